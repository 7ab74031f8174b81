"""`gigajax` command line: train, check-layouts, data (tokenizers, preparation), ckpt (tools).

`gigajax train --config FILE --workdir DIR [--config.a.b=v ...]` trains or resumes;
`gigajax check-layouts --config FILE --layouts "data=8;fsdp=8"` compares layouts with one device;
`gigajax data train-tokenizer|prepare ...` and `gigajax ckpt average|export ...` are registered
by `gigajax/data/commands.py` and `gigajax/train/ckpt_commands.py`.

User errors (`GigajaxError`) are printed as one paragraph without a traceback, exit code 2
(3 when `train.nonfinite=stop` stopped a run).
"""

from __future__ import annotations

import argparse
import os
import sys

from gigajax.data import commands as data_commands
from gigajax.errors import GigajaxError
from gigajax.eval import commands as eval_commands
from gigajax.train import ckpt_commands


def _split_overrides(rest: list[str]) -> list[str]:
    """Accept `--config.a.b=v` and `--config.a.b v`; anything else is a usage error."""
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            raise GigajaxError(f"Unknown argument {item!r}: overrides look like "
                               "--config.train.steps=100.")
        if "=" not in item:
            if i + 1 >= len(rest):
                raise GigajaxError(f"Override {item!r} has no value: write {item}=VALUE.")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return overrides


def simulate_cpu_devices(wanted: int | None) -> None:
    """Give the CPU backend `wanted` (simulated) devices in this process.

    Only the CPU platform is affected; on a GPU machine the mesh is built over the GPUs. An
    explicit `--xla_force_host_platform_device_count` in XLA_FLAGS wins.
    """
    import jax

    if wanted and wanted > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", wanted)
        except RuntimeError:  # backends already initialised (e.g. called from a notebook)
            pass


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from gigajax import distributed
    from gigajax.config import load_config
    from gigajax.mesh import fixed_device_count

    cfg = load_config(args.config, overrides)
    wanted = fixed_device_count(cfg.mesh)
    processes = distributed.expected_process_count(args.num_processes)
    if wanted and wanted % processes:
        raise GigajaxError(f"the mesh asks for {wanted} devices, which do not split over "
                           f"--num-processes={processes}.")
    simulate_cpu_devices(wanted // processes if wanted else None)  # per process
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from gigajax.train.loop import train

    summary = train(cfg, args.workdir, progress=not args.no_progress)
    if not distributed.is_main_process():
        return 0
    if "loss" not in summary:
        print(f"nothing to do: {args.workdir} is already at step {summary['step']}; raise "
              "--config.train.steps to train further")
        return 0
    keys = ("step", "loss", "eval_loss", "tokens_per_s", "mfu")
    print("final: " + "  ".join(f"{k} {summary[k]:.6g}" for k in keys if k in summary))
    return 0


def _check_layouts(args: argparse.Namespace, overrides: list[str]) -> int:
    from gigajax.check_layouts import devices_needed, parse_layouts
    from gigajax.config import load_config

    layouts = parse_layouts(args.layouts)
    cfg = load_config(args.config, overrides)
    simulate_cpu_devices(devices_needed(layouts))
    from gigajax.check_layouts import check_layouts

    rows = check_layouts(cfg, layouts, args.steps, args.output)
    return 0 if all(row["ok"] for row in rows) else 1


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from gigajax.config import load_config
    from gigajax.mesh import fixed_device_count
    from gigajax.plan import format_plan, plan

    cfg = load_config(args.config, overrides)
    devices = args.devices or fixed_device_count(cfg.mesh)
    if not devices:
        raise GigajaxError("the mesh has a -1 axis: pass --devices N to say how many devices.")
    if args.advise:
        from gigajax.advise import advise, format_advice, parse_bytes

        if args.compile:
            raise GigajaxError("--advise plans hundreds of layouts from formulas and compiles "
                               "none: run --compile on the layout you pick.")
        advice = advise(cfg, devices, parse_bytes(args.max_memory))
        print(json.dumps(advice, indent=2) if args.json else format_advice(advice, args.top))
        return 0
    if args.compile:
        simulate_cpu_devices(devices)  # before anything starts JAX's backends
    result = plan(cfg, devices)
    if args.compile:  # ahead of time on (simulated) devices: nothing runs
        from gigajax.plan import compiled_memory

        result["compiled"] = compiled_memory(cfg, devices)
        result["compiled_bytes_per_device"] = result["compiled"]["total"]
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigajax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train or resume a model",
                                description="Train per a config file; rerun to resume.")
    train.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    train.add_argument("--workdir", required=True, help="where metrics and checkpoints go")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = train.add_argument_group(
        "multi-process", "explicit jax.distributed setup (SLURM and Open MPI are detected)")
    multi.add_argument("--coordinator", help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int, help="how many processes in all")
    multi.add_argument("--process-id", type=int, help="this process, 0 .. num-processes - 1")
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
    planner.add_argument("--advise", action="store_true",
                         help="rank every layout of the device count by estimated step time "
                              "among those that fit --max-memory, with the TP-vs-SP crossover")
    planner.add_argument("--max-memory", default="80GB",
                         help="per-device budget for --advise, e.g. 80GB, 141GB, 24GiB")
    planner.add_argument("--top", type=int, default=10, help="rows --advise prints")
    planner.set_defaults(handler=lambda args, rest: _plan(args, _split_overrides(rest)))
    train.set_defaults(handler=lambda args, rest: _train(args, _split_overrides(rest)))
    check.set_defaults(handler=lambda args, rest: _check_layouts(args, _split_overrides(rest)))
    data_commands.register(commands)
    ckpt_commands.register(commands)
    eval_commands.register(commands)
    args, rest = parser.parse_known_args(argv)
    try:
        return args.handler(args, rest)
    except GigajaxError as error:
        print(f"gigajax: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("gigajax: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
