"""`gigajax data prepare`: text, JSON Lines or Parquet files -> token shards + manifest.

Every document is tokenized (no BOS) and followed by EOS (formats and the SFT template:
`readers.py`; the on-disk format: `store.py`). Input files are cut into units of ~16 MB that
worker processes tokenize in parallel; the parent takes their results in input order, sends
each document to `validation` iff crc32("{file key}:{doc index}") / 2**32 < val_fraction, and
writes a shard per split whenever it holds --shard-tokens tokens (documents never straddle
shards). So the output depends on the inputs and options only, never on --workers.

The manifest is written last and carries a fingerprint of (inputs' paths, sizes, mtimes;
tokenizer; options), each shard's sha256s and id range, and its own sha256 (`store.py`): a re-run
whose fingerprint matches and whose shards all have their sizes and sha256s (`verify.py` reads
them) does nothing. A rebuild writes into `.staging/` and replaces the old dataset only once it
is complete (old manifest deleted, old shards deleted, new shards moved in, new manifest
written), so a rebuild that fails leaves the previous dataset as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from gigajax.data import readers, store
from gigajax.data.chat import ChatTemplate, chat_pieces, encode_pieces, load_chat_template
from gigajax.data.stdlib_corpus import is_validation
from gigajax.data.tokenizer import Tokenizer, get_tokenizer
from gigajax.data.verify import verify_prepared
from gigajax.errors import ConfigError, DataError, GigajaxError

PREPARE_VERSION = 1
CHUNK_BYTES = 16 << 20  # input bytes per unit of work
ENCODE_CHARS = 1 << 20  # characters per encode_batch call
COUNT_KEYS = ("files", "empty_files", "records", "documents_read", "documents_written",
              "skipped_empty", "skipped_too_short", "skipped_malformed", "utf8_replaced_chars",
              "utf8_replaced_documents", "tokens")
_OURS = re.compile(rf"^(?:(?:{'|'.join(store.SPLITS)})-\d{{5}}\.(?:tokens|docs|mask)|"
                   rf"{re.escape(store.MANIFEST)})(?:\.tmp)?$")
STAGING = ".staging"  # a rebuild writes here; the old dataset stays whole until it succeeds


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything besides inputs and tokenizer that the output depends on (fingerprinted)."""

    field: str = "text"
    sft: bool = False
    val_fraction: float = 0.01
    bad_utf8: str = "replace"
    bad_lines: str = "error"
    min_doc_tokens: int = 1
    shard_tokens: int = 100_000_000
    chat: bool = False  # messages rendered by the tokenizer's chat template (an SFT mode)
    dpo: bool = False  # {prompt, chosen, rejected} pairs, one document each

    @property
    def kind(self) -> str:
        """What records are read as (`readers.KINDS`)."""
        return "dpo" if self.dpo else "chat" if self.chat else "sft" if self.sft else "text"

    @property
    def masked(self) -> bool:
        """Whether the output has a loss mask."""
        return self.kind != "text"

    def check(self) -> None:
        """A ConfigError naming the flag for any value out of range."""
        if self.dpo and (self.sft or self.chat):
            raise ConfigError("--dpo reads preference pairs; it does not combine with --sft or "
                              "--chat.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction={self.val_fraction} must lie in [0, 1) (0: no "
                              "validation split).")
        for flag, value, allowed in (("--bad-utf8", self.bad_utf8, readers.BAD_UTF8),
                                     ("--bad-lines", self.bad_lines, readers.BAD_LINES)):
            if value not in allowed:
                raise ConfigError(f"{flag}={value!r}; allowed values: {', '.join(allowed)}.")
        if self.min_doc_tokens < 1:
            raise ConfigError(f"--min-doc-tokens={self.min_doc_tokens} must be >= 1.")
        if self.shard_tokens < 1:
            raise ConfigError(f"--shard-tokens={self.shard_tokens} must be >= 1.")
        if not self.field:
            raise ConfigError("--field must name a JSON field / Parquet column, e.g. text.")


@dataclasses.dataclass
class UnitResult:
    """One unit's kept documents, each followed by EOS, in order."""

    tokens: np.ndarray  # [N] ids in the dataset's token dtype
    doc_lens: np.ndarray  # [D] int64 tokens per document, EOS included
    doc_index: np.ndarray  # [D] int64 record index within the unit
    mask: np.ndarray | None  # [N] uint8 training targets (SFT), else None
    counts: Counter


def tokenize_unit(unit: readers.Unit, opts: Options, tokenizer: Tokenizer) -> UnitResult:
    """Read and tokenize one unit; malformed records raise readers.BadRecord."""
    counts: Counter = Counter()
    dtype = store.token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    toks, lens, index, masks = [], [], [], []
    batch: list[tuple[int, readers.Record]] = []

    template = load_chat_template(tokenizer) if opts.chat else None

    def encode(batch: list[tuple[int, readers.Record]]) -> None:
        if opts.masked:
            records = [_pieces(rec, i, template, eos) for i, rec in batch]
            flat = encode_pieces(tokenizer, [p for rec in records for p in rec])
        else:
            flat = tokenizer.encode_batch([rec for _, rec in batch])
        j = 0
        for n, (i, rec) in enumerate(batch):
            if opts.masked:
                rec = records[n]
                pieces, j = flat[j:j + len(rec)], j + len(rec)
                ids = np.concatenate(pieces)
                mask = np.concatenate([np.full(len(p), t, np.uint8)
                                       for p, (_, t, _) in zip(pieces, rec, strict=True)])
            else:
                ids, j = flat[j], j + 1
            if len(ids) < opts.min_doc_tokens:
                counts["skipped_too_short"] += 1
                continue
            toks.extend((ids, eos))
            lens.append(len(ids) + 1)
            index.append(i)
            if opts.masked:
                masks.extend((mask, np.ones(1, np.uint8)))

    chars = 0
    for i, rec in readers.read_records(unit, opts.field, opts.kind, opts.bad_utf8,
                                       opts.bad_lines, counts):
        counts["documents_read"] += 1
        texts = readers.record_texts(rec)
        if not any(t.strip() for t in texts):
            counts["skipped_empty"] += 1
            continue
        batch.append((i, rec))
        chars += sum(map(len, texts))
        if chars >= ENCODE_CHARS:
            encode(batch)
            batch, chars = [], 0
    encode(batch)
    tokens = np.concatenate(toks) if toks else np.zeros(0, dtype)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        bad = int(tokens.max()) if tokens.max() >= tokenizer.vocab_size else int(tokens.min())
        raise DataError(f"{unit.path}: tokenizer {tokenizer.spec!r} produced id {bad}, outside "
                        f"its vocabulary [0, {tokenizer.vocab_size}); the tokenizer file is "
                        "inconsistent. Fix or retrain it (gigajax data train-tokenizer).")
    counts["documents_written"] += len(lens)
    counts["tokens"] += len(tokens)
    mask = (np.concatenate(masks) if masks else np.zeros(0, np.uint8)) if opts.masked else None
    return UnitResult(tokens.astype(dtype, copy=False), np.asarray(lens, np.int64),
                      np.asarray(index, np.int64), mask, counts)


def _pieces(rec: readers.Record, index: int, template: ChatTemplate | None,
            eos: np.ndarray) -> list[tuple[str | np.ndarray, bool, bool]]:
    """A masked record as pieces (text or ids, is_target, parse specials): SFT pieces as read,
    a chat rendered by its template, a DPO pair as `prompt chosen EOS prompt rejected` (the
    closing EOS is appended with every document's)."""
    if isinstance(rec, readers.Chat):
        return chat_pieces(template, rec, index)
    if isinstance(rec, readers.Pair):
        return [(rec.prompt, False, False), (rec.chosen, True, False), (eos, True, False),
                (rec.prompt, False, False), (rec.rejected, True, False)]
    return [(text, target, False) for text, target in rec]


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, threads: int) -> None:
    """Per worker process: its tokenizer, and its share of the CPUs for batch encoding."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the HF batch encoder's pool, per process
    _WORKER["tokenizer"] = tokenizer


def _worker_unit(unit: readers.Unit, opts: Options) -> UnitResult:
    """`tokenize_unit` with this worker's tokenizer."""
    return tokenize_unit(unit, opts, _WORKER["tokenizer"])


def _cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _results(units: list[readers.Unit], opts: Options, tokenizer: Tokenizer,
             workers: int) -> Iterator[tuple[readers.Unit, Callable[[], UnitResult]]]:
    """(unit, get its result) in unit order; at most 2 * workers units in flight."""
    if workers == 1:
        for unit in units:
            yield unit, lambda unit=unit: tokenize_unit(unit, opts, tokenizer)
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX threads
    threads = max(1, _cpus() // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer, threads)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for unit in units:
                pending.append((unit, pool.submit(_worker_unit, unit, opts)))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result
            while pending:
                done, future = pending.popleft()
                yield done, future.result
        finally:
            for _, future in pending:
                future.cancel()


class _SplitWriter:
    """Buffers one split's documents and writes a shard whenever it holds shard_tokens."""

    def __init__(self, out: Path, split: str, opts: Options, vocab_size: int):
        self.out, self.split, self.opts, self.vocab_size = out, split, opts, vocab_size
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, lens: np.ndarray, mask: np.ndarray | None) -> None:
        """Append whole documents (tokens [N], lens [D], mask [N]); write full shards."""
        if len(lens):
            self.parts.append((tokens, lens, mask))
            self.buffered += len(tokens)
        if self.buffered >= self.opts.shard_tokens:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        """Write every full shard (it ends with the first document that reaches shard_tokens),
        and the rest too if final; keep the rest otherwise."""
        tokens = np.concatenate([p[0] for p in self.parts])
        ends = np.cumsum(np.concatenate([p[1] for p in self.parts]))
        mask = np.concatenate([p[2] for p in self.parts]) if self.opts.masked else None
        first_doc, first_tok = 0, 0
        while first_doc < len(ends):
            k = int(np.searchsorted(ends, first_tok + self.opts.shard_tokens)) + 1
            if k > len(ends) and not final:
                break
            k = min(k, len(ends))
            cut = int(ends[k - 1])
            name = store.shard_name(self.split, len(self.shards))
            self.shards.append(store.write_shard(
                self.out, name, tokens[first_tok:cut], ends[first_doc:k] - first_tok,
                None if mask is None else mask[first_tok:cut], vocab_size=self.vocab_size))
            first_doc, first_tok = k, cut
        self.parts, self.buffered = [], len(tokens) - first_tok
        if self.buffered:
            rest = None if mask is None else mask[first_tok:]
            lens = np.diff(ends[first_doc:], prepend=first_tok)
            self.parts.append((tokens[first_tok:], lens, rest))

    def close(self) -> dict[str, Any]:
        """Write what is left; the split's manifest entry."""
        if self.buffered:
            self._write(final=True)
        return {"shards": self.shards, "num_tokens": sum(s["num_tokens"] for s in self.shards),
                "num_docs": sum(s["num_docs"] for s in self.shards)}


def _is_validation(key: str, first: int, doc_index: np.ndarray, val_fraction: float) -> np.ndarray:
    """[D] bool: crc32("{key}:{doc index in file}") / 2**32 < val_fraction."""
    if val_fraction == 0:
        return np.zeros(len(doc_index), bool)
    return np.array([is_validation(f"{key}:{first + int(i)}", val_fraction) for i in doc_index],
                    bool)


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest already in `out` (None if none); refuses a file or a foreign directory."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory; choose a directory path.")
    if not out.exists():
        return None
    try:
        manifest = store.read_manifest(out)
    except DataError:
        manifest = None
    foreign = sorted(name for name in os.listdir(out)
                     if not _OURS.match(name) and name != STAGING)
    if foreign and manifest is None:
        raise DataError(f"--out {out} holds files that `data prepare` did not write ("
                        f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose "
                        "a new or empty directory. Nothing was deleted.")
    return manifest


def _up_to_date(out: Path, manifest: dict[str, Any] | None, fingerprint: str, progress: bool,
                echo: Callable[[str], None]) -> bool:
    """Same fingerprint and every listed shard file has its size and sha256 (`verify`)."""
    if manifest is None or manifest.get("fingerprint") != fingerprint:
        return False
    try:
        verify_prepared(out, progress=progress)
    except DataError as e:
        echo(f"{out}: the inputs are unchanged but a shard is not what was written, so it is "
             f"rebuilt ({e})")
        return False
    return True


def _remove_leftovers(out: Path) -> None:
    """Delete what an interrupted run left: *.tmp files and an unfinished staging directory."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    for name in sorted(os.listdir(out)):
        if _OURS.match(name) and name.endswith(".tmp"):
            (out / name).unlink()


def _remove_dataset(out: Path) -> None:
    """Delete the manifest first (so nothing trusts the shards), then the shards."""
    (out / store.MANIFEST).unlink(missing_ok=True)
    for name in sorted(os.listdir(out)):
        if _OURS.match(name):
            (out / name).unlink()


def tokenizer_record(tok: Tokenizer) -> dict[str, Any]:
    """The manifest's description of the tokenizer."""
    keys = ("vocab_size", "bos_id", "eos_id", "pad_id", "fim_prefix_id", "fim_middle_id",
            "fim_suffix_id")
    return {"spec": tok.spec, "fingerprint": tok.fingerprint(),
            **{k: getattr(tok, k) for k in keys}}


def _tokenize_all(files: list[readers.InputFile], units: list[readers.Unit], opts: Options,
                  tok: Tokenizer, workers: int, writers: dict[str, _SplitWriter],
                  progress: bool) -> Counter:
    """Tokenize every unit (in parallel), route each document to its split; returns counts."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    counts = Counter(files=len(files), empty_files=sum(f.size == 0 for f in files))
    next_record = [0] * len(files)  # the file-level index of each file's next unit's record
    units_left, files_done = Counter(u.file for u in units), 0
    with Progress("{task.description}", BarColumn(), "{task.percentage:>3.0f}%",
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("tokenizing", total=sum(u.nbytes for u in units))
        for unit, get in _results(units, opts, tok, workers):
            first = next_record[unit.file]
            try:
                res = get()
            except readers.BadRecord as e:
                raise readers.locate(unit, first, e) from None
            except BrokenProcessPool:
                raise GigajaxError(
                    "a `data prepare` worker process died (out of memory?). From a Python "
                    "script, call prepare() under `if __name__ == '__main__':` (workers are "
                    "spawned); --workers 1 runs in-process and shows the error.") from None
            next_record[unit.file] += res.counts["records"]
            counts.update(res.counts)
            units_left[unit.file] -= 1
            files_done += units_left[unit.file] == 0
            is_val = _is_validation(files[unit.file].key, first, res.doc_index,
                                    opts.val_fraction)
            for split, docs in (("train", ~is_val), ("validation", is_val)):
                if docs.all():
                    writers[split].add(res.tokens, res.doc_lens, res.mask)
                elif docs.any():
                    per_token = np.repeat(docs, res.doc_lens)
                    writers[split].add(res.tokens[per_token], res.doc_lens[docs],
                                       None if res.mask is None else res.mask[per_token])
            bar.update(task, advance=unit.nbytes, description=(
                f"{files_done}/{len(files)} files  {counts['documents_written']:,} docs  "
                f"{counts['tokens']:,} tokens"))
    return counts


def prepare(inputs: list[str], tokenizer: str | Tokenizer, out: str | os.PathLike, *,
            field: str = "text", sft: bool = False, val_fraction: float = 0.01,
            workers: int | None = None, bad_utf8: str = "replace", bad_lines: str = "error",
            min_doc_tokens: int = 1, shard_tokens: int = 100_000_000, progress: bool = True,
            echo: Callable[[str], None] | None = print, chat: bool = False,
            dpo: bool = False) -> dict[str, Any]:
    """Tokenize the files matching `inputs` into `out`; returns the manifest (see module doc).

    Worker processes are spawned: a script calling this with workers > 1 needs the
    `if __name__ == "__main__":` guard.
    """
    opts = Options(field, sft, val_fraction, bad_utf8, bad_lines, min_doc_tokens, shard_tokens,
                   chat, dpo)
    opts.check()
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1.")
    echo = echo or (lambda _: None)
    tok = get_tokenizer(tokenizer, "--tokenizer") if isinstance(tokenizer, str) else tokenizer
    out = Path(out)
    files = readers.expand_inputs(inputs, exclude=str(out))
    old = _existing_manifest(out)
    input_records = [{"path": f.path, "key": f.key, "size": f.size, "mtime_ns": f.mtime_ns}
                     for f in files]
    tok_record = tokenizer_record(tok)
    template = load_chat_template(tok) if chat else None
    fingerprint = hashlib.sha256(json.dumps(
        {"version": PREPARE_VERSION, "format": store.FORMAT, "inputs": input_records,
         "tokenizer": tok_record["fingerprint"], "options": dataclasses.asdict(opts),
         **({"chat_template": template.fingerprint()} if template else {})},
        sort_keys=True).encode()).hexdigest()
    if out.is_dir():
        _remove_leftovers(out)
    if _up_to_date(out, old, fingerprint, progress, echo):
        echo(f"{out} is up to date ({len(files)} input files unchanged); nothing to do.")
        return old
    units = [u for i, f in enumerate(files)
             for u in readers.plan_units(i, f, CHUNK_BYTES, opts.field, opts.kind)]
    staging = out / STAGING
    staging.mkdir(parents=True)
    start = time.perf_counter()
    writers = {s: _SplitWriter(staging, s, opts, tok.vocab_size) for s in store.SPLITS}
    counts = _tokenize_all(files, units, opts, tok, workers or max(1, min(_cpus(), len(units))),
                           writers, progress)
    if counts["documents_written"] == 0:
        raise DataError(
            f"no documents to write: the {len(files)} input file(s) ({counts['empty_files']} "
            f"empty) gave {counts['documents_read']} documents, {counts['skipped_empty']} blank, "
            f"{counts['skipped_too_short']} shorter than --min-doc-tokens={min_doc_tokens}, and "
            f"{counts['skipped_malformed']} malformed records were skipped. Check --input and "
            "--field.")
    manifest = {
        "dtype": store.token_dtype(tok.vocab_size).str,
        "splits": {s: w.close() for s, w in writers.items()},
        "tokenizer": tok_record,
        "max_token_id": max(s["max_token_id"] for w in writers.values() for s in w.shards),
        "has_loss_mask": opts.masked,
        "counts": {k: counts[k] for k in COUNT_KEYS},
        "inputs": input_records,
        "options": dataclasses.asdict(opts),
        "fingerprint": fingerprint,
    }
    _remove_dataset(out)  # only now that the new one is complete
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    staging.rmdir()
    manifest = store.write_manifest(out, manifest)
    _summary(echo, out, manifest, time.perf_counter() - start)
    return manifest


def _summary(echo: Callable[[str], None], out: Path, manifest: dict[str, Any],
             seconds: float) -> None:
    c = manifest["counts"]
    echo(f"prepared {out} in {seconds:.1f} s: {c['documents_written']:,} documents, "
         f"{c['tokens']:,} tokens ({c['tokens'] / max(seconds, 1e-9):,.0f} tokens/s), "
         f"tokenizer {manifest['tokenizer']['spec']}")
    for split, info in manifest["splits"].items():
        echo(f"  {split:<10} {info['num_docs']:>12,} documents {info['num_tokens']:>15,} tokens "
             f"in {len(info['shards'])} shard(s)")
    echo(f"  skipped: {c.get('skipped_empty', 0):,} blank, {c.get('skipped_too_short', 0):,} "
         f"shorter than --min-doc-tokens, {c.get('skipped_malformed', 0):,} malformed records; "
         f"{c.get('utf8_replaced_chars', 0):,} invalid UTF-8 characters replaced in "
         f"{c.get('utf8_replaced_documents', 0):,} documents")
    if manifest["splits"]["train"]["num_tokens"] == 0:
        echo("  warning: the train split is empty (every document hashed into validation); "
             "lower --val-fraction.")
    if manifest["splits"]["validation"]["num_tokens"] == 0:
        echo(f"  warning: the validation split is empty (no document hashed into it at "
             f"--val-fraction {manifest['options']['val_fraction']}); training evaluates on it, "
             "so raise --val-fraction (or add documents).")
