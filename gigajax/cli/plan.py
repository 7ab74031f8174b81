"""`gigajax plan --config FILE [--devices N] [--json] [--compile] [--backend B] [--advise]`:
predicted memory and communication of a config (`plan/`), or every layout ranked
(`--advise`)."""

from __future__ import annotations

import argparse
import json

from gigajax import api
from gigajax.cli.common import split_overrides
from gigajax.errors import GigajaxError
from gigajax.plan.advise import format_advice
from gigajax.plan.planner import BACKENDS, format_plan


def _plan(args: argparse.Namespace, rest: list[str]) -> int:
    if args.devices is not None and args.devices < 1:
        raise GigajaxError(f"--devices {args.devices}: give a device count >= 1.")
    if args.top < 1:
        raise GigajaxError(f"--top {args.top}: give the number of rows to print, >= 1.")
    cfg = api.load_config(args.config, *split_overrides(rest))
    if args.advise:
        if args.compile:
            raise GigajaxError("--advise plans hundreds of layouts from formulas and compiles "
                               "none: run --compile on the layout you pick.")
        advice = api.advise(cfg, args.devices, args.max_memory, args.backend or "gpu")
        print(json.dumps(advice, indent=2) if args.json else format_advice(advice, args.top))
        return 0
    result = api.plan(cfg, args.devices, compile=args.compile, backend=args.backend)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    planner = commands.add_parser(
        "plan", help="predicted per-device memory and communication of a config",
        description="Per-device bytes of parameters, gradients, optimizer state and activations "
                    "(Korthikanti et al. 2022, adapted), and bytes sent per step per mesh axis, "
                    "from formulas: nothing is built or run.")
    planner.add_argument("--config", required=True, help="config file, e.g. configs/small.py")
    planner.add_argument("--devices", type=int, help="device count (default: the mesh's)")
    planner.add_argument("--json", action="store_true", help="print JSON instead of a table")
    planner.add_argument("--compile", action="store_true",
                         help="also compile the train step for the devices (simulated on CPU; "
                              "nothing runs) and print XLA's per-device memory beside")
    planner.add_argument("--backend", choices=BACKENDS,
                         help="the backend the step will compile for (default gpu; with "
                              "--compile, this machine's): a MoE model's grouped matmul is a "
                              "dense masked matmul on cpu")
    planner.add_argument("--advise", action="store_true",
                         help="rank every layout of the device count by estimated step time "
                              "among those that fit --max-memory, with the TP-vs-SP crossover")
    planner.add_argument("--max-memory", default="80GB",
                         help="per-device budget for --advise, e.g. 80GB, 141GB, 24GiB")
    planner.add_argument("--top", type=int, default=10, help="rows --advise prints")
    planner.set_defaults(handler=_plan)
