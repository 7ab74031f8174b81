"""One transformer block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.attention import Attention
from gigajax.model.layers import RMSNorm
from gigajax.model.mlp import SwiGLU
from gigajax.parallel.shardings import constrain


class Block(nnx.Module):
    """Pre-norm decoder block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_BTD: jnp.ndarray, cos_BTE: jnp.ndarray, sin_BTE: jnp.ndarray,
                 positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None,
                 dropout_key: jax.Array | None = None) -> jnp.ndarray:
        """The block; `dropout_key` drives LoRA dropout (training only; each adapter folds in
        its own salt)."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_BTE, sin_BTE, positions_BT,
                                  segment_ids_BT, dropout_key)
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD), dropout_key)
        return constrain(x_BTD, ("batch", "seq", "embed"))

    def decode(self, x_BTD, cos_BTE, sin_BTE, positions_BT, k_BSKE, v_BSKE, index, start_B):
        """The block on new tokens with a KV cache (generation); returns (x, k, v)."""
        attn_BTD, k_BSKE, v_BSKE = self.attn.decode(self.attn_norm(x_BTD), cos_BTE, sin_BTE,
                                                    positions_BT, k_BSKE, v_BSKE, index,
                                                    start_B)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), k_BSKE, v_BSKE
