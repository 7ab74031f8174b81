"""Experts on the mesh: the shard_map that sends each token to the devices holding its experts
(expert parallelism over the `expert` axis) and brings the results back.

Model code calls `experts_on_mesh` with the routing already made and no collectives; this module
is the one place where the experts' sharding is spelled out, and `ops/moe_dispatch.py` holds the
all-to-all that is the algorithm. Without an `expert` axis each device runs its own tokens
through all the experts; on one device (no mesh) the experts are plain array code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gigajax.ops import moe_dispatch
from gigajax.parallel.shardings import current_activation_rules


def experts_on_mesh(x_BTD: jnp.ndarray, weights_BTK: jnp.ndarray, experts_BTK: jnp.ndarray,
                    w_gate_XDF: jnp.ndarray, w_up_XDF: jnp.ndarray, w_down_XFD: jnp.ndarray,
                    dispatch: str, capacity_factor: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum_k weights * expert_k(x) [B, T, D] in x's dtype, assignments dropped (int32 scalar)).

    `dispatch` ragged (dropless) or capacity (GShard: each expert takes at most
    ceil(capacity_factor * T * K / X) assignments of the T tokens dispatched together). Under an
    `expert` axis of size E the tokens (split over data x fsdp x expert and the sequence axes)
    are dispatched per device: each device's assignments go by all-to-all over `expert` to the
    devices holding their experts (X / E each), whose F dim may be split over `tensor` (the
    partial sums are added over it), so the ragged result equals one device's. Capacity
    dispatch then counts T as the device's tokens, so which assignments drop depends on E.

    Dropless dispatch runs inside shard_map on every mesh: left to GSPMD, the sort over the
    global batch's assignments is not split, and every device would run every token's experts.
    Capacity dispatch without `expert` stays array code over the global batch, whose slots are
    one device's.
    """
    mesh = jax.sharding.get_abstract_mesh()
    expert_parallel = not mesh.empty and dict(mesh.shape).get("expert", 1) > 1
    if mesh.empty or (dispatch == "capacity" and not expert_parallel):
        return _experts_together(x_BTD, weights_BTK, experts_BTK, w_gate_XDF, w_up_XDF,
                                 w_down_XFD, dispatch, capacity_factor)
    rules = current_activation_rules()
    batch, seq, mlp = rules.get("batch"), rules.get("inner_seq"), rules.get("mlp")
    token_axes = tuple(a for axes in (batch, seq) for a in ((axes,) if isinstance(axes, str)
                                                           else axes or ()))

    def local(x_BTD, weights_BTK, experts_BTK, w_gate_LDF, w_up_LDF, w_down_LFD):
        B, T, D = x_BTD.shape
        K = experts_BTK.shape[-1]
        x_TD, weights_TK, experts_TK = (x_BTD.reshape(B * T, D), weights_BTK.reshape(B * T, K),
                                        experts_BTK.reshape(B * T, K))
        if dispatch == "ragged":
            experts = (x_TD, weights_TK, experts_TK, w_gate_LDF, w_up_LDF, w_down_LFD)
            y_TD = (moe_dispatch.all_to_all_ragged_experts(*experts, "expert") if expert_parallel
                    else moe_dispatch.ragged_experts(*experts))
            dropped = jnp.zeros((), jnp.int32)
        else:  # every device's drops, counted once
            X = w_gate_LDF.shape[0] * jax.lax.axis_size("expert")
            capacity = moe_dispatch.expert_capacity(B * T, K, X, capacity_factor)
            y_TD, dropped = moe_dispatch.all_to_all_capacity_experts(
                x_TD, weights_TK, experts_TK, w_gate_LDF, w_up_LDF, w_down_LFD, capacity,
                "expert")
            dropped = jax.lax.psum(dropped, token_axes)
        if mlp is not None:  # each tensor shard ran its slice of every expert's hidden dim
            y_TD = jax.lax.psum(y_TD, mlp)
        return y_TD.reshape(B, T, D), dropped

    tokens = PartitionSpec(batch, seq, None)
    in_proj, out_proj = PartitionSpec("expert", None, mlp), PartitionSpec("expert", mlp, None)
    return jax.shard_map(
        local, in_specs=(tokens, tokens, tokens, in_proj, in_proj, out_proj),
        out_specs=(tokens, PartitionSpec()))(
            x_BTD, weights_BTK, experts_BTK, w_gate_XDF, w_up_XDF, w_down_XFD)


def _experts_together(x_BTD, weights_BTK, experts_BTK, w_gate_XDF, w_up_XDF, w_down_XFD,
                      dispatch, capacity_factor):
    """The experts as array code over all B*T tokens at once (one device, or GSPMD's split)."""
    B, T, D = x_BTD.shape
    K = experts_BTK.shape[-1]
    args = (x_BTD.reshape(B * T, D), weights_BTK.reshape(B * T, K), experts_BTK.reshape(B * T, K),
            w_gate_XDF, w_up_XDF, w_down_XFD)
    if dispatch == "ragged":
        return moe_dispatch.ragged_experts(*args).reshape(B, T, D), jnp.zeros((), jnp.int32)
    capacity = moe_dispatch.expert_capacity(B * T, K, w_gate_XDF.shape[0], capacity_factor)
    y_TD, dropped = moe_dispatch.capacity_experts(*args, capacity)
    return y_TD.reshape(B, T, D), dropped
