"""`gigajax check-layouts --config FILE --layouts "data=8;fsdp=8"`: each layout against one
device (`plan/equivalence.py`); exit 1 when any layout is off or cannot run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gigajax import api
from gigajax.cli.common import split_overrides
from gigajax.errors import ConfigError
from gigajax.plan.layouts import parse_layouts
from gigajax.train.logger import log_console


def _check_layouts(args: argparse.Namespace, rest: list[str]) -> int:
    layouts = parse_layouts(args.layouts)
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: give a number of steps >= 1.")
    cfg = api.load_config(args.config, *split_overrides(rest))
    rows = api.check_layouts(cfg, layouts, args.steps, console=log_console())
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


def register(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check-layouts", help="compare mesh layouts with one device",
        description="Run a few fp32 steps under each layout and under one device; print the "
                    "loss per step and the relative differences of loss, gradients, parameters.")
    check.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    check.add_argument("--layouts", required=True,
                       help='e.g. "data=8;fsdp=8;tensor=2,data=4;fsdp=8,zero_stage=1;'
                            'tensor=4,megatron_sp=1"')
    check.add_argument("--steps", type=int, default=3, help="optimizer steps per layout")
    check.add_argument("--output", help="also write the rows as JSON here")
    check.set_defaults(handler=_check_layouts)
