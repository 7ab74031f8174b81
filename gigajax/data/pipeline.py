"""Grain pipeline: a token stream -> shuffled fixed-length windows -> packed batches.

The stream is cut into non-overlapping windows of T+1 tokens with stride T (window i covers tokens
[i*T, i*T+T]), so every token after the first is a target once per epoch (a tail shorter than T is
dropped). The dataset is a random-access `grain.MapDataset`: the batch of training step s is
`ds[s]`, a pure function of (tokens, seed, s), so resuming after a crash is starting at index
`step`, with no iterator state.

A batch is a dict of numpy arrays, all [B, T]:
  inputs, targets  int32   window[:-1], window[1:]
  positions        int32   position within the current document, counted from the window start
                           or from the token after the last EOS, whichever is later
  segment_ids      int32   1 + number of EOS inputs before this token in the window (the token
                           after an EOS opens a new document); attention must not cross segments
  loss_mask        float32 0 where the input is EOS (its target opens the next document), else 1

Under sequence parallelism every [B, T] array is permuted along T into the ring layout
(`ops/layouts.py`, `sequence_perm`) here, once; the model and the loss never un-permute.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from gigajax.data.stdlib_corpus import load_stdlib_tokens
from gigajax.data.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
from gigajax.errors import ConfigError, DataError
from gigajax.ops.layouts import permute_sequence

Batch = dict[str, np.ndarray]
SOURCES = ("stdlib",)


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many windows of seq_len+1 tokens at stride seq_len fit in num_tokens."""
    return max(0, (num_tokens - 1) // seq_len)


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """A zero-copy [N, T+1] view: row i is tokens[i*T : i*T + T + 1]."""
    n = num_windows(len(tokens), seq_len)
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=tokens.dtype)
    view = np.lib.stride_tricks.sliding_window_view(tokens[: n * seq_len + 1], seq_len + 1)
    return view[::seq_len]


def batch_features(w_BxT1: np.ndarray, eos_id: int) -> Batch:
    """[B, T+1] token windows -> the batch dict (inputs, targets, positions, segment_ids, mask)."""
    w_BxT1 = w_BxT1.astype(np.int32)
    inputs_BxT, targets_BxT = w_BxT1[:, :-1], w_BxT1[:, 1:]
    seq_len = inputs_BxT.shape[1]
    is_eos_BxT = inputs_BxT == eos_id
    starts_BxT = np.zeros_like(is_eos_BxT)
    starts_BxT[:, 1:] = is_eos_BxT[:, :-1]  # the token after an EOS opens a new document
    idx_T = np.arange(seq_len, dtype=np.int32)
    last_start_BxT = np.maximum.accumulate(np.where(starts_BxT, idx_T, 0), axis=1)
    return {
        "inputs": np.ascontiguousarray(inputs_BxT),
        "targets": np.ascontiguousarray(targets_BxT),
        "positions": (idx_T - last_start_BxT).astype(np.int32),
        "segment_ids": 1 + np.cumsum(starts_BxT, axis=1, dtype=np.int32),
        "loss_mask": (~is_eos_BxT).astype(np.float32),
    }


def permute_batch(batch: Batch, perm: np.ndarray | None) -> Batch:
    """Every [B, T] array of the batch with its tokens in layout order (`perm` from
    `ops.layouts.layout_permutation`); the batch itself when perm is None."""
    if perm is None:
        return batch
    return {key: np.ascontiguousarray(permute_sequence(value, perm))
            for key, value in batch.items()}


def _shuffle_seed(seed: int) -> int:
    """A well-mixed uint32 shuffle seed: grain shuffles epoch e with seed+e, so seed s epoch 1 would
    otherwise equal seed s+1 epoch 0."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def make_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    eos_id: int = ByteTokenizer.eos_id,
    rows: slice | None = None,
    sequence_perm: np.ndarray | None = None,
) -> grain.MapDataset:
    """A random-access dataset whose item s is the batch for step s (a function of seed and s).

    `rows` selects this process's rows of each global batch (all rows when None): a process
    reads only the windows it feeds to its own devices. `sequence_perm` permutes the tokens of
    every row into the sequence-parallel layout.
    """
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"data.seq_len={seq_len} and data.batch_size={batch_size} must be >= 1.")
    n = num_windows(len(tokens), seq_len)
    if n < batch_size:
        raise DataError(
            f"{len(tokens)} tokens give {n} windows of data.seq_len={seq_len}+1 tokens, fewer than "
            f"one batch of data.batch_size={batch_size}. Lower data.seq_len or data.batch_size, or "
            "read more text (raise data.max_bytes, 0 = no cap)."
        )
    ds = grain.MapDataset.source(windows(tokens, seq_len))
    if shuffle:
        ds = ds.shuffle(seed=_shuffle_seed(seed))  # a fresh permutation every epoch
    if repeat:
        ds = ds.repeat()  # infinite; batches may straddle an epoch boundary
    local = range(*(rows or slice(0, batch_size)).indices(batch_size))

    def local_windows(step: int) -> np.ndarray:  # rows `local` of the global batch `step`
        return np.stack([ds[step * batch_size + r] for r in local])

    batches = grain.MapDataset.range(len(ds) // batch_size).map(local_windows)
    features = batches.map(functools.partial(batch_features, eos_id=eos_id))
    return features.map(functools.partial(permute_batch, perm=sequence_perm))


def batch_iterator(ds: grain.MapDataset, start_step: int, prefetch: int = 2) -> Iterator[Batch]:
    """Batches for steps start_step, start_step+1, ...; one thread reads `prefetch` ahead."""
    read_options = grain.ReadOptions(
        num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch
    )
    return iter(ds.slice(slice(start_step, None)).to_iter_dataset(read_options))


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    eos_id: int = ByteTokenizer.eos_id,
    rows: slice | None = None,
    sequence_perm: np.ndarray | None = None,
) -> list[Batch]:
    """The first `num_batches` batches of the unshuffled validation stream (a fixed list)."""
    n = num_windows(len(tokens), seq_len)
    if n < num_batches * batch_size:
        raise DataError(
            f"The validation split has {len(tokens)} tokens = {n} windows of data.seq_len={seq_len}"
            f"+1, fewer than train.eval_batches={num_batches} x data.batch_size={batch_size}. "
            "Lower train.eval_batches, data.seq_len or data.batch_size, or raise data.val_fraction "
            "or data.max_bytes."
        )
    ds = make_dataset(
        tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        eos_id=eos_id,
        shuffle=False,
        repeat=False,
        rows=rows,
        sequence_perm=sequence_perm,
    )
    return [ds[i] for i in range(num_batches)]


def check_data_config(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """Fail fast on an unknown `data.source` or `data.tokenizer`; returns the tokenizer."""
    if data_cfg.source not in SOURCES:
        raise ConfigError(
            f"data.source={data_cfg.source!r} is not a known source; allowed values: "
            + ", ".join(repr(s) for s in SOURCES)
            + "."
        )
    return get_tokenizer(data_cfg.tokenizer)


def build_datasets(
    data_cfg: ml_collections.ConfigDict,
    seed: int,
    rows: slice | None = None,
    sequence_perm: np.ndarray | None = None,
) -> tuple[Tokenizer, grain.MapDataset, np.ndarray]:
    """From the `data` config: (tokenizer, train batches dataset, validation token stream).

    `rows`, `sequence_perm`: this process's rows of each training batch, and the sequence
    layout of its tokens (see `make_dataset`).
    """
    tokenizer = check_data_config(data_cfg)
    max_bytes = int(data_cfg.max_bytes) or None
    load = functools.partial(
        load_stdlib_tokens,
        tokenizer=tokenizer,
        max_bytes=max_bytes,
        val_fraction=data_cfg.val_fraction,
    )
    train_tokens = load("train")
    train_ds = make_dataset(
        train_tokens,
        seq_len=data_cfg.seq_len,
        batch_size=data_cfg.batch_size,
        seed=seed,
        eos_id=tokenizer.eos_id,
        rows=rows,
        sequence_perm=sequence_perm,
    )
    return tokenizer, train_ds, load("validation")
