"""The run's directory: checked before anything is written, and files replaced atomically.

A run writes `config.json`, `metrics.jsonl`, `tb/` and `checkpoints/` in its workdir; a crash
or a refused run must never leave one of them half-written or replaced by another run's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gigajax.errors import ConfigError


def check_workdir(workdir: str | Path) -> Path:
    """`workdir` as a Path when a run can write there (an existing directory, or a new one that
    can be made); else ConfigError saying what is in the way."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {str(workdir)!r} is a file: pass a directory (a new one, or "
                          "a run's to resume it).")
    existing = workdir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"workdir {str(workdir)!r} cannot be made: {str(existing)!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {str(workdir)!r} cannot be written: {str(existing)!r} is not "
                          "writable by this user.")
    return workdir


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary file in the same directory and rename it into place: a
    reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
