"""Multi-head attention with GQA and RoPE; the attention itself is a pure op from `gigajax.ops`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from gigajax.config import ModelConfig
from gigajax.model.init import residual_init, weight_init
from gigajax.model.rope import apply_rope
from gigajax.ops.attention import dot_product_attention
from gigajax.sharding import current_activation_rules, param


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
        out_BTHE = attention_on_mesh(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, cfg)
        return jnp.einsum("BTHE,HED->BTD", out_BTHE, self.wo[...].astype(dtype))


def attention_on_mesh(q_BTHE: jnp.ndarray, k_BSKE: jnp.ndarray, v_BSKE: jnp.ndarray,
                      segment_ids_BT: jnp.ndarray | None, cfg: ModelConfig) -> jnp.ndarray:
    """Causal attention, each device running the kernel on its own batch rows and heads.

    Under a mesh the kernel runs inside `jax.shard_map`, split like the activation rules say
    (batch over data x fsdp, heads over tensor), so no attention op is left for GSPMD to guess.
    When KV heads are replicated over `tensor` (fewer than its size), each device slices the one
    KV head that its query heads share.
    """
    def kernel(q, k, v, segment_ids):
        return dot_product_attention(
            q, k, v, impl=cfg.attention_impl, causal=True, q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids, sliding_window=cfg.sliding_window or None,
            block_q=cfg.block_q, block_kv=cfg.block_kv)

    if jax.sharding.get_abstract_mesh().empty:
        return kernel(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
    rules = current_activation_rules()
    batch, heads, kv_heads = rules.get("batch"), rules.get("heads"), rules.get("kv_heads")
    group = cfg.n_heads // cfg.n_kv_heads

    def local(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT):
        if heads is not None and kv_heads is None:  # KV replicated: take our query heads' one
            first = jax.lax.axis_index(heads) * q_BTHE.shape[2] // group
            k_BSKE = jax.lax.dynamic_slice_in_dim(k_BSKE, first, 1, axis=2)
            v_BSKE = jax.lax.dynamic_slice_in_dim(v_BSKE, first, 1, axis=2)
        return kernel(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)

    q_spec = PartitionSpec(batch, None, heads, None)
    kv_spec = PartitionSpec(batch, None, kv_heads, None)
    seg_spec = PartitionSpec(batch, None)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec)(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
