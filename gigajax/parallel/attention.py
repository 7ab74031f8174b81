"""Attention on the mesh: the shard_map that runs the attention kernel on each device's batch
rows, heads and tokens, and picks the sequence-parallel algorithm (ring, Ulysses, their hybrid,
or the whole sequence) from the mesh's axes.

Model code calls `attention_on_mesh` with logical shapes and no collectives; this module is the
one place where the attention's sharding is spelled out, and `ops/ring.py` and `ops/ulysses.py`
hold the collectives that are the algorithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gigajax.config import ModelConfig
from gigajax.ops.attention import dot_product_attention
from gigajax.ops.ring import ring_attention
from gigajax.ops.ulysses import ulysses_attention
from gigajax.parallel.shardings import current_activation_rules


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
        # KV heads replicated over `tensor` (rules.kv_heads_on_tensor): take our query heads' one
        if heads is not None and kv_heads is None:
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
