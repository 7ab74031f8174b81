"""Per-device memory of one training step under several mesh layouts, from XLA's compiled program.

Nothing is run: each layout's train step is lowered on abstract inputs and compiled for N simulated
CPU devices, and `compiled.memory_analysis()` gives per-device bytes (arguments: the sharded
state and batch; temp: activations and workspace). Also counts the collectives in the compiled
program. Writes a table and JSON.

    python experiments/layout_memory.py --config configs/small.py \
        --layouts "data=8;fsdp=8;tensor=4,data=2" --output runs/layout_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

DEVICES = 8
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from rich.table import Table  # noqa: E402

from gigajax.config import load_config  # noqa: E402
from gigajax.parallel.mesh import make_mesh  # noqa: E402
from gigajax.plan.layouts import layout_config, layout_name, parse_layouts  # noqa: E402
from gigajax.plan.planner import abstract_batch, memory_of  # noqa: E402
from gigajax.train.logger import log_console  # noqa: E402
from gigajax.train.loop import build_training  # noqa: E402

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
MB = 2**20


def measure(cfg, layout: dict, dtype: str) -> dict:
    c = layout_config(cfg, layout)
    c.model.dtype = dtype  # layout_config makes checks fp32; memory is measured in the run dtype
    mesh = make_mesh(c.mesh, jax.devices()[:DEVICES], c.attention)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        training = build_training(c, mesh)
        compiled = training.train_step.lower(training.state.abstract,
                                             abstract_batch(c, mesh)).compile()
    memory = memory_of(compiled)
    hlo = compiled.as_text()
    state_bytes = sum(jnp.dtype(x.dtype).itemsize * math.prod(x.sharding.shard_shape(x.shape))
                      for x in jax.tree.leaves(training.state.abstract))
    return {"layout": layout_name(layout), "mesh": dict(mesh.shape),
            "state_mb": state_bytes / MB, "argument_mb": memory["arguments"] / MB,
            "temp_mb": memory["temp"] / MB, "output_mb": memory["outputs"] / MB,
            "alias_mb": memory["aliased"] / MB, "total_mb": memory["total"] / MB,
            "collectives": {op: len(re.findall(rf"= (\([^)]*\)|\S+) {op}(-start)?\(", hlo))
                            for op in COLLECTIVES},
            "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.py")
    parser.add_argument("--layouts", default="data=8;fsdp=8;fsdp=8,zero_stage=1;tensor=4,data=2;"
                                             "tensor=4,data=2,megatron_sp=1")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype to measure in")
    parser.add_argument("--output", default="runs/layout_memory.json")
    args, overrides = parser.parse_known_args()
    cfg = load_config(args.config, overrides)
    console = log_console()
    rows = []
    for layout in parse_layouts(args.layouts):
        with console.status(f"compiling {layout_name(layout)}"):
            rows.append(measure(cfg, layout, args.dtype))
    table = Table(title=f"{args.config}: per-device memory of one train step "
                        f"({DEVICES} devices, {args.dtype} compute, fp32 params)")
    for col in ("layout", "state MB", "arguments MB", "temp MB", "total MB", "vs data",
                "collectives (ag/rs/ar)", "compile s"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    base = rows[0]["total_mb"]
    for r in rows:
        n = r["collectives"]
        table.add_row(r["layout"], f"{r['state_mb']:.0f}", f"{r['argument_mb']:.0f}",
                      f"{r['temp_mb']:.0f}", f"{r['total_mb']:.0f}", f"{r['total_mb'] / base:.2f}",
                      f"{n['all-gather']}/{n['reduce-scatter']}/{n['all-reduce']}",
                      f"{r['compile_s']:.0f}")
    console.print(table)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=2)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
