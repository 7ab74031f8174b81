"""Attention kernels: a plain reference, a blockwise (flash) kernel with its own VJP, a dispatcher.

Shapes: q [B,T,H,E], k and v [B,S,K,E], H a multiple of K (G = H/K query heads share one kv head;
K/V are never repeated in memory). Masking is given by optional arrays, so that ring attention over
permuted layouts (zigzag) reuses the same kernel with its own positions:
  causal            key allowed iff kv_pos <= q_pos (positions default to arange)
  segment ids       key allowed iff q_seg == kv_seg (packed documents; 0 is an ordinary id)
  sliding_window w  key allowed iff q_pos - kv_pos < w (with causal: 0 <= q_pos - kv_pos < w)

Fully masked rows (a query with no allowed key) give out = 0 exactly, no NaN anywhere, and
lse = MASKED_LSE = -1e30: finite (so two such rows merge without inf - inf) yet below any real
logsumexp, so the ring merge `out - sigmoid(lse_b - lse) * (out - out_b)` takes the other side
exactly (sigmoid(+-1e30) is exactly 1 or 0). Merge lse with `jnp.logaddexp(lse, lse_b)`, which is
exact here; the equal form `lse - log_sigmoid(lse - lse_b)` rounds lse_b away when lse is -1e30.
Rows with no key get no gradient, whatever cotangent their out or lse receive.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
ATTENTION_IMPLS = ("reference", "blockwise", "xla", "cudnn")
MASKED_LSE = -1e30  # lse of a row with no allowed key; see the module docstring
_F32 = jnp.float32


def _allowed(q_pos, kv_pos, q_seg, kv_seg, causal: bool, window: int | None) -> Array:
    """Which keys each query may see: bool [B,Tq,Sk] from positions and segment ids."""
    ok = jnp.ones(q_pos.shape + kv_pos.shape[-1:], dtype=bool)
    dist = q_pos[:, :, None] - kv_pos[:, None, :]
    if causal:
        ok &= dist >= 0
    if window is not None:
        ok &= dist < window
    if q_seg is not None:
        ok &= q_seg[:, :, None] == kv_seg[:, None, :]
    return ok


def _normalize(q, k, q_pos, kv_pos, q_seg, kv_seg, scale):
    """Fill in default positions and scale; check head counts and segment-id pairing."""
    (b, t, h, e), (_, s, kh, _) = q.shape, k.shape
    if h % kh:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {kh}")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_pos is None:
        q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if kv_pos is None:
        kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    return q_pos, kv_pos, q_seg, kv_seg, scale


def reference_attention(
    q: Array, k: Array, v: Array, *, causal: bool = True, q_positions: Array | None = None,
    kv_positions: Array | None = None, q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None, sliding_window: int | None = None,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """Full-score-matrix attention (fp32 softmax): the oracle the fast kernels are tested against.

    Returns out [B,T,H,E] in q.dtype and lse [B,H,T] float32.
    """
    q_pos, kv_pos, q_seg, kv_seg, scale = _normalize(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    b, t, h, e = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, e)
    allowed = _allowed(q_pos, kv_pos, q_seg, kv_seg, causal, sliding_window)[:, None, None]
    s = jnp.einsum("BTKGE,BSKE->BKGTS", qg, k, preferred_element_type=_F32) * scale
    # A finite fill keeps every gradient finite; the where on p zeroes fully masked rows.
    s = jnp.where(allowed, s, MASKED_LSE)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)
    out = jnp.einsum("BKGTS,BSKE->BTKGE", p.astype(v.dtype), v, preferred_element_type=_F32)
    lse = jnp.where(allowed.any(-1), lse, MASKED_LSE)
    return out.reshape(b, t, h, e).astype(q.dtype), lse.reshape(b, h, t)


def _to_blocks(x, block: int, axis: int, fill=0):
    """Pad `axis` to a multiple of `block` and split it: [.., L, ..] -> [L/block, .., block, ..]."""
    if x is None:
        return None
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -x.shape[axis] % block)
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(*x.shape[:axis], -1, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _from_blocks(x, axis: int, length: int):
    """Inverse of _to_blocks: [n, .., block, ..] -> [.., length, ..]."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return lax.slice_in_dim(x, 0, length, axis=axis)


def _kv_blocks(k, v, kv_pos, kv_seg, bk):
    """K/V side split into blocks; padded keys are marked invalid so no query sees them."""
    valid = jnp.ones_like(kv_pos, dtype=bool)
    return tuple(_to_blocks(x, bk, 1) for x in (k, v, kv_pos, kv_seg)) + (
        _to_blocks(valid, bk, 1, fill=False),)


def _fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q, block_kv,
         out_dtype=None):
    """Online-softmax forward (FlashAttention-2, Algorithm 1): one [bq,bk] score tile at a time.

    out is in `out_dtype` (default q.dtype; ring attention asks for fp32 partial results)."""
    out_dtype = q.dtype if out_dtype is None else out_dtype
    b, t, h, e = q.shape
    kh = k.shape[2]
    bq, bk = min(block_q, t), min(block_kv, k.shape[1])
    qb = _to_blocks(q.reshape(b, t, kh, h // kh, e), bq, 1)  # [nq,B,bq,K,G,E]
    q_xs = (qb, _to_blocks(q_pos, bq, 1), _to_blocks(q_seg, bq, 1))
    kv_xs = _kv_blocks(k, v, kv_pos, kv_seg, bk)

    def q_block(xs):
        q_, qp, qs = xs
        stat = jnp.zeros_like(q_[..., 0], dtype=_F32).transpose(0, 2, 3, 1)  # [B,K,G,bq]
        init = (stat - jnp.inf, stat, jnp.zeros_like(q_, dtype=_F32).transpose(0, 2, 3, 1, 4))

        def kv_step(carry, xs):
            k_, v_, kp, ks, kvalid = xs
            allowed = (_allowed(qp, kp, qs, ks, causal, window) & kvalid[:, None, :])[:, None, None]

            def update(carry):
                m, row_sum, acc = carry
                s = jnp.einsum("BTKGE,BSKE->BKGTS", q_, k_, preferred_element_type=_F32) * scale
                s = jnp.where(allowed, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet: no inf - inf
                alpha = jnp.exp(m - m_safe)  # rescale of the old statistics
                p = jnp.exp(s - m_safe[..., None])
                pv = jnp.einsum("BKGTS,BSKE->BKGTE", p.astype(v_.dtype), v_,
                                preferred_element_type=_F32)
                return m_new, alpha * row_sum + p.sum(-1), alpha[..., None] * acc + pv

            # Skip tiles with no allowed key (most of the upper triangle when causal).
            return lax.cond(allowed.any(), update, lambda c: c, carry), None

        (m, row_sum, acc), _ = lax.scan(kv_step, init, kv_xs)
        row_sum_safe = jnp.where(row_sum == 0.0, 1.0, row_sum)
        lse = jnp.where(row_sum == 0.0, MASKED_LSE, m + jnp.log(row_sum_safe))
        return (acc / row_sum_safe[..., None]).astype(out_dtype), lse

    out, lse = lax.map(q_block, q_xs)  # [nq,B,K,G,bq,E], [nq,B,K,G,bq]
    out = _from_blocks(out, 3, t).reshape(b, h, t, e).transpose(0, 2, 1, 3)
    return out, _from_blocks(lse, 3, t).reshape(b, h, t)


def _bwd(q, k, v, out, lse, dout, dlse, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale,
         block_q, block_kv):
    """Recomputing backward (FlashAttention-2, Algorithm 2) that also takes a cotangent for lse.

    With P = exp(s - lse): dV = P^T dO, dP = dO V^T, dS = P * (dP - D + dlse), D = rowsum(dO * O),
    dQ = scale dS K, dK = scale dS^T Q. The dlse term is d lse / d s = P.
    """
    b, t, h, e = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = min(block_q, t), min(block_kv, s_len)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # D [B,T,H]
    delta = delta.reshape(b, t, kh, g).transpose(0, 2, 3, 1)  # [B,K,G,T]
    if dlse is not None:
        delta = delta - dlse.astype(_F32).reshape(b, kh, g, t)
    as_blocks = functools.partial(_to_blocks, block=bq, axis=1)
    qb, dob = (as_blocks(x.reshape(b, t, kh, g, e)) for x in (q, dout))
    lseb = _to_blocks(lse.astype(_F32).reshape(b, kh, g, t), bq, 3, fill=jnp.inf)  # pad: P = 0
    q_xs = (qb, dob, lseb, _to_blocks(delta, bq, 3), as_blocks(q_pos), as_blocks(q_seg))
    dq0 = jnp.zeros_like(qb, dtype=_F32)

    def kv_block(dq, xs):
        k_, v_, kp, ks, kvalid = xs

        def q_step(carry, xs):
            q_, do_, lse_, delta_, qp, qs, dq_ = xs
            allowed = (_allowed(qp, kp, qs, ks, causal, window) & kvalid[:, None, :])[:, None, None]

            def update(args):
                dk, dv, dq_ = args
                s = jnp.einsum("BTKGE,BSKE->BKGTS", q_, k_, preferred_element_type=_F32) * scale
                p = jnp.exp(jnp.where(allowed, s - lse_[..., None], -jnp.inf))
                dv = dv + jnp.einsum("BKGTS,BTKGE->BSKE", p.astype(do_.dtype), do_,
                                     preferred_element_type=_F32)
                dp = jnp.einsum("BTKGE,BSKE->BKGTS", do_, v_, preferred_element_type=_F32)
                ds = (scale * p * (dp - delta_[..., None])).astype(q_.dtype)
                dq_ = dq_ + jnp.einsum("BKGTS,BSKE->BTKGE", ds, k_, preferred_element_type=_F32)
                dk = dk + jnp.einsum("BKGTS,BTKGE->BSKE", ds, q_, preferred_element_type=_F32)
                return dk, dv, dq_

            dk, dv, dq_ = lax.cond(allowed.any(), update, lambda a: a, (*carry, dq_))
            return (dk, dv), dq_

        init = (jnp.zeros_like(k_, dtype=_F32), jnp.zeros_like(v_, dtype=_F32))
        (dk, dv), dq = lax.scan(q_step, init, (*q_xs, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(kv_block, dq0, _kv_blocks(k, v, kv_pos, kv_seg, bk))
    dq = _from_blocks(dq, 1, t).reshape(b, t, h, e)
    return (dq.astype(q.dtype), _from_blocks(dk, 1, s_len).astype(k.dtype),
            _from_blocks(dv, 1, s_len).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q, block_kv):
    """Blockwise attention with a recomputing VJP; integer mask arrays get no cotangent."""
    return _fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q, block_kv)


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q, block_kv):
    """Saves q, k, v, out, lse and the mask arrays: O(T) residuals, never the probabilities."""
    out, lse = _fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q,
                    block_kv)
    # Named so that a remat policy can keep them (model.remat='minimal') instead of re-running
    # the whole kernel forward in the backward pass.
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
    return (out, lse), (q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg)


def _flash_bwd(causal, window, scale, block_q, block_kv, res, cts):
    """Cotangents for (out, lse) -> (dq, dk, dv); None for positions and segment ids."""
    q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg = res
    dout, dlse = cts
    grads = _bwd(q, k, v, out, lse, dout, dlse, q_pos, kv_pos, q_seg, kv_seg, causal, window,
                 scale, block_q, block_kv)
    return (*grads, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: Array, k: Array, v: Array, *, causal: bool = True, q_positions: Array | None = None,
    kv_positions: Array | None = None, q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None, sliding_window: int | None = None,
    scale: float | None = None, block_q: int = 512, block_kv: int = 512,
) -> tuple[Array, Array]:
    """Flash attention in plain JAX, differentiable in out and lse: (out [B,T,H,E], lse [B,H,T])."""
    q_pos, kv_pos, q_seg, kv_seg, scale = _normalize(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    return _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, sliding_window, scale, block_q,
                  block_kv)


def blockwise_attention_fwd(
    q: Array, k: Array, v: Array, *, causal: bool = True, q_positions: Array | None = None,
    kv_positions: Array | None = None, q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None, sliding_window: int | None = None,
    scale: float | None = None, block_q: int = 512, block_kv: int = 512, out_dtype=None,
) -> tuple[Array, Array]:
    """Forward pass alone, for callers with their own VJP (ring attention): (out, lse fp32).

    `out_dtype`: the output's dtype (default q.dtype); partial results to merge want fp32.
    """
    q_pos, kv_pos, q_seg, kv_seg, scale = _normalize(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    return _fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, sliding_window, scale, block_q,
                block_kv, out_dtype)


def blockwise_attention_bwd(
    q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array, dlse: Array | None = None,
    *, causal: bool = True, q_positions: Array | None = None, kv_positions: Array | None = None,
    q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
    sliding_window: int | None = None, scale: float | None = None, block_q: int = 512,
    block_kv: int = 512,
) -> tuple[Array, Array, Array]:
    """Backward pass alone: (dq, dk, dv) for this k/v given the final out and lse of q's rows.

    For ring attention pass the merged out and lse (and their cotangents) with each k/v shard:
    P = exp(s - lse) is then that shard's slice of the global softmax.
    """
    q_pos, kv_pos, q_seg, kv_seg, scale = _normalize(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    return _bwd(q, k, v, out, lse, dout, dlse, q_pos, kv_pos, q_seg, kv_seg, causal,
                sliding_window, scale, block_q, block_kv)


def dot_product_attention(
    q: Array, k: Array, v: Array, *, impl: str = "blockwise", causal: bool = True,
    q_positions: Array | None = None, kv_positions: Array | None = None,
    q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
    sliding_window: int | None = None, scale: float | None = None, block_q: int = 512,
    block_kv: int = 512,
) -> Array:
    """Attention out [B,T,H,E] by the kernel `impl` (one of ATTENTION_IMPLS)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention kernel {impl!r} is not one of {ATTENTION_IMPLS}")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"the cudnn kernel needs a GPU (the backend is "
                         f"{jax.default_backend()!r}); use one of {ATTENTION_IMPLS[:3]}")
    masks = {"causal": causal, "q_positions": q_positions, "kv_positions": kv_positions,
             "q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids,
             "sliding_window": sliding_window, "scale": scale}
    if impl == "reference":
        return reference_attention(q, k, v, **masks)[0]
    if impl == "blockwise":
        return blockwise_attention(q, k, v, **masks, block_q=block_q, block_kv=block_kv)[0]
    # jax.nn: GQA built in; local_window_size=(left, right) allows -right <= q - kv <= left.
    t, s = q.shape[1], k.shape[1]
    if (q_positions is None and kv_positions is None and causal and t == s
            and q_segment_ids is kv_segment_ids):
        # Self-attention: native causal (and window) flags, only segment ids need a mask. Every
        # row sees at least its own key (the diagonal), so no row is fully masked.
        window = None if sliding_window is None else (sliding_window - 1, 0)
        mask = None if q_segment_ids is None else (
            q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                            local_window_size=window, implementation=impl)
    q_pos, kv_pos, q_seg, kv_seg, scale = _normalize(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale)
    allowed = _allowed(q_pos, kv_pos, q_seg, kv_seg, causal, sliding_window)  # [B,T,S]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale,
                                       implementation=impl)
    # jax.nn averages v over a row with no allowed key; the other kernels give 0 there.
    return jnp.where(allowed.any(-1)[:, :, None, None], out, 0).astype(out.dtype)
