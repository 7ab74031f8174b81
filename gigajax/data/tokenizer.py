"""Tokenizers behind one small protocol: bytes (the default), any Hugging Face `tokenizer.json`,
a SentencePiece `.model`; and `train_tokenizer`, a byte-level BPE trained on the user's corpus.

Text is encoded without specials: `data prepare` appends EOS after each document itself. Special
tokens written in the text (a document that quotes "<|endoftext|>") are encoded as plain text, so a
document can never forge an EOS.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from gigajax.errors import ConfigError

ALLOWED = ("allowed values: 'byte', a tokenizer.json path (Hugging Face tokenizers) or a "
           "SentencePiece .model path.")
# Special tokens of the tokenizers we train, in id order (ids 0..5).
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
# Spellings of each special token in common tokenizers, ours first.
SPECIAL_NAMES = {
    "bos": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>"),
    "eos": ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>"),
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>", "<PRE>", "▁<PRE>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>", "<MID>", "▁<MID>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>", "<SUF>", "▁<SUF>"),
}


class Tokenizer(Protocol):
    """What data preparation, the pipeline and the model need from a tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    fim_prefix_id: int | None  # FIM sentinels; None when the tokenizer has none
    fim_middle_id: int | None
    fim_suffix_id: int | None
    spec: str  # what `get_tokenizer` was given: 'byte' or the file's absolute path

    def fingerprint(self) -> str:
        """sha256 hex identifying the vocabulary (of the tokenizer file's bytes)."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """Text -> 1-D array of token ids (no specials added)."""
        ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text, in parallel where the library can."""
        ...

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text, dropping special tokens."""
        ...

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id stands for in decoded text (b"" for specials): what token
        healing matches against the prompt's text."""
        ...


def _special_ids(tok: Tokenizer) -> set[int]:
    """The ids `decode` drops."""
    ids = (tok.bos_id, tok.eos_id, tok.pad_id, tok.fim_prefix_id, tok.fim_middle_id,
           tok.fim_suffix_id)
    return {i for i in ids if i is not None}


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; BOS/EOS/PAD are 256/257/258, FIM prefix/middle/suffix
    259/260/261."""

    num_bytes = 256
    bos_id, eos_id, pad_id = 256, 257, 258
    fim_prefix_id, fim_middle_id, fim_suffix_id = 259, 260, 261
    vocab_size = 262
    spec = "byte"

    def fingerprint(self) -> str:
        """A constant: the byte vocabulary never changes."""
        return hashlib.sha256(b"gigajax-byte-v1").hexdigest()

    def encode(self, text: str) -> np.ndarray:
        """Text -> uint16 array of its UTF-8 bytes."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text (already memory-bound; nothing to parallelise)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Byte ids -> text; specials are skipped and invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids)
        data = ids[(ids >= 0) & (ids < self.num_bytes)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """Byte i for ids below 256; specials b""."""
        return [bytes([i]) for i in range(self.num_bytes)] + [b""] * (self.vocab_size - 256)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _file_sha256(path: str) -> str:
    """sha256 hex of a file's bytes: what identifies a tokenizer file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_eos(path: str) -> ConfigError:
    """EOS separates documents in the token stream, so a tokenizer without one is refused."""
    return ConfigError(f"{path} has no end-of-document token; looked for "
                       f"{', '.join(SPECIAL_NAMES['eos'])}. Add one (training needs EOS between "
                       "documents) or train a tokenizer with `gigajax data train-tokenizer`.")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; special ids found by name (SPECIAL_NAMES)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        self.spec = str(Path(path).resolve())
        try:
            self._tok = _HFTokenizer.from_file(self.spec)
        except Exception as e:  # the library raises plain Exception on a bad file
            raise ConfigError(f"{self.spec} is not a tokenizer.json the "
                              f"`tokenizers` library can load ({e}).") from None
        self._tok.encode_special_tokens = True  # "<|eos|>" in a document is text, not EOS
        self._tok.no_padding()
        self._tok.no_truncation()
        found = {key: next((i for name in names if (i := self._tok.token_to_id(name)) is not None),
                           None) for key, names in SPECIAL_NAMES.items()}
        if found["eos"] is None:
            raise _missing_eos(self.spec)
        self.eos_id = found["eos"]
        self.bos_id = found["bos"] if found["bos"] is not None else self.eos_id
        self.pad_id = found["pad"] if found["pad"] is not None else self.eos_id
        self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id = (
            found["fim_prefix"], found["fim_middle"], found["fim_suffix"])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._specials = _special_ids(self)
        self._parsing = None  # the same file, parsing specials (`encode_batch_with_specials`)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json bytes."""
        return _file_sha256(self.spec)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids, no specials added."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Parallel encoding with the library's batch encoder (offsets not computed)."""
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encode_batch_with_specials(self, texts: list[str]) -> list[np.ndarray]:
        """`encode_batch` with special tokens written in the text parsed as specials: for a
        chat template's own text (`chat.py`), never for a document's."""
        if self._parsing is None:
            from tokenizers import Tokenizer as _HFTokenizer

            self._parsing = _HFTokenizer.from_file(self.spec)
            self._parsing.no_padding()
            self._parsing.no_truncation()
        encodings = self._parsing.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Ids -> text, specials dropped; invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in np.asarray(ids).ravel() if int(i) not in self._specials]
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes: a byte-level BPE's alphabet mapped back to bytes (GPT-2's
        table), else SentencePiece-style pieces ("▁" a space, "<0x0A>" a byte)."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in [decoder, *decoder.get("decoders", [])]}
        pieces = [self._tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        added = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        out = [_byte_level_bytes(p) if "ByteLevel" in kinds else _piece_bytes(p)
               for p in pieces]
        return [b"" if i in self._specials or i in added else b for i, b in enumerate(out)]

    def __reduce__(self):  # to worker processes: reload by path (cached there)
        return get_tokenizer, (self.spec,)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r})"


class SentencePieceTokenizer:
    """A SentencePiece `.model`; BOS/EOS/PAD from the model, FIM pieces by name if present."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.spec = str(Path(path).resolve())
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.spec)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{self.spec} is not a SentencePiece model "
                              f"({e}).") from None
        if self._sp.eos_id() < 0:
            raise ConfigError(f"{self.spec} has no EOS piece (eos_id = -1); "
                              "train it with --eos_id set, or use another tokenizer.")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id = (
            self._piece(SPECIAL_NAMES[k]) for k in ("fim_prefix", "fim_middle", "fim_suffix"))
        self.vocab_size = self._sp.get_piece_size()
        self._specials = _special_ids(self)

    def _piece(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            i = self._sp.piece_to_id(name)
            if i != self._sp.unk_id() and self._sp.id_to_piece(i) == name:
                return i
        return None

    def fingerprint(self) -> str:
        """sha256 of the .model bytes."""
        return _file_sha256(self.spec)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids, no BOS/EOS added."""
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The library's multi-threaded batch encoding."""
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts, out_type=int)]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Ids -> text, specials dropped."""
        return self._sp.decode([int(i) for i in np.asarray(ids).ravel()
                                if int(i) not in self._specials])

    def token_bytes(self) -> list[bytes]:
        """Each piece's bytes ("▁" a space, byte pieces "<0x0A>" their byte); control and
        unknown pieces b""."""
        sp = self._sp
        return [b"" if sp.is_control(i) or sp.is_unknown(i) or i in self._specials
                else _piece_bytes(sp.id_to_piece(i)) for i in range(self.vocab_size)]

    def __reduce__(self):
        return get_tokenizer, (self.spec,)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.spec!r})"


_BYTE = ByteTokenizer()
_KINDS = {".json": HFTokenizer, ".model": SentencePieceTokenizer}


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each
    byte (bytes that print as themselves keep their code; the others take 256, 257, ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _byte_level_bytes(token: str) -> bytes:
    """A byte-level BPE token's bytes (an added token not in the alphabet: its UTF-8)."""
    table = _byte_level_table()
    if all(ch in table for ch in token):
        return bytes(table[ch] for ch in token)
    return token.encode("utf-8")


def _piece_bytes(piece: str) -> bytes:
    """A SentencePiece-style piece's bytes: "<0xNN>" is byte NN, "▁" a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> Tokenizer:
    """Load once per (path, mtime, size): a retrained file is reloaded."""
    return _KINDS[Path(path).suffix](path)


def get_tokenizer(spec: str, field: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer that `data.tokenizer` (or the flag `field`) names: 'byte' or a file path
    (a directory holding tokenizer.json or tokenizer.model also works)."""
    if spec == "byte":
        return _BYTE
    hint = " Set it with e.g. --config.data.tokenizer=byte." if field == "data.tokenizer" else ""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "tokenizer.json", path / "tokenizer.model")
                     if p.is_file()), path)
    if path.suffix not in _KINDS:
        raise ConfigError(f"{field}={spec!r} is not a known tokenizer; {ALLOWED}{hint}")
    try:
        stat = path.stat()
    except OSError as e:
        raise ConfigError(f"{field}={spec!r}: cannot read the file ({e.strerror}); "
                          f"{ALLOWED}{hint}") from None
    if not path.is_file():
        raise ConfigError(f"{field}={spec!r} is not a file; {ALLOWED}{hint}")
    try:
        return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except ConfigError as e:
        raise ConfigError(f"{field}={spec!r}: {e}") from None


def train_tokenizer(files: list[str], vocab_size: int, out_path: str | os.PathLike,
                    min_frequency: int = 2, show_progress: bool = True, field: str = "text",
                    bad_utf8: str = "replace", bad_lines: str = "error") -> HFTokenizer:
    """Train a byte-level BPE (every byte representable, so nothing is ever unknown) on the
    documents of `files` (globs; read like `data prepare` reads them) and write tokenizer.json.

    Specials are SPECIALS at ids 0..5. The file is written atomically.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gigajax.data import readers

    if vocab_size < 256 + len(SPECIALS):
        raise ConfigError(f"--vocab-size={vocab_size} is too small: a byte-level BPE needs at "
                          f"least {256 + len(SPECIALS)} ids (256 bytes + {len(SPECIALS)} "
                          "specials).")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"--min-frequency={min_frequency!r}: give a count >= 1 (how often a "
                          "pair must be seen to be merged).")
    inputs = readers.expand_inputs(files)
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  show_progress=show_progress, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = readers.iter_texts(inputs, field=field, bad_utf8=bad_utf8, bad_lines=bad_lines)
    tok.train_from_iterator(docs, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tok.save(str(tmp), pretty=True)
    os.replace(tmp, out_path)
    return HFTokenizer(out_path)
