"""Per-device memory of one training step with LoRA against full fine-tuning: the planner's
figure and XLA's compiled one (train step lowered on abstract inputs for N simulated CPU devices;
nothing runs). Prints a table and writes JSON.

    python experiments/lora_memory.py --config configs/small.py --layout fsdp=8 \
        --ranks 0,8,16 --output runs/lora_memory.json

Rank 0 is full fine-tuning; the others train adapters on `--targets` (default all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

DEVICES = 8
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
from rich.table import Table  # noqa: E402

from gigajax.config import ModelConfig, load_config  # noqa: E402
from gigajax.model.inventory import adapter_params, param_count  # noqa: E402
from gigajax.plan import planner  # noqa: E402
from gigajax.plan.layouts import devices_needed, layout_config, parse_layouts  # noqa: E402
from gigajax.train.logger import log_console  # noqa: E402

MiB = 2**20


def measure(cfg, layout: dict, rank: int, targets: str, dtype: str, compile: bool) -> dict:
    """The planner's bytes (and XLA's, with `compile`) of `cfg` under `layout` at LoRA `rank`."""
    c = layout_config(cfg, layout)
    c.model.dtype = dtype  # layout_config makes checks fp32; memory is measured in the run dtype
    c.model.lora.rank, c.model.lora.targets = rank, targets
    devices = devices_needed([layout])
    start = time.perf_counter()
    plan = planner.plan(c, devices, jax.default_backend())
    row = {"rank": rank, "targets": targets if rank else "-",
           "params": param_count(ModelConfig.from_config(c)),
           "trained": adapter_params(ModelConfig.from_config(c)) if rank
           else param_count(ModelConfig.from_config(c)),
           "predicted": {k: v for k, v in plan["bytes"].items()},
           "predicted_total": plan["predicted_bytes_per_device"]}
    if compile:
        row["compiled"] = planner.compiled_memory(c, devices)
    row["seconds"] = time.perf_counter() - start
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.py")
    parser.add_argument("--layout", default="fsdp=8")
    parser.add_argument("--ranks", default="0,8,16", help="0 is full fine-tuning")
    parser.add_argument("--targets", default="all")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype to measure in")
    parser.add_argument("--no-compile", action="store_true", help="the planner only")
    parser.add_argument("--output", default="runs/lora_memory.json")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    (layout,) = parse_layouts(args.layout)
    console = log_console()
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        with console.status(f"rank {rank}"):
            rows.append(measure(cfg, layout, rank, args.targets, args.dtype,
                                not args.no_compile))
    table = Table(title=f"{args.config} under {args.layout}: per-device memory of one train "
                        f"step ({args.dtype} compute, fp32 params), MiB")
    for col in ("LoRA rank", "trained params", "params", "grads", "optimizer", "activations",
                "planner total", "XLA total", "vs full (XLA)"):
        table.add_column(col, justify="right")
    full = rows[0].get("compiled", {}).get("total") or rows[0]["predicted_total"]
    for r in rows:
        b, xla = r["predicted"], r.get("compiled", {}).get("total")
        table.add_row("full" if not r["rank"] else str(r["rank"]), f"{r['trained'] / 1e6:.2f}M",
                      f"{b['params'] / MiB:.0f}", f"{b['grads'] / MiB:.1f}",
                      f"{b['optimizer'] / MiB:.1f}", f"{b['activations'] / MiB:.0f}",
                      f"{r['predicted_total'] / MiB:.0f}",
                      "-" if xla is None else f"{xla / MiB:.0f}",
                      f"{(xla or r['predicted_total']) / full:.2f}")
    console.print(table)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    result = {"config": args.config, "layout": args.layout, "dtype": args.dtype,
              "overrides": overrides, "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
                         f"({jax.default_backend()}, {jax.device_count()} devices)",
              "rows": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
