"""Sweep mesh layouts x remat policies for a config: speed, memory and loss of each, as CSV and a
Pareto plot (tokens/s against compiled memory per device).

Each point builds the config under the layout, compiles its train step ahead of time (XLA's
per-device memory, and the planner's prediction beside it), runs `--warmup` steps then times
`--steps` more on real batches, and records tokens/s, step time and the loss after the last
step. A layout the config cannot take (heads not divisible, ...) is recorded with its error
rather than stopping the sweep. Works on simulated CPU devices (set below when jax is not yet
imported) and on GPUs.

    python experiments/sweep_mesh.py --config configs/tiny.py \
        --layouts "data=8;fsdp=8;tensor=2,data=4;sequence=8;sequence=4,sp_impl=ulysses,data=2" \
        --remat none,full --steps 5 --out runs/sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

DEVICES = 8
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gigajax.config import load_config  # noqa: E402
from gigajax.data.pipeline import build_datasets  # noqa: E402
from gigajax.errors import GigajaxError  # noqa: E402
from gigajax.parallel.mesh import make_mesh, sequence_permutation  # noqa: E402
from gigajax.parallel.multihost import place_batch  # noqa: E402
from gigajax.plan.layouts import layout_config, layout_name, parse_layouts  # noqa: E402
from gigajax.plan.planner import abstract_batch, memory_of, plan  # noqa: E402
from gigajax.train.logger import log_console  # noqa: E402
from gigajax.train.loop import build_training  # noqa: E402

MB = 2**20
FIELDS = ("layout", "remat", "devices", "tokens_per_s", "step_s", "compiled_mb", "predicted_mb",
          "loss", "compile_s", "error")


def run_point(cfg, layout: dict, remat: str, warmup: int, steps: int) -> dict:
    """Compile and time one (layout, remat) point; the error message if the config refuses."""
    row = {"layout": layout_name(layout), "remat": remat}
    try:
        c = layout_config(cfg, layout, dtype=None)
        c.model.remat = remat
        devices = jax.device_count() if any(v == -1 for v in layout.values()) else None
        mesh = make_mesh(c.mesh, jax.devices()[:devices] if devices else None, c.attention)
    except GigajaxError as error:
        return {**row, "error": str(error).splitlines()[0][:200]}
    n = mesh.size
    row["devices"] = n
    row["predicted_mb"] = plan(c, n, jax.default_backend())["predicted_bytes_per_device"] / MB
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        training = build_training(c, mesh)
        compiled = training.train_step.lower(training.state.abstract,
                                             abstract_batch(c, mesh)).compile()
        row["compile_s"] = time.perf_counter() - start
        row["compiled_mb"] = memory_of(compiled)["total"] / MB
        perm = sequence_permutation(mesh, c.data.seq_len, c.attention.layout)
        _, train_ds, _ = build_datasets(c.data, c.train.seed, sequence_perm=perm)
        state = training.state.init()
        batches = [place_batch(train_ds[s], mesh, c.data.batch_size)
                   for s in range(warmup + steps)]
        for batch in batches[:warmup]:
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for batch in batches[warmup:]:
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
    row["step_s"] = seconds / steps
    row["tokens_per_s"] = steps * c.data.batch_size * c.data.seq_len / seconds
    row["loss"] = float(metrics["loss"])
    return row


def pareto(rows: list[dict]) -> list[dict]:
    """The points no other point beats on both speed (higher) and memory (lower)."""
    ok = [r for r in rows if not r.get("error")]
    return [r for r in ok if not any(
        o["tokens_per_s"] >= r["tokens_per_s"] and o["compiled_mb"] <= r["compiled_mb"]
        and (o["tokens_per_s"], o["compiled_mb"]) != (r["tokens_per_s"], r["compiled_mb"])
        for o in ok)]


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Tokens/s against compiled memory per device, the Pareto front joined, points labelled."""
    ok = [r for r in rows if not r.get("error")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for remat in sorted({r["remat"] for r in ok}):
        pts = [r for r in ok if r["remat"] == remat]
        ax.scatter([r["compiled_mb"] for r in pts], [r["tokens_per_s"] for r in pts],
                   label=f"remat={remat}")
    for r in ok:
        ax.annotate(r["layout"], (r["compiled_mb"], r["tokens_per_s"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted(pareto(rows), key=lambda r: r["compiled_mb"])
    ax.plot([r["compiled_mb"] for r in front], [r["tokens_per_s"] for r in front], "k--",
            linewidth=0.8, label="Pareto front")
    ax.set_xlabel("compiled memory per device (MB)")
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--layouts", default="data=8;fsdp=8;tensor=2,data=4;sequence=8;"
                                             "sequence=4,sp_impl=ulysses,data=2")
    parser.add_argument("--remat", default="none,full", help="comma-separated remat policies")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per point")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point")
    parser.add_argument("--out", default="runs/sweep", help="directory for CSV, JSON and PNG")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    console = log_console()
    rows = []
    for layout in parse_layouts(args.layouts):
        for remat in args.remat.split(","):
            with console.status(f"{layout_name(layout)} remat={remat}"):
                rows.append(run_point(cfg, layout, remat, args.warmup, args.steps))
            r = rows[-1]
            console.print(f"{r['layout']:<32} remat={remat:<8} " + (
                f"error: {r['error']}" if r.get("error") else
                f"{r['tokens_per_s']:>9.0f} tokens/s  {r['step_s'] * 1e3:>8.1f} ms/step  "
                f"{r['compiled_mb']:>8.1f} MB (predicted {r['predicted_mb']:.1f})  "
                f"loss {r['loss']:.4f}"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(
        {"config": args.config, "overrides": overrides, "backend": jax.default_backend(),
         "devices": jax.device_count(), "rows": rows}, indent=2))
    plot(rows, f"{args.config} on {jax.device_count()} {jax.default_backend()} devices",
         out / "pareto.png")
    front = ", ".join(f"{r['layout']} ({r['remat']})" for r in pareto(rows))
    console.print(f"Pareto front: {front}\nwrote {out}/sweep.csv, sweep.json, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
