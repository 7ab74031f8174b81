"""`gigajax train --config FILE --workdir DIR [--config.a.b=v ...]`: train, or resume."""

from __future__ import annotations

import argparse

from gigajax import api
from gigajax.cli.common import split_overrides
from gigajax.parallel.multihost import is_main_process


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = api.load_config(args.config, *split_overrides(rest))
    run = api.train(cfg, args.workdir, progress=not args.no_progress,
                    coordinator=args.coordinator, num_processes=args.num_processes,
                    process_id=args.process_id)
    if not is_main_process():
        return 0
    if "loss" not in run.summary:
        print(f"nothing to do: {args.workdir} is already at step {run.step}; raise "
              "--config.train.steps to train further")
        return 0
    keys = ("step", "loss", "eval_loss", "tokens_per_s", "mfu")
    print("final: " + "  ".join(f"{k} {run.summary[k]:.6g}" for k in keys if k in run.summary))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
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
    train.set_defaults(handler=_train)
