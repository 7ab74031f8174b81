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
that holds less than it should. Reads are JSON and raw arrays only: nothing is unpickled.

The manifest records, per shard, its token and document counts, the sha256 of each of its files
and its smallest and largest token id; and its own `manifest_sha256`: the sha256 of its canonical
JSON (sorted keys, no spaces) without that key. Reading it (`read_manifest`) checks every key
the reader needs is there with its type, the ids against the tokenizer's vocabulary, the counts
against each other and that hash, so an edited manifest is refused. Opening a split checks each
shard's byte size, and every read of a token range checks its ids against the shard's recorded
largest id (a max over what is read), which catches bytes overwritten in place.
`data/verify.py` reads every byte against the recorded sha256s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gigajax.errors import DataError

FORMAT = "gigajax-tokens-v2"
OLD_FORMATS = ("gigajax-tokens-v1",)  # no sha256 of its own, no id range per shard
MANIFEST = "manifest.json"
HASH_KEY = "manifest_sha256"
SPLITS = ("train", "validation")
DOC_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")
REBUILD = "re-run `gigajax data prepare` with the same --input and --out to rebuild it"
# the keys (and their types) a reader needs; `prepare` writes more (counts, inputs, options, ...)
MANIFEST_KEYS = {"format": str, HASH_KEY: str, "dtype": str, "splits": dict, "tokenizer": dict,
                 "max_token_id": int, "has_loss_mask": bool}
TOKENIZER_KEYS = {"spec": str, "fingerprint": str, "vocab_size": int, "eos_id": int}
TOKENIZER_IDS = ("bos_id", "pad_id", "fim_prefix_id", "fim_middle_id", "fim_suffix_id")  # or null
SPLIT_KEYS = {"shards": list, "num_tokens": int, "num_docs": int}
SHARD_KEYS = {"name": str, "num_tokens": int, "num_docs": int, "min_token_id": int,
              "max_token_id": int, "tokens_sha256": str, "docs_sha256": str}
_KINDS = {str: "a string", int: "an integer", bool: "true or false", dict: "a JSON object",
          list: "a list"}


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
    mask: [N] 0/1. The record holds the smallest and largest id (-1 for an empty shard).
    """
    out_dir = Path(out_dir)
    lo, hi = (int(np.min(tokens)), int(np.max(tokens))) if len(tokens) else (-1, -1)
    if len(tokens) and (lo < 0 or hi >= vocab_size):
        raise ValueError(f"shard {name}: token ids must lie in [0, {vocab_size})")
    tokens = np.ascontiguousarray(tokens, dtype=token_dtype(vocab_size))
    doc_ends = np.ascontiguousarray(doc_ends, dtype=DOC_DTYPE)
    if len(doc_ends) and (doc_ends[-1] != len(tokens) or np.any(np.diff(doc_ends) <= 0)):
        raise ValueError(f"shard {name}: document ends must increase and end at {len(tokens)}")
    record: dict[str, Any] = {
        "name": name,
        "num_tokens": int(len(tokens)),
        "num_docs": int(len(doc_ends)),
        "min_token_id": lo,
        "max_token_id": hi,
        "tokens_sha256": _write_atomic(out_dir / f"{name}.tokens", tokens.data),
        "docs_sha256": _write_atomic(out_dir / f"{name}.docs", doc_ends.data),
    }
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=MASK_DTYPE)
        if mask.shape != tokens.shape:
            raise ValueError(f"shard {name}: mask shape {mask.shape} != tokens {tokens.shape}")
        record["mask_sha256"] = _write_atomic(out_dir / f"{name}.mask", mask.data)
    return record


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without `HASH_KEY`."""
    body = {k: v for k, v in manifest.items() if k != HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json atomically (last, after every shard it lists), with this format and
    its own sha256 (any old ones are replaced); returns it as written."""
    body = {k: v for k, v in manifest.items() if k not in ("format", HASH_KEY)}
    manifest = json.loads(json.dumps({"format": FORMAT, **body}))  # tuples -> lists, as read
    manifest[HASH_KEY] = manifest_hash(manifest)
    _write_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def shard_files(shard: dict[str, Any], dtype: np.dtype) -> dict[str, tuple[np.dtype, int]]:
    """The files of a manifest's shard record: suffix -> (item dtype, item count)."""
    files = {".tokens": (dtype, shard["num_tokens"]), ".docs": (DOC_DTYPE, shard["num_docs"])}
    if "mask_sha256" in shard:
        files[".mask"] = (MASK_DTYPE, shard["num_tokens"])
    return files


def read_manifest(data_dir: str | Path, *, shards: bool = True) -> dict[str, Any]:
    """The manifest of a prepared directory, checked (`check_manifest`; with shards=False its
    format, keys and hash only, for a reader of the tokenizer record alone); a DataError saying
    what to run when there is none."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{str(data_dir)!r} is not a prepared dataset (no {MANIFEST}; an interrupted "
            "`gigajax data prepare` writes it last). Run: gigajax data prepare --input FILES "
            f"--tokenizer TOKENIZER --out {data_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); {REBUILD}.") from None
    check_manifest(manifest, path, shards=shards)
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields(record: Any, keys: dict[str, type], where: str, path: Path) -> None:
    """Every key of `keys` is in `record` (a JSON object) with its type; else a DataError
    naming the key (dotted from the manifest's top) and the file."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where or 'the manifest'} is {_short(record)}, not a JSON "
                        f"object; {REBUILD}.")
    for key, kind in keys.items():
        name = f"{where}.{key}" if where else key
        if key not in record:
            raise DataError(f"{path}: the key {name!r} is missing (the manifest was edited or "
                            f"damaged); {REBUILD}.")
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{path}: {name} is {_short(value)} where {_KINDS[kind]} is "
                            f"needed (the manifest was edited or damaged); {REBUILD}.")


def check_manifest(manifest: Any, path: Path, *, shards: bool = True) -> None:
    """A DataError naming the file and the key for any manifest a reader cannot trust: an old
    format, a missing or mistyped key, ids outside the vocabulary or counts that disagree
    (unless shards=False), or a `manifest_sha256` that is not the hash of the rest (an edit)."""
    if isinstance(manifest, dict) and manifest.get("format") in OLD_FORMATS:
        raise DataError(f"{path} has the older format {manifest['format']!r} (no shard id ranges "
                        f"or manifest hash, which this version checks; it reads {FORMAT!r}): "
                        f"{REBUILD}.")
    _fields(manifest, {"format": str}, "", path)
    if manifest["format"] != FORMAT:
        raise DataError(f"{path} has format {manifest['format']!r}; this version reads "
                        f"{FORMAT!r}: {REBUILD}.")
    _fields(manifest, MANIFEST_KEYS, "", path)
    tok = manifest["tokenizer"]
    _fields(tok, TOKENIZER_KEYS, "tokenizer", path)
    for key in TOKENIZER_IDS:
        if tok.get(key) is not None:
            _fields(tok, {key: int}, "tokenizer", path)
    if shards:
        _check_consistency(manifest, path)
    if manifest[HASH_KEY] != manifest_hash(manifest):
        raise DataError(f"{path} was changed after `gigajax data prepare` wrote it: its "
                        f"{HASH_KEY} is not the sha256 of the rest of it (canonical JSON); a "
                        f"manifest is not edited by hand: {REBUILD}.")


def _check_consistency(manifest: dict[str, Any], path: Path) -> None:
    """The ids against the vocabulary, the splits' keys, the counts against each other."""
    tok = manifest["tokenizer"]
    vocab = tok["vocab_size"]
    refuse = functools.partial(_refuse, path)
    if vocab < 1 or manifest["dtype"] != token_dtype(vocab).str:
        raise refuse(f"dtype {manifest['dtype']!r} and tokenizer.vocab_size={vocab} disagree "
                     f"(a vocabulary of {vocab} ids is stored as {token_dtype(vocab).str!r})")
    _fields(manifest["splits"], dict.fromkeys(SPLITS, dict), "splits", path)
    for split in SPLITS:
        entry = manifest["splits"][split]
        _fields(entry, SPLIT_KEYS, f"splits.{split}", path)
        for k, shard in enumerate(entry["shards"]):
            where = f"splits.{split}.shards[{k}]"
            _fields(shard, SHARD_KEYS, where, path)
            _check_shard(shard, where, shard_name(split, k), manifest, path)
        for key in ("num_tokens", "num_docs"):
            if entry[key] != sum(s[key] for s in entry["shards"]):
                raise refuse(f"splits.{split}.{key}={entry[key]} is not the sum over its shards "
                             f"({sum(s[key] for s in entry['shards'])})")
    for key in ("eos_id", *TOKENIZER_IDS):  # after the shards, which name themselves
        if tok.get(key) is not None and not 0 <= tok[key] < vocab:
            raise refuse(f"tokenizer.{key}={tok[key]} is outside its vocabulary [0, {vocab})")
    if manifest["max_token_id"] >= vocab:
        raise refuse(f"max_token_id={manifest['max_token_id']} is not below tokenizer.vocab_size"
                     f"={vocab}")


def _refuse(path: Path, what: str) -> DataError:
    """The error for a manifest that says something impossible."""
    return DataError(f"{path}: {what}; {REBUILD}.")


def _check_shard(shard: dict[str, Any], where: str, name: str, manifest: dict[str, Any],
                 path: Path) -> None:
    """One shard record against its place, the vocabulary and the loss mask flag."""
    refuse = functools.partial(_refuse, path)
    vocab = manifest["tokenizer"]["vocab_size"]
    if shard["name"] != name:
        raise refuse(f"{where}.name is {shard['name']!r} where its place in the list says "
                     f"{name!r}")
    if shard["num_tokens"] < 0 or not 0 <= shard["num_docs"] <= shard["num_tokens"]:
        raise refuse(f"shard {name} promises {shard['num_docs']} documents in "
                     f"{shard['num_tokens']} tokens")
    lo, hi = shard["min_token_id"], shard["max_token_id"]
    if shard["num_tokens"] and not 0 <= lo <= hi:
        raise refuse(f"shard {name} records ids from {lo} to {hi}")
    if hi >= vocab:
        raise refuse(f"shard {name} holds token ids up to {hi}, but tokenizer.vocab_size={vocab} "
                     f"allows ids below {vocab} only (the manifest was edited, or the shard is "
                     "another tokenizer's)")
    if hi > manifest["max_token_id"]:
        raise refuse(f"shard {name} holds token id {hi}, above the manifest's max_token_id="
                     f"{manifest['max_token_id']}")
    if manifest["has_loss_mask"]:
        _fields(shard, {"mask_sha256": str}, where, path)
    elif "mask_sha256" in shard:
        raise refuse(f"shard {name} has a loss mask, but has_loss_mask is false")


class ConcatStream(Sequence):
    """Several 1-D memory-mapped arrays read as one: `stream[a:b]` copies only tokens a..b-1.

    With `files` and `limits` (one each per part) every read checks its values are <= the
    part's limit (a max over what is read) and names the file and position when one is not.
    """

    def __init__(self, parts: list[np.ndarray], files: list[Path] | None = None,
                 limits: list[int] | None = None, kind: str = "token id"):
        keep = [i for i, p in enumerate(parts) if len(p)]
        self.parts = [parts[i] for i in keep]
        self.files = [files[i] for i in keep] if files is not None else None
        self.limits = [limits[i] for i in keep] if limits is not None else None
        self.kind = kind
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
            piece = np.asarray(self.parts[i][lo:hi])
            if self.limits is not None and len(piece) and piece.max() > self.limits[i]:
                self._refuse(i, int(lo), piece)
            pieces.append(piece)
            pos = self.starts[i] + hi
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def _refuse(self, i: int, lo: int, piece: np.ndarray) -> None:
        """The DataError for a value above part i's limit in `piece` (part i from `lo`)."""
        k = int(np.argmax(piece > self.limits[i]))
        file, limit = self.files[i], self.limits[i]
        allowed = ("only 0 and 1 are written" if self.kind == "mask value" else
                   f"the largest id `gigajax data prepare` wrote in this shard is {limit}")
        raise DataError(
            f"{file}: token {lo + k} (byte {(lo + k) * piece.itemsize}) holds {self.kind} "
            f"{int(piece[k])}, where {allowed}: the file was changed after it was prepared "
            f"(its size is right). `gigajax data verify {file.parent}` checks every shard; "
            f"{REBUILD}.")


@dataclasses.dataclass
class PreparedSplit:
    """One split of a prepared directory, memory-mapped."""

    tokens: ConcatStream  # [N] ids, EOS after each document
    mask: ConcatStream | None  # [N] 1 = training target (SFT data), None = every token counts
    num_docs: int
    manifest: dict[str, Any]
    doc_parts: list[tuple[np.ndarray, int]] = dataclasses.field(default_factory=list)

    def document_ends(self) -> np.ndarray:
        """[D] int64 end offsets of the documents in `tokens` (read now from every shard's
        memory-mapped index; whole-example packing needs them, stream packing does not)."""
        parts = [np.asarray(docs, np.int64) + first for docs, first in self.doc_parts]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_size(path: Path, dtype: np.dtype, count: int, what: str) -> None:
    """A DataError unless `path` holds exactly `count` items of `dtype`."""
    expected = count * dtype.itemsize
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{what}: {path} is missing or unreadable ({e.strerror}); "
                        f"{REBUILD}.") from None
    if size != expected:
        raise DataError(f"{what}: {path} has {size} bytes where the manifest promises {expected} "
                        f"(truncated or overwritten); {REBUILD}.")


def _mapped(path: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """Memory-map `path` after checking it holds exactly `count` items of `dtype`."""
    check_size(path, dtype, count, what)
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_split(data_dir: str | Path, split: str) -> PreparedSplit:
    """Memory-map `split` of a prepared directory (manifest checked, every shard's size
    checked); its reads check ids against each shard's recorded largest id."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in SPLITS:
        raise DataError(f"{data_dir} has no {split!r} split (it has {list(SPLITS)}).")
    dtype = np.dtype(manifest["dtype"])
    tokens, masks, num_docs = [], [], 0
    files, limits, doc_parts, first = [], [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        what = f"prepared data {data_dir}, shard {shard['name']}"
        arrays = {suffix: _mapped(data_dir / f"{shard['name']}{suffix}", item, count, what)
                  for suffix, (item, count) in shard_files(shard, dtype).items()}
        tokens.append(arrays[".tokens"])
        files.append(data_dir / f"{shard['name']}.tokens")
        limits.append(shard["max_token_id"])
        docs = arrays[".docs"]
        if shard["num_docs"] and int(docs[-1]) != shard["num_tokens"]:
            raise DataError(f"{what}: its document index ends at {int(docs[-1])}, not at its "
                            f"{shard['num_tokens']} tokens; {REBUILD}.")
        if ".mask" in arrays:
            masks.append(arrays[".mask"])
        num_docs += shard["num_docs"]
        doc_parts.append((docs, first))
        first += shard["num_tokens"]
    mask = None
    if masks:  # check_manifest saw that every shard has one
        mask = ConcatStream(masks, [f.with_suffix(".mask") for f in files], [1] * len(masks),
                            kind="mask value")
    return PreparedSplit(ConcatStream(tokens, files, limits), mask, num_docs, manifest, doc_parts)
