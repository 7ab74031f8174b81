"""The on-disk format of a prepared dataset: token shards, document index, optional loss mask.

A prepared directory (written by `gigajax data prepare`, read by the training pipeline) holds

  manifest.json                 written last: its presence means every shard it lists is complete
  {split}-{k:05d}.tokens        raw little-endian token ids (uint16, or uint32 when the vocabulary
                                has more than 65,536 ids); every document is followed by EOS
  {split}-{k:05d}.docs          int64 end offset (exclusive, in tokens) of each document
  {split}-{k:05d}.mask          uint8, only for SFT data: 1 where the token is a training target
                                (response tokens and the EOS that closes an example), else 0

for split in ("train", "validation"). Every file is written under a temporary name, flushed to
disk and renamed, so a crash leaves at worst a `*.tmp` file, never a shard under its real name
that holds less than it should. Reading checks each shard's byte size against the manifest
(and its document index against its token count) before trusting it, and reads JSON and raw
arrays only: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gigajax.errors import DataError

FORMAT = "gigajax-tokens-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
DOC_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32; little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    """The file stem of shard `index` of `split`, e.g. 'train-00003'."""
    return f"{split}-{index:05d}"


def _write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write `data` to `path` through `path.tmp` + fsync + rename; returns its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk before the next file (the manifest comes last)
        os.fsync(directory)
    finally:
        os.close(directory)
    return hashlib.sha256(data).hexdigest()


def write_shard(out_dir: str | Path, name: str, tokens: np.ndarray, doc_ends: np.ndarray,
                mask: np.ndarray | None = None, *, vocab_size: int) -> dict[str, Any]:
    """Write one shard (`name`.tokens/.docs[/.mask]) atomically; returns its manifest record.

    tokens: [N] ids < vocab_size; doc_ends: [D] increasing exclusive ends, the last == N;
    mask: [N] 0/1.
    """
    out_dir = Path(out_dir)
    if len(tokens) and (np.min(tokens) < 0 or np.max(tokens) >= vocab_size):
        raise ValueError(f"shard {name}: token ids must lie in [0, {vocab_size})")
    tokens = np.ascontiguousarray(tokens, dtype=token_dtype(vocab_size))
    doc_ends = np.ascontiguousarray(doc_ends, dtype=DOC_DTYPE)
    if len(doc_ends) and (doc_ends[-1] != len(tokens) or np.any(np.diff(doc_ends) <= 0)):
        raise ValueError(f"shard {name}: document ends must increase and end at {len(tokens)}")
    record: dict[str, Any] = {
        "name": name,
        "num_tokens": int(len(tokens)),
        "num_docs": int(len(doc_ends)),
        "tokens_sha256": _write_atomic(out_dir / f"{name}.tokens", tokens.data),
        "docs_sha256": _write_atomic(out_dir / f"{name}.docs", doc_ends.data),
    }
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=MASK_DTYPE)
        if mask.shape != tokens.shape:
            raise ValueError(f"shard {name}: mask shape {mask.shape} != tokens {tokens.shape}")
        record["mask_sha256"] = _write_atomic(out_dir / f"{name}.mask", mask.data)
    return record


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json atomically (last, after every shard it lists); returns it as written."""
    manifest = {"format": FORMAT, **manifest}
    _write_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def shard_files(shard: dict[str, Any], dtype: np.dtype) -> dict[str, tuple[np.dtype, int]]:
    """The files of a manifest's shard record: suffix -> (item dtype, item count)."""
    files = {".tokens": (dtype, shard["num_tokens"]), ".docs": (DOC_DTYPE, shard["num_docs"])}
    if "mask_sha256" in shard:
        files[".mask"] = (MASK_DTYPE, shard["num_tokens"])
    return files


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory; a DataError saying what to run when there is none."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{str(data_dir)!r} is not a prepared dataset (no {MANIFEST}; an interrupted "
            "`gigajax data prepare` writes it last). Run: gigajax data prepare --input FILES "
            f"--tokenizer TOKENIZER --out {data_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); run `gigajax data prepare` again.") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}; this version reads "
                        f"{FORMAT!r}. Prepare the data again.")
    return manifest


class ConcatStream(Sequence):
    """Several 1-D memory-mapped arrays read as one: `stream[a:b]` copies only tokens a..b-1."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype("<u2")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("ConcatStream slices take step 1")
            return self._range(start, max(start, stop))
        if index < 0:
            index += len(self)
        return self._range(index, index + 1)[0]

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, pos = [], start
        for i in range(max(first, 0), len(self.parts)):
            if pos >= stop:
                break
            lo, hi = pos - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            pieces.append(np.asarray(self.parts[i][lo:hi]))
            pos = self.starts[i] + hi
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)


@dataclasses.dataclass
class PreparedSplit:
    """One split of a prepared directory, memory-mapped."""

    tokens: ConcatStream  # [N] ids, EOS after each document
    mask: ConcatStream | None  # [N] 1 = training target (SFT data), None = every token counts
    num_docs: int
    manifest: dict[str, Any]


def _mapped(path: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """Memory-map `path` after checking it holds exactly `count` items of `dtype`."""
    expected = count * dtype.itemsize
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{what}: {path} is missing or unreadable ({e.strerror}); prepare the "
                        "data again.") from None
    if size != expected:
        raise DataError(f"{what}: {path} has {size} bytes where the manifest promises {expected} "
                        "(truncated or overwritten); prepare the data again.")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_split(data_dir: str | Path, split: str) -> PreparedSplit:
    """Memory-map `split` of a prepared directory, checking every shard's size first."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest.get("splits", {}):
        raise DataError(f"{data_dir} has no {split!r} split (it has "
                        f"{sorted(manifest.get('splits', {}))}).")
    dtype = np.dtype(manifest["dtype"])
    tokens, masks, num_docs = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        what = f"prepared data {data_dir}, shard {shard['name']}"
        arrays = {suffix: _mapped(data_dir / f"{shard['name']}{suffix}", item, count, what)
                  for suffix, (item, count) in shard_files(shard, dtype).items()}
        tokens.append(arrays[".tokens"])
        docs = arrays[".docs"]
        if shard["num_docs"] and int(docs[-1]) != shard["num_tokens"]:
            raise DataError(f"{what}: its document index ends at {int(docs[-1])}, not at its "
                            f"{shard['num_tokens']} tokens; prepare the data again.")
        if ".mask" in arrays:
            masks.append(arrays[".mask"])
        num_docs += shard["num_docs"]
    mask = ConcatStream(masks) if masks else None
    if mask is not None and len(masks) != len(tokens):
        raise DataError(f"{data_dir}: only some {split} shards have a loss mask; prepare again.")
    return PreparedSplit(ConcatStream(tokens), mask, num_docs, manifest)
