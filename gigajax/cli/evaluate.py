"""`gigajax eval ...` subcommands: passkey (retrieval over a length x depth grid).

  gigajax eval passkey --checkpoint runs/passkey --lengths 512,1k,2k,4k \
      --depths 0,0.25,0.5,0.75,1 --samples 10 --rope none,linear,yarn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from gigajax import api
from gigajax.checkpoint.params import workdir_of
from gigajax.cli.common import split_overrides
from gigajax.errors import GigajaxError
from gigajax.eval import benchmark
from gigajax.train.logger import log_console


def _progress(enabled: bool) -> Progress:
    """A rich progress bar over grid cells on stderr (a no-op context when disabled)."""
    return Progress("[bold]passkey", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=log_console(stderr=True), disable=not enabled)


def _passkey(args: argparse.Namespace, rest: list[str]) -> int:
    overrides = split_overrides(rest)
    lengths = benchmark.parse_lengths(args.lengths)
    depths = benchmark.parse_depths(args.depths)
    workdir = workdir_of(args.checkpoint)
    out_dir = args.output or (workdir / "eval" if workdir else None)
    if out_dir is None and Path(args.checkpoint).exists():  # (a missing one: the API says so)
        raise GigajaxError(f"{args.checkpoint} is not inside a training workdir: pass --output "
                           "DIR for the results.")
    bar = _progress(not args.no_progress)  # shown once the first cell is scored
    task = bar.add_task("passkey", total=None)

    def progress(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        result = api.eval_passkey(
            args.checkpoint, lengths, depths=depths, rope=args.rope,
            rope_factor=args.rope_factor, samples=args.samples, seed=args.seed,
            key_digits=args.key_digits, batch_size=args.batch_size, step=args.step,
            overrides=overrides, output=out_dir, progress=progress)
    finally:
        bar.stop()
    max_seq_len = result["config"]["model"]["max_seq_len"]
    if max(lengths) > max_seq_len:
        print(f"note: lengths up to {max(lengths)} exceed model.max_seq_len={max_seq_len}: they "
              "test length extrapolation", file=sys.stderr)
    step = f" step {result['step']}" if result["step"] is not None else ""
    print(f"PassKey of {result['checkpoint']}{step}: {args.samples} samples per cell, seed "
          f"{args.seed}, trained context {result['trained_context']}, "
          f"{result['seconds']:.0f} s")
    print(benchmark.format_table(result))
    print(f"wrote {' and '.join(result['files'])}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax eval` and its subcommands; each sets `handler(args, rest) -> exit code`."""
    ev = commands.add_parser("eval", help="evaluate a trained checkpoint (PassKey)",
                             description=__doc__.splitlines()[0])
    sub = ev.add_subparsers(dest="eval_command", required=True)
    pk = sub.add_parser(
        "passkey", help="PassKey retrieval accuracy over context lengths and needle depths",
        description="Hide a random key at each depth of filler text of each length, ask for it, "
                    "and score the greedy answers (right when they start with the key). Writes "
                    "passkey.json and passkey.png (a heatmap per RoPE scaling) and prints a "
                    "table. Extra --config.a.b=v overrides apply to the run's saved config.")
    pk.add_argument("--checkpoint", required=True,
                    help="a training workdir (its latest checkpoint), its checkpoints/ or one "
                         "step directory, or a params checkpoint from `gigajax ckpt export`")
    pk.add_argument("--step", type=int, help="which checkpoint of a workdir (default: latest)")
    pk.add_argument("--lengths", required=True,
                    help="prompt lengths in tokens, k = 1024: e.g. 512,1k,2k,4k")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                    help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--samples", type=int, default=5, help="prompts per cell (default 5)")
    pk.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    pk.add_argument("--key-digits", type=int, default=5,
                    help="digits of the key (default 5, as in the PassKey benchmark)")
    pk.add_argument("--rope", help="RoPE scalings to compare, e.g. none,linear,yarn (default: "
                                   "the config's model.rope_scaling.type)")
    pk.add_argument("--rope-factor",
                    help="auto (length / trained context, >= 1) or a number >= 1 (default: auto "
                         "with --rope, else the config's model.rope_scaling.factor)")
    pk.add_argument("--batch-size", type=int, default=8,
                    help="prompts decoded together (default 8)")
    pk.add_argument("--output", help="directory for passkey.json and passkey.png (default: "
                                     "<workdir>/eval)")
    pk.add_argument("--no-progress", action="store_true", help="no progress bar")
    pk.set_defaults(handler=_passkey)
