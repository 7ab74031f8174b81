"""Mixture-of-experts routing and dispatch: pure functions on arrays, no Flax and no config.

Shapes: T tokens (any leading dims flattened), D model width, X experts, K experts per token
(top-k), F an expert's hidden width, C an expert's capacity (capacity dispatch only).

- `route`: the router's top-k experts per token and their gate weights (softmax or sigmoid
  scores; DeepSeek-V3's balancing bias moves the choice, never the weights).
- `ragged_experts`: dropless dispatch. The T*K (token, expert) assignments are sorted by expert
  and each expert's rows multiplied by its weights in one grouped matmul (`jax.lax.ragged_dot`).
- `capacity_experts`: GShard's dispatch (Lepikhin et al. 2020) with fixed shapes: each expert
  takes at most C assignments, first choices first, the rest are dropped and counted.
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
    gradient; [X] float32."""
    return bias_X + rate * jnp.sign(jnp.mean(load_X) - load_X)
