"""`gigajax ckpt ...` subcommands (to be filled: average, export)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax ckpt` and its subcommands; each sets `handler(args, rest) -> exit code`."""
