"""KV-cache decoding equals the full forward pass: prefill, token-by-token steps, GQA, sliding
windows; greedy generation equals argmax over full recomputation."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigajax.config import ModelConfig, load_config
from gigajax.infer.generate import generate, generate_batch
from gigajax.model import Decoder

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def model(*overrides):
    cfg = load_config(ROOT / "configs" / "tiny.py", [
        "--config.model.dtype=float32", "--config.model.n_layers=2", *overrides])
    with nnx.use_eager_sharding(False):  # names stay metadata: one device, no mesh
        return Decoder(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("overrides", [
    [], ["--config.model.n_kv_heads=1"], ["--config.model.sliding_window=5"]])
def test_prefill_then_steps_match_the_full_forward(overrides):
    m = model(*overrides)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 20), 0, 300)
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


def test_greedy_generation_equals_argmax_of_full_recomputation():
    m = model()
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (15,), 0, 300))
    got = generate(m, prompt, 8)
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(jnp.argmax(m(jnp.asarray(ids)[None])[0, -1])))
    np.testing.assert_array_equal(got, ids[len(prompt):])
    first = int(got[0])
    assert list(generate(m, prompt, 8, eos_id=first)) == [first]  # stops at EOS


def test_chunked_prefill_and_batches_equal_one_prompt_at_a_time():
    """Chunks of 6 over a 15-token prompt (the last one overlapping) and a batch of 3 give the
    same tokens as whole-prompt prefill, prompt by prompt."""
    m = model("--config.model.n_kv_heads=1")
    prompts_BT = np.asarray(jax.random.randint(jax.random.key(3), (3, 15), 0, 300))
    want = np.stack([generate(m, p, 6, prefill_chunk=64) for p in prompts_BT])
    np.testing.assert_array_equal(generate_batch(m, prompts_BT, 6, prefill_chunk=6), want)
    np.testing.assert_array_equal(generate(m, prompts_BT[0], 6, prefill_chunk=4), want[0])
