"""Generation with a KV cache: a prefill of the prompt, then one token per step, each token
picked by a chooser (`choosers.py`: greedy today).

The prompt is prefilled in chunks of at most `prefill_chunk` tokens (attention memory grows with
chunk x cache length, not prompt length squared); the last chunk is moved back to end at the
prompt's end, recomputing a few cached tokens (the same keys and values, written again), so
every chunk has one shape. Two compiled programs per (batch, cache length, chooser): a chunk and
one token; the cache index is a traced scalar and the step is jitted once per module (the graph
definition and the chooser are static arguments), so repeated calls and long generations do not
recompile. One device; the model's own layers (`Decoder.decode`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigajax.infer.choosers import Chooser, greedy
from gigajax.model import Decoder


@functools.partial(jax.jit, static_argnums=(0, 5))
def _decode_step(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array,
                 cache: dict[str, jax.Array], index: jax.Array, choose: Chooser
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The chosen next token [B] after `tokens_BT` at cache slots [index, index+T), and the
    updated cache."""
    logits_BTV, cache = nnx.merge(graphdef, state).decode(tokens_BT, cache, index)
    return choose(logits_BTV[:, -1]), cache


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, prompts_BT: jax.Array,
             cache: dict[str, jax.Array], chunk: int, choose: Chooser
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fill the cache with the prompts in chunks; the chosen token after the last one [B]."""
    T = prompts_BT.shape[1]
    chunk = min(chunk, T)
    for start in range(0, T, chunk):
        start = min(start, T - chunk)  # the last chunk ends at T (recomputing some slots)
        token_B, cache = _decode_step(graphdef, state, prompts_BT[:, start:start + chunk],
                                      cache, jnp.int32(start), choose)
    return token_B, cache


def generate_batch(model: Decoder, prompts_BT: np.ndarray, max_new_tokens: int,
                   choose: Chooser = greedy, prefill_chunk: int = 512) -> np.ndarray:
    """The continuations [B, max_new_tokens] of prompts [B, T] of one length."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompts_BT = jnp.asarray(prompts_BT, jnp.int32)
    B, T = prompts_BT.shape
    graphdef, state = nnx.split(model)
    cache = model.init_cache(B, T + max_new_tokens)
    token_B, cache = _prefill(graphdef, state, prompts_BT, cache, prefill_chunk, choose)
    out = [token_B]
    for index in range(T, T + max_new_tokens - 1):
        token_B, cache = _decode_step(graphdef, state, token_B[:, None], cache,
                                      jnp.int32(index), choose)
        out.append(token_B)
    return np.asarray(jnp.stack(out, axis=1), np.int32)


def generate(model: Decoder, prompt_ids: np.ndarray, max_new_tokens: int,
             eos_id: int | None = None, choose: Chooser = greedy, prefill_chunk: int = 512
             ) -> np.ndarray:
    """The continuation of `prompt_ids` [T]: up to `max_new_tokens` ids, stopping after
    `eos_id` if given."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompt_1T = jnp.asarray(prompt_ids, jnp.int32)[None]
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, prompt_1T.shape[1] + max_new_tokens)
    token_1, cache = _prefill(graphdef, state, prompt_1T, cache, prefill_chunk, choose)
    out = [int(token_1[0])]
    index = prompt_1T.shape[1]
    while len(out) < max_new_tokens and (eos_id is None or out[-1] != eos_id):
        token_1, cache = _decode_step(graphdef, state, token_1[:, None], cache,
                                      jnp.int32(index), choose)
        out.append(int(token_1[0]))
        index += 1
    return np.asarray(out, np.int32)
