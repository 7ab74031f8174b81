"""Context extension end to end, on CPU: a model trained at 256 tokens that knows PassKey
(`tests/fixtures/passkey_tiny`, from `configs/passkey_tiny.py`) goes out to Hugging Face format
and back, is fine-tuned with YaRN at 4x its context (1,024 tokens) under a zigzag ring over 8
simulated devices, is scored on PassKey before and after, and is exported again; `transformers`
(when installed) then runs the export and gives the same logits, to float32 rounding.

1. round trip: `gigajax.to_hf(fixture)` writes an HF model directory (config.json, safetensors,
   tokenizer.json); `gigajax.from_hf` of it writes a gigajax params checkpoint. Both must hold
   the same tensors and give the same logits.
2. before: PassKey (`gigajax.eval_passkey`) of the base as trained, and with YaRN x4 applied
   zero-shot (the scaling alone, no training).
3. fine-tune: the base run's own config with `train.init_from` = the imported checkpoint,
   `model.rope_scaling` = yarn x4 from 256, `data.seq_len` = `model.max_seq_len` = 1,024, and
   `mesh.sequence=8`, `attention.sp_impl=ring`, `attention.layout=zigzag`: each window is split
   over the 8 devices (two 64-token chunks each) and K/V blocks travel around the ring.
   150 steps of 4 windows at a peak rate of 2e-3 (cosine) take the mean PassKey score at
   1,024 tokens from 0.00 to 1.00 (5 depths x 10 prompts).
4. after: PassKey of the fine-tuned run (its own YaRN x4); the three grids as one heatmap.
5. export: `gigajax.to_hf` of the result in float32, and transformers' logits of it against
   `gigajax.load`'s on a 1,024-token PassKey prompt (skipped without torch and transformers).

    python experiments/extend_context.py --out runs/extend_context      # 2-3 minutes on 2 cores
    python experiments/extend_context.py --out /tmp/extend --quick      # smoke run, ~25 s

Writes extend_context.json (every number printed), extend_context.png (the heatmaps) and
finetune_loss.png in --out, beside the checkpoints hf_base/, imported/, finetune/, hf_final/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import gigajax

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "passkey_tiny"
DEVICES = 8  # the ring: mesh.sequence


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="new directory for the checkpoints and results")
    p.add_argument("--base", default=str(FIXTURE),
                   help="the short-context model: a workdir or params checkpoint of a "
                        "data.source=passkey run (default tests/fixtures/passkey_tiny)")
    p.add_argument("--factor", type=int, default=4, help="context extension factor (default 4)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default 150)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--lengths", default="256,512,1k", help="PassKey lengths (k = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=10, help="prompts per cell (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 steps of 1 window, PassKey at 1k, depth 0.5, 1 sample")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.lengths, args.depths, args.samples = 2, 1, "1k", "0.5", 1
    return args


class Phases:
    """Wall time of each named phase, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{self.seconds[name]:6.1f} s] {name}", file=sys.stderr, flush=True)
        return value


def passkey_prompt(lm: gigajax.LM, length: int, depth: float = 0.5):
    """The benchmark's PassKey prompt of `length` tokens (seed 0, sample 0): .ids, .key."""
    from gigajax.data.synthetic import make_prompt

    return make_prompt(lm.tokenizer, length, depth, seed=0)


def tensors(checkpoint: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as stored, by its path ('blocks/attn/wq/kernel')."""
    import jax

    from gigajax.checkpoint.params import read_params

    leaves = jax.tree_util.tree_leaves_with_path(read_params(checkpoint).params)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(x)
            for path, x in leaves}


def round_trip(base: Path, out: Path) -> dict:
    """base -> an HF directory -> a gigajax params checkpoint; the largest differences."""
    hf_dir, imported = out / "hf_base", out / "imported"
    before = tensors(base)
    stored = "bfloat16" if any(x.dtype.name == "bfloat16" for x in before.values()) else "float32"
    gigajax.to_hf(base, hf_dir, dtype=stored)  # the checkpoint's own dtype: nothing rounds
    gigajax.from_hf(hf_dir, imported, dtype="float32")
    before = {k: x.astype(np.float32) for k, x in before.items()}
    after = tensors(imported)
    if before.keys() != after.keys():
        raise SystemExit(f"the import has other tensors: {sorted(before.keys() ^ after.keys())}")
    lm_base, lm_imported = gigajax.load(base), gigajax.load(imported)
    ids = passkey_prompt(lm_base, lm_base.config.data.seq_len).ids
    return {"hf_dir": str(hf_dir), "imported": str(imported), "hf_dtype": stored,
            "hf_files": sorted(p.name for p in hf_dir.iterdir()), "tensors": len(before),
            "max_tensor_diff": max(float(np.abs(before[k] - after[k]).max()) for k in before),
            "max_logit_diff": float(np.abs(lm_base.logits(ids) - lm_imported.logits(ids)).max()),
            "trained_context": int(lm_base.config.data.seq_len)}


def finetune_overrides(context: int, args: argparse.Namespace, init_from: Path) -> list[str]:
    """The base run's config turned into a YaRN fine-tune at factor x its context, each window
    split over a zigzag ring of DEVICES devices."""
    length, steps = args.factor * context, args.steps
    return [f"train.init_from={init_from}",
            "model.rope_scaling.type=yarn", f"model.rope_scaling.factor={args.factor}",
            f"model.rope_scaling.original_max_seq_len={context}",
            f"model.max_seq_len={length}", f"data.seq_len={length}",
            f"data.batch_size={args.batch}",
            "mesh.data=1", f"mesh.sequence={DEVICES}",
            "attention.sp_impl=ring", "attention.layout=zigzag",
            f"train.steps={steps}", f"optim.lr={args.lr}", "optim.schedule=cosine",
            f"optim.warmup_steps={max(1, steps // 10)}", f"train.log_every={max(1, steps // 30)}",
            f"train.eval_every={steps}", "train.eval_batches=1", f"train.checkpoint_every={steps}"]


def finetune(base: Path, imported: Path, workdir: Path, args: argparse.Namespace,
             context: int) -> gigajax.Run:
    cfg = gigajax.load_config(base, *finetune_overrides(context, args, imported))
    return gigajax.train(cfg, workdir, progress=False)


def compare_with_transformers(hf_dir: Path, tuned: Path, length: int, context: int) -> dict:
    """transformers' logits of the export against gigajax's on a `length`-token PassKey prompt,
    both in float32, and transformers' greedy answer to a prompt; or why it was skipped.

    float32 rounding alone moves this model's logits by a few 1e-4 at 1,024 tokens (both
    libraries'), so transformers in float64 is the reference too: gigajax should be as close
    to it as transformers' own float32 run is.
    """
    try:
        import torch
        import transformers
    except ImportError as error:
        return {"skipped": f"{error.name} is not installed"}
    transformers.utils.logging.disable_progress_bar()
    lm = gigajax.load(tuned)
    ids = torch.tensor(passkey_prompt(lm, length).ids[None], dtype=torch.long)
    logits = {}
    for dtype in (torch.float64, torch.float32):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
        with torch.no_grad():
            logits[dtype] = model(ids).logits[0].double().numpy()
    ours = lm.logits(ids[0].numpy()).astype(np.float64)
    hf32, hf64 = logits[torch.float32], logits[torch.float64]
    diff = np.abs(ours - hf32)

    short = passkey_prompt(lm, length - 8)  # room for the answer within max_position_embeddings
    with torch.no_grad():  # `model`: the float32 one
        answer = model.generate(torch.tensor(short.ids[None], dtype=torch.long),
                                max_new_tokens=7, do_sample=False)[0, len(short.ids):]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return {"transformers": transformers.__version__, "prompt_tokens": int(ids.shape[1]),
            "max_abs_logit_diff": float(diff.max()),
            "max_abs_logit_diff_first_tokens": float(diff[:context].max()), "first_tokens": context,
            "max_abs_logit": float(np.abs(ours).max()),
            "same_argmax": float((hf32.argmax(-1) == ours.argmax(-1)).mean()),
            "gigajax_vs_float64": float(np.abs(ours - hf64).max()),
            "transformers_float32_vs_float64": float(np.abs(hf32 - hf64).max()),
            "key": short.key, "answer": tokenizer.decode(answer.tolist())}


def plot_loss(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "loss" in m]
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], "o-", ms=3)
    ax.set(xlabel="fine-tuning step", ylabel="answer loss (nats/token)", yscale="log")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summary(result: dict) -> str:
    """Mean PassKey score per length for each model, then the checks and the phase times."""
    lines = ["model".ljust(32) + "".join(f"{n:>7}" for n in result["lengths"]) + "   mean"]
    for run in result["runs"]:
        lines.append(run["title"].ljust(32) + "".join(f"{s:7.2f}" for s in run["mean_by_length"])
                     + f"{run['mean']:7.2f}")
    rt, hf = result["round_trip"], result["transformers"]
    lines.append(f"HF round trip: {rt['tensors']} tensors, largest difference "
                 f"{rt['max_tensor_diff']:.1e}; logits {rt['max_logit_diff']:.1e}")
    if "skipped" in hf:
        lines.append(f"transformers comparison skipped: {hf['skipped']}")
    else:
        lines.append(
            f"transformers {hf['transformers']}, {hf['prompt_tokens']}-token prompt, float32: "
            f"largest |logit difference| {hf['max_abs_logit_diff']:.1e} "
            f"({hf['max_abs_logit_diff_first_tokens']:.1e} over the first {hf['first_tokens']}; "
            f"logits up to {hf['max_abs_logit']:.0f}); against transformers in float64: gigajax "
            f"{hf['gigajax_vs_float64']:.1e}, transformers float32 "
            f"{hf['transformers_float32_vs_float64']:.1e}; same argmax at "
            f"{hf['same_argmax']:.0%} of positions; its greedy answer {hf['answer']!r} "
            f"(key {hf['key']})")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gigajax.simulate_cpu_devices(DEVICES)  # before JAX starts
    from gigajax.eval import benchmark

    out, base = Path(args.out), Path(args.base)
    if out.exists():
        if not args.overwrite:
            raise SystemExit(f"--out {out} exists: choose another or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start, phases = time.perf_counter(), Phases()
    grid = dict(depths=args.depths, samples=args.samples)

    rt = phases.run("HF export + import", round_trip, base, out)
    context = rt["trained_context"]
    before = phases.run("PassKey before", gigajax.eval_passkey, base, args.lengths,
                        rope="none,yarn", rope_factor=args.factor, **grid)
    tuned = out / "finetune"
    run = phases.run("fine-tune", finetune, base, Path(rt["imported"]), tuned, args, context)
    after = phases.run("PassKey after", gigajax.eval_passkey, tuned, args.lengths, **grid)
    phases.run("HF export", gigajax.to_hf, tuned, out / "hf_final", dtype="float32")
    hf = phases.run("transformers", compare_with_transformers, out / "hf_final", tuned,
                    args.factor * context, context)
    phases.seconds["total"] = round(time.perf_counter() - start, 1)

    titles = ["as trained", f"YaRN x{args.factor}, zero-shot",
              f"YaRN x{args.factor}, fine-tuned {args.steps} steps"]
    runs = [{**r, "title": t} for r, t in zip(before["runs"] + after["runs"], titles,
                                                 strict=True)]
    result = {**before, "benchmark": "extend_context", "runs": runs, "round_trip": rt,
              "finetune": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                           "seq_len": args.factor * context, "factor": args.factor,
                           "devices": DEVICES, "summary": run.summary,
                           "config": run.config.to_dict()},
              "transformers": hf, "seconds": phases.seconds}
    benchmark.write_outputs(result, out, "extend_context")
    plot_loss(run.metrics, out / "finetune_loss.png",
              f"YaRN x{args.factor} at {args.factor * context} tokens, zigzag ring of {DEVICES}")
    print(benchmark.format_table(result))
    print(summary(result))
    print(f"wrote {out}/extend_context.json, extend_context.png and finetune_loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
