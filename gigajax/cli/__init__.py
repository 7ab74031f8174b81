"""`gigajax` command line: train, check-layouts, plan, data, ckpt, eval.

`gigajax train --config FILE --workdir DIR [--config.a.b=v ...]` trains or resumes;
`gigajax check-layouts --config FILE --layouts "data=8;fsdp=8"` compares layouts with one device;
`gigajax plan --config FILE [--advise]` predicts memory and traffic; `gigajax data ...`,
`gigajax ckpt ...` and `gigajax eval ...` have subcommands. One module per command group, each
parsing its flags and calling the Python API (`gigajax/api.py`) or the library.

User errors (`GigajaxError`) are printed as one paragraph without a traceback, exit code 2
(3 when `train.nonfinite=stop` stopped a run).
"""

from __future__ import annotations

import argparse
import sys

from gigajax.cli import ckpt, data, evaluate, layouts, plan, train
from gigajax.errors import GigajaxError

COMMANDS = (train, layouts, plan, data, ckpt, evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigajax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
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
