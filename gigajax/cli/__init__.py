"""`gigajax` command line: train, check-layouts, plan, data, ckpt, convert, eval, generate.

`gigajax train --config FILE --workdir DIR [--config.a.b=v ...]` trains or resumes;
`gigajax check-layouts --config FILE --layouts "data=8;fsdp=8"` compares layouts with one device;
`gigajax plan --config FILE [--advise]` predicts memory and traffic; `gigajax data ...`,
`gigajax ckpt ...` and `gigajax eval ...` have subcommands; `gigajax generate --checkpoint DIR
--prompt TEXT` continues prompts. One module per command group, each
parsing its flags and calling the Python API (`gigajax/api.py`) or the library.

User errors (`GigajaxError`, and an `OSError` on a path given) are printed as one paragraph
without a traceback, exit code 2 (3 when a run stopped on non-finite values, 130 when SIGTERM or
Ctrl-C stopped it). SIGTERM is caught from the first line of this module on, before JAX loads.
"""

from __future__ import annotations

from gigajax.train import signals  # stdlib only: SIGTERM is recorded from here on

signals.install_early()

import argparse  # noqa: E402  (after the SIGTERM handler: these imports take seconds)
import sys  # noqa: E402

from gigajax.cli import ckpt, convert, data, evaluate, generate, layouts, plan, train  # noqa: E402
from gigajax.errors import GigajaxError  # noqa: E402

COMMANDS = (train, layouts, plan, data, ckpt, convert, evaluate, generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigajax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    args, rest = parser.parse_known_args(argv)
    is_run = args.command == "train"  # the run takes the early SIGTERM over (train/signals.py)
    if not is_run and signals.release_early():
        print("gigajax: terminated (SIGTERM) before the command started", file=sys.stderr)
        return 143
    try:
        return args.handler(args, rest)
    except GigajaxError as error:
        print(f"gigajax: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a path the user gave: missing, not writable, a file, disk full
        where = f": {error.filename}" if error.filename else ""
        print(f"gigajax: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gigajax: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        signals.release_early()


if __name__ == "__main__":
    sys.exit(main())
