"""Multi-head attention with GQA and RoPE; the attention itself is a pure op from `gigajax.ops`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from gigajax.config import ModelConfig
from gigajax.model.init import residual_init, weight_init
from gigajax.model.rope import apply_rope
from gigajax.ops.attention import dot_product_attention, reference_attention
from gigajax.ops.ring import ring_attention
from gigajax.ops.ulysses import ulysses_attention
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
                 positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None) -> jnp.ndarray:
        """Causal attention over the tokens in order: the reference, XLA and cuDNN kernels mask
        by token index (native causal flags), the blockwise kernel and the ring by
        `positions_BT`; the two agree because positions increase within each segment.
        """
        q_BTHE, k_BTKE, v_BTKE = self._qkv(x_BTD, cos_BTE, sin_BTE)
        out_BTHE = attention_on_mesh(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT,
                                     self.cfg)
        return jnp.einsum("BTHE,HED->BTD", out_BTHE, self.wo[...].astype(x_BTD.dtype))

    def _qkv(self, x_BTD, cos_BTE, sin_BTE):
        """q, k, v of the tokens, q and k rotated by RoPE at their positions."""
        dtype = x_BTD.dtype
        q_BTHE = jnp.einsum("BTD,DHE->BTHE", x_BTD, self.wq[...].astype(dtype))
        k_BTKE = jnp.einsum("BTD,DKE->BTKE", x_BTD, self.wk[...].astype(dtype))
        v_BTKE = jnp.einsum("BTD,DKE->BTKE", x_BTD, self.wv[...].astype(dtype))
        return apply_rope(q_BTHE, cos_BTE, sin_BTE), apply_rope(k_BTKE, cos_BTE, sin_BTE), v_BTKE

    def decode(self, x_BTD, cos_BTE, sin_BTE, positions_BT, k_BSKE, v_BSKE, index):
        """Attention of T new tokens at cache slots [index, index+T) over the cache (slot j
        holds position j); returns (output, updated k cache, updated v cache)."""
        q_BTHE, k_BTKE, v_BTKE = self._qkv(x_BTD, cos_BTE, sin_BTE)
        k_BSKE = jax.lax.dynamic_update_slice(k_BSKE, k_BTKE.astype(k_BSKE.dtype),
                                              (0, index, 0, 0))
        v_BSKE = jax.lax.dynamic_update_slice(v_BSKE, v_BTKE.astype(v_BSKE.dtype),
                                              (0, index, 0, 0))
        B, S = k_BSKE.shape[:2]
        slots_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        filled_BS = (slots_BS < index + x_BTD.shape[1]).astype(jnp.int32)  # 0: empty slot
        out_BTHE, _ = reference_attention(
            q_BTHE, k_BSKE, v_BSKE, q_positions=positions_BT, kv_positions=slots_BS,
            q_segment_ids=jnp.ones(positions_BT.shape, jnp.int32), kv_segment_ids=filled_BS,
            sliding_window=self.cfg.sliding_window or None)
        out_BTD = jnp.einsum("BTHE,HED->BTD", out_BTHE, self.wo[...].astype(x_BTD.dtype))
        return out_BTD, k_BSKE, v_BSKE


def attention_on_mesh(q_BTHE: jnp.ndarray, k_BSKE: jnp.ndarray, v_BSKE: jnp.ndarray,
                      positions_BT: jnp.ndarray, segment_ids_BT: jnp.ndarray | None,
                      cfg: ModelConfig) -> jnp.ndarray:
    """Causal attention, each device running the kernel on its own batch rows, heads and tokens.

    Under a mesh the kernel runs inside `jax.shard_map`, split like the activation rules say
    (batch over data x fsdp, heads over tensor, tokens over sequence x ulysses), so no attention
    op is left for GSPMD to guess. When KV heads are replicated over `tensor` (fewer than its
    size), each device slices the one KV head that its query heads share. With sequence
    parallelism: Ulysses over `ulysses` (all-to-all; each device then holds whole sequences in
    order, attended as on one device), ring attention over `sequence` (tokens in
    the ring layout's order, masked by their positions: within a packed document position order
    is token order, and segment ids keep documents apart), or both (hybrid).
    """
    window = cfg.sliding_window or None
    masks = {"causal": True, "sliding_window": window, "block_q": cfg.block_q,
             "block_kv": cfg.block_kv}

    def whole_sequence(q, k, v, positions, segment_ids):  # the whole sequence, in order
        # the blockwise kernel masks by the batch's positions (index order within a document):
        # masks of iota positions are constants, which XLA may fold into one
        # [T/bq, T/bk, bq, bk] array (a TiB at 1M tokens)
        by_position = ({"q_positions": positions, "kv_positions": positions}
                       if cfg.attention_impl == "blockwise" else {})
        return dot_product_attention(q, k, v, impl=cfg.attention_impl, q_segment_ids=segment_ids,
                                     kv_segment_ids=segment_ids, **by_position, **masks)

    def ring(q, k, v, positions, segment_ids):  # this device's tokens against the ring's
        return ring_attention(q, k, v, axis_name="sequence", positions_BT=positions,
                              segment_ids_BT=segment_ids, sliding_window=window,
                              block_q=cfg.block_q, block_kv=cfg.block_kv)[0]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return whole_sequence(q_BTHE, k_BSKE, v_BSKE, positions_BT, segment_ids_BT)
    sizes = dict(mesh.shape)
    ring_size, ulysses = sizes.get("sequence", 1), sizes.get("ulysses", 1)
    rules = current_activation_rules()
    batch, heads, kv_heads = rules.get("batch"), rules.get("heads"), rules.get("kv_heads")
    seq = rules.get("inner_seq")
    group = cfg.n_heads // cfg.n_kv_heads

    def local(q_BTHE, k_BSKE, v_BSKE, positions_BT, segment_ids_BT):
        if heads is not None and kv_heads is None:  # KV replicated: take our query heads' one
            first = jax.lax.axis_index(heads) * q_BTHE.shape[2] // group
            k_BSKE = jax.lax.dynamic_slice_in_dim(k_BSKE, first, 1, axis=2)
            v_BSKE = jax.lax.dynamic_slice_in_dim(v_BSKE, first, 1, axis=2)
        if ulysses > 1:  # pure Ulysses, or hybrid with a ring inside
            return ulysses_attention(q_BTHE, k_BSKE, v_BSKE, axis_name="ulysses",
                                     positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                     local_attention=ring if ring_size > 1 else whole_sequence)
        if ring_size > 1:
            return ring(q_BTHE, k_BSKE, v_BSKE, positions_BT, segment_ids_BT)
        return whole_sequence(q_BTHE, k_BSKE, v_BSKE, positions_BT, segment_ids_BT)

    q_spec = PartitionSpec(batch, seq, heads, None)
    kv_spec = PartitionSpec(batch, seq, kv_heads, None)
    tokens_spec = PartitionSpec(batch, seq)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, tokens_spec, tokens_spec),
                         out_specs=q_spec)(q_BTHE, k_BSKE, v_BSKE, positions_BT, segment_ids_BT)
