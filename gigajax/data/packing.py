"""Whole-example packing: every window of T+1 tokens holds whole documents, padded at its end.

Stream packing (`pipeline.WindowSource`) cuts the token stream every T tokens, so an SFT example
that crosses a window edge continues in the next window without its prompt. Here (data.packing
whole, the default for data with a loss mask) the documents of a split are laid into windows
greedily in their stored order: a document goes into the current window if it fits in what is
left of its T+1 tokens, else it opens the next window. The rest of a window is padding: pad
tokens whose targets have mask 0, after the last document's EOS, so `pipeline.batch_features`
gives them a segment of their own and no loss. A document longer than T+1 tokens is refused
(data.overlong=error) or left out and counted (skip); a skipped document also closes the window.
The windows are fixed by (data, T) alone; shuffling permutes whole windows, as for streams.

DPO pairs (`data prepare --dpo`) are stored one document per pair, `prompt chosen EOS prompt
rejected EOS`, so a pair is never split: its two halves sit in the same window, one segment
each. For pairs a window item also carries `pairs` [T+1] int32 (+p on the tokens of pair p's
chosen half, -p on its rejected half, p = 1, 2, ... within the window; 0 on padding) and
`reference` [T+1] float32 (each half's reference log-probability sum, on its closing EOS; zeros
until `train/reference.py` has computed them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from gigajax.errors import ConfigError, DataError

MIN_PAIR_TOKENS = 6  # prompt, response and EOS of at least one token each, twice


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """How a source's windows are made: 'stream' or 'whole', and what whole does with an
    overlong example; `pad_id` fills the rest of a whole-packed window."""

    mode: str = "stream"
    overlong: str = "error"
    pad_id: int = 258  # the byte tokenizer's PAD


STREAM = PackingSpec()  # the default: windows cut from the stream
def is_pairs(manifest: dict) -> bool:
    """Whether a prepared directory holds DPO pairs (`data prepare --dpo`)."""
    return bool(manifest.get("options", {}).get("dpo", False))


def packing_spec(data_cfg: ml_collections.ConfigDict, has_mask: bool, pairs: bool,
                 pad_id: int) -> PackingSpec:
    """data.packing resolved: auto is whole for data with a loss mask (SFT, DPO), else stream;
    DPO pairs are always packed whole."""
    mode = data_cfg.packing
    if pairs and mode == "stream":
        raise ConfigError("config.data.packing='stream' is not allowed for DPO pairs (each pair "
                          "must stay whole in one window): use 'auto' or 'whole'.")
    if mode == "auto":
        mode = "whole" if has_mask or pairs else "stream"
    return PackingSpec(mode, data_cfg.overlong, pad_id)


def max_pairs(seq_len: int) -> int:
    """The most DPO pairs a window of seq_len+1 tokens can hold (a static bound for the loss)."""
    return max(1, (seq_len + 1) // MIN_PAIR_TOKENS)


@dataclasses.dataclass(frozen=True)
class Packing:
    """Window w holds documents [first[w], stop[w]); `skipped` lists the overlong ones."""

    first: np.ndarray  # [W] int64
    stop: np.ndarray  # [W] int64
    skipped: np.ndarray  # [S] int64 document indices left out (data.overlong=skip)
    used_tokens: int  # tokens of the kept documents (the rest of the windows is padding)


def pack_whole(doc_lens: np.ndarray, capacity: int, overlong: str, name: str = "") -> Packing:
    """Greedy sequential packing of documents of `doc_lens` tokens into windows of `capacity`
    (= seq_len + 1) tokens (module doc); a DataError for an overlong one under 'error'."""
    firsts, stops, skipped = [], [], []
    start, used = 0, 0
    for d, n in enumerate(doc_lens.tolist()):
        if n > capacity:
            if overlong == "error":
                where = f" of {name}" if name else ""
                raise DataError(
                    f"document {d}{where} has {n} tokens, more than a window of data.seq_len="
                    f"{capacity - 1}+1 holds whole (data.packing whole keeps every example in "
                    f"one window). Raise data.seq_len, or set data.overlong=skip to leave such "
                    "examples out (they are counted in the run's log).")
            if d > start:
                firsts.append(start), stops.append(d)
            skipped.append(d)
            start, used = d + 1, 0
            continue
        if used + n > capacity:
            firsts.append(start), stops.append(d)
            start, used = d, 0
        used += n
    if len(doc_lens) > start:
        firsts.append(start), stops.append(len(doc_lens))
    kept = np.ones(len(doc_lens), bool)
    kept[skipped] = False
    return Packing(np.asarray(firsts, np.int64), np.asarray(stops, np.int64),
                   np.asarray(skipped, np.int64), int(doc_lens[kept].sum()))


class PackedWindows(Sequence):
    """Random access to whole-packed windows of a token stream with document ends `doc_ends`:
    item w = (tokens, target mask) [T+1], plus (pairs, reference) [T+1] for DPO pairs."""

    def __init__(self, tokens: Sequence[int], mask: Sequence[int] | None, doc_ends: np.ndarray,
                 seq_len: int, *, pad_id: int, eos_id: int, overlong: str = "error",
                 pairs: bool = False, reference: np.ndarray | None = None, name: str = ""):
        self.tokens, self.mask, self.seq_len = tokens, mask, seq_len
        self.pad_id, self.eos_id, self.pairs = pad_id, eos_id, pairs
        self.doc_starts = np.concatenate([[0], doc_ends]).astype(np.int64)[:-1]
        self.doc_ends = np.asarray(doc_ends, np.int64)
        self.packing = pack_whole(self.doc_ends - self.doc_starts, seq_len + 1, overlong, name)
        if reference is not None and reference.shape != (len(doc_ends), 2):
            raise ValueError(f"reference of shape {reference.shape} for {len(doc_ends)} pairs")
        self.reference = reference

    def __len__(self) -> int:
        return len(self.packing.first)

    def __getitem__(self, w: int) -> tuple[np.ndarray, ...]:
        if not 0 <= w < len(self):
            raise IndexError(w)
        first, stop = int(self.packing.first[w]), int(self.packing.stop[w])
        lo, hi = int(self.doc_starts[first]), int(self.doc_ends[stop - 1])
        size = self.seq_len + 1
        tokens = np.full(size, self.pad_id, np.int32)
        tokens[:hi - lo] = np.asarray(self.tokens[lo:hi], np.int32)
        mask = np.zeros(size, np.uint8)
        mask[:hi - lo] = 1 if self.mask is None else np.asarray(self.mask[lo:hi], np.uint8)
        if not self.pairs:
            return tokens, mask
        pairs, reference = np.zeros(size, np.int32), np.zeros(size, np.float32)
        for p, d in enumerate(range(first, stop), start=1):
            a, b = int(self.doc_starts[d]) - lo, int(self.doc_ends[d]) - lo
            eos = a + int(np.argmax(tokens[a:b] == self.eos_id))  # the chosen half's EOS
            pairs[a:eos + 1], pairs[eos + 1:b] = p, -p
            if self.reference is not None:
                reference[eos], reference[b - 1] = self.reference[d]
        return tokens, mask, pairs, reference

    def documents(self, w: int) -> range:
        """The document indices window w holds, in order (pair p of the window = index p-1)."""
        return range(int(self.packing.first[w]), int(self.packing.stop[w]))

    def summary(self) -> str:
        """One line for the run's log: windows, fill, skipped documents."""
        total = len(self) * (self.seq_len + 1)
        fill = self.packing.used_tokens / total if total else 0.0
        skipped = len(self.packing.skipped)
        return (f"{len(self)} windows holding {len(self.doc_ends) - skipped} whole "
                f"{'pairs' if self.pairs else 'examples'} ({fill:.0%} of their tokens; the rest "
                f"is padding), {skipped} longer than data.seq_len+1 skipped")
