"""Sampling the next token: the logits processors `transformers.generate` applies, in its order
(repetition penalty, temperature, top-k, top-p, min-p), then a draw from what is left.

Each processor maps logits [B, V] (float32) to logits [B, V] with removed tokens at -inf, so the
filtered softmax is the exact distribution a draw follows (tested by a chi-square test against
it). Pure functions of arrays and a `Sampling` setting; the decode loop (`generate.py`) carries
the PRNG key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gigajax.errors import GigajaxError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a sampled token is drawn from; the defaults change nothing (plain softmax)."""

    temperature: float = 1.0  # > 0: logits / temperature
    top_k: int = 0  # 0: off; else keep the k most likely tokens
    top_p: float = 1.0  # (0, 1]: keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # [0, 1): drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # > 0: seen tokens' logits / penalty (x penalty if < 0)

    def __post_init__(self) -> None:
        checks = [("temperature", self.temperature > 0, "a number > 0"),
                  ("top_k", isinstance(self.top_k, int) and self.top_k >= 0,
                   "an integer >= 0 (0 turns it off)"),
                  ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("min_p", 0 <= self.min_p < 1, "a number in [0, 1)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "a number > 0")]
        for name, ok, allowed in checks:
            if not ok:
                raise GigajaxError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: use "
                                   f"{allowed}.")


def repetition_penalty(logits_BV: jax.Array, seen_BV: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty (Keskar et al. 2019) as transformers applies it: a seen token's logit is
    divided by `penalty` when positive, multiplied when negative."""
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def top_k(logits_BV: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits (ties with the k-th are kept too, as transformers does)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p(logits_BV: jax.Array, p: float) -> jax.Array:
    """Nucleus sampling (Holtzman et al. 2020): keep the most likely tokens until their
    probability reaches `p` (at least one)."""
    if p >= 1.0:
        return logits_BV
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the tokens ahead
    keep_sorted_BV = before_BV < p  # the first token always: nothing is ahead of it
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[
        jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def min_p(logits_BV: jax.Array, p: float) -> jax.Array:
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below p x the largest."""
    if p <= 0.0:
        return logits_BV
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    floor_B1 = p * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV < floor_B1, -jnp.inf, logits_BV)


def filtered_logits(logits_BV: jax.Array, s: Sampling,
                    seen_BV: jax.Array | None = None) -> jax.Array:
    """The logits a token is drawn from: every processor of `s`, in transformers' order."""
    x = logits_BV.astype(jnp.float32)
    if seen_BV is not None and s.repetition_penalty != 1.0:
        x = repetition_penalty(x, seen_BV, s.repetition_penalty)
    x = x / s.temperature
    return min_p(top_p(top_k(x, s.top_k), s.top_p), s.min_p)


def sample(key: jax.Array, logits_BV: jax.Array, s: Sampling,
           seen_BV: jax.Array | None = None) -> jax.Array:
    """Token ids [B] drawn from the filtered softmax of each row."""
    return jax.random.categorical(key, filtered_logits(logits_BV, s, seen_BV),
                                  axis=-1).astype(jnp.int32)
