"""Decoding: the KV cache equals the full forward pass; the compiled loop's greedy, sampled,
beam and contrastive choices equal plain re-implementations that recompute everything each
step; left-padded batches equal each prompt alone; stops, stop strings and streaming; the same
tokens on a tensor x fsdp mesh with the weights left sharded."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigajax.config import ModelConfig, load_config
from gigajax.data.tokenizer import ByteTokenizer
from gigajax.infer.generate import GenerateOptions, generate, generate_batch
from gigajax.infer.sampling import Sampling, filtered_logits
from gigajax.model import Decoder

ROOT = Path(__file__).resolve().parents[1]

TOL = 1e-5
V = 300  # prompt ids below the byte tokenizer's specials


def model(*overrides):
    cfg = load_config(ROOT / "configs" / "tiny.py", [
        "--config.model.dtype=float32", "--config.model.n_layers=2",
        "--config.model.d_model=64", "--config.model.mlp_dim=128", *overrides])
    with nnx.use_eager_sharding(False):  # names stay metadata: one device, no mesh
        return Decoder(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def m():
    return model()


def prompts(*lengths, seed=0):
    return [np.asarray(jax.random.randint(jax.random.key(seed + i), (n,), 0, 256))
            for i, n in enumerate(lengths)]


_FORWARDS = {}


def normed_features(m, ids):
    """The final-normed features [T, D] of `ids` by one full forward pass, right-padded to a
    multiple of 32 tokens (causal: the padding changes no earlier position) and jitted, so a
    reference that recomputes everything each step compiles once per 32 tokens."""
    if id(m) not in _FORWARDS:
        graphdef, state = nnx.split(m)
        run = jax.jit(lambda s, x: (lambda d: d.final_norm(d.features(x)))(nnx.merge(graphdef, s)))
        _FORWARDS[id(m)] = lambda x: run(state, x)
    T = len(ids)
    padded = np.zeros((1, -(-T // 32) * 32), np.int32)
    padded[0, :T] = ids
    return _FORWARDS[id(m)](jnp.asarray(padded))[0, :T]


def full_logits(m, ids):
    return m.head(normed_features(m, ids)[None, -1:])[0, 0]


def greedy_reference(m, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(jnp.argmax(full_logits(m, ids))))
    return ids[len(prompt):]


@pytest.mark.parametrize("overrides", [
    [], ["--config.model.n_kv_heads=1"], ["--config.model.sliding_window=5"]])
def test_prefill_then_steps_match_the_full_forward(overrides):
    m = model(*overrides)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 20), 0, V)
    want_BTV = m(tokens_BT)
    cache = m.init_cache(2, 24)
    got, cache = m.decode(tokens_BT[:, :12], cache, jnp.int32(0))
    steps = [got]
    for i in range(12, 20):
        logits, cache = m.decode(tokens_BT[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    got_BTV = jnp.concatenate(steps, axis=1)
    scale = float(jnp.max(jnp.abs(want_BTV)))
    assert float(jnp.max(jnp.abs(got_BTV - want_BTV))) <= TOL * scale


def test_left_padded_batch_equals_full_recomputation_prompt_by_prompt(m):
    """Prompts of 15, 9 and 20 tokens, left-padded to 32 and prefilled in chunks of 6 (the
    last one overlapping), give each prompt's argmax continuation."""
    ps = prompts(15, 9, 20)
    outs = generate(m, ps, GenerateOptions(max_new_tokens=6, prefill_chunk=6))
    for p, out in zip(ps, outs, strict=True):
        assert out.tokens.tolist() == greedy_reference(m, p, 6)
        assert out.stop == "length"
    np.testing.assert_array_equal(generate_batch(m, np.stack(ps[:1]), 6)[0], outs[0].tokens)


def test_a_stop_token_ends_its_row_and_the_others_go_on(m):
    ps = prompts(15, 9, 20)
    free = generate(m, ps, GenerateOptions(max_new_tokens=6))
    stop = int(free[0].tokens[2])
    outs = generate(m, ps, GenerateOptions(max_new_tokens=6), stop_ids=[stop])
    for f, o in zip(free, outs, strict=True):
        row = f.tokens.tolist()
        want = row[:row.index(stop) + 1] if stop in row else row
        assert o.tokens.tolist() == want
    assert outs[0].stop == "stop token" and len(outs[0].tokens) <= 3


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy(m):
    ps = prompts(12, 7)
    sample = GenerateOptions(strategy="sample", max_new_tokens=8, sampling=Sampling(
        temperature=1.5), seed=3)
    a, b = (generate(m, ps, sample) for _ in range(2))
    assert [o.tokens.tolist() for o in a] == [o.tokens.tolist() for o in b]
    other = generate(m, ps, GenerateOptions(strategy="sample", max_new_tokens=8,
                                            sampling=Sampling(temperature=1.5), seed=4))
    assert [o.tokens.tolist() for o in a] != [o.tokens.tolist() for o in other]
    top1 = generate(m, ps, GenerateOptions(strategy="sample", max_new_tokens=8,
                                           sampling=Sampling(top_k=1), seed=3))
    greedy = generate(m, ps, GenerateOptions(max_new_tokens=8))
    assert [o.tokens.tolist() for o in top1] == [o.tokens.tolist() for o in greedy]


def test_sampled_tokens_follow_the_filtered_softmax(m):
    """Chi-square over 2,048 rows of one prompt, each drawing its first token inside the
    loop, against the top-k / top-p / temperature softmax of that prompt's logits."""
    rows, s = 2048, Sampling(temperature=2.0, top_k=12, top_p=0.9)
    p = prompts(10)[0]
    outs = generate(m, [p] * rows, GenerateOptions(strategy="sample", max_new_tokens=1,
                                                   sampling=s, seed=0))
    probs = np.asarray(jax.nn.softmax(filtered_logits(full_logits(m, p)[None], s)[0]),
                       np.float64)
    counts = np.bincount([int(o.tokens[0]) for o in outs], minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0 and support.sum() >= 3
    expected = probs[support] * rows
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 3 * support.sum() + 30  # far above the 99.9% quantile for <= 12 dof


def test_beam_search_of_one_beam_is_greedy(m):
    ps = prompts(12, 7)
    beam = generate(m, ps, GenerateOptions(strategy="beam", num_beams=1, max_new_tokens=6))
    greedy = generate(m, ps, GenerateOptions(max_new_tokens=6))
    assert [o.tokens.tolist() for o in beam] == [o.tokens.tolist() for o in greedy]


def contrastive_reference(m, prompt, n, k, alpha):
    """Su et al.'s rule recomputed from scratch each step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        x = jnp.asarray(ids)[None]
        h_TD = normed_features(m, x[0])
        probs = jax.nn.softmax(m.head(h_TD[None, -1:])[0, 0])
        top_p, top_ids = jax.lax.top_k(probs, k)
        unit_TD = h_TD / jnp.linalg.norm(h_TD, axis=-1, keepdims=True)
        scores = []
        for p, v in zip(top_p.tolist(), top_ids.tolist(), strict=True):
            h_v = normed_features(m, ids + [v])[-1]
            penalty = float(jnp.max(unit_TD @ (h_v / jnp.linalg.norm(h_v))))
            scores.append((1 - alpha) * p - alpha * penalty)
        ids.append(int(top_ids[int(np.argmax(scores))]))
    return ids[len(prompt):]


def test_contrastive_search_equals_recomputing_everything(m):
    ps = prompts(9, 5)
    outs = generate(m, ps, GenerateOptions(strategy="contrastive", top_k=3, penalty_alpha=0.6,
                                           max_new_tokens=5))
    for p, out in zip(ps, outs, strict=True):
        assert out.tokens.tolist() == contrastive_reference(m, p, 5, 3, 0.6)
    greedy = generate(m, ps, GenerateOptions(max_new_tokens=5))
    assert [o.tokens.tolist() for o in outs] != [o.tokens.tolist() for o in greedy]


def test_stop_strings_cut_the_text_and_streamed_pieces_add_up(m):
    tok = ByteTokenizer()
    ps = prompts(8, 13)
    free = generate(m, ps, GenerateOptions(max_new_tokens=24), tokenizer=tok)
    stop = free[0].text[5:7]
    pieces = {0: [], 1: []}
    outs = generate(m, ps, GenerateOptions(max_new_tokens=24), tokenizer=tok,
                    stop_strings=[stop], segment=4,
                    on_text=lambda row, text: pieces[row].append(text))
    first = free[0].text.index(stop) + len(stop)
    assert outs[0].text == free[0].text[:first] and outs[0].stop == "stop string"
    for row, out in enumerate(outs):
        assert "".join(pieces[row]) == out.text
        if stop not in free[row].text:
            assert out.text == free[row].text
    assert len(pieces[0]) >= 2  # streamed as it went, not at the end


def test_generation_on_a_tensor_fsdp_mesh_equals_one_device(m):
    """Greedy and beam search on a (fsdp 2, tensor 2) mesh: the same tokens, and each device
    holds a quarter of the attention and MLP weights (nothing gathered on one device)."""
    import ml_collections

    from gigajax.parallel.mesh import make_mesh
    from gigajax.parallel.rules import make_layout
    from gigajax.parallel.shardings import activation_rules, param_shardings

    mesh = make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 2, "sequence": 1,
                                                "tensor": 2}), jax.devices()[:4])
    layout = make_layout(m.cfg.n_kv_heads, dict(mesh.shape))
    graphdef, state = nnx.split(m)
    with activation_rules(layout.activations):
        shardings = param_shardings(state, mesh, layout.params)
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    wq = sharded.blocks.attn.wq[...]
    assert wq.addressable_shards[0].data.size * 4 == wq.size
    rules = tuple({**layout.activations, "batch": None}.items())
    ps = prompts(12, 7)
    for opts in (GenerateOptions(max_new_tokens=6),
                 GenerateOptions(strategy="beam", num_beams=2, max_new_tokens=6)):
        want = generate(m, ps, opts)
        with jax.set_mesh(mesh):
            got = generate(sharded, ps, opts, rules=rules)
        assert [o.tokens.tolist() for o in got] == [o.tokens.tolist() for o in want]
