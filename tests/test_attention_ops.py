"""Attention kernels against a float64 numpy oracle with an explicit mask, and against jax.nn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gigajax.config import schema
from gigajax.errors import ConfigError
from gigajax.ops.attention import (
    ATTENTION_IMPLS,
    MASKED_LSE,
    blockwise_attention,
    blockwise_attention_bwd,
    blockwise_attention_fwd,
    dot_product_attention,
    reference_attention,
)
from gigajax.parallel.checks import check_backend

# Each case: shapes (B, T, S, H, K, E), mask kwargs, block sizes. Lengths 37 and 50 are not
# multiples of the blocks; blocks of 64 > 24 check clipping to the length.
CASES = {
    "causal_gqa": {"shape": (2, 37, 37, 4, 2, 8), "causal": True, "blocks": (16, 16)},
    "causal_mqa": {"shape": (1, 37, 37, 4, 1, 8), "causal": True, "blocks": (8, 16)},
    "causal_mha_one_block": {"shape": (2, 24, 24, 2, 2, 16), "causal": True, "blocks": (64, 64)},
    "noncausal_t_ne_s": {"shape": (2, 37, 50, 4, 2, 8), "causal": False, "blocks": (16, 16)},
    "packed_segments": {"shape": (2, 37, 37, 4, 2, 8), "causal": True, "blocks": (16, 8),
                        "segments": True},
    "sliding_window": {"shape": (2, 37, 37, 4, 2, 8), "causal": True, "blocks": (16, 16),
                       "window": 5},
    "noncausal_window": {"shape": (1, 37, 37, 2, 1, 8), "causal": False, "blocks": (16, 16),
                         "window": 7},
    "permuted_positions": {"shape": (2, 32, 32, 4, 2, 8), "causal": True, "blocks": (8, 8),
                           "permute": True},
    "causal_window_t_gt_s": {"shape": (1, 20, 8, 2, 1, 8), "causal": True, "blocks": (8, 8),
                             "window": 4},  # queries 11.. are past every key's window
    "fully_masked_rows": {"shape": (2, 37, 37, 4, 2, 8), "causal": True, "blocks": (16, 16),
                          "segments": True, "orphan": True},
}


def make_case(name, dtype=jnp.float32, seed=0):
    """Random q, k, v, output/lse cotangents, mask kwargs and the explicit [B,T,S] mask."""
    c = CASES[name]
    b, t, s, h, kh, e = c["shape"]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((b, t, h, e), (b, s, kh, e), (b, s, kh, e)))
    dout = rng.standard_normal((b, t, h, e)).astype(np.float32)
    dlse = rng.standard_normal((b, h, t)).astype(np.float32)
    q_pos, kv_pos = np.tile(np.arange(t), (b, 1)), np.tile(np.arange(s), (b, 1))
    kwargs = {"causal": c["causal"], "sliding_window": c.get("window")}
    if c.get("permute"):  # a zigzag-like layout: positions are a permutation, not arange
        q_pos = np.stack([rng.permutation(t) for _ in range(b)])
        kv_pos = q_pos.copy()
        kwargs.update(q_positions=jnp.asarray(q_pos, jnp.int32),
                      kv_positions=jnp.asarray(kv_pos, jnp.int32))
    dist = q_pos[:, :, None] - kv_pos[:, None, :]
    mask = np.ones((b, t, s), bool)
    if c["causal"]:
        mask &= dist >= 0
    if c.get("window"):
        mask &= dist < c["window"]
    if c.get("segments"):  # packed documents: sorted ids 0..3 with random boundaries
        q_seg = np.sort(rng.integers(0, 4, (b, t)), axis=1)
        kv_seg = q_seg.copy() if s == t else np.sort(rng.integers(0, 4, (b, s)), axis=1)
        if c.get("orphan"):  # queries whose segment no key has: rows with nothing allowed
            q_seg[0, 5] = q_seg[1, -1] = 99
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
        kwargs.update(q_segment_ids=jnp.asarray(q_seg, jnp.int32),
                      kv_segment_ids=jnp.asarray(kv_seg, jnp.int32))
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v, dout)] + [jnp.asarray(dlse)]
    return arrays, kwargs, mask, c["blocks"]


def numpy_attention(q, k, v, dout, dlse, mask):
    """float64 oracle: out, lse and the gradients of sum(out*dout) + sum(lse*dlse)."""
    q, k, v, dout, dlse = (np.asarray(x, np.float64) for x in (q, k, v, dout, dlse))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1 / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], np.einsum("bthe,bshe->bhts", q, k) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1)
    out = np.einsum("bhts,bshe->bthe", p, v)
    lse = np.where(denom[..., 0] > 0, np.log(np.maximum(denom[..., 0], 1e-300)) + m[..., 0],
                   MASKED_LSE)
    dp = np.einsum("bthe,bshe->bhts", dout, v)
    delta = np.einsum("bthe,bthe->bht", dout, out)
    ds = p * (dp - delta[..., None] + dlse[..., None]) * scale
    dq = np.einsum("bhts,bshe->bthe", ds, k)
    dk = np.einsum("bhts,bthe->bshe", ds, q)
    dv = np.einsum("bhts,bthe->bshe", p, dout)
    dk, dv = (x.reshape(*x.shape[:2], -1, g, x.shape[-1]).sum(3) for x in (dk, dv))
    return out, lse, dq, dk, dv


def assert_close(actual, expected, rtol, floor=0.1):
    """Relative tolerance per element, plus an absolute floor of floor * rtol * max|expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    atol = floor * rtol * max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


jax_nn_attention = jax.jit(jax.nn.dot_product_attention,
                           static_argnames=("is_causal", "local_window_size", "implementation"))
ATTENTION_FNS = {"blockwise": blockwise_attention, "reference": reference_attention}


@functools.cache
def _jitted_grads(impl, causal, window, blocks):
    """One compiled grad function per (kernel, static mask args, blocks); arrays are arguments."""
    fn = functools.partial(ATTENTION_FNS[impl], causal=causal, sliding_window=window)
    if impl == "blockwise":
        fn = functools.partial(fn, block_q=blocks[0], block_kv=blocks[1])

    def loss(q, k, v, dout, dlse, mask_arrays):
        out, lse = fn(q, k, v, **mask_arrays)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse), (out, lse)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def grads_of(impl, kwargs, blocks, q, k, v, dout, dlse):
    """(out, lse, dq, dk, dv) of `impl` for the scalar sum(out * dout) + sum(lse * dlse)."""
    arrays = {n: x for n, x in kwargs.items() if n not in ("causal", "sliding_window")}
    grad_fn = _jitted_grads(impl, kwargs["causal"], kwargs["sliding_window"], blocks)
    grads, (out, lse) = grad_fn(q, k, v, dout, dlse, arrays)
    return (out, lse, *grads)


def blockwise(kwargs, blocks):
    return functools.partial(blockwise_attention, **kwargs, block_q=blocks[0], block_kv=blocks[1])


@pytest.mark.parametrize("name", CASES)
def test_blockwise_out_lse_and_grads_match_numpy_fp32(name):
    (q, k, v, dout, dlse), kwargs, mask, blocks = make_case(name)
    expected = numpy_attention(q, k, v, dout, dlse, mask)
    actual = grads_of("blockwise", kwargs, blocks, q, k, v, dout, dlse)
    for a, e, what in zip(actual, expected, ("out", "lse", "dq", "dk", "dv"), strict=False):
        assert np.isfinite(np.asarray(a)).all(), what
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_reference_out_lse_and_grads_match_numpy_fp32(name):
    (q, k, v, dout, dlse), kwargs, mask, _ = make_case(name)
    expected = numpy_attention(q, k, v, dout, dlse, mask)
    actual = grads_of("reference", kwargs, None, q, k, v, dout, dlse)
    for a, e in zip(actual, expected, strict=False):
        assert np.isfinite(np.asarray(a)).all()
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("name", ["packed_segments", "noncausal_t_ne_s"])
def test_lse_grads_match_reference_autodiff(name):
    (q, k, v, _, dlse), kwargs, _, blocks = make_case(name, seed=1)
    zero = jnp.zeros_like(q)
    ref = grads_of("reference", kwargs, None, q, k, v, zero, dlse)
    ours = grads_of("blockwise", kwargs, blocks, q, k, v, zero, dlse)
    for a, e in zip(ours[2:], ref[2:], strict=False):
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("name", ["causal_gqa", "packed_segments", "sliding_window"])
def test_blockwise_bf16_matches_fp32_oracle(name):
    (q, k, v, dout, dlse), kwargs, mask, blocks = make_case(name, dtype=jnp.bfloat16)
    expected = numpy_attention(q, k, v, dout, dlse, mask)  # f64 of the bf16-rounded inputs
    actual = grads_of("blockwise", kwargs, blocks, q, k, v, dout, dlse)
    assert actual[0].dtype == jnp.bfloat16 and actual[1].dtype == jnp.float32
    assert all(x.dtype == jnp.bfloat16 for x in actual[2:])
    # P and dS are rounded to bf16 for the matmuls (as in FlashAttention-2), so where a sum
    # cancels only the error relative to the largest entry is meaningful: 2e-2 of it.
    for a, e in zip(actual, expected, strict=False):
        assert_close(a, e, rtol=2e-2, floor=1.0)


def test_fully_masked_rows_give_zero_out_masked_lse_and_finite_grads():
    (q, k, v, dout, dlse), kwargs, _, blocks = make_case("fully_masked_rows")
    for impl in ("blockwise", "reference"):
        out, lse, *grads = grads_of(impl, kwargs, blocks, q, k, v, dout, dlse)
        assert np.all(np.asarray(out)[0, 5] == 0) and np.all(np.asarray(out)[1, -1] == 0)
        assert np.all(np.asarray(lse)[0, :, 5] == MASKED_LSE)
        assert np.all(np.asarray(grads[0])[0, 5] == 0)
        assert all(np.isfinite(np.asarray(x)).all() for x in (out, lse, *grads))


def test_fwd_and_bwd_pieces_match_the_custom_vjp():
    (q, k, v, dout, dlse), kwargs, _, blocks = make_case("packed_segments")
    kw = dict(kwargs, block_q=blocks[0], block_kv=blocks[1])

    @jax.jit
    def pieces(q, k, v, dout, dlse):
        out, lse = blockwise_attention_fwd(q, k, v, **kw)
        return blockwise_attention_bwd(q, k, v, out, lse, dout, dlse, **kw)

    _, _, *grads = grads_of("blockwise", kwargs, blocks, q, k, v, dout, dlse)
    for a, e in zip(pieces(q, k, v, dout, dlse), grads, strict=False):
        assert_close(a, e, rtol=1e-6)  # same math; only XLA's fusion choices differ


def test_blockwise_saves_only_inputs_out_lse_and_positions():
    (q, k, v, *_), kwargs, _, blocks = make_case("causal_gqa")
    b, t, h, _ = q.shape

    def residuals(fn):  # the leaves of the VJP closure, traced for shapes only
        return jax.eval_shape(lambda q, k, v: jax.tree.leaves(jax.vjp(fn, q, k, v)[1]), q, k, v)
    shapes = sorted(x.shape for x in residuals(blockwise(kwargs, blocks)))
    assert shapes == sorted([q.shape, k.shape, v.shape, q.shape, (b, h, t), (b, t), (b, t)])
    reference = residuals(functools.partial(reference_attention, **kwargs))
    assert max(x.size for x in reference) >= t * t * h  # the check can fail


@pytest.mark.parametrize("name", ["noncausal_t_ne_s", "packed_segments", "noncausal_window",
                                  "permuted_positions", "fully_masked_rows"])
def test_blockwise_matches_jax_nn_xla_on_rows_with_a_key(name):
    (q, k, v, *_), kwargs, mask, blocks = make_case(name)
    out, _ = jax.jit(blockwise(kwargs, blocks))(q, k, v)
    expected = jax_nn_attention(q, k, v, mask=jnp.asarray(mask)[:, None], implementation="xla")
    rows = mask.any(-1)  # jax.nn averages v over a row with no allowed key
    assert_close(np.asarray(out)[rows], np.asarray(expected)[rows], rtol=1e-5)


@pytest.mark.parametrize("name", ["causal_gqa", "noncausal_t_ne_s", "sliding_window"])
def test_blockwise_matches_jax_nn_native_causal_and_window(name):
    (q, k, v, *_), kwargs, _, blocks = make_case(name)
    window = kwargs["sliding_window"]
    expected = jax_nn_attention(
        q, k, v, is_causal=kwargs["causal"], implementation="xla",
        local_window_size=None if window is None else (window - 1, 0))
    assert_close(jax.jit(blockwise(kwargs, blocks))(q, k, v)[0], expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["causal_gqa", "noncausal_t_ne_s", "causal_window_t_gt_s",
                                  "noncausal_window", "fully_masked_rows", "packed_segments"])
def test_dispatcher_xla_and_reference_match_blockwise(name):
    (q, k, v, *_), kwargs, _, blocks = make_case(name)
    kw = dict(kwargs, block_q=blocks[0], block_kv=blocks[1])
    attend = {impl: jax.jit(functools.partial(dot_product_attention, impl=impl, **kw))
              for impl in ("blockwise", "xla", "reference")}
    expected = attend["blockwise"](q, k, v)
    for impl in ("xla", "reference"):
        assert_close(attend[impl](q, k, v), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["packed_segments", "sliding_window", "permuted_positions"])
def test_dispatcher_xla_grads_match_blockwise(name):
    """Gradients through jax.nn (native causal + segment mask, or a dense mask) equal ours."""
    (q, k, v, dout, _), kwargs, _, blocks = make_case(name)
    kw = dict(kwargs, block_q=blocks[0], block_kv=blocks[1])
    if "q_segment_ids" in kw:  # one array for both, as the model passes: jax.nn's native path
        kw["kv_segment_ids"] = kw["q_segment_ids"]

    def grads(impl):
        def loss(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, impl=impl, **kw) * dout)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for actual, expected in zip(grads("xla"), grads("blockwise"), strict=True):
        assert_close(actual, expected, rtol=1e-5)


def test_dispatcher_rejects_cudnn_off_gpu_and_unknown_impls():
    """The op raises plain ValueErrors about its arguments; the config field errors come from
    validation (`attention.impl`) and the backend check of a run."""
    (q, k, v, *_), kwargs, _, _ = make_case("causal_mha_one_block")
    assert ATTENTION_IMPLS == schema.ATTENTION_IMPLS  # the config offers what the op runs
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"cudnn.*GPU.*'blockwise'"):
            dot_product_attention(q, k, v, impl="cudnn", **kwargs)
        cfg = schema.base_config()
        cfg.attention.impl = "cudnn"
        with pytest.raises(ConfigError, match=r"attention\.impl='cudnn' needs a GPU"):
            check_backend(cfg)
    with pytest.raises(ValueError, match=r"'flash' is not one of"):
        dot_product_attention(q, k, v, impl="flash", **kwargs)
