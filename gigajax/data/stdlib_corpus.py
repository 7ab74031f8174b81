"""The default corpus every machine has: the Python standard library's own `.py` sources.

Files are listed in sorted relative-path order and split train/validation by file with a stable
hash (crc32 of the relative path), so the split is the same on every run and every host that has
the same Python version; nothing depends on random state.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from gigajax.data.tokenizer import Tokenizer
from gigajax.errors import ConfigError, DataError

SPLITS = ("train", "validation")
# Third-party packages, the test suites (they hold deliberately odd encodings and huge data
# literals) and IDLE are not "the standard library's source" in the sense we want.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Sorted POSIX relative paths of the `.py` files under `root` (default: the stdlib)."""
    root = Path(root) if root is not None else stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: never walk into them
        rel_dir = Path(dirpath).relative_to(root)
        files += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(files)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Stable by-file split: the file is in validation iff crc32(path) / 2**32 < val_fraction."""
    return zlib.crc32(rel_path.encode("utf-8")) / 2**32 < val_fraction


def split_files(split: str, val_fraction: float, root: str | Path | None = None) -> list[str]:
    """The sorted relative paths of the files in `split` ('train' or 'validation')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1.")
    root = Path(root) if root is not None else stdlib_dir()
    files = stdlib_files(root)
    if not files:
        raise DataError(
            f"No .py files found under {root} (the Python standard library directory from "
            "sysconfig). This interpreter ships without its sources; choose another data.source."
        )
    want_val = split == "validation"
    return [f for f in files if is_validation(f, val_fraction) == want_val]


def load_stdlib_tokens(
    split: str,
    tokenizer: Tokenizer,
    max_bytes: int | None = None,
    val_fraction: float = 0.05,
    root: str | Path | None = None,
) -> np.ndarray:
    """Tokens of the split's files, each followed by EOS, concatenated in sorted path order.

    `max_bytes` (None or 0: no cap) stops adding files once the bytes read reach it, so a tiny run
    starts fast; the file that crosses the cap is kept whole.
    """
    root = Path(root) if root is not None else stdlib_dir()
    files = split_files(split, val_fraction, root)
    if not files:
        raise DataError(
            f"The {split!r} split of {root} has no files with data.val_fraction={val_fraction}; "
            "use a val_fraction that leaves files on both sides."
        )
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    total = 0
    for rel in files:
        data = (root / rel).read_bytes()
        total += len(data)
        pieces += [tokenizer.encode(data.decode("utf-8", errors="replace")).astype(dtype), eos]
        if max_bytes and total >= max_bytes:
            break
    return np.concatenate(pieces)
