"""Context extension on PassKey: a model trained at T tokens, scored at longer lengths as trained,
with RoPE scaling applied zero-shot (PI, YaRN), and after a short fine-tune at a longer length
with that scaling (`train.init_from`), as PI and YaRN are used in practice. One JSON, one heatmap
PNG (a panel per variant) and a table.

1. The base run (`--base`): trained by `--config` (or resumed) unless it already holds a
   checkpoint of the config's last step.
2. Per method in `--methods`: a run in `<out>/runs/<method>_x<factor>` whose params start from
   the base's last checkpoint, with `model.rope_scaling` = (method, `--factor`, original T),
   `data.seq_len` and `model.max_seq_len` = factor x T, `--finetune-batch` windows per step
   (default: the base's batch / factor, the same tokens per step), `--finetune-steps` steps at
   `--finetune-lr`.
3. `gigajax eval passkey` scoring (`eval/benchmark.py`) of the base as trained and under each
   method with factor length / T, then of each fine-tuned run with its own scaling (factor fixed).

    python experiments/passkey_extension.py --base runs/passkey_tiny --out runs/passkey_ext \
        --lengths 256,512,1k,2k          # writes passkey_extension.json and .png in --out
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gigajax
from gigajax.checkpoint import params as params_checkpoint
from gigajax.eval import benchmark
from gigajax.infer.loading import load_trained

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"linear": "PI", "yarn": "YaRN"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "passkey_tiny.py"),
                   help="the base run's config (default configs/passkey_tiny.py)")
    p.add_argument("--base", required=True, help="the base run's workdir (trained if needed)")
    p.add_argument("--out", required=True, help="directory for runs/, the JSON and the PNG")
    p.add_argument("--methods", default="linear,yarn",
                   help="RoPE scalings to fine-tune with (default linear,yarn)")
    p.add_argument("--factor", type=int, default=2,
                   help="fine-tuning length = factor x the base's length (default 2)")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-batch", type=int, default=0,
                   help="windows per fine-tuning step (default: the base's batch / factor)")
    p.add_argument("--lengths", default="256,512,1k,2k", help="PassKey lengths (k = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--samples", type=int, default=10, help="prompts per cell (default 10)")
    p.add_argument("--set", action="append", default=[], metavar="--config.a.b=v",
                   help="an override for the base config (repeatable), e.g. for smoke tests")
    return p.parse_args(argv)


def finetune_overrides(base_cfg, method: str, factor: int, steps: int, lr: float, batch: int,
                       init_from: Path) -> list[str]:
    """The base config changed into a fine-tune at factor x its length with `method`."""
    seq_len = base_cfg.data.seq_len
    return [f"--config.model.rope_scaling.type={method}",
            f"--config.model.rope_scaling.factor={factor}",
            f"--config.model.rope_scaling.original_max_seq_len={seq_len}",
            f"--config.model.max_seq_len={factor * seq_len}",
            f"--config.data.seq_len={factor * seq_len}",
            f"--config.data.batch_size={batch}",
            f"--config.attention.block_q={min(base_cfg.attention.block_q, factor * seq_len)}",
            f"--config.train.steps={steps}", f"--config.optim.lr={lr}",
            f"--config.optim.warmup_steps={max(1, steps // 10)}",
            f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
            f"--config.train.init_from={init_from}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lengths = benchmark.parse_lengths(args.lengths)
    depths = benchmark.parse_depths(args.depths)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods {args.methods!r}: choose from {', '.join(METHODS)}")
    out = Path(args.out)
    start = time.perf_counter()

    base_cfg = gigajax.load_config(args.config, *args.set)
    saved = Path(args.base, "checkpoints")
    if (not saved.is_dir()
            or base_cfg.train.steps not in params_checkpoint.checkpoint_steps(args.base)):
        print(f"training the base run {args.base} to step {base_cfg.train.steps}",
              file=sys.stderr)
        gigajax.train(base_cfg, args.base, progress=False)
    base_dir = params_checkpoint.step_directory(args.base, base_cfg.train.steps)
    batch = args.finetune_batch or max(1, base_cfg.data.batch_size // args.factor)

    evaluated = []  # (trained model, its RoPE scalings, panel titles)
    base = load_trained(base_dir)
    ropes = benchmark.parse_ropes(",".join(["none", *methods]), "auto", "none", 1.0)
    evaluated.append((base, ropes, [r.title(benchmark.original_context(base)) + ", zero-shot"
                                    if r.type != "none" else r.title(0) for r in ropes]))
    finetunes = {}
    for method in methods:
        workdir = out / "runs" / f"{method}_x{args.factor}"
        cfg = gigajax.load_config(args.config, *args.set, *finetune_overrides(
            base_cfg, method, args.factor, args.finetune_steps, args.finetune_lr, batch,
            base_dir))
        print(f"fine-tuning {workdir}: {method} x{args.factor} at {cfg.data.seq_len} tokens, "
              f"{args.finetune_steps} steps", file=sys.stderr)
        finetunes[method] = gigajax.train(cfg, workdir, progress=False).summary
        tuned = load_trained(workdir)
        rope = benchmark.Rope(method, float(args.factor))
        evaluated.append((tuned, [rope], [
            f"{METHODS[method]} x{args.factor}, fine-tuned {args.finetune_steps} steps at "
            f"{cfg.data.seq_len}"]))

    runs = []
    for trained, scalings, titles in evaluated:
        scored = benchmark.run_passkey(trained, lengths, depths, scalings, samples=args.samples)
        for run, title in zip(scored["runs"], titles, strict=True):
            runs.append({**run, "title": title, "checkpoint": scored["checkpoint"],
                         "step": scored["step"]})
    result = {"benchmark": "passkey_extension", "lengths": lengths, "depths": depths,
              "samples": args.samples, "seed": scored["seed"],
              "key_digits": scored["key_digits"], "step": base.step,
              "trained_context": base_cfg.data.seq_len, "factor": args.factor,
              "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
              "finetune_final_loss": {m: s.get("loss") for m, s in finetunes.items()},
              "runs": runs, "seconds": round(time.perf_counter() - start, 1),
              "config": base.config.to_dict()}
    json_path, png_path = benchmark.write_outputs(result, out, "passkey_extension")
    print(benchmark.format_table(result))
    print(f"wrote {json_path} and {png_path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
