"""One transformer block: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x)), the MLP a dense
SwiGLU or a mixture of experts (`model/moe.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.attention import Attention
from gigajax.model.layers import RMSNorm
from gigajax.model.mlp import SwiGLU
from gigajax.model.moe import MoE, MoEStats
from gigajax.parallel.shardings import constrain


class Block(nnx.Module):
    """Pre-norm decoder block; `moe`: routed experts in place of the dense MLP."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs) if moe else SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_BTD: jnp.ndarray, cos_BTE: jnp.ndarray, sin_BTE: jnp.ndarray,
                 positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None,
                 dropout_key: jax.Array | None = None) -> tuple[jnp.ndarray, MoEStats | None]:
        """The block's output, and its MoE statistics (None for a dense MLP); `dropout_key`
        drives LoRA dropout (training only; each adapter folds in its own salt)."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_BTE, sin_BTE, positions_BT,
                                  segment_ids_BT, dropout_key)
        mlp_BTD, stats = self._mlp(self.mlp_norm(x_BTD), dropout_key)
        return constrain(x_BTD + mlp_BTD, ("batch", "seq", "embed")), stats

    def decode(self, x_BTD, cos_BTE, sin_BTE, positions_BT, k_BSKE, v_BSKE, index, start_B):
        """The block on new tokens with a KV cache (generation); returns (x, k, v)."""
        attn_BTD, k_BSKE, v_BSKE = self.attn.decode(self.attn_norm(x_BTD), cos_BTE, sin_BTE,
                                                    positions_BT, k_BSKE, v_BSKE, index,
                                                    start_B)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self._mlp(self.mlp_norm(x_BTD))[0], k_BSKE, v_BSKE

    def _mlp(self, h_BTD: jnp.ndarray, dropout_key: jax.Array | None = None
             ) -> tuple[jnp.ndarray, MoEStats | None]:
        if isinstance(self.mlp, MoE):
            return self.mlp(h_BTD)
        return self.mlp(h_BTD, dropout_key), None
