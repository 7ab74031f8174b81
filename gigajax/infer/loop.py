"""The compiled decode loop: a chunked prefill, then `lax.while_loop` over new tokens, each chosen
by a strategy (greedy or sampled here; `beam.py`, `contrastive.py`), with no host round trip per
token.

Two programs per (strategy, batch, prompt bucket, cache length): `start` prefills the prompts
and returns the loop state, `run` advances it until `stop_at` tokens or every row has stopped.
The host calls `run` once, or every few tokens to stream text and check stop strings
(`generate.py`). Prompts are left-padded to one length: row b's tokens start at slot
`start_B[b]`, so every row's next token goes to the same cache slot.

A state is a dict of arrays; every strategy keeps `logits` (of the next token, [R, V]),
`cache`, `index` (the slot the next token is written to) and `n` (tokens chosen so far).
`ctx` holds the per-call arrays: `start` [B], `stop_ids` [n_stop], `key`, and for token
healing `allowed` [B, R + 1, V] and `token_len` [V] (`healing.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.infer.healing import healing_mask
from gigajax.infer.sampling import Sampling, repetition_penalty, sample
from gigajax.model import Decoder
from gigajax.parallel.shardings import activation_rules

State = dict[str, Any]
Context = dict[str, jax.Array]


class Strategy(Protocol):
    """How the next token is chosen; a frozen dataclass (a static argument of the programs)."""

    needs_features: bool  # keep every position's final-normed features (contrastive search)

    def init(self, logits_BV: jax.Array, cache: dict, features_BSD: jax.Array | None,
             prompts_BT: jax.Array, ctx: Context, max_new: int) -> State: ...

    def step(self, model: Decoder, s: State, ctx: Context) -> State: ...

    def finished(self, s: State) -> jax.Array: ...

    def result(self, s: State) -> tuple[jax.Array, jax.Array]:
        """(tokens [B, N], lengths [B]): each prompt's generated ids, valid up to its length."""
        ...


def prefill(model: Decoder, prompts_BT: jax.Array, start_B: jax.Array, cache: dict, chunk: int,
            features_BSD: jax.Array | None = None
            ) -> tuple[jax.Array, dict, jax.Array | None]:
    """Fill the cache with the prompts, `chunk` tokens at a time under `lax.scan` (attention
    memory grows with chunk x cache length); the last chunk moves back to end at the prompt's
    end, rewriting a few slots with the same values, so all chunks have one shape. Returns the
    next-token logits [B, V], the cache and (if given) the features written into
    `features_BSD`."""
    T = prompts_BT.shape[1]
    C = min(chunk, T)
    starts = jnp.asarray(sorted({min(s, T - C) for s in range(0, T, C)}), jnp.int32)

    def one_chunk(carry, start):
        cache, features_BSD = carry
        tokens_BC = jax.lax.dynamic_slice_in_dim(prompts_BT, start, C, axis=1)
        h_BCD, cache = model.decode_features(tokens_BC, cache, start, start_B)
        if features_BSD is not None:
            features_BSD = jax.lax.dynamic_update_slice_in_dim(
                features_BSD, h_BCD.astype(features_BSD.dtype), start, axis=1)
        return (cache, features_BSD), h_BCD[:, -1]

    (cache, features_BSD), last_nBD = jax.lax.scan(one_chunk, (cache, features_BSD), starts)
    return model.head(last_nBD[-1][:, None])[:, 0], cache, features_BSD


def is_stop(token_B: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """Whether each token is a stop token [B] (an empty `stop_ids` stops nothing)."""
    return jnp.any(token_B[:, None] == stop_ids[None], axis=-1)


def constrained(logits_RV: jax.Array, s: State, ctx: Context, prompt_of_R: jax.Array
                ) -> jax.Array:
    """The logits with token healing's constraint applied (unchanged without healing);
    `prompt_of_R` maps each row to its prompt's table."""
    if "spelled" not in s:
        return logits_RV
    allowed_RV = healing_mask(ctx["allowed"][prompt_of_R], s["spelled"])
    return jnp.where(allowed_RV, logits_RV, -jnp.inf)


def record(s: State, token_B: jax.Array, ctx: Context) -> State:
    """Append each row's token (a stopped row's is ignored) and update lengths and stops."""
    done_B, n = s["done"], s["n"]
    token_B = jnp.where(done_B, 0, token_B)
    out = dict(s, tokens=s["tokens"].at[:, n].set(token_B),
               lengths=jnp.where(done_B, s["lengths"], n + 1),
               done=done_B | is_stop(token_B, ctx["stop_ids"]))
    if "spelled" in s:
        out["spelled"] = s["spelled"] + ctx["token_len"][token_B]
    if "seen" in s:
        out["seen"] = s["seen"].at[jnp.arange(token_B.shape[0]), token_B].set(True)
    return out


def token_state(logits_BV: jax.Array, cache: dict, prompts_BT: jax.Array, ctx: Context,
                max_new: int, track_seen: bool) -> State:
    """The state of a one-row-per-prompt strategy after the prefill."""
    B, T = prompts_BT.shape
    s = {"logits": logits_BV, "cache": cache, "index": jnp.int32(T), "n": jnp.int32(0),
         "tokens": jnp.zeros((B, max_new), jnp.int32), "lengths": jnp.zeros(B, jnp.int32),
         "done": jnp.zeros(B, bool)}
    if "allowed" in ctx:
        s["spelled"] = jnp.zeros(B, jnp.int32)
    if track_seen:  # the prompt's tokens count as seen (transformers' repetition penalty)
        real_BT = jnp.arange(T)[None] >= ctx["start"][:, None]
        s["seen"] = jnp.zeros(logits_BV.shape, bool).at[
            jnp.arange(B)[:, None], prompts_BT].max(real_BT)
    return s


@dataclasses.dataclass(frozen=True)
class TokenByToken:
    """Greedy decoding (`sampling` None: the most likely token after the repetition penalty),
    or a draw from the filtered softmax (`sampling.py`), one seeded key per step."""

    sampling: Sampling | None = None
    repetition_penalty: float = 1.0
    needs_features = False

    def init(self, logits_BV, cache, features_BSD, prompts_BT, ctx, max_new):
        return token_state(logits_BV, cache, prompts_BT, ctx, max_new,
                           self.repetition_penalty != 1.0)

    def step(self, model: Decoder, s: State, ctx: Context) -> State:
        B = s["done"].shape[0]
        logits_BV = constrained(s["logits"], s, ctx, jnp.arange(B))
        if self.sampling is not None:
            key = jax.random.fold_in(ctx["key"], s["n"])
            token_B = sample(key, logits_BV, self.sampling, s.get("seen"))
        else:
            if "seen" in s:
                logits_BV = repetition_penalty(logits_BV, s["seen"], self.repetition_penalty)
            token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        s = record(s, token_B, ctx)
        logits_B1V, cache = model.decode(s["tokens"][:, s["n"], None], s["cache"], s["index"],
                                         ctx["start"])
        return dict(s, logits=logits_B1V[:, 0], cache=cache, index=s["index"] + 1,
                    n=s["n"] + 1)

    def finished(self, s: State) -> jax.Array:
        return jnp.all(s["done"])

    def result(self, s: State) -> tuple[jax.Array, jax.Array]:
        return s["tokens"], s["lengths"]


def _rules(rules: tuple | None) -> contextlib.AbstractContextManager:
    return activation_rules(dict(rules)) if rules else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "max_new", "chunk",
                                             "rules"))
def start(params: nnx.State, prompts_BT: jax.Array, ctx: Context, *, graphdef: nnx.GraphDef,
          strategy: Strategy, max_new: int, chunk: int, rules: tuple | None = None) -> State:
    """Prefill left-padded prompts [B, T] into a cache of T + max_new slots: the loop state."""
    with _rules(rules):
        model = nnx.merge(graphdef, params)
        B, T = prompts_BT.shape
        cache = model.init_cache(B, T + max_new)
        features = (jnp.zeros((B, T + max_new, model.cfg.d_model), model.cfg.dtype)
                    if strategy.needs_features else None)
        logits_BV, cache, features = prefill(model, prompts_BT, ctx["start"], cache, chunk,
                                             features)
        return strategy.init(logits_BV, cache, features, prompts_BT, ctx, max_new)


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "rules"),
                   donate_argnames=("state",))
def run(params: nnx.State, state: State, ctx: Context, stop_at: jax.Array, *,
        graphdef: nnx.GraphDef, strategy: Strategy, rules: tuple | None = None) -> State:
    """Advance the loop until `stop_at` tokens are chosen or the strategy has finished."""
    with _rules(rules):
        model = nnx.merge(graphdef, params)
        return jax.lax.while_loop(
            lambda s: (s["n"] < stop_at) & ~strategy.finished(s),
            lambda s: strategy.step(model, s, ctx), state)
