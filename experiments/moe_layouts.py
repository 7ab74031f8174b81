"""Train `configs/tiny_moe.py` under one device and under expert-parallel layouts (each a
`gigajax train` run in its own process, on as many simulated CPU devices as its mesh needs),
then print each layout's loss curve against one device's and plot every MoE layer's expert
load over training (`moe_load` in metrics.jsonl). Writes JSON, CSV and PNG.

    python experiments/moe_layouts.py --out runs/moe_layouts --steps 300 \
        --layouts "expert=4,data=2" [--config.model.moe.bias_update_rate=0.001 ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
ONE_DEVICE = {"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}


def mesh_flags(layout: str) -> list[str]:
    """`--config.mesh.*` flags of a layout like 'expert=4,data=2' (other axes 1)."""
    sizes = dict(ONE_DEVICE)
    for part in filter(None, layout.split(",")):
        axis, size = part.split("=")
        sizes[axis.strip()] = int(size)
    return [f"--config.mesh.{axis}={size}" for axis, size in sizes.items()]


def train_run(workdir: Path, layout: str, config: Path, overrides: list[str]) -> list[dict]:
    """`gigajax train` of `config` under `layout` ('' = one device); its metrics rows."""
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume
    command = [sys.executable, "-m", "gigajax.cli", "train", "--config", str(config),
               "--workdir", str(workdir), "--no-progress", *mesh_flags(layout), *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def compare(reference: list[dict], rows: list[dict]) -> dict[str, float]:
    """The largest relative difference of the training and validation losses at equal steps."""
    by_step = {r["step"]: r for r in reference}
    train = [abs(r["loss"] - by_step[r["step"]]["loss"]) / abs(by_step[r["step"]]["loss"])
             for r in rows]
    evals = [abs(r["eval_loss"] - by_step[r["step"]]["eval_loss"]) / by_step[r["step"]]["eval_loss"]
             for r in rows if "eval_loss" in r]
    return {"loss_rel_diff": max(train), "eval_loss_rel_diff": max(evals, default=0.0)}


def plot_load(rows: list[dict], path: Path, title: str) -> None:
    """A heat map per MoE layer: each expert's load over the mean (1: balanced) by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    loads = np.array([r["moe_load"] for r in rows])  # [steps, layers, X]
    layers, experts = loads.shape[1:]
    fig, axes = plt.subplots(layers, 1, figsize=(6, 1.6 * layers + 0.8), sharex=True,
                             squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.imshow(loads[:, layer].T * experts, aspect="auto", cmap="viridis",
                          extent=(steps[0], steps[-1], experts - 0.5, -0.5), vmin=0, vmax=3)
        ax.set(ylabel=f"MoE layer {layer}\nexpert")
    axes[-1, 0].set(xlabel="step")
    fig.colorbar(image, ax=axes[:, 0], label="load / mean")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/moe_layouts")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_moe.py"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layouts", default="expert=4,data=2",
                        help="';'-separated layouts to compare with one device")
    args, extra = parser.parse_known_args()  # the rest: --config.* flags for every run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"--config.train.steps={args.steps}", *extra]
    runs = {"1 device": train_run(out / "one_device", "", Path(args.config), overrides)}
    for i, layout in enumerate(filter(None, args.layouts.split(";"))):
        runs[layout] = train_run(out / f"layout{i}", layout, Path(args.config), overrides)
    reference = runs["1 device"]
    table = [{"layout": name, **compare(reference, rows), "final_loss": rows[-1]["loss"],
              "final_eval_loss": rows[-1].get("eval_loss"),
              "tokens_per_s": rows[-1].get("tokens_per_s")} for name, rows in runs.items()]
    print(f"{'layout':<28} {'loss rel diff':>14} {'eval rel diff':>14} {'final loss':>11} "
          f"{'tokens/s':>9}")
    for row in table:
        print(f"{row['layout']:<28} {row['loss_rel_diff']:>14.2e} "
              f"{row['eval_loss_rel_diff']:>14.2e} {row['final_loss']:>11.4f} "
              f"{row['tokens_per_s'] or 0:>9.0f}")
    with open(out / "moe_layouts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "moe_layouts.json").write_text(json.dumps({"table": table, "runs": runs}, indent=1))
    last = list(runs)[-1]
    if "moe_load" not in runs[last][0]:  # a dense config: nothing to plot
        print(f"wrote {out / 'moe_layouts.json'} and moe_layouts.csv")
        return
    plot_load(runs[last], out / "moe_load.png", f"{Path(args.config).stem} expert load ({last})")
    print(f"wrote {out / 'moe_layouts.json'}, moe_layouts.csv and moe_load.png")


if __name__ == "__main__":
    main()
