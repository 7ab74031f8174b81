"""Greedy generation with a KV cache: one prefill of the prompt, then one token per step.

Two compiled programs (the prompt's length, and one token), the cache index a traced scalar,
so a long generation does not recompile. One device; the model's own layers (`Decoder.decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigajax.model import Decoder


def greedy_generate(model: Decoder, prompt_ids: np.ndarray, max_new_tokens: int,
                    eos_id: int | None = None) -> np.ndarray:
    """The argmax continuation of `prompt_ids` [T]: up to `max_new_tokens` ids, stopping after
    `eos_id` if given."""
    prompt_1T = jnp.asarray(prompt_ids, jnp.int32)[None]
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, prompt_1T.shape[1] + max_new_tokens)

    @jax.jit
    def step(state, tokens_1T, cache, index):
        logits_1TV, cache = nnx.merge(graphdef, state).decode(tokens_1T, cache, index)
        return jnp.argmax(logits_1TV[:, -1], axis=-1).astype(jnp.int32), cache

    token_1, cache = step(state, prompt_1T, cache, jnp.int32(0))
    out = [int(token_1[0])]
    index = prompt_1T.shape[1]
    while len(out) < max_new_tokens and (eos_id is None or out[-1] != eos_id):
        token_1, cache = step(state, token_1[:, None], cache, jnp.int32(index))
        out.append(int(token_1[0]))
        index += 1
    return np.asarray(out, np.int32)
