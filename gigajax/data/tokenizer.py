"""Tokenizers: a byte-level one (the default) behind a small protocol that BPE can fill later."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gigajax.errors import ConfigError


class Tokenizer(Protocol):
    """What the pipeline and the model need from a tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Text -> 1-D array of token ids (no specials added)."""
        ...

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Token ids -> text, dropping special tokens."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; BOS/EOS/PAD are 256/257/258."""

    num_bytes = 256
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """Text -> uint16 array of its UTF-8 bytes."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Byte ids -> text; specials are skipped and invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids)
        data = ids[(ids >= 0) & (ids < self.num_bytes)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer named by `data.tokenizer`."""
    if name not in _TOKENIZERS:
        allowed = ", ".join(repr(k) for k in _TOKENIZERS)
        raise ConfigError(
            f"data.tokenizer={name!r} is not a known tokenizer; allowed values: {allowed}. "
            "Set it with e.g. --config.data.tokenizer=byte."
        )
    return _TOKENIZERS[name]()
