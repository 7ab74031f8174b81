"""`gigajax eval passkey`: the PassKey grid (`eval/passkey.py`) of a trained checkpoint, under one
or more RoPE scalings; results as JSON, a heatmap PNG (one panel per scaling) and a table.

Answers come from greedy decoding with a KV cache (`infer/generate.py`), the samples of one grid
cell as a batch, on one device. A RoPE scaling is applied at evaluation time only (no fine-tuning):
`linear` is position interpolation (Chen et al. 2023), `yarn` is YaRN (Peng et al. 2023),
`llama3` and `dynamic` (NTK) as transformers computes them (`model/rope.py`), with
`factor` either fixed or, with `auto`, chosen per length as length / trained context (at least
1, so the trained length is always scored with the model as trained). The trained context is the
config's `model.rope_scaling.original_max_seq_len`, or the run's `data.seq_len` when that is 0
and the run trained without scaling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gigajax.config.schema import ROPE_SCALINGS
from gigajax.data.pipeline import data_tokenizer
from gigajax.data.synthetic import shortest_length
from gigajax.data.tokenizer import Tokenizer
from gigajax.errors import GigajaxError
from gigajax.eval import passkey
from gigajax.infer.generate import generate_batch
from gigajax.infer.loading import Trained, build_model, trained_context

TITLES = {"none": "RoPE as trained", "linear": "PI (linear)", "yarn": "YaRN", "llama3": "Llama 3",
          "dynamic": "dynamic NTK"}


@dataclasses.dataclass(frozen=True)
class Rope:
    """One RoPE scaling to evaluate: its type and factor (None: length / trained context)."""

    type: str
    factor: float | None

    def factor_at(self, length: int, original: int) -> float:
        if self.type == "none":
            return 1.0
        return self.factor if self.factor is not None else max(1.0, length / original)

    def title(self, original: int) -> str:
        if self.type == "none":
            return TITLES["none"]
        factor = f"length/{original}" if self.factor is None else f"{self.factor:g}"
        return f"{TITLES[self.type]}, factor {factor}"


def parse_lengths(text: str) -> list[int]:
    """'512,1k,2k' -> [512, 1024, 2048] (k = 1024)."""
    lengths = []
    for item in (s.strip().lower() for s in text.split(",") if s.strip()):
        try:
            value = float(item[:-1]) * 1024 if item.endswith("k") else float(item)
        except ValueError:
            value = 0.0
        if not math.isfinite(value) or value < 1 or value != int(value):
            raise GigajaxError(f"--lengths {text!r}: {item!r} is not a token count; write whole "
                               "numbers or multiples of 1k = 1024 tokens, e.g. 512,1k,2k,4k.")
        lengths.append(int(value))
    if not lengths:
        raise GigajaxError("--lengths is empty; e.g. --lengths 1k,2k,4k.")
    return lengths


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each in [0, 1]."""
    try:
        depths = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        depths = []
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):  # (NaN fails too)
        raise GigajaxError(f"--depths {text!r}: give comma-separated needle depths in [0, 1] "
                           "(0: right after the instruction, 1: just before the question), "
                           "e.g. 0,0.25,0.5,0.75,1.")
    return depths


def parse_ropes(types: str | None, factor: str | None, config_type: str,
                config_factor: float) -> list[Rope]:
    """`--rope none,linear,yarn` and `--rope-factor auto|F` -> the scalings to run. Without
    --rope: the config's own scaling (and factor, unless --rope-factor says otherwise)."""
    names = [s.strip() for s in types.split(",") if s.strip()] if types else [config_type]
    for name in names:
        if name not in ROPE_SCALINGS:
            raise GigajaxError(f"--rope {types!r}: {name!r} is not a RoPE scaling; choose from "
                               f"{', '.join(ROPE_SCALINGS)} (linear = position interpolation).")
    if factor is None:
        factor = "auto" if types else str(config_factor)
    if factor == "auto":
        value = None
    else:
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not (math.isfinite(value) and value >= 1.0):
            raise GigajaxError(f"--rope-factor {factor!r}: use auto (length / trained context) "
                               "or a finite number >= 1.")
    if names == ["none"] and value not in (None, 1.0):
        raise GigajaxError(f"--rope-factor {factor} scales nothing: the run has no RoPE scaling; "
                           "say which with --rope linear or --rope yarn (or both).")
    return [Rope(name, value) for name in dict.fromkeys(names)]


def original_context(trained: Trained) -> int:
    """The context RoPE scaling stretches from (module docstring)."""
    rs = trained.config.model.rope_scaling
    if rs.original_max_seq_len:
        return int(rs.original_max_seq_len)
    if trained.saved_config.get("model", {}).get("rope_scaling", {}).get("type", "none") != "none":
        return int(trained.config.model.max_seq_len / rs.factor)  # the config's own rule
    return trained_context(trained.saved_config)


def check_lengths(lengths: Sequence[int], tokenizer: Tokenizer, key_digits: int) -> None:
    """Every length holds at least the prompt without filler."""
    shortest = shortest_length(tokenizer, key_digits)
    if min(lengths) < shortest:
        raise GigajaxError(f"--lengths {min(lengths)} is shorter than the PassKey prompt without "
                           f"filler ({shortest} tokens with a {key_digits}-digit key): use "
                           f"lengths >= {shortest}.")


def _generator(trained: Trained, rope: Rope, original: int, batch_size: int
               ) -> passkey.Generate:
    """Greedy answers of the trained params under `rope` (a model per prompt length, since
    the factor may depend on it), `batch_size` prompts at a time."""
    models = {}

    def generate(ids_BT: np.ndarray, new_tokens: int) -> np.ndarray:
        length = ids_BT.shape[1]
        if length not in models:
            cfg = trained.config.copy_and_resolve_references()
            rs = cfg.model.rope_scaling
            rs.type, rs.factor = rope.type, rope.factor_at(length, original)
            if rope.type != "none":
                rs.original_max_seq_len = original
            models[length] = build_model(trained.params, cfg)
        return np.concatenate([
            generate_batch(models[length], ids_BT[i:i + batch_size], new_tokens)
            for i in range(0, len(ids_BT), batch_size)])

    return generate


def run_passkey(trained: Trained, lengths: Sequence[int], depths: Sequence[float],
                ropes: Sequence[Rope], samples: int = 5, seed: int = 0, key_digits: int = 5,
                batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> dict:
    """Score the grid once per RoPE scaling; the JSON-ready result."""
    if min(samples, batch_size, key_digits) < 1:
        raise GigajaxError(f"--samples {samples}, --batch-size {batch_size} and --key-digits "
                           f"{key_digits} must be >= 1.")
    if not 0 <= seed < 2**31:
        raise GigajaxError(f"--seed {seed}: give a seed in [0, 2**31).")
    tokenizer = data_tokenizer(trained.config.data)
    check_lengths(lengths, tokenizer, key_digits)
    original = original_context(trained)
    cells, done = len(ropes) * len(lengths) * len(depths), 0
    runs = []
    for rope in ropes:
        generate = _generator(trained, rope, original, batch_size)

        def tick(k: int, total: int, offset: int = done) -> None:
            if progress:
                progress(offset + k, cells)

        start = time.perf_counter()
        grid = passkey.score_grid(generate, tokenizer, lengths, depths, samples, seed,
                                  key_digits, progress=tick)
        done += len(lengths) * len(depths)
        scores = np.asarray(grid["scores"])
        runs.append({"rope": rope.type, "title": rope.title(original),
                     "factors": [rope.factor_at(n, original) for n in lengths],
                     "scores": grid["scores"], "mean": grid["mean"],
                     "mean_by_length": scores.mean(axis=1).tolist(),
                     "answers": grid["answers"],
                     "seconds": round(time.perf_counter() - start, 1)})
    return {"benchmark": "passkey", "checkpoint": _shown(trained.path), "step": trained.step,
            "lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "key_digits": key_digits, "trained_context": original, "runs": runs,
            "config": trained.config.to_dict()}


def _shown(path: Path) -> str:
    """`path` relative to the working directory when inside it (results stay portable)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_outputs(result: dict, out_dir: str | Path, name: str = "passkey") -> tuple[Path, Path]:
    """`<name>.json` and `<name>.png` (one heatmap panel per run) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    panels = [{**result, "scores": run["scores"]} for run in result["runs"]]
    step = f", step {result['step']}" if result["step"] is not None else ""
    passkey.plot_heatmap(panels, png_path, [run["title"] for run in result["runs"]],
                         suptitle=f"PassKey, {result['samples']} samples per cell; trained at "
                                  f"{result['trained_context']} tokens{step}")
    return json_path, png_path


def format_table(result: dict) -> str:
    """Accuracy per depth (rows) and length (columns), one block per RoPE scaling."""
    lines = []
    width = max(7, *(len(str(n)) + 2 for n in result["lengths"]))
    for run in result["runs"]:
        lines.append(f"{run['title']}: mean {run['mean']:.2f}")
        lines.append("depth".ljust(7) + "".join(str(n).rjust(width) for n in result["lengths"]))
        scores = np.asarray(run["scores"])  # [length, depth]
        for j, depth in enumerate(result["depths"]):
            lines.append(f"{depth:<7.2f}" + "".join(f"{s:{width}.2f}" for s in scores[:, j]))
        lines.append("mean".ljust(7) + "".join(f"{s:{width}.2f}" for s in run["mean_by_length"]))
    return "\n".join(lines)
