"""A mixture-of-experts MLP (DeepSeekMoE, Dai et al. 2024): a router sends each token to its
top-k of X fine-grained SwiGLU experts, and shared experts (one SwiGLU as wide as all of them)
see every token. The block's output is shared(x) + sum_k w_k expert_k(x).

The layer returns its statistics beside its output (`MoEStats`: the auxiliary losses, each
expert's load, the dropped share), so the loss adds them without the model knowing the train
step. The router runs in float32; its balancing bias (DeepSeek-V3's auxiliary-loss-free
balancing) is a `RoutingBias` variable, not a parameter: no gradient reaches it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.layers import residual_init, weight_init
from gigajax.model.mlp import SwiGLU
from gigajax.ops import moe_dispatch
from gigajax.parallel.shardings import param


class RoutingBias(nnx.Variable):
    """Per-expert routing bias [X]: moves the top-k choice only, updated outside the gradient
    (`ops.moe_dispatch.balance_bias_update`)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEStats:
    """One MoE layer's statistics on a batch: float32 scalars, and the load [X]."""

    load_balance_loss: jax.Array  # Switch/GShard auxiliary loss, 1 when balanced
    router_z_loss: jax.Array  # mean logsumexp(router logits)^2
    load_X: jax.Array  # share of the T*K assignments each expert got
    dropped_fraction: jax.Array  # share of assignments over capacity (0 when dropless)


class MoE(nnx.Module):
    """Router [D, X], routed experts gate/up [X, D, F] and down [X, F, D], shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe = cfg.moe
        D, X = cfg.d_model, moe.n_routed_experts
        F = moe.expert_mlp_dim or cfg.mlp_dim
        init, out_init = weight_init(cfg), residual_init(cfg)
        self.moe = moe
        self.router = param(rngs, init, (D, X), ("embed", None))
        self.w_gate = param(rngs, init, (X, D, F), ("expert", "embed", "mlp"))
        self.w_up = param(rngs, init, (X, D, F), ("expert", "embed", "mlp"))
        self.w_down = param(rngs, out_init, (X, F, D), ("expert", "mlp", "embed"))
        self.routing_bias = RoutingBias(jnp.zeros((X,), jnp.float32))
        self.shared = (SwiGLU(dataclasses.replace(cfg, mlp_dim=moe.n_shared_experts * F),
                              rngs=rngs) if moe.n_shared_experts else None)

    def __call__(self, x_BTD: jnp.ndarray) -> tuple[jnp.ndarray, MoEStats]:
        """The layer's output [B, T, D] (x's dtype) and its statistics."""
        moe = self.moe
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NX = jnp.einsum("ND,DX->NX", x_ND.astype(jnp.float32), self.router[...])
        weights_NK, experts_NK, scores_NX = moe_dispatch.route(
            logits_NX, moe.top_k, moe.score, moe.renormalize, self.routing_bias[...])
        experts = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if moe.dispatch == "ragged":
            y_ND = moe_dispatch.ragged_experts(x_ND, weights_NK, experts_NK, *experts)
            dropped = jnp.zeros((), jnp.int32)
        else:
            capacity = moe_dispatch.expert_capacity(B * T, moe.top_k, moe.n_routed_experts,
                                                    moe.capacity_factor)
            y_ND, dropped = moe_dispatch.capacity_experts(x_ND, weights_NK, experts_NK,
                                                          *experts, capacity)
        y_BTD = y_ND.reshape(B, T, D)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        stats = MoEStats(
            load_balance_loss=moe_dispatch.load_balance_loss(scores_NX, experts_NK),
            router_z_loss=moe_dispatch.router_z_loss(logits_NX),
            load_X=moe_dispatch.expert_load(experts_NK, moe.n_routed_experts),
            dropped_fraction=dropped.astype(jnp.float32) / experts_NK.size)
        return y_BTD, stats
