"""PassKey retrieval (Mohtashami & Jaggi 2023): a random key hidden at a depth in filler text;
the model must repeat it. Prompts, scoring over a (length, depth) grid, and the heatmap.

A prompt is `INSTRUCTION + filler[:a] + NEEDLE + filler[a:] + QUESTION`, cut to `length` tokens
by the amount of filler; `depth` in [0, 1] places the needle that far into the filler. The
answer counts as right when the generated text, stripped of leading spaces, starts with the
key's digits. Everything is a function of (seed, length, depth, sample), so two runs score
the same prompts.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gigajax.data.tokenizer import Tokenizer

INSTRUCTION = ("There is important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. ")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"

# (prompt token ids, number of new tokens) -> the generated token ids
Generate = Callable[[np.ndarray, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One PassKey prompt: its token ids, the key, and where the needle sits."""

    ids: np.ndarray  # [length] token ids
    key: str  # the digits to retrieve
    length: int
    depth: float


def make_prompt(tokenizer: Tokenizer, length: int, depth: float, seed: int, sample: int = 0,
                key_digits: int = 5) -> Prompt:
    """The prompt of `length` tokens with a `key_digits`-digit key at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} must lie in [0, 1]")
    rng = np.random.default_rng([seed, length, int(round(depth * 1e6)), sample])
    key = "".join(str(d) for d in rng.integers(0, 10, key_digits))
    head = tokenizer.encode(INSTRUCTION)
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


def is_right(answer: str, key: str) -> bool:
    """Binary score: the answer, leading spaces stripped, starts with the key."""
    return answer.lstrip().startswith(key)


def score_grid(generate: Generate, tokenizer: Tokenizer, lengths: Sequence[int],
               depths: Sequence[float], samples: int = 5, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Mean score per (length, depth) over `samples` prompts each; JSON-ready."""
    grid = list(itertools.product(lengths, depths))
    scores = np.zeros((len(lengths), len(depths)))
    for k, (length, depth) in enumerate(grid):
        right = 0
        for sample in range(samples):
            prompt = make_prompt(tokenizer, length, depth, seed, sample)
            new_tokens = len(tokenizer.encode(" " + prompt.key)) + 1
            answer = tokenizer.decode(generate(prompt.ids, new_tokens))
            right += is_right(answer, prompt.key)
        scores[k // len(depths), k % len(depths)] = right / samples
        if progress:
            progress(k + 1, len(grid))
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "scores": scores.tolist(), "mean": float(scores.mean())}


def plot_heatmap(result: dict, path: str | Path, title: str = "PassKey retrieval") -> None:
    """Score per (depth, length) as a heatmap PNG (rows: depth, columns: length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(result["scores"]).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * scores.shape[1], 1.0 + 0.5 * scores.shape[0]))
    image = ax.imshow(scores, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.2f}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), value in np.ndenumerate(scores):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
