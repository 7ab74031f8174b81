"""PassKey retrieval (Mohtashami & Jaggi 2023): a random key hidden at a depth in filler text;
the model must repeat it. Scoring over a (length, depth) grid, and the heatmap; the prompts
themselves are data (`data/synthetic.py`), shared with the synthetic training documents.

The answer counts as right when the generated text, stripped of leading spaces, starts with the
key's digits. Everything is a function of (seed, length, depth, sample), so two runs score
the same prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gigajax.data.synthetic import make_prompt
from gigajax.data.tokenizer import Tokenizer

# (prompt token ids [B, T], number of new tokens N) -> the generated token ids [B, N]
Generate = Callable[[np.ndarray, int], np.ndarray]


def is_right(answer: str, key: str) -> bool:
    """Binary score: the answer, leading spaces stripped, starts with the key."""
    return answer.lstrip().startswith(key)


def score_grid(generate: Generate, tokenizer: Tokenizer, lengths: Sequence[int],
               depths: Sequence[float], samples: int = 5, seed: int = 0, key_digits: int = 5,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Mean score per (length, depth) over `samples` prompts each, and every answer the model
    gave (`answers[i][j]`: the cell's {key, answer} per sample, so a score of 0 can be read);
    JSON-ready. The prompts of one cell have the same length, so `generate` answers them as
    one batch.
    """
    grid = list(itertools.product(lengths, depths))
    scores = np.zeros((len(lengths), len(depths)))
    answers: list[list[list[dict[str, str]]]] = [[[] for _ in depths] for _ in lengths]
    for k, (length, depth) in enumerate(grid):
        prompts = [make_prompt(tokenizer, length, depth, seed, sample, key_digits)
                   for sample in range(samples)]
        new_tokens = max(len(tokenizer.encode(" " + p.key)) for p in prompts) + 1
        answers_BN = generate(np.stack([p.ids for p in prompts]), new_tokens)
        texts = [tokenizer.decode(answer_N) for answer_N in answers_BN]
        right = sum(is_right(text, p.key) for text, p in zip(texts, prompts, strict=True))
        scores[k // len(depths), k % len(depths)] = right / samples
        answers[k // len(depths)][k % len(depths)] = [
            {"key": p.key, "answer": text} for text, p in zip(texts, prompts, strict=True)]
        if progress:
            progress(k + 1, len(grid))
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "key_digits": key_digits, "scores": scores.tolist(), "mean": float(scores.mean()),
            "answers": answers}


def plot_heatmap(result: dict | Sequence[dict], path: str | Path,
                 title: str | Sequence[str] = "PassKey retrieval", suptitle: str = "") -> None:
    """Score per (depth, length) as a heatmap PNG (rows: depth, columns: length); several
    results (with a title each) side by side as panels sharing one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [result] if isinstance(result, dict) else list(result)
    titles = [title] if isinstance(title, str) else list(title)
    if len(titles) != len(results):
        raise ValueError(f"{len(results)} results but {len(titles)} titles")
    n_depths, n_lengths = np.asarray(results[0]["scores"]).T.shape
    fig, axes = plt.subplots(1, len(results), squeeze=False, sharey=True, figsize=(
        0.8 + len(results) * max(2.4, 0.6 + 0.9 * n_lengths), 1.2 + 0.5 * n_depths))
    for ax, res, name in zip(axes[0], results, titles, strict=True):
        scores = np.asarray(res["scores"]).T  # [depth, length]
        image = ax.imshow(scores, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(res["lengths"])), [str(n) for n in res["lengths"]])
        ax.set_yticks(range(len(res["depths"])), [f"{d:.2f}" for d in res["depths"]])
        ax.set_xlabel("context length (tokens)")
        for (i, j), value in np.ndenumerate(scores):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
