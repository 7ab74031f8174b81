"""Token healing: the prompt-boundary fix (Lundberg 2023, guidance's "token healing").

A prompt that ends inside what the tokenizer would merge ("http:" before "//") makes the model
continue from an unusual token boundary: `link is <a href="http:` goes on as ` //site.com`,
because "://" is one token in training text and ":" alone is rarely followed by "//". Healing
backs the prompt up by its last token(s) and constrains the first generated tokens to spell
the removed text again, so the model may choose "://" itself.

The constraint runs inside the decode loop: for each prompt, a table `allowed[i, v]` says
whether token v may come next once i bytes of the removed text have been spelled again (v's
bytes extend the rest, or are a prefix of it that leaves a rest other tokens can spell); a row
past the end allows everything. The loop
carries the bytes spelled so far per row and adds the chosen token's byte length.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Healed:
    """Prompts backed up, and what their first generated tokens must spell again."""

    prompts: list[np.ndarray]  # each prompt without its last token(s)
    removed: list[bytes]  # the bytes of the removed tokens, per prompt


def back_up(prompts: Sequence[np.ndarray], token_bytes: Sequence[bytes], tokens: int = 1
            ) -> Healed:
    """Remove the last `tokens` tokens of each prompt (keeping at least one token, and never
    one whose text is empty, such as a special token)."""
    kept, removed = [], []
    for ids in prompts:
        cut = len(ids)
        while cut > max(1, len(ids) - tokens) and token_bytes[int(ids[cut - 1])]:
            cut -= 1
        kept.append(np.asarray(ids[:cut]))
        removed.append(b"".join(token_bytes[int(i)] for i in ids[cut:]))
    return Healed(kept, removed)


def allowed_tables(removed: Sequence[bytes], token_bytes: Sequence[bytes], vocab_size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(allowed [B, R + 1, V] bool, each token's byte length [V] int32, each removed text's
    length [B] int32), R the longest removed text. Row i of prompt b allows the tokens that can
    follow once i of its bytes are spelled (a token that is a prefix of the rest only if some
    tokens then spell what it leaves: no dead ends where a vocabulary lacks a byte); rows
    i >= len(removed[b]) allow every token."""
    R = max((len(r) for r in removed), default=0)
    by_first = defaultdict(list)  # first byte -> the tokens starting with it
    for v, b in enumerate(token_bytes[:vocab_size]):
        if b:
            by_first[b[0]].append(v)
    allowed = np.ones((len(removed), R + 1, vocab_size), bool)
    for row, text in enumerate(removed):
        live = np.zeros(len(text) + 1, bool)  # from which offsets the rest can be spelled
        live[len(text)] = True
        for i in range(len(text) - 1, -1, -1):  # from the end: a prefix must leave a live rest
            rest = text[i:]
            ok = [v for v in by_first[rest[0]] if token_bytes[v].startswith(rest)
                  or (rest.startswith(token_bytes[v]) and live[i + len(token_bytes[v])])]
            allowed[row, i] = False
            allowed[row, i, ok] = True
            live[i] = bool(ok)
    lengths = np.zeros(vocab_size, np.int32)
    lengths[:len(token_bytes)] = [len(b) for b in token_bytes[:vocab_size]]
    return allowed, lengths, np.asarray([len(r) for r in removed], np.int32)


def healing_mask(allowed_BRV: jax.Array, spelled_B: jax.Array) -> jax.Array:
    """The tokens each row may choose next [B, V], given the bytes spelled again so far."""
    R = allowed_BRV.shape[1] - 1
    row_B = jnp.minimum(spelled_B, R)
    return jnp.take_along_axis(allowed_BRV, row_B[:, None, None], axis=1)[:, 0]
