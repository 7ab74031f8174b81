"""Generated training data: PassKey documents (`data.source=passkey`), the task that
`gigajax eval passkey` scores, so a small model can learn retrieval in minutes.

A PassKey prompt (Mohtashami & Jaggi 2023) is `INSTRUCTION + filler[:a] + NEEDLE + filler[a:] +
QUESTION`, cut to `length` tokens by the amount of filler; `depth` in [0, 1] places the needle
that far into the filler; `eval/passkey.py` scores a model on them. A training document is
`prompt + ANSWER + EOS` (" <key>." after the question).

Window i of T+1 tokens is a function of (seed, split, i) alone: documents with prompt lengths
drawn uniformly from [shortest prompt, what still fits] are laid one after another until the next
would not fit whole, and the rest of the window holds the start of one more prompt (cut off, never
its answer). So every trained answer has its needle in the same window, documents start at window
starts (positions, segment ids and loss masks come from `pipeline.batch_features` as for every
source), and windows are independent, so no shuffle is needed. The answer's tokens have loss
weight 1, every other token `text_weight` (0: the answer alone; 1: a plain language-model loss
over everything).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from gigajax.data.tokenizer import Tokenizer
from gigajax.errors import ConfigError

SPLITS = {"train": 0, "validation": 1}  # a separate random stream per split
WINDOWS = 1 << 31  # windows per "epoch": the index range, not data held anywhere

INSTRUCTION = ("There is important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. ")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"

ANSWER = " {key}."  # what follows QUESTION: the synthetic training data's target



@dataclasses.dataclass(frozen=True)
class Prompt:
    """One PassKey prompt: its token ids, the key, and where the needle sits."""

    ids: np.ndarray  # [length] token ids
    key: str  # the digits to retrieve
    length: int
    depth: float


def make_key(rng: np.random.Generator, key_digits: int = 5) -> str:
    """`key_digits` random decimal digits (leading zeros allowed)."""
    return "".join(str(d) for d in rng.integers(0, 10, key_digits))


def fixed_tokens(tokenizer: Tokenizer, key: str, instruction: bool = True) -> int:
    """Tokens of a prompt without filler: instruction, needle with `key`, question."""
    return sum(len(tokenizer.encode(text))
               for text in (INSTRUCTION * instruction, NEEDLE.format(key=key), QUESTION))


def shortest_length(tokenizer: Tokenizer, key_digits: int = 5) -> int:
    """The shortest `length` a prompt can have (no filler), for a `key_digits`-digit key."""
    return fixed_tokens(tokenizer, "0" * key_digits)


def build_prompt(tokenizer: Tokenizer, length: int, depth: float, key: str,
                 instruction: bool = True) -> Prompt:
    """The prompt of `length` tokens with `key` in its needle at `depth` of the filler (and
    without the instruction if `instruction` is False: synthetic training data only)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} must lie in [0, 1]")
    head = tokenizer.encode(INSTRUCTION * instruction)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the prompt without filler "
                         f"({length - budget} tokens)")
    unit = tokenizer.encode(FILLER)
    filler = np.tile(unit, budget // max(len(unit), 1) + 1)[:budget]
    cut = int(round(depth * budget))
    ids = np.concatenate([head, filler[:cut], needle, filler[cut:], question]).astype(np.int32)
    return Prompt(ids, key, length, depth)


def make_prompt(tokenizer: Tokenizer, length: int, depth: float, seed: int, sample: int = 0,
                key_digits: int = 5) -> Prompt:
    """The prompt of `length` tokens with a `key_digits`-digit key at `depth` of the filler."""
    rng = np.random.default_rng([seed, length, int(round(depth * 1e6)), sample])
    return build_prompt(tokenizer, length, depth, make_key(rng, key_digits))


def document(tokenizer: Tokenizer, length: int, depth: float, key: str, instruction: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
    """One document, prompt of `length` tokens + answer + EOS, and its answer mask (1 on the
    answer's tokens)."""
    prompt = build_prompt(tokenizer, length, depth, key, instruction).ids
    answer = tokenizer.encode(ANSWER.format(key=key)).astype(np.int32)
    tokens = np.concatenate([prompt, answer, [tokenizer.eos_id]]).astype(np.int32)
    mask = np.zeros(len(tokens), np.uint8)
    mask[len(prompt):len(prompt) + len(answer)] = 1
    return tokens, mask


def smallest_document(tokenizer: Tokenizer, key_digits: int) -> int:
    """Tokens of the shortest document (no filler) with a `key_digits`-digit key."""
    key = "0" * key_digits
    return (shortest_length(tokenizer, key_digits)
            + len(tokenizer.encode(ANSWER.format(key=key))) + 1)


class PasskeyWindows(Sequence):
    """Random access to PassKey windows: item i = (tokens [seq_len + 1] int32, loss weights of
    those tokens as targets [seq_len + 1] float32: 1 on answers, `text_weight` elsewhere).

    Keys have `min_key_digits` (0: `key_digits`) to `key_digits` digits, uniformly; a share
    `short_rate` of documents leave out the instruction. Both only shape training data: the
    benchmark's documents are the defaults (whole prompts, `key_digits` digits).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, seed: int, split: str = "train",
                 key_digits: int = 5, text_weight: float = 0.0, short_rate: float = 0.0,
                 min_key_digits: int = 0):
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.split, self.key_digits, self.text_weight = SPLITS[split], key_digits, text_weight
        self.short_rate, self.min_key_digits = short_rate, min_key_digits or key_digits
        if smallest_document(tokenizer, key_digits) > seq_len + 1:
            raise ValueError(f"a PassKey document needs at least "
                             f"{smallest_document(tokenizer, key_digits)} tokens; seq_len "
                             f"{seq_len} + 1 is shorter")

    def __len__(self) -> int:
        return WINDOWS

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < WINDOWS:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.split, i])
        room = self.seq_len + 1
        tokens, answers = [], []
        while room:
            digits = int(rng.integers(self.min_key_digits, self.key_digits + 1))
            key = make_key(rng, digits)
            instruction = bool(rng.random() >= self.short_rate)
            depth = float(rng.random())
            floor = fixed_tokens(self.tokenizer, key, instruction)
            extra = len(self.tokenizer.encode(ANSWER.format(key=key))) + 1
            if floor + extra > room:  # no whole document fits: the start of one more prompt
                cut = build_prompt(self.tokenizer, max(floor, room), depth, key,
                                           instruction).ids[:room]
                tokens.append(cut)
                answers.append(np.zeros(len(cut), np.uint8))
                break
            length = int(rng.integers(floor, room - extra + 1))
            doc, answer = document(self.tokenizer, length, depth, key, instruction)
            tokens.append(doc)
            answers.append(answer)
            room -= len(doc)
        weights_T1 = np.where(np.concatenate(answers) == 1, 1.0, self.text_weight)
        return np.concatenate(tokens).astype(np.int32), weights_T1.astype(np.float32)


def check_passkey_config(data_cfg: ml_collections.ConfigDict, tok: Tokenizer) -> None:
    """A window holds a whole document (the `data.passkey.*` ranges are config field checks)."""
    digits = data_cfg.passkey.key_digits
    need = smallest_document(tok, digits)
    if data_cfg.seq_len + 1 < need:
        raise ConfigError(f"config.data.seq_len={data_cfg.seq_len} is too short for PassKey: "
                          f"a document without filler takes {need} tokens with "
                          f"data.passkey.key_digits={digits}; use data.seq_len >= {need - 1} "
                          f"({need - 1 + 64} or more leaves room for filler), or shorter keys.")


def preference_records(n: int, seed: int = 0, letters: int = 8,
                       answer: int = 4) -> list[dict[str, str]]:
    """A synthetic DPO task (`data prepare --dpo` records): the prompt is `letters` random
    lowercase letters, the chosen answer repeats its last letter `answer` times (the rule), the
    rejected one repeats another letter (it breaks the rule)."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    records = []
    for _ in range(n):
        prompt = "".join(rng.choice(alphabet, letters))
        other = rng.choice(alphabet[alphabet != prompt[-1]])
        records.append({"prompt": prompt, "chosen": prompt[-1] * answer,
                        "rejected": str(other) * answer})
    return records
