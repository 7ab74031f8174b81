"""Ring attention (Liu et al. 2023) over one mesh axis: K/V travel around the ring, Q stays.

A pure function of the local shards, called inside `jax.shard_map` by the caller. Device r holds
q, k, v for its tokens [B, T/N, ...] (in the layout order of `ops/layouts.py`) and their *global*
positions, which the masks use, so contiguous, striped and zigzag layouts share this code. At
step i device r attends to the K/V block that started on device r - i, merging the block's
(out, lse) into its running result in fp32 with the stable form

    lse' = logaddexp(lse, lse_b),   out' = out - sigmoid(lse_b - lse) * (out - out_b).

The backward pass (custom VJP) recomputes every block from the global out and lse (P = exp(s -
lse) is then that block's slice of the global softmax), keeps dQ at home and sends dK/dV around
the ring with their K/V, so after N sends they are back on their owner. In both passes the next
block's `ppermute` is issued before the current block's compute, so XLA can overlap the two.
Tiles with no allowed key (the future under a causal mask) are skipped inside the blockwise
kernel, which is how the contiguous layout saves its idle steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from gigajax.ops.attention import MASKED_LSE, blockwise_attention_bwd, blockwise_attention_fwd

Array = jax.Array
_F32 = jnp.float32


def _send_to_next(tree, axis_name: str):
    """Every device sends `tree` to the next one on the ring (r -> r + 1 mod N)."""
    n = lax.axis_size(axis_name)
    pairs = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, pairs), tree)


def merge_partials(out: Array, lse: Array, out_b: Array, lse_b: Array) -> tuple[Array, Array]:
    """Combine two softmax-normalised partial results over disjoint keys (fp32).

    out [B,T,H,E], lse [B,H,T]. A side with lse = MASKED_LSE (no key) contributes nothing.
    """
    weight_b = jax.nn.sigmoid(lse_b - lse).transpose(0, 2, 1)[..., None]  # [B,T,H,1]
    return out - weight_b * (out - out_b.astype(_F32)), jnp.logaddexp(lse, lse_b)


def _ring_forward(q, k, v, positions, segment_ids, axis_name, causal, window, scale, block_q,
                  block_kv):
    """(out [B,T,H,E] in q.dtype, lse [B,H,T] fp32) of q against every device's K/V."""
    n = lax.axis_size(axis_name)

    def attend(kv):
        k_, v_, kv_pos, kv_seg = kv
        return blockwise_attention_fwd(
            q, k_, v_, causal=causal, q_positions=positions, kv_positions=kv_pos,
            q_segment_ids=segment_ids, kv_segment_ids=kv_seg, sliding_window=window,
            scale=scale, block_q=block_q, block_kv=block_kv, out_dtype=_F32)

    def step(carry, _):
        kv, out, lse = carry
        incoming = _send_to_next(kv, axis_name)  # issued first: overlaps with this block
        out, lse = merge_partials(out, lse, *attend(kv))
        return (incoming, out, lse), None

    # *_like keeps the shard_map "varying over the axis" type that the scan carry needs
    out0 = jnp.zeros_like(q, dtype=_F32)
    lse0 = jnp.full_like(q[..., 0], MASKED_LSE, dtype=_F32).transpose(0, 2, 1)  # [B,H,T]
    (kv, out, lse), _ = lax.scan(step, ((k, v, positions, segment_ids), out0, lse0), None,
                                 length=n - 1)
    out, lse = merge_partials(out, lse, *attend(kv))  # the last block: nothing left to send
    return out.astype(q.dtype), lse


def _ring_backward(q, k, v, positions, segment_ids, out, lse, dout, dlse, axis_name, causal,
                   window, scale, block_q, block_kv):
    """(dq, dk, dv): dq accumulates at home, dK/dV travel with their block back to its owner."""
    n = lax.axis_size(axis_name)

    def grads(kv):
        k_, v_, kv_pos, kv_seg = kv
        return blockwise_attention_bwd(
            q, k_, v_, out, lse, dout, dlse, causal=causal, q_positions=positions,
            kv_positions=kv_pos, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
            sliding_window=window, scale=scale, block_q=block_q, block_kv=block_kv)

    def step(carry, _):
        kv, (dk, dv), dq = carry
        incoming = _send_to_next(kv, axis_name)
        dq_b, dk_b, dv_b = grads(kv)
        dkv = _send_to_next((dk + dk_b.astype(_F32), dv + dv_b.astype(_F32)), axis_name)
        return (incoming, dkv, dq + dq_b.astype(_F32)), None

    zeros = (jnp.zeros_like(k, dtype=_F32), jnp.zeros_like(v, dtype=_F32))
    init = ((k, v, positions, segment_ids), zeros, jnp.zeros_like(q, dtype=_F32))
    (kv, (dk, dv), dq), _ = lax.scan(step, init, None, length=n - 1)
    dq_b, dk_b, dv_b = grads(kv)
    # after N - 1 steps this device holds the block of device r + 1: one more send returns it
    dk, dv = _send_to_next((dk + dk_b.astype(_F32), dv + dv_b.astype(_F32)), axis_name)
    return (dq + dq_b.astype(_F32)).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring(q, k, v, positions, segment_ids, axis_name, causal, window, scale, block_q, block_kv):
    return _ring_forward(q, k, v, positions, segment_ids, axis_name, causal, window, scale,
                         block_q, block_kv)


def _ring_fwd(q, k, v, positions, segment_ids, axis_name, causal, window, scale, block_q,
              block_kv):
    out, lse = _ring_forward(q, k, v, positions, segment_ids, axis_name, causal, window, scale,
                             block_q, block_kv)
    # the names the `minimal` remat policy keeps, as for the blockwise kernel
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
    return (out, lse), (q, k, v, positions, segment_ids, out, lse)


def _ring_bwd(axis_name, causal, window, scale, block_q, block_kv, res, cts):
    q, k, v, positions, segment_ids, out, lse = res
    dout, dlse = cts
    grads = _ring_backward(q, k, v, positions, segment_ids, out, lse, dout, dlse, axis_name,
                           causal, window, scale, block_q, block_kv)
    return (*grads, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q_BTHE: Array, k_BTKE: Array, v_BTKE: Array, *, axis_name: str, positions_BT: Array,
    segment_ids_BT: Array | None = None, causal: bool = True, sliding_window: int | None = None,
    scale: float | None = None, block_q: int = 512, block_kv: int = 512,
) -> tuple[Array, Array]:
    """Self-attention over the tokens of every device on `axis_name` (call inside shard_map).

    All arrays are this device's shard: q [B,T/N,H,E], k and v [B,T/N,K,E], the tokens' global
    positions [B,T/N] and segment ids [B,T/N] (documents never attend across ids). Returns
    (out [B,T/N,H,E], lse [B,H,T/N] fp32), differentiable in both.
    """
    scale = q_BTHE.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ring(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT, axis_name, causal,
                 sliding_window, scale, block_q, block_kv)
