"""Decoder behaviour: causality, document isolation, scan == unrolled, remat == no remat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigajax.config import ModelConfig, base_config
from gigajax.model import Decoder

FP32 = dict(rtol=1e-5, atol=1e-6)


def model_config(**overrides) -> ModelConfig:
    cfg = base_config()
    cfg.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                     max_seq_len=64)
    cfg.attention.update(block_q=8, block_kv=8)
    return dataclasses.replace(ModelConfig.from_config(cfg), **overrides)


def make_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    with nnx.use_eager_sharding(False):
        return Decoder(cfg, rngs=nnx.Rngs(seed))


def forward(model: Decoder, *args):
    """Jitted logits (eager op-by-op dispatch is far slower on CPU)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda params, *a: nnx.merge(graphdef, params)(*a))(params, *args)


def tokens(batch=2, length=24, vocab=64, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def param_grads(model: Decoder, toks, **kwargs):
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(toks, **kwargs)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(toks.shape[1]))

    return jax.jit(jax.grad(loss))(params)


def assert_trees_close(a, b, rtol=1e-5):
    """Every leaf agrees to `rtol` relative to that leaf's largest magnitude (fp32: 1e-5)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.max(np.abs(x - y)) <= rtol * np.max(np.abs(y)), np.max(np.abs(x - y))


def test_logits_shape_and_dtype():
    logits = forward(make_model(model_config()), tokens())
    assert logits.shape == (2, 24, 64) and logits.dtype == jnp.float32


def test_causality_through_gradients():
    """The logit at position t gets no gradient from input tokens at positions > t."""
    cfg = model_config()
    model = make_model(cfg)
    toks = jnp.arange(24)[None, :]  # token id == position, so embedding rows name positions
    graphdef, params = nnx.split(model)

    @jax.jit
    def embed_grad(params, t):
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(toks)[0, t]))(params)["embed"]

    for t in (0, 7, 23):
        row_norms = np.linalg.norm(np.asarray(embed_grad(params, t)[...]), axis=1)
        assert np.all(row_norms[: t + 1] > 0)
        np.testing.assert_array_equal(row_norms[t + 1:], 0.0)


def test_segment_ids_isolate_documents():
    """A packed document gives the same logits as the document alone at positions from 0."""
    model = make_model(model_config())
    doc_a, doc_b = tokens(1, 10, seed=2), tokens(1, 14, seed=3)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(10), jnp.arange(14)])[None]
    segments = jnp.concatenate([jnp.ones(10, jnp.int32), 2 * jnp.ones(14, jnp.int32)])[None]
    logits = forward(model, packed, positions, segments)
    np.testing.assert_allclose(logits[:, :10], forward(model, doc_a), **FP32)
    np.testing.assert_allclose(logits[:, 10:], forward(model, doc_b), **FP32)


@pytest.mark.parametrize("impl", ["blockwise", "reference", "xla"])
def test_sliding_window_limits_context(impl):
    """Window w, as in HF Mistral (`kv_idx > q_idx - sliding_window`): the query at t sees the
    keys t-w+1 .. t. With one layer, the token at s therefore changes the logits at exactly
    s .. s+w-1: the query at s+w-1 sees it (key t-w+1), the one at s+w does not (key t-w)."""
    w = 4
    model = make_model(model_config(sliding_window=w, n_layers=1, attention_impl=impl))
    toks = tokens(1, 16)
    a = forward(model, toks)
    for s in (3, 6):  # the window inside one block of 8 keys, and across two
        b = forward(model, toks.at[0, s].set((toks[0, s] + 1) % 64))
        changed = [t for t in range(16) if not np.allclose(a[0, t], b[0, t], **FP32)]
        assert changed == list(range(s, s + w)), (s, changed)


def test_scan_equals_unrolled():
    cfg = model_config()
    scanned, unrolled = make_model(cfg), make_model(dataclasses.replace(cfg, scan_layers=False))
    toks = tokens()
    np.testing.assert_allclose(forward(scanned, toks), forward(unrolled, toks), **FP32)
    assert_trees_close(param_grads(scanned, toks), param_grads(unrolled, toks))


@functools.cache
def reference_grads(scan: bool):
    return param_grads(make_model(model_config(scan_layers=scan)), tokens())


@pytest.mark.parametrize("policy,scan", [("full", True), ("dots", True), ("minimal", True),
                                         ("full", False)])
def test_remat_does_not_change_gradients(policy, scan):
    cfg = model_config(scan_layers=scan)
    toks = tokens()
    reference = reference_grads(scan)
    rematted = param_grads(make_model(dataclasses.replace(cfg, remat=policy)), toks)
    assert_trees_close(reference, rematted)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_attention_impls_agree_in_the_model(impl):
    """Packed documents, logits and gradients: every kernel gives the blockwise result."""
    cfg = model_config()
    toks = tokens()
    segments = jnp.asarray(np.repeat([[1, 2, 3]], 8, axis=1).repeat(2, axis=0), jnp.int32)
    positions = jnp.tile(jnp.arange(8), 3)[None].repeat(2, axis=0)
    other = make_model(dataclasses.replace(cfg, attention_impl=impl))
    np.testing.assert_allclose(forward(other, toks, positions, segments),
                               forward(make_model(cfg), toks, positions, segments), **FP32)
    assert_trees_close(param_grads(other, toks, positions_BT=positions, segment_ids_BT=segments),
                       param_grads(make_model(cfg), toks, positions_BT=positions,
                                   segment_ids_BT=segments))


BF16 = dict(rtol=2e-2, atol=2e-2)  # bf16 compute (8 significand bits) against fp32


def bf16_and_fp32_log_probs(init_std: float = 0.1):
    """Log-probabilities of every vocabulary entry, fp32 and bf16 compute, of one fp32 model.

    init_std 0.1 (5x the default) makes the fresh model sharp: its attention logits span a few
    units, so attention depends on RoPE and its output is a large part of the residual stream
    (at the default 0.02 the model is near uniform and a bf16 path without RoPE, or with half
    the attention output, stays within the bf16 tolerance)."""
    cfg = model_config(init_std=init_std)
    toks = tokens()
    full = jax.nn.log_softmax(forward(make_model(cfg), toks))
    half = jax.nn.log_softmax(forward(make_model(dataclasses.replace(cfg, dtype="bfloat16")),
                                      toks))
    return np.asarray(half), np.asarray(full)


def test_bfloat16_compute_is_close_to_float32():
    half, full = bf16_and_fp32_log_probs()
    assert half.dtype == full.dtype == np.float32  # logits are fp32 for the loss
    np.testing.assert_allclose(half, full, **BF16)


def _rope_skipped_in_bf16(apply_rope):
    return lambda x, cos, sin: x if x.dtype == jnp.bfloat16 else apply_rope(x, cos, sin)


def _attention_halved_in_bf16(attention_on_mesh):
    def halved(q, *args):
        out = attention_on_mesh(q, *args)
        return out * 0.5 if q.dtype == jnp.bfloat16 else out
    return halved


@pytest.mark.parametrize("name, wrap", [("apply_rope", _rope_skipped_in_bf16),
                                        ("attention_on_mesh", _attention_halved_in_bf16)],
                         ids=["rope_skipped", "attention_halved"])
def test_bfloat16_check_rejects_a_broken_bf16_path(monkeypatch, name, wrap):
    """The check above fails for a bf16 path that skips RoPE or halves the attention output
    (fp32 unchanged), so passing it says the bf16 path computes the same model."""
    import gigajax.model.attention as attention

    monkeypatch.setattr(attention, name, wrap(getattr(attention, name)))
    half, full = bf16_and_fp32_log_probs()
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        np.testing.assert_allclose(half, full, **BF16)


def test_tied_embeddings_have_no_separate_head():
    model = make_model(model_config(tie_embeddings=True))
    assert not hasattr(model, "lm_head")
    assert forward(model, tokens()).shape == (2, 24, 64)


def test_parameters_are_float32_with_logical_names():
    state = nnx.state(make_model(model_config()), nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    specs = nnx.get_partition_spec(state)
    wq_names = ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["blocks"]["attn"]["wq"].get_value()) == wq_names
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")


def count_scans_in_backward(remat: str) -> int:
    """How many scans (the kernel's loops and the layer loop) the gradient program runs."""
    model = make_model(model_config(remat=remat, scan_layers=False, n_layers=1))
    graphdef, params = nnx.split(model)
    toks = tokens()

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(toks))

    return str(jax.make_jaxpr(jax.grad(loss))(params)).count("scan[")


def test_minimal_remat_keeps_attention_and_full_recomputes_it():
    """'minimal' saves the kernel's out and lse, so its forward scans do not run again."""
    none, minimal, full = (count_scans_in_backward(p) for p in ("none", "minimal", "full"))
    assert none < minimal < full


def test_weight_decay_skips_norms_and_embeddings_of_the_decoder():
    from gigajax.train.optim import decay_mask

    params = nnx.state(make_model(model_config()), nnx.Param)
    decayed = {jax.tree_util.keystr(path): flag for path, flag in
               jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    names = {k.split("]")[-2].strip("['"): v for k, v in decayed.items()}
    assert {n for n, v in names.items() if v} == {"wq", "wk", "wv", "wo", "w_gate", "w_up",
                                                  "w_down", "lm_head"}
    assert {n for n, v in names.items() if not v} == {"embed", "scale"}
