"""`gigajax ckpt ...` subcommands: average (weights of several steps), export (params only),
merge-lora (a LoRA run's adapters merged into its weights)."""

from __future__ import annotations

import argparse

from gigajax.checkpoint import params
from gigajax.cli.common import no_extra
from gigajax.errors import GigajaxError

DTYPE_CHOICES = tuple(params.DTYPES)


def parse_steps(text: str) -> list[int]:
    """'9000,9500,10000' -> [9000, 9500, 10000]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise GigajaxError(f"--steps {text!r}: give comma-separated step numbers, e.g. "
                           "9000,9500,10000.") from None


def _checksum_policy(args: argparse.Namespace) -> dict:
    return {"require_checksums": not args.allow_missing_checksums,
            "allow_hint": "Pass --allow-missing-checksums to read it anyway, with a warning."}


def _add_checksum_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-missing-checksums", action="store_true",
                        help="read a checkpoint that has no checksums.json (written before "
                             "checksums existed), with a warning, instead of refusing it")


def _average(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "ckpt")
    steps = parse_steps(args.steps)
    if not steps:
        raise GigajaxError(f"--steps {args.steps!r}: give at least one step, e.g. 9000,9500.")
    params.average(args.workdir, steps, args.out, args.dtype, **_checksum_policy(args))
    return 0


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "ckpt")
    params.export(args.workdir, args.out, args.step, args.dtype, **_checksum_policy(args))
    return 0


def _merge_lora(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "ckpt")
    params.merge_lora(args.checkpoint, args.out, args.step, args.dtype, **_checksum_policy(args))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax ckpt` and its subcommands; each sets `handler(args, rest) -> exit code`."""
    ckpt = commands.add_parser(
        "ckpt", help="checkpoint tools: average, export, merge-lora",
        description="Tools over a run's checkpoints (<workdir>/checkpoints/<step>/). Each writes a "
                    "params-only checkpoint that `gigajax.checkpoint.params.load_params` reads.")
    tools = ckpt.add_subparsers(dest="ckpt_command", required=True)
    average = tools.add_parser(
        "average", help="mean of the parameters of several steps",
        description="Average the parameters of several checkpoints of one run element-wise "
                    "(fp32 sum), e.g. the last few before the end of a run.")
    average.add_argument("--workdir", required=True, help="the training run's workdir")
    average.add_argument("--steps", required=True, help="comma-separated, e.g. 9000,9500,10000")
    average.add_argument("--out", required=True, help="new directory for the averaged params")
    average.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    _add_checksum_flag(average)
    average.set_defaults(handler=_average)
    export = tools.add_parser(
        "export", help="params of one step, for inference",
        description="Write the parameters of one checkpoint (no optimizer state) with the run's "
                    "config, optionally cast to bfloat16.")
    export.add_argument("--workdir", required=True, help="the training run's workdir")
    export.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    export.add_argument("--out", required=True, help="new directory for the params")
    export.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    _add_checksum_flag(export)
    export.set_defaults(handler=_export)
    merge = tools.add_parser(
        "merge-lora", help="a LoRA run's adapters merged into its weights",
        description="Write the params of a LoRA run's checkpoint with every adapter merged into "
                    "its weight (W + alpha/rank A B, float32) and removed, and its config with "
                    "model.lora.rank=0: a plain model for load, train.init_from, convert to-hf.")
    merge.add_argument("--checkpoint", required=True,
                       help="a LoRA run's workdir, step directory or params checkpoint")
    merge.add_argument("--step", type=int, help="which checkpoint of a workdir (default: latest)")
    merge.add_argument("--out", required=True, help="new directory for the merged params")
    merge.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    _add_checksum_flag(merge)
    merge.set_defaults(handler=_merge_lora)
