"""Execute the notebooks headless, as the tests do, and save their outputs in place.

    python notebooks/run.py                       # all of them, outputs written back
    python notebooks/run.py 01_quickstart --check # run one, keep the file as it is

Each runs in a fresh Python 3 kernel (ipykernel) with `notebooks/` as its working directory,
without a device count in XLA_FLAGS (each notebook chooses its own simulated devices; other XLA
flags are kept), and fails on the first cell that raises. Prints each notebook's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from gigajax.parallel.devices import without_device_count

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 900


def execute(path: Path, save: bool) -> float:
    """Run every cell of `path` in a new kernel; the wall time in seconds."""
    book = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    client = NotebookClient(book, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}})
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    if save:
        nbformat.write(book, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*",
                        help="notebooks to run (default: all), e.g. 01_quickstart")
    parser.add_argument("--check", action="store_true", help="run only; do not save outputs")
    args = parser.parse_args(argv)
    chosen = [p for p in NOTEBOOKS if not args.names or p.stem in args.names]
    if not chosen:
        raise SystemExit(f"no notebook named {args.names}; have {[p.stem for p in NOTEBOOKS]}")
    for path in chosen:
        print(f"{path.name}: {execute(path, save=not args.check):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
