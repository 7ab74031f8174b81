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
from gigajax.parallel.moe import experts_on_mesh
from gigajax.parallel.shardings import param

ROUTING_BIAS = "routing_bias"  # MoE's attribute: checkpoints and the train step find it by name


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
        # replicated (X floats); the attribute is named ROUTING_BIAS
        self.routing_bias = RoutingBias(jnp.zeros((X,), jnp.float32), out_sharding=(None,),
                                        eager_sharding=False)
        self.shared = (SwiGLU(dataclasses.replace(cfg, mlp_dim=moe.n_shared_experts * F),
                              rngs=rngs) if moe.n_shared_experts else None)

    def __call__(self, x_BTD: jnp.ndarray) -> tuple[jnp.ndarray, MoEStats]:
        """The layer's output [B, T, D] (x's dtype) and its statistics."""
        moe = self.moe
        logits_BTX = jnp.einsum("BTD,DX->BTX", x_BTD.astype(jnp.float32), self.router[...])
        weights_BTK, experts_BTK, scores_BTX = moe_dispatch.route(
            logits_BTX, moe.top_k, moe.score, moe.renormalize, self.routing_bias[...])
        y_BTD, dropped = experts_on_mesh(x_BTD, weights_BTK, experts_BTK, self.w_gate[...],
                                         self.w_up[...], self.w_down[...], moe.dispatch,
                                         moe.capacity_factor)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        X, K = moe.n_routed_experts, moe.top_k
        scores_NX, experts_NK = scores_BTX.reshape(-1, X), experts_BTK.reshape(-1, K)
        stats = MoEStats(
            load_balance_loss=moe_dispatch.load_balance_loss(scores_NX, experts_NK),
            router_z_loss=moe_dispatch.router_z_loss(logits_BTX.reshape(-1, X)),
            load_X=moe_dispatch.expert_load(experts_NK, X),
            dropped_fraction=dropped.astype(jnp.float32) / experts_NK.size)
        return y_BTD, stats
