"""`gigajax data verify DIR`: every byte of a prepared directory read against its manifest.

Opening a prepared directory for training checks what is cheap (`store.py`): the manifest's keys,
types, counts and own sha256, each shard's byte size, and the ids of each window as it is read.
`verify_prepared` reads every file in full: its size and sha256, each shard's token ids against
its recorded smallest and largest, its document index (increasing, ending at its token count) and
its loss mask (0 and 1 only). The first bad shard is a DataError naming the file and, where a
value is out of range, its position; a good directory returns what was checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gigajax.data import store
from gigajax.errors import DataError

CHUNK_BYTES = 8 << 20  # read at a time; a multiple of every item size (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Verified:
    """What `verify_prepared` read of a good directory."""

    data_dir: str
    shards: int
    files: int
    num_bytes: int
    num_tokens: int
    seconds: float

    def summary(self) -> str:
        """The one-line report `gigajax data verify` prints."""
        return (f"verified {self.data_dir}: {self.shards} shards, {self.files} files, "
                f"{self.num_tokens:,} tokens, {self.num_bytes:,} bytes in {self.seconds:.1f} s; "
                "sizes, sha256s, token id ranges, document indexes and loss masks match the "
                "manifest")


def _first_bad(values: np.ndarray, lo: int, hi: int) -> int | None:
    """Index of the first value outside [lo, hi], or None."""
    bad = (values < lo) | (values > hi)
    return int(np.argmax(bad)) if bad.any() else None


def _check_file(path: Path, suffix: str, item: np.dtype, shard: dict[str, Any],
                advance: Callable[[int], None]) -> None:
    """Stream `path` once: its sha256 and the range of its values; a DataError if either is off."""
    digest, seen, last_end = hashlib.sha256(), 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            values = np.frombuffer(chunk, item)
            if suffix == ".tokens":
                k = _first_bad(values, shard["min_token_id"], shard["max_token_id"])
                if k is not None:
                    raise DataError(
                        f"{path}: token {seen + k} (byte {(seen + k) * item.itemsize}) holds id "
                        f"{int(values[k])}, outside [{shard['min_token_id']}, "
                        f"{shard['max_token_id']}], the ids `gigajax data prepare` wrote in this "
                        f"shard: the file was changed after it was prepared; {store.REBUILD}.")
            elif suffix == ".docs":
                steps = np.diff(values, prepend=last_end)
                if (steps <= 0).any():
                    k = int(np.argmax(steps <= 0))
                    raise DataError(f"{path}: document {seen + k} ends at {int(values[k])}, not "
                                    "after the one before it: the file was changed after it was "
                                    f"prepared; {store.REBUILD}.")
                last_end = int(values[-1])
            elif (k := _first_bad(values, 0, 1)) is not None:
                raise DataError(f"{path}: token {seen + k} has mask value {int(values[k])}, where "
                                "only 0 and 1 are written: the file was changed after it was "
                                f"prepared; {store.REBUILD}.")
            seen += len(values)
            advance(len(chunk))
    if suffix == ".docs" and shard["num_docs"] and last_end != shard["num_tokens"]:
        raise DataError(f"{path}: the last document ends at {last_end}, not at the shard's "
                        f"{shard['num_tokens']} tokens; {store.REBUILD}.")
    want = shard[f"{suffix[1:]}_sha256"]
    if digest.hexdigest() != want:
        raise DataError(f"{path}: its sha256 is {digest.hexdigest()}, where the manifest records "
                        f"{want}: its bytes changed after `gigajax data prepare` wrote them (its "
                        f"size is right and its values are in range, so a read would not notice); "
                        f"{store.REBUILD}.")


def verify_prepared(data_dir: str | Path, *, progress: bool = True) -> Verified:
    """Read every shard of a prepared directory in full against its manifest (see module doc);
    a DataError names the first bad one. `progress`: a rich progress bar over the bytes."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    start = time.perf_counter()
    data_dir = Path(data_dir)
    manifest = store.read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"])
    shards = [s for split in store.SPLITS for s in manifest["splits"][split]["shards"]]
    files = [(shard, suffix, item, count) for shard in shards
             for suffix, (item, count) in store.shard_files(shard, dtype).items()]
    for shard, suffix, item, count in files:  # a missing or cut file fails before any reading
        store.check_size(data_dir / f"{shard['name']}{suffix}", item, count,
                         f"prepared data {data_dir}, shard {shard['name']}")
    total = sum(item.itemsize * count for _, _, item, count in files)
    with Progress("{task.description}", BarColumn(), "{task.percentage:>3.0f}%",
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("verifying", total=total)
        for k, (shard, suffix, item, _) in enumerate(files):
            bar.update(task, description=f"verifying {shard['name']}{suffix} ({k + 1}/"
                                         f"{len(files)} files)")
            _check_file(data_dir / f"{shard['name']}{suffix}", suffix, item, shard,
                        lambda n: bar.advance(task, n))
        bar.update(task, description=f"verified {len(files)} files")
    return Verified(str(data_dir), len(shards), len(files), total,
                    sum(s["num_tokens"] for s in shards), time.perf_counter() - start)
