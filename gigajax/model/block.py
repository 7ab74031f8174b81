"""One transformer block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.attention import Attention
from gigajax.model.init import residual_init, weight_init
from gigajax.sharding import constrain, param


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), statistics in float32."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",))
        self.eps = eps

    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTD.dtype)


class SwiGLU(nnx.Module):
    """Gated MLP (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_dim
        init, out_init = weight_init(cfg), residual_init(cfg)
        self.w_gate = param(rngs, init, (D, F), ("embed", "mlp"))
        self.w_up = param(rngs, init, (D, F), ("embed", "mlp"))
        self.w_down = param(rngs, out_init, (F, D), ("mlp", "embed"))

    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        dtype = x_BTD.dtype
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.w_gate[...].astype(dtype))
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.w_up[...].astype(dtype))
        hidden_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "inner_seq", "mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden_BTF, self.w_down[...].astype(dtype))


class Block(nnx.Module):
    """Pre-norm decoder block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_BTD: jnp.ndarray, cos_BTE: jnp.ndarray, sin_BTE: jnp.ndarray,
                 positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None) -> jnp.ndarray:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_BTE, sin_BTE, positions_BT,
                                  segment_ids_BT)
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, ("batch", "seq", "embed"))

    def decode(self, x_BTD, cos_BTE, sin_BTE, positions_BT, k_BSKE, v_BSKE, index):
        """The block on new tokens with a KV cache (generation); returns (x, k, v)."""
        attn_BTD, k_BSKE, v_BSKE = self.attn.decode(self.attn_norm(x_BTD), cos_BTE, sin_BTE,
                                                    positions_BT, k_BSKE, v_BSKE, index)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), k_BSKE, v_BSKE
