"""Multi-head attention with GQA and RoPE: projections here, the attention itself from
`parallel/attention.py` (training: the kernel on each device's shard) or `ops` (decoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.layers import RMSNorm, residual_init, weight_init
from gigajax.model.lora import project
from gigajax.model.rope import apply_rope
from gigajax.ops.attention import reference_attention
from gigajax.parallel.attention import attention_on_mesh
from gigajax.parallel.shardings import param


class Attention(nnx.Module):
    """Projections q [D,H,E], k/v [D,K,E], o [H,E,D] (optional q/k/v biases and per-head q/k
    RMSNorms, LoRA adapters: `model/lora.py`); RoPE on q and k at global positions."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        init, out_init = weight_init(cfg), residual_init(cfg)
        self.wq = param(rngs, init, (D, H, E), ("embed", "heads", "head_dim"))
        self.wk = param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, init, (D, K, E), ("embed", "kv_heads", "head_dim"))
        self.wo = param(rngs, out_init, (H, E, D), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:  # Qwen2
            zeros = nnx.initializers.zeros
            self.bq = param(rngs, zeros, (H, E), ("heads", "head_dim"))
            self.bk = param(rngs, zeros, (K, E), ("kv_heads", "head_dim"))
            self.bv = param(rngs, zeros, (K, E), ("kv_heads", "head_dim"))
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's E dims of q and k, before RoPE
            self.q_norm = RMSNorm(E, cfg.norm_eps, rngs=rngs, names=("head_dim",))
            self.k_norm = RMSNorm(E, cfg.norm_eps, rngs=rngs, names=("head_dim",))
        self.cfg = cfg

    def __call__(self, x_BTD: jnp.ndarray, cos_BTE: jnp.ndarray, sin_BTE: jnp.ndarray,
                 positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None,
                 dropout_key: jax.Array | None = None) -> jnp.ndarray:
        """Causal attention over the tokens in order: the reference, XLA and cuDNN kernels mask
        by token index (native causal flags), the blockwise kernel and the ring by
        `positions_BT`; the two agree because positions increase within each segment.
        `dropout_key`: LoRA dropout (training only).
        """
        q_BTHE, k_BTKE, v_BTKE = self._qkv(x_BTD, cos_BTE, sin_BTE, dropout_key)
        out_BTHE = attention_on_mesh(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT,
                                     self.cfg)
        return self._out(out_BTHE, dropout_key)

    def _out(self, out_BTHE, dropout_key=None):
        """The output projection o [H,E,D] (and its adapter)."""
        return project(self, "wo", "BTHE,HED->BTD", out_BTHE, dropout_key)

    def _qkv(self, x_BTD, cos_BTE, sin_BTE, dropout_key=None):
        """q, k, v of the tokens, q and k rotated by RoPE at their positions."""
        dtype = x_BTD.dtype
        q_BTHE = project(self, "wq", "BTD,DHE->BTHE", x_BTD, dropout_key)
        k_BTKE = project(self, "wk", "BTD,DKE->BTKE", x_BTD, dropout_key)
        v_BTKE = project(self, "wv", "BTD,DKE->BTKE", x_BTD, dropout_key)
        if self.cfg.qkv_bias:
            q_BTHE = q_BTHE + self.bq[...].astype(dtype)
            k_BTKE = k_BTKE + self.bk[...].astype(dtype)
            v_BTKE = v_BTKE + self.bv[...].astype(dtype)
        if self.cfg.qk_norm:
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        return apply_rope(q_BTHE, cos_BTE, sin_BTE), apply_rope(k_BTKE, cos_BTE, sin_BTE), v_BTKE

    def decode(self, x_BTD, cos_BTE, sin_BTE, positions_BT, k_BSKE, v_BSKE, index, start_B):
        """Attention of T new tokens at cache slots [index, index+T) over the cache; row b's
        slot j holds position j - start_B[b], and its slots before start_B[b] (left padding)
        are masked. Returns (output, updated k cache, updated v cache)."""
        q_BTHE, k_BTKE, v_BTKE = self._qkv(x_BTD, cos_BTE, sin_BTE)
        k_BSKE = jax.lax.dynamic_update_slice(k_BSKE, k_BTKE.astype(k_BSKE.dtype),
                                              (0, index, 0, 0))
        v_BSKE = jax.lax.dynamic_update_slice(v_BSKE, v_BTKE.astype(v_BSKE.dtype),
                                              (0, index, 0, 0))
        S = k_BSKE.shape[1]
        slots_1S = jnp.arange(S)[None]
        filled_BS = ((slots_1S >= start_B[:, None])  # 0: padding or an empty slot
                     & (slots_1S < index + x_BTD.shape[1])).astype(jnp.int32)
        out_BTHE, _ = reference_attention(
            q_BTHE, k_BSKE, v_BSKE, q_positions=positions_BT,
            kv_positions=slots_1S - start_B[:, None],
            q_segment_ids=jnp.ones(positions_BT.shape, jnp.int32), kv_segment_ids=filled_BS,
            sliding_window=self.cfg.sliding_window or None)
        return self._out(out_BTHE), k_BSKE, v_BSKE
