"""Input files -> documents: globs expanded, files cut into units, records read and checked.

Formats, by extension:
  .jsonl .json .ndjson   JSON Lines: one object per line, the text in --field (blank lines ignored)
  .parquet               the string column --field, read a batch of rows at a time
  anything else          plain text: the whole file is one document

A UTF-8 byte order mark opening a file is dropped. A document's index within its file (which,
hashed with the file's key, picks its split) is its 0-based line number in JSON Lines, its row
in Parquet, and 0 for a text file.

SFT records (--sft, JSON Lines or Parquet) become pieces (text, is_target):
  {"prompt": P, "response": R}   -> (P, 0) (R, 1)             prompt and response joined as given
  {"messages": [{"role", "content"}, ...]}
                                 -> per turn ("<role>: ", 0) (content, A) ("\\n", A)
                                    where A = 1 for role "assistant", else 0
The EOS that closes every example is a target too. With --chat, `messages` records are read
as they are (`Chat`) and rendered by the tokenizer's own chat template (`chat.py`). With --dpo,
records are `{"prompt", "chosen", "rejected"}` strings (`Pair`; `prepare.py` writes each pair
as one document, `data/packing.py` says how).

A malformed record raises BadRecord(index within its unit, message); the caller, who knows where
the unit starts, turns it into a DataError naming file and line (or row).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from gigajax.errors import DataError

TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
JSONL_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson"})
COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".7z", ".lz4"})
SFT_COLUMNS = ("prompt", "response", "messages")
DPO_FIELDS = ("prompt", "chosen", "rejected")
KINDS = ("text", "sft", "chat", "dpo")  # what a record is read as (`kind`)
BAD_UTF8 = ("replace", "reject")
BAD_LINES = ("error", "skip")
_SURROGATES = re.compile("[\ud800-\udfff]")
_FFFD_UTF8 = "\ufffd".encode()
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark opening a file is dropped



@dataclasses.dataclass(frozen=True)
class Chat:
    """A `messages` record read for the tokenizer's chat template: ((role, content), ...)."""

    messages: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Pair:
    """A DPO record: the prompt, the preferred and the rejected response."""

    prompt: str
    chosen: str
    rejected: str


# a document's text, an SFT example's pieces (text, is_target), a chat or a DPO pair
Record = str | list[tuple[str, bool]] | Chat | Pair


def kind_name(kind: str | bool) -> str:
    """A record kind of KINDS; True / False (the former `sft` flag) mean 'sft' / 'text'."""
    return ("sft" if kind else "text") if isinstance(kind, bool) else kind


def record_texts(rec: Record) -> list[str]:
    """Every string of a record (to test it for blankness)."""
    if isinstance(rec, str):
        return [rec]
    if isinstance(rec, Chat):
        return [content for _, content in rec.messages]
    if isinstance(rec, Pair):
        return [rec.prompt, rec.chosen, rec.rejected]
    return [text for text, _ in rec]


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file as matched; `key` (its path relative to the non-glob part of the pattern
    that matched it) names it in the validation split hash, so moving the data keeps the split."""

    path: str
    key: str
    size: int
    mtime_ns: int
    kind: str


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of one input file that one worker reads: bytes [start, stop) of a text or JSON
    Lines file, or row groups [start, stop) of a Parquet file."""

    file: int  # index into the input list
    path: str
    kind: str
    start: int
    stop: int
    nbytes: int  # for progress


class BadRecord(Exception):
    """A record the reader refuses; `index` counts records (lines for text) within the unit."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)
        self.index, self.message = index, message


class BadEncoding(BadRecord):
    """Invalid UTF-8 under --bad-utf8 reject: an error even under --bad-lines skip."""


def kind_of(path: str) -> str:
    """The reader for `path`, from its extension; compressed files are refused."""
    suffix = Path(path).suffix.lower()
    if suffix in COMPRESSED_SUFFIXES:
        raise DataError(f"{path}: compressed input ({suffix}) is not read; decompress it first "
                        "(e.g. `zstd -d` / `gunzip`) and pass the result to --input.")
    if suffix in JSONL_SUFFIXES:
        return JSONL
    return PARQUET if suffix == ".parquet" else TEXT


def _glob_base(pattern: str) -> str:
    """The directory part of `pattern` before its first wildcard (its parent if it has none)."""
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return str(Path(*parts[:i])) if i else "."
    return str(Path(pattern).parent)


def expand_inputs(patterns: list[str], exclude: str | None = None) -> list[InputFile]:
    """Expand --input globs (recursive `**`), each pattern's matches sorted, duplicates dropped;
    every file checked readable. Files under `exclude` (the output directory) are left out."""
    if not patterns:
        raise DataError("--input: give at least one file or glob, e.g. --input 'data/*.jsonl'.")
    skip = os.path.abspath(exclude) + os.sep if exclude else None
    seen, files = set(), []
    for pattern in patterns:
        if os.path.isdir(pattern):
            raise DataError(f"--input {pattern!r} is a directory; pass the files in it, e.g. "
                            f"--input '{os.path.join(pattern, '**', '*.jsonl')}'.")
        matches = sorted(glob.glob(pattern, recursive=True))
        regular = [m for m in matches if not os.path.isdir(m)]
        if not regular:
            what = "only directories" if matches else "no files"
            raise DataError(f"--input {pattern!r} matches {what} (relative to {os.getcwd()}). "
                            "Quote globs so the shell leaves them to gigajax, and use '**/' to "
                            "reach subdirectories.")
        base = _glob_base(pattern)
        for match in regular:
            path = os.path.abspath(match)
            if path in seen or (skip and path.startswith(skip)):
                continue
            seen.add(path)
            try:
                with open(path, "rb"):
                    pass
                stat = os.stat(path)
            except OSError as e:
                raise DataError(f"{path}: cannot read it ({e.strerror}); fix its permissions or "
                                "leave it out of --input.") from None
            key = Path(os.path.relpath(path, os.path.abspath(base))).as_posix()
            files.append(InputFile(path, key, stat.st_size, stat.st_mtime_ns, kind_of(path)))
    return files


def _jsonl_boundaries(path: str, size: int, chunk_bytes: int) -> list[int]:
    """Byte offsets that cut a JSON Lines file into ~chunk_bytes pieces, each just after a '\\n'."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < size:
            f.seek(cuts[-1] + chunk_bytes)
            f.readline()  # to the end of the line the seek landed in
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return cuts + [size]


def parquet_columns(path: str, field: str, sft: str | bool) -> list[str]:
    """The columns to read from a Parquet file (`sft`: the record kind), checked against its
    schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from None
    names = schema.names
    kind = kind_name(sft)
    if kind == "dpo":
        if missing := [c for c in DPO_FIELDS if c not in names]:
            raise DataError(f"{path}: --dpo needs columns 'prompt', 'chosen' and 'rejected'; it "
                            f"has no {missing[0]!r} (its columns: {names}).")
        return list(DPO_FIELDS)
    if kind == "chat":
        if "messages" not in names:
            raise DataError(f"{path}: --chat needs a column 'messages'; it has {names}.")
        return ["messages"]
    if kind == "sft":
        cols = [c for c in SFT_COLUMNS if c in names]
        if "messages" not in cols and not {"prompt", "response"} <= set(cols):
            raise DataError(f"{path}: --sft needs columns 'prompt' and 'response', or "
                            f"'messages'; it has {names}.")
        return cols
    if field not in names:
        raise DataError(f"{path}: no column {field!r}; its columns are {names}. Choose one with "
                        "--field.")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {field!r} has type {kind}, not string; choose a text "
                        "column with --field.")
    return [field]


def plan_units(index: int, inp: InputFile, chunk_bytes: int, field: str,
               sft: str | bool) -> list[Unit]:
    """Cut one input into units of about chunk_bytes (text files stay whole: one document);
    `sft` is the record kind."""
    if inp.kind == TEXT:
        if kind_name(sft) != "text":
            raise DataError(f"{inp.path}: --{kind_name(sft)} reads JSON Lines or Parquet records; "
                            "this file is read as plain text (by its extension).")
        return [Unit(index, inp.path, TEXT, 0, inp.size, inp.size)]
    if inp.kind == JSONL:
        cuts = _jsonl_boundaries(inp.path, inp.size, chunk_bytes)
        return [Unit(index, inp.path, JSONL, a, b, b - a)
                for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    import pyarrow.parquet as pq

    parquet_columns(inp.path, field, sft)
    meta = pq.ParquetFile(inp.path).metadata
    units, group, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes or g == meta.num_row_groups - 1:
            units.append(Unit(index, inp.path, PARQUET, group, g + 1, size))
            group, size = g + 1, 0
    return units


def decode_utf8(data: bytes, bad_utf8: str, counts: Counter) -> str:
    """Strict UTF-8; under --bad-utf8 replace, U+FFFD per bad sequence (counted); under reject
    the UnicodeDecodeError propagates for the caller to locate."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if bad_utf8 == "reject":
            raise
    text = data.decode("utf-8", errors="replace")
    counts["utf8_replaced_chars"] += text.count("\ufffd") - data.count(_FFFD_UTF8)
    counts["utf8_replaced_documents"] += 1
    return text


def _bad_utf8(index: int, error: UnicodeDecodeError, where: str) -> BadEncoding:
    """The refusal of invalid UTF-8 under --bad-utf8 reject."""
    return BadEncoding(index, f"invalid UTF-8 ({error.reason}) at byte {where}; fix the "
                       "encoding or pass --bad-utf8 replace to replace bad bytes with U+FFFD.")


def _clean(text: str, bad_utf8: str, counts: Counter, index: int) -> str:
    """Unpaired surrogates (from JSON '\\ud800' escapes) are not valid Unicode either."""
    if text.isascii() or not _SURROGATES.search(text):
        return text
    if bad_utf8 == "reject":
        raise BadEncoding(index, "the text holds unpaired UTF-16 surrogates (\\udXXX escapes); "
                        "fix it or pass --bad-utf8 replace.")
    text, n = _SURROGATES.subn("\ufffd", text)
    counts["utf8_replaced_chars"] += n
    counts["utf8_replaced_documents"] += 1
    return text


def _sft_pieces(obj: dict, index: int) -> list[tuple[str, bool]]:
    """An SFT record -> pieces (text, is_target) by the template in the module docstring."""
    if obj.get("messages") is not None:
        turns = obj["messages"]
        if not isinstance(turns, list) or not turns:
            raise BadRecord(index, "'messages' must be a non-empty list of "
                            '{"role": ..., "content": ...} objects.')
        pieces = []
        for turn in turns:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                    and isinstance(turn.get("content"), str)):
                raise BadRecord(index, f"each message needs string 'role' and 'content'; got "
                                f"{str(turn)[:80]}.")
            target = turn["role"] == "assistant"
            pieces += [(f"{turn['role']}: ", False), (turn["content"], target), ("\n", target)]
        return pieces
    prompt, response = obj.get("prompt"), obj.get("response")
    if isinstance(prompt, str) and isinstance(response, str):
        return [(prompt, False), (response, True)]
    raise BadRecord(index, "an SFT record needs string 'prompt' and 'response', or 'messages'; "
                    f"its keys are {sorted(obj)}.")


def _chat(obj: dict, index: int) -> Chat:
    """A `messages` record, checked, for the chat template."""
    turns = obj.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRecord(index, "--chat needs 'messages': a non-empty list of "
                        '{"role": ..., "content": ...} objects.')
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), str)):
            raise BadRecord(index, f"each message needs string 'role' and 'content'; got "
                            f"{str(turn)[:80]}.")
    return Chat(tuple((turn["role"], turn["content"]) for turn in turns))


def _pair(obj: dict, index: int, noun: str) -> Pair:
    """A DPO record: string prompt, chosen and rejected, none of them empty."""
    for key in DPO_FIELDS:
        if key not in obj or obj[key] is None:
            raise BadRecord(index, f"a DPO record needs string {noun}s 'prompt', 'chosen' and "
                            f"'rejected'; it has no {key!r} (its keys: {sorted(obj)}).")
        if not isinstance(obj[key], str):
            raise BadRecord(index, f"{noun} {key!r} of a DPO record is a "
                            f"{type(obj[key]).__name__}, not a string.")
        if not obj[key]:
            raise BadRecord(index, f"{noun} {key!r} of a DPO record is empty.")
    return Pair(obj["prompt"], obj["chosen"], obj["rejected"])


def _record(obj: object, field: str, sft: str | bool, index: int,
            noun: str = "field") -> Record:
    """The text (SFT pieces, chat or DPO pair: `sft` is the kind) of one JSON object / row."""
    if not isinstance(obj, dict):
        raise BadRecord(index, f"is a JSON {type(obj).__name__}, not an object.")
    kind = kind_name(sft)
    if kind == "dpo":
        return _pair(obj, index, noun)
    if kind == "chat":
        return _chat(obj, index)
    if kind == "sft":
        return _sft_pieces(obj, index)
    if obj.get(field) is None:
        raise BadRecord(index, f"has no {noun} {field!r} (its keys: {sorted(obj)}); choose the "
                        f"text {noun} with --field.")
    if not isinstance(obj[field], str):
        raise BadRecord(index, f"{noun} {field!r} is a {type(obj[field]).__name__}, not a "
                        "string.")
    return obj[field]


def _clean_record(rec: Record, bad_utf8: str, counts: Counter, index: int) -> Record:
    """`_clean` on every string of a record."""
    if isinstance(rec, str):
        return _clean(rec, bad_utf8, counts, index)
    if isinstance(rec, Chat):
        return Chat(tuple((_clean(r, bad_utf8, counts, index), _clean(c, bad_utf8, counts, index))
                          for r, c in rec.messages))
    if isinstance(rec, Pair):
        return Pair(*(_clean(t, bad_utf8, counts, index) for t in record_texts(rec)))
    return [(_clean(t, bad_utf8, counts, index), m) for t, m in rec]


def _read_jsonl(unit: Unit, field: str, sft: bool, bad_utf8: str, bad_lines: str,
                counts: Counter) -> Iterator[tuple[int, Record]]:
    """Records of lines [start, stop) of a JSON Lines file; index = line within the unit."""
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        pos, index = unit.start, -1
        while pos < unit.stop:
            line = f.readline()
            if not line:
                break
            pos, index = pos + len(line), index + 1
            counts["records"] += 1
            if pos == len(line) and line.startswith(_BOM):
                line = line[len(_BOM):]
            if not line.strip():
                continue  # blank line: no record
            try:
                try:
                    text = decode_utf8(line, bad_utf8, counts)
                except UnicodeDecodeError as e:
                    start = pos - len(line)
                    raise _bad_utf8(index, e, f"{e.start} of the line ({start + e.start} of the "
                                    "file)") from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    hint = " (.json files are read as JSON Lines)" if index == 0 else ""
                    raise BadRecord(index, f"malformed JSON ({e.msg} at column {e.colno})"
                                    f"{hint}.") from None
                rec = _clean_record(_record(obj, field, sft, index), bad_utf8, counts, index)
            except BadRecord as e:
                _skip_or_raise(e, bad_lines, counts, "line")
                continue
            yield index, rec


def _skip_or_raise(error: BadRecord, bad_lines: str, counts: Counter, what: str) -> None:
    """--bad-lines error: re-raise with the fix spelled out; skip: count the record. Invalid
    UTF-8 under --bad-utf8 reject is an error either way."""
    if isinstance(error, BadEncoding):
        raise error
    if bad_lines == "error":
        raise BadRecord(error.index, f"{error.message} Fix the {what} or pass --bad-lines skip "
                        f"to skip such {what}s.") from None
    counts["skipped_malformed"] += 1


def _read_parquet(unit: Unit, columns: list[str], field: str, sft: bool, bad_utf8: str,
                  bad_lines: str, counts: Counter) -> Iterator[tuple[int, Record]]:
    """Records of row groups [start, stop) of a Parquet file, 1024 rows at a time."""
    import pyarrow.parquet as pq

    index = -1
    pf = pq.ParquetFile(unit.path)
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(unit.start, unit.stop),
                                 columns=columns):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(f"{unit.path}: a string column holds invalid UTF-8 ({e.reason}) "
                            f"in a batch after row {index + 1}; rewrite the file with valid "
                            "UTF-8.") from None
        for row in rows:
            index += 1
            counts["records"] += 1
            try:
                rec = _clean_record(_record(row, field, sft, index, "column"), bad_utf8, counts,
                                    index)
            except BadRecord as e:
                _skip_or_raise(e, bad_lines, counts, "row")
                continue
            yield index, rec


def read_records(unit: Unit, field: str = "text", sft: bool = False, bad_utf8: str = "replace",
                 bad_lines: str = "error", counts: Counter | None = None
                 ) -> Iterator[tuple[int, Record]]:
    """(index within the unit, record) for each record of `unit`; skips and UTF-8 repairs are
    added to `counts`, refusals raise BadRecord, unreadable files DataError."""
    counts = Counter() if counts is None else counts
    try:
        if unit.kind == TEXT:
            with open(unit.path, "rb") as f:
                data = f.read()
            data = data[len(_BOM):] if data.startswith(_BOM) else data
            counts["records"] += 1
            try:
                text = decode_utf8(data, bad_utf8, counts)
            except UnicodeDecodeError as e:  # its index: the line, for the message
                raise _bad_utf8(data.count(b"\n", 0, e.start), e, f"{e.start} of the file") \
                    from None
            yield 0, text
        elif unit.kind == JSONL:
            yield from _read_jsonl(unit, field, sft, bad_utf8, bad_lines, counts)
        else:
            columns = parquet_columns(unit.path, field, sft)
            yield from _read_parquet(unit, columns, field, sft, bad_utf8, bad_lines, counts)
    except OSError as e:
        raise DataError(f"{unit.path}: cannot read it ({e.strerror or e}); fix its permissions "
                        "or leave it out of --input.") from None


def locate(unit: Unit, first_record: int, error: BadRecord) -> DataError:
    """A DataError naming the file and the line (1-based) or Parquet row (0-based) of `error`."""
    if unit.kind == PARQUET:
        return DataError(f"{unit.path}, row {first_record + error.index}: {error.message}")
    return DataError(f"{unit.path}:{first_record + error.index + 1}: {error.message}")


def iter_texts(inputs: list[InputFile], field: str = "text", bad_utf8: str = "replace",
               bad_lines: str = "error") -> Iterator[str]:
    """Every non-blank document text of `inputs` in order, one unit per file (for training a
    tokenizer); a DataError when there is none."""
    found = False
    for i, inp in enumerate(inputs):
        for unit in plan_units(i, inp, 1 << 62, field, False):  # one unit: whole file
            try:
                for _, text in read_records(unit, field, False, bad_utf8, bad_lines):
                    if text.strip():
                        found = True
                        yield text
            except BadRecord as e:
                raise locate(unit, 0, e) from None
    if not found:
        raise DataError(f"the {len(inputs)} input file(s) hold no non-blank documents.")
