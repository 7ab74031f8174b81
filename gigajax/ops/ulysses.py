"""DeepSpeed-Ulysses (Jacobs et al. 2023): all-to-all from sequence-sharded to head-sharded.

A pure function of the local shards, called inside `jax.shard_map`. Before attention one
all-to-all turns q [B, T/N, H, E] into [B, T, H/N, E] (every token, a slice of the heads), the
attention runs locally over the whole sequence, and a second all-to-all turns the output back.
Its gradients are all-to-alls too, so plain autodiff is the backward pass.

GQA: K/V heads are split over the axis like the query heads when K is a multiple of N. When K
divides N instead, each KV head is repeated N/K times before the all-to-all, so every device gets
exactly the KV head its query heads share (K = 2, N = 8: devices 0-3 get head 0, 4-7 head 1).
Any other K is a config error (`check_ulysses_heads`).

Hybrid (USP, Fang & Zhao 2024): pass `local_attention` that is itself ring attention over a
second axis; Ulysses then runs inside each ring group.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
# (q [B,T,h,E], k [B,T,k,E], v, positions [B,T], segment_ids [B,T] | None) -> out [B,T,h,E]
LocalAttention = Callable[[Array, Array, Array, Array, Array | None], Array]


def _seq_to_heads(x: Array, axis_name: str) -> Array:
    """[B, T/N, h, E] -> [B, T, h/N, E]: send head group j to device j, gather the sequence."""
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def _heads_to_seq(x: Array, axis_name: str) -> Array:
    """[B, T, h/N, E] -> [B, T/N, h, E]: the inverse of `_seq_to_heads`."""
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(
    q_BTHE: Array, k_BTKE: Array, v_BTKE: Array, *, axis_name: str, positions_BT: Array,
    segment_ids_BT: Array | None, local_attention: LocalAttention,
) -> Array:
    """Attention over the tokens of every device on `axis_name` (call inside shard_map).

    q [B,T/N,H,E], k and v [B,T/N,K,E], global positions and segment ids [B,T/N] of this
    device's tokens; `local_attention` sees the whole sequence for H/N heads. Returns
    out [B,T/N,H,E].
    """
    n = lax.axis_size(axis_name)
    n_kv = k_BTKE.shape[2]
    if n_kv % n:  # fewer KV heads than devices: repeat each for the devices that share it
        k_BTKE, v_BTKE = (jnp.repeat(x, n // n_kv, axis=2) for x in (k_BTKE, v_BTKE))
    q, k, v = (_seq_to_heads(x, axis_name) for x in (q_BTHE, k_BTKE, v_BTKE))
    out = local_attention(q, k, v, _gather_seq(positions_BT, axis_name),
                          _gather_seq(segment_ids_BT, axis_name))
    return _heads_to_seq(out, axis_name)


def _gather_seq(x: Array | None, axis_name: str) -> Array | None:
    """[B, T/N] -> [B, T]: every device's positions or segment ids, in device order."""
    return None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)
