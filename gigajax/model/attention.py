"""Multi-head attention with GQA and RoPE; the attention itself is a pure op from `gigajax.ops`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.init import residual_init, weight_init
from gigajax.model.rope import apply_rope
from gigajax.ops.attention import dot_product_attention
from gigajax.sharding import param


class Attention(nnx.Module):
    """Projections q [D,H,E], k/v [D,K,E], o [H,E,D]; RoPE on q and k at global positions."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        init, out_init = weight_init(cfg), residual_init(cfg)
        self.wq = param(rngs, init, (D, H, E), ("embed", "heads", "head_dim"))
        self.wk = param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"))
        self.wo = param(rngs, out_init, (H, E, D), ("heads", "head_dim", "embed"))
        self.cfg = cfg

    def __call__(self, x_BTD: jnp.ndarray, cos_BTE: jnp.ndarray, sin_BTE: jnp.ndarray,
                 segment_ids_BT: jnp.ndarray | None) -> jnp.ndarray:
        """Causal mask by token index: within a packed document index order is position order
        (positions live only in the RoPE tables), which lets jax.nn/cuDNN use native causal flags.
        """
        cfg, dtype = self.cfg, x_BTD.dtype
        q_BTHE = jnp.einsum("BTD,DHE->BTHE", x_BTD, self.wq[...].astype(dtype))
        k_BTKE = jnp.einsum("BTD,DKE->BTKE", x_BTD, self.wk[...].astype(dtype))
        v_BTKE = jnp.einsum("BTD,DKE->BTKE", x_BTD, self.wv[...].astype(dtype))
        q_BTHE = apply_rope(q_BTHE, cos_BTE, sin_BTE)
        k_BTKE = apply_rope(k_BTKE, cos_BTE, sin_BTE)
        out_BTHE = dot_product_attention(
            q_BTHE, k_BTKE, v_BTKE, impl=cfg.attention_impl, causal=True,
            q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT,
            sliding_window=cfg.sliding_window or None, block_q=cfg.block_q, block_kv=cfg.block_kv)
        return jnp.einsum("BTHE,HED->BTD", out_BTHE, self.wo[...].astype(dtype))
