"""`gigajax data ...` subcommands (to be filled: train-tokenizer, prepare)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax data` and its subcommands; each sets `handler(args, rest) -> exit code`."""
