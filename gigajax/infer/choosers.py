"""How the next token is chosen from the logits: a chooser maps logits [B, V] (float32) to token
ids [B] (int32) inside the jitted decode step. Greedy today; samplers, beam and contrastive
search plug in here with the same signature (with their own state where they need it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Chooser = Callable[[jax.Array], jax.Array]  # logits [B, V] -> next token ids [B]


def greedy(logits_BV: jax.Array) -> jax.Array:
    """The most likely token (ties: the lowest id)."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


CHOOSERS: dict[str, Chooser] = {"greedy": greedy}
