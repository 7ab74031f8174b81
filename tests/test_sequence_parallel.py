"""Sequence-parallel attention (ring in three layouts, Ulysses, hybrid) equals one device.

Each case runs the op inside `jax.shard_map` over N simulated CPU devices on inputs permuted into
the layout, un-permutes the output and the gradients of sum(out * dout), and compares them with
`reference_attention` on the whole sequence in its original order. Tolerances, relative to the
largest entry of each array: fp32 output 1e-5, gradients 1e-4; bf16 inputs 2e-2.
Shapes: B=2, T=64, H=8 query heads, K=2 KV heads (GQA), E=8; packed documents whose boundaries
fall inside device shards and across them, with positions restarting at each document.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from gigajax.errors import ConfigError
from gigajax.ops.attention import blockwise_attention, reference_attention
from gigajax.ops.layouts import inverse_permutation, layout_permutation, permute_sequence
from gigajax.ops.ring import ring_attention
from gigajax.ops.ulysses import ulysses_attention
from gigajax.parallel.checks import check_sequence_split, check_ulysses_heads

B, T, H, K, E = 2, 64, 8, 2, 8
BLOCK = 8


def make_inputs(seed=0, documents=True):
    """q, k, v, dout in original order; positions; segment ids of random documents.

    With documents, positions restart at each document start, as the data pipeline makes them
    (the ring masks by position, the reference by token index); without, they are 0..T-1.
    """
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((B, T, H, E)) for _ in range(2))
    k, v = (rng.standard_normal((B, T, K, E)) for _ in range(2))
    index = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    if not documents:
        return [np.asarray(x, np.float32) for x in (q, k, v, dout)], index, None
    # 5 documents per row, cut at random places (so they cross shard boundaries)
    cuts = np.sort(rng.choice(np.arange(1, T), size=(B, 4), replace=False), axis=1)
    segments = np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts])
    starts = np.stack([np.concatenate([[0], c])[s] for c, s in zip(cuts, segments, strict=True)])
    positions = (index - starts).astype(np.int32)
    return ([np.asarray(x, np.float32) for x in (q, k, v, dout)], positions,
            segments.astype(np.int32))


def reference(q, k, v, dout, segments, window, dtype):
    """Output and (dq, dk, dv) of the whole sequence on one device (fp32 math)."""
    def f(q, k, v):
        seg = None if segments is None else jnp.asarray(segments)
        return reference_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                                   sliding_window=window)[0]
    args = [jnp.asarray(x, dtype).astype(jnp.float32) for x in (q, k, v)]
    out, vjp = jax.vjp(f, *args)
    return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(dout))]


def run_sharded(attend, mesh, seq_axes, perm, q, k, v, dout, positions, segments, dtype):
    """`attend(q, k, v, positions, segments)` under shard_map on permuted inputs; un-permuted
    output and gradients."""
    spec = PartitionSpec(None, seq_axes)
    permuted = [jnp.asarray(permute_sequence(x, perm), dtype) for x in (q, k, v)]
    pos = jnp.asarray(permute_sequence(positions, perm))
    seg = None if segments is None else jnp.asarray(permute_sequence(segments, perm))

    @jax.jit
    def forward_and_grads(q, k, v, dout):
        fn = jax.shard_map(lambda q, k, v, p, s: attend(q, k, v, p, s), mesh=mesh,
                           in_specs=(spec,) * 5, out_specs=spec)
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, pos, seg), q, k, v)
        return out, vjp(dout.astype(out.dtype))

    out, grads = forward_and_grads(*permuted, jnp.asarray(permute_sequence(dout, perm)))
    inv = inverse_permutation(perm)

    def unpermute(x):
        return np.asarray(x.astype(jnp.float32))[:, inv]

    return unpermute(out), [unpermute(g) for g in grads]


def assert_close(got, want, out_rtol, grad_rtol):
    """max |a - b| <= rtol * max |b| for the output and for each gradient; all finite."""
    (out, grads), (want_out, want_grads) = got, want
    for name, a, b, rtol in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads),
                                (out_rtol,) + (grad_rtol,) * 3, strict=True):
        assert np.all(np.isfinite(a)), f"{name} has NaN or inf"
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def mesh_of(shape, names):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:n])


def local_blockwise(q, k, v, positions, segments, window):
    """The whole-sequence kernel that Ulysses runs on each device's heads."""
    return blockwise_attention(q, k, v, q_positions=positions, kv_positions=positions,
                               q_segment_ids=segments, kv_segment_ids=segments,
                               sliding_window=window, block_q=BLOCK, block_kv=BLOCK)[0]


def ring_on(axis, q, k, v, positions, segments, window):
    return ring_attention(q, k, v, axis_name=axis, positions_BT=positions,
                          segment_ids_BT=segments, sliding_window=window, block_q=BLOCK,
                          block_kv=BLOCK)[0]


def attention_fn(kind: str, window):
    """attend(q, k, v, positions, segments) and its mesh axes, for `ring`, `ulysses`, `hybrid`
    (Ulysses over `uly` inside a ring over `ring`)."""
    if kind == "ring":
        return (lambda q, k, v, p, s: ring_on("sp", q, k, v, p, s, window)), ("sp",)
    if kind == "ulysses":
        local, axes = functools.partial(local_blockwise, window=window), ("sp",)
    else:
        local, axes = functools.partial(ring_on, "ring", window=window), ("ring", "uly")

    def attend(q, k, v, p, s):
        return ulysses_attention(q, k, v, axis_name=axes[-1], positions_BT=p, segment_ids_BT=s,
                                 local_attention=local)
    return attend, axes


def check(kind, shape, layout="contiguous", window=None, dtype=jnp.float32, documents=True):
    """Run one case on a mesh of `shape` and compare it with one device."""
    (q, k, v, dout), positions, segments = make_inputs(documents=documents)
    attend, axes = attention_fn(kind, window)
    ring_size = 1 if kind == "ulysses" else shape[0]  # Ulysses' shards are contiguous
    got = run_sharded(attend, mesh_of(shape, axes), axes, layout_permutation(T, ring_size, layout),
                      q, k, v, dout, positions, segments, dtype)
    want = reference(q, k, v, dout, segments, window, dtype)
    assert_close(got, want, *((2e-2, 2e-2) if dtype == jnp.bfloat16 else (1e-5, 1e-4)))


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_matches_one_device(layout, n):
    check("ring", (n,), layout)


@pytest.mark.parametrize("layout,n", [("contiguous", 8), ("zigzag", 4), ("striped", 2)])
def test_ring_sliding_window_matches_one_device(layout, n):
    check("ring", (n,), layout, window=11)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_bf16_matches_one_device(layout):
    check("ring", (8,), layout, dtype=jnp.bfloat16)


def test_ring_without_segment_ids_matches_one_device():
    check("ring", (4,), "zigzag", documents=False)


@pytest.mark.parametrize("n", [2, 4, 8])  # K=2: split over 2, repeated over 4 and 8
def test_ulysses_matches_one_device(n):
    check("ulysses", (n,))


def test_ulysses_sliding_window_and_bf16():
    check("ulysses", (4,), window=11)
    check("ulysses", (8,), dtype=jnp.bfloat16)


@pytest.mark.parametrize("shape,layout", [((2, 4), "zigzag"), ((4, 2), "striped"),
                                          ((2, 2), "contiguous")])
def test_hybrid_ulysses_in_ring_matches_one_device(shape, layout):
    check("hybrid", shape, layout)


def test_fully_masked_blocks_give_no_nan():
    """A window of 2: each query sees itself and its predecessor, so at most ring steps the K/V
    block is fully masked for all of a device's rows; outputs and gradients stay finite."""
    check("ring", (8,), "contiguous", window=2)


def test_layout_permutations():
    assert layout_permutation(8, 2, "contiguous").tolist() == list(range(8))
    assert layout_permutation(8, 2, "striped").tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert layout_permutation(8, 2, "zigzag").tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    perm = layout_permutation(64, 4, "zigzag")
    x = np.arange(2 * 64).reshape(2, 64)
    assert (permute_sequence(x, perm)[:, inverse_permutation(perm)] == x).all()


@pytest.mark.parametrize("seq_len,n,layout", [(30, 4, "contiguous"), (36, 4, "zigzag"),
                                              (12, 8, "striped")])
def test_bad_sequence_splits_are_config_errors(seq_len, n, layout):
    """(An unknown layout name is a field error of `attention.layout`: tests/test_config.py.)"""
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        check_sequence_split(seq_len, n, layout)
    with pytest.raises(ValueError, match="do not split"):  # the op itself, about its shapes
        layout_permutation(seq_len, n, layout)


def test_bad_ulysses_heads_are_config_errors():
    with pytest.raises(ConfigError, match="model.n_heads"):
        check_ulysses_heads(6, 2, 4)
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        check_ulysses_heads(12, 3, 2)
    check_ulysses_heads(8, 2, 8)  # repeated KV heads: fine
