"""Mixture-of-experts routing and dispatch: pure functions on arrays, no Flax and no config.

Shapes: T tokens (any leading dims flattened), D model width, X experts, K experts per token
(top-k), F an expert's hidden width, C an expert's capacity (capacity dispatch only).

- `route`: the router's top-k experts per token and their gate weights (softmax or sigmoid
  scores; DeepSeek-V3's balancing bias moves the choice, never the weights).
- `ragged_experts`: dropless dispatch. The T*K (token, expert) assignments are sorted by expert
  and each expert's rows multiplied by its weights in one grouped matmul (`jax.lax.ragged_dot`).
- `capacity_experts`: GShard's dispatch (Lepikhin et al. 2020) with fixed shapes: each expert
  takes at most C assignments, first choices first, the rest are dropped and counted.
- `all_to_all_ragged_experts`, `all_to_all_capacity_experts`: the same two inside
  `shard_map`, each device holding L = X / E of the experts of an `expert` axis of E devices:
  assignments travel to their expert's device by all-to-all and come back the same way.
- `load_balance_loss` (Switch/GShard), `router_z_loss` (ST-MoE), `expert_load` and
  `balance_bias_update` (DeepSeek-V3's auxiliary-loss-free balancing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
ROUTER_SCORES = ("softmax", "sigmoid")


def route(logits_TX: Array, top_k: int, score: str = "softmax", renormalize: bool = True,
          bias_X: Array | None = None) -> tuple[Array, Array, Array]:
    """(weights [T, K] float32, experts [T, K] int32, scores [T, X] float32) of router logits.

    `score` softmax (Mixtral, Qwen-MoE, DeepSeekMoE) or sigmoid (DeepSeek-V3) turns logits into
    per-expert scores; the top-k of scores + `bias_X` are chosen, and their unbiased scores are
    the weights, divided by their sum when `renormalize`.
    """
    if score not in ROUTER_SCORES:
        raise ValueError(f"router score {score!r}: choose one of {ROUTER_SCORES}")
    logits_TX = logits_TX.astype(jnp.float32)
    scores_TX = jax.nn.softmax(logits_TX, -1) if score == "softmax" else jax.nn.sigmoid(logits_TX)
    choice_TX = scores_TX if bias_X is None else scores_TX + bias_X.astype(jnp.float32)
    _, experts_TK = jax.lax.top_k(jax.lax.stop_gradient(choice_TX), top_k)
    weights_TK = jnp.take_along_axis(scores_TX, experts_TK, axis=-1)
    if renormalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, -1, keepdims=True)
    return weights_TK, experts_TK.astype(jnp.int32), scores_TX


def swiglu_experts(x_ND: Array, w_gate_XDF: Array, w_up_XDF: Array, w_down_XFD: Array,
                   group_sizes_X: Array) -> Array:
    """SwiGLU of rows sorted by expert: rows [offset_x, offset_x + group_sizes_X[x]) through
    expert x (`jax.lax.ragged_dot`); [N, D] in, [N, D] out, in x's dtype."""
    dtype = x_ND.dtype
    gate_NF = jax.lax.ragged_dot(x_ND, w_gate_XDF.astype(dtype), group_sizes_X)
    up_NF = jax.lax.ragged_dot(x_ND, w_up_XDF.astype(dtype), group_sizes_X)
    return jax.lax.ragged_dot(jax.nn.silu(gate_NF) * up_NF, w_down_XFD.astype(dtype),
                              group_sizes_X)


def ragged_experts(x_TD: Array, weights_TK: Array, experts_TK: Array, w_gate_XDF: Array,
                   w_up_XDF: Array, w_down_XFD: Array) -> Array:
    """Dropless MoE: sum_k weights[t, k] * SwiGLU_{experts[t, k]}(x[t]), [T, D] in x's dtype.

    The T*K assignments are sorted by expert (stable: token order within an expert), gathered,
    multiplied group by group, scattered back and weighted: no token is ever dropped.
    """
    T, K = experts_TK.shape
    X = w_gate_XDF.shape[0]
    flat_N = experts_TK.reshape(-1)  # N = T*K assignments, token-major
    order_N = jnp.argsort(flat_N, stable=True)
    group_sizes_X = jnp.bincount(flat_N, length=X).astype(jnp.int32)
    y_sorted_ND = swiglu_experts(x_TD[order_N // K], w_gate_XDF, w_up_XDF, w_down_XFD,
                                 group_sizes_X)
    y_TKD = jnp.zeros_like(y_sorted_ND).at[order_N].set(y_sorted_ND).reshape(T, K, -1)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK.astype(x_TD.dtype))


def expert_capacity(tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Assignments each expert takes in capacity dispatch: ceil(factor * T * K / X), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / n_experts))


def capacity_dispatch(experts_TK: Array, n_experts: int, capacity: int) -> tuple[Array, Array]:
    """GShard's dispatch mask [T, K, X, C] (assignment (t, k) sits in slot c of expert x) and the
    number of assignments dropped. Slots fill first choices first (all k=0, then k=1, ...),
    in token order within a choice; an expert's assignments past `capacity` are dropped."""
    T, K = experts_TK.shape
    chosen_KTX = jax.nn.one_hot(experts_TK.T, n_experts, dtype=jnp.int32)
    slot_KTX = jnp.cumsum(chosen_KTX.reshape(K * T, n_experts), 0).reshape(K, T, -1) - 1
    kept_KTX = chosen_KTX * (slot_KTX < capacity)
    dispatch_KTXC = kept_KTX[..., None] * jax.nn.one_hot(slot_KTX, capacity, dtype=jnp.int32)
    dropped = jnp.sum(chosen_KTX) - jnp.sum(kept_KTX)
    return jnp.transpose(dispatch_KTXC, (1, 0, 2, 3)), dropped


def capacity_experts(x_TD: Array, weights_TK: Array, experts_TK: Array, w_gate_XDF: Array,
                     w_up_XDF: Array, w_down_XFD: Array, capacity: int) -> tuple[Array, Array]:
    """MoE with fixed shapes (GShard einsums): ([T, D] output in x's dtype, assignments dropped).

    Each expert runs on its C slots [X, C, D]; a dropped assignment adds nothing to its token
    (the residual stream carries the token past this layer)."""
    dtype = x_TD.dtype
    dispatch_TKXC, dropped = capacity_dispatch(experts_TK, w_gate_XDF.shape[0], capacity)
    dispatch_TKXC = dispatch_TKXC.astype(dtype)
    x_XCD = jnp.einsum("TKXC,TD->XCD", dispatch_TKXC, x_TD)
    gate_XCF = jnp.einsum("XCD,XDF->XCF", x_XCD, w_gate_XDF.astype(dtype))
    up_XCF = jnp.einsum("XCD,XDF->XCF", x_XCD, w_up_XDF.astype(dtype))
    y_XCD = jnp.einsum("XCF,XFD->XCD", jax.nn.silu(gate_XCF) * up_XCF, w_down_XFD.astype(dtype))
    combine_TKXC = dispatch_TKXC * weights_TK.astype(dtype)[..., None, None]
    return jnp.einsum("TKXC,XCD->TD", combine_TKXC, y_XCD), dropped


def _exchange(x_E: Array, axis_name: str) -> Array:
    """Block e of x_E [E, ...] to device e of `axis_name`; block s of the result came from s."""
    return jax.lax.all_to_all(x_E, axis_name, 0, 0, tiled=True)


def all_to_all_ragged_experts(x_TD: Array, weights_TK: Array, experts_TK: Array,
                              w_gate_LDF: Array, w_up_LDF: Array, w_down_LFD: Array,
                              axis_name: str) -> Array:
    """Dropless MoE across the E devices of `axis_name` (inside shard_map), [T, D] out.

    This device holds tokens x_TD and experts [e*L, (e+1)*L) (e its index on the axis). Its
    T*K = N assignments are sorted by expert and packed per destination device into a buffer
    [E, N, D] (N rows each: dropless whatever the routing, at E times the memory of the tokens);
    one all-to-all delivers them, each device runs its experts on what it received (grouped
    matmul over the rows sorted by local expert, padding rows in no group), and a second
    all-to-all returns the results to their tokens. With `tensor`, the weights' F dim may be a
    shard: the result is then a partial sum the caller adds over `tensor`.
    """
    T, K = experts_TK.shape
    L, D = w_gate_LDF.shape[0], x_TD.shape[-1]
    E = jax.lax.axis_size(axis_name)
    N = T * K
    flat_N = experts_TK.reshape(-1)  # token-major assignments
    device_N, local_N = flat_N // L, flat_N % L
    order_N = jnp.argsort(flat_N, stable=True)  # by device, then local expert, then token
    per_device_E = jnp.zeros((E,), jnp.int32).at[device_N].add(1)
    first_E = jnp.cumsum(per_device_E) - per_device_E
    slot_N = jnp.zeros((N,), jnp.int32).at[order_N].set(
        jnp.arange(N, dtype=jnp.int32) - first_E[device_N[order_N]])  # row in its device's block
    send_END = jnp.zeros((E, N, D), x_TD.dtype).at[device_N, slot_N].set(x_TD[jnp.arange(N) // K])
    send_EN = jnp.full((E, N), L, jnp.int32).at[device_N, slot_N].set(local_N)  # L: padding
    rows_MD = _exchange(send_END, axis_name).reshape(E * N, D)  # M = E*N rows received
    local_M = _exchange(send_EN, axis_name).reshape(E * N)
    by_expert_M = jnp.argsort(local_M, stable=True)  # padding (L) last, in no group
    group_sizes_L = jnp.sum(local_M[:, None] == jnp.arange(L), 0).astype(jnp.int32)
    y_sorted_MD = swiglu_experts(rows_MD[by_expert_M], w_gate_LDF, w_up_LDF, w_down_LFD,
                                 group_sizes_L)
    y_MD = jnp.zeros_like(y_sorted_MD).at[by_expert_M].set(y_sorted_MD)
    back_END = _exchange(y_MD.reshape(E, N, D), axis_name)  # block e: what device e computed
    y_TKD = back_END[device_N, slot_N].reshape(T, K, D)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK.astype(x_TD.dtype))


def all_to_all_capacity_experts(x_TD: Array, weights_TK: Array, experts_TK: Array,
                                w_gate_LDF: Array, w_up_LDF: Array, w_down_LFD: Array,
                                capacity: int, axis_name: str) -> tuple[Array, Array]:
    """GShard's expert-parallel MoE (inside shard_map): ([T, D] out, assignments dropped here).

    Each device fills C = `capacity` slots per expert from its own tokens (`capacity_dispatch`:
    the capacity is per device, so drops depend on how tokens are spread, unlike one device's
    global slots), sends expert e's slots [X, C, D] to the device holding e by one all-to-all
    ([L, E*C, D] arrive), runs its L experts and returns the slots by a second all-to-all.
    """
    dtype = x_TD.dtype
    L, D = w_gate_LDF.shape[0], x_TD.shape[-1]
    E = jax.lax.axis_size(axis_name)
    dispatch_TKXC, dropped = capacity_dispatch(experts_TK, E * L, capacity)
    dispatch_TKXC = dispatch_TKXC.astype(dtype)
    x_ELCD = jnp.einsum("TKXC,TD->XCD", dispatch_TKXC, x_TD).reshape(E, L, capacity, D)
    x_LSD = jnp.swapaxes(_exchange(x_ELCD, axis_name), 0, 1).reshape(L, E * capacity, D)
    gate_LSF = jnp.einsum("LSD,LDF->LSF", x_LSD, w_gate_LDF.astype(dtype))
    up_LSF = jnp.einsum("LSD,LDF->LSF", x_LSD, w_up_LDF.astype(dtype))
    y_LSD = jnp.einsum("LSF,LFD->LSD", jax.nn.silu(gate_LSF) * up_LSF, w_down_LFD.astype(dtype))
    y_ELCD = jnp.swapaxes(y_LSD.reshape(L, E, capacity, D), 0, 1)
    y_XCD = _exchange(y_ELCD, axis_name).reshape(E * L, capacity, D)
    combine_TKXC = dispatch_TKXC * weights_TK.astype(dtype)[..., None, None]
    return jnp.einsum("TKXC,XCD->TD", combine_TKXC, y_XCD), dropped


def expert_load(experts_TK: Array, n_experts: int) -> Array:
    """The share of the T*K assignments each expert got, [X] float32 (sums to 1)."""
    counts_X = jnp.bincount(experts_TK.reshape(-1), length=n_experts)
    return counts_X.astype(jnp.float32) / experts_TK.size


def load_balance_loss(scores_TX: Array, experts_TK: Array) -> Array:
    """Switch/GShard auxiliary loss X * sum_x load_x * mean_t p_tx (Fedus et al. 2021), p the
    router's probabilities (scores normalised per token): 1 when routing is uniform; its
    gradient reaches the router through p only (the load is a count)."""
    X = scores_TX.shape[-1]
    probs_TX = scores_TX / jnp.sum(scores_TX, -1, keepdims=True)
    load_X = jax.lax.stop_gradient(expert_load(experts_TK, X))
    return X * jnp.sum(load_X * jnp.mean(probs_TX, 0))


def router_z_loss(logits_TX: Array) -> Array:
    """ST-MoE's router z-loss (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TX.astype(jnp.float32), -1)))


def balance_bias_update(bias_X: Array, load_X: Array, rate: float) -> Array:
    """DeepSeek-V3's auxiliary-loss-free balancing: each expert's routing bias moves by `rate`
    towards balance (down when it had more than the mean load, up when less), outside the
    gradient; [..., X] float32 (leading dims: layers, each balanced on its own)."""
    return bias_X + rate * jnp.sign(jnp.mean(load_X, -1, keepdims=True) - load_X)
