"""Grain pipeline: token streams -> shuffled fixed-length windows -> packed batches.

Sources: the stdlib corpus (`data.source=stdlib`, in memory), directories written by `gigajax data
prepare` (`data.source=prepared`, memory-mapped shards, `data/store.py`), one (`data.path`) or
several mixed by weight (`data.mixture`), or generated PassKey documents (`data.source=passkey`,
`data/synthetic.py`: windows made on demand, already packed). Each stream holds documents each
followed by EOS and is cut into non-overlapping windows of T+1 tokens with stride T (window i
covers tokens [i*T, i*T+T]), so every token after the first is a target once per epoch (a tail
shorter than T is dropped): documents are packed several to a window, and one that crosses a window
edge continues in the next window. The dataset is a random-access `grain.MapDataset`: the batch of
training step s is `ds[s]`, a pure function of (data, seed, s). The training loop reads it through
grain's iterator, whose state (the next index) is saved with every checkpoint.

A batch is a dict of numpy arrays, all [B, T]:
  inputs, targets  int32   window[:-1], window[1:]
  positions        int32   position within the current document, counted from the window start
                           or from the token after the last EOS, whichever is later
  segment_ids      int32   1 + number of EOS inputs before this token in the window (the token
                           after an EOS opens a new document); attention must not cross segments
  loss_mask        float32 0 where the input is EOS (its target opens the next document) or,
                           for SFT data, where the target is not a response token; else 1
                           (PassKey: 1 on the answer, data.passkey.text_weight elsewhere)
and for DPO pairs (`data/packing.py`), of each target:
  pairs            int32   +p in pair p's chosen half, -p in its rejected half, 0 on padding
  reference        float32 a half's reference log-probability sum on its closing EOS, else 0

With data.packing whole (the default for SFT and DPO data) a window holds whole examples and
padding instead (`data/packing.py`), so no response is trained without its prompt.

Under sequence parallelism every [B, T] array is permuted along T into the ring layout
(`ops/layouts.py`, `sequence_perm`) here, once; the model and the loss never un-permute.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from gigajax.config.validate import validate_data
from gigajax.data import store
from gigajax.data.packing import STREAM, PackedWindows, PackingSpec, is_pairs, packing_spec
from gigajax.data.stdlib_corpus import load_stdlib_tokens
from gigajax.data.synthetic import PasskeyWindows, check_passkey_config
from gigajax.data.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
from gigajax.errors import ConfigError, DataError
from gigajax.ops.layouts import permute_sequence

Batch = dict[str, np.ndarray]


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


def batch_features(w_BxT1: np.ndarray, target_mask_BxT1: np.ndarray | None = None,
                   pairs_BxT1: np.ndarray | None = None, reference_BxT1: np.ndarray | None = None,
                   *, eos_id: int) -> Batch:
    """[B, T+1] token windows (and their 0/1 target masks, SFT; pairs and reference log-probs,
    DPO) -> the batch dict."""
    w_BxT1 = w_BxT1.astype(np.int32)
    inputs_BxT, targets_BxT = w_BxT1[:, :-1], w_BxT1[:, 1:]
    seq_len = inputs_BxT.shape[1]
    is_eos_BxT = inputs_BxT == eos_id
    starts_BxT = np.zeros_like(is_eos_BxT)
    starts_BxT[:, 1:] = is_eos_BxT[:, :-1]  # the token after an EOS opens a new document
    idx_T = np.arange(seq_len, dtype=np.int32)
    last_start_BxT = np.maximum.accumulate(np.where(starts_BxT, idx_T, 0), axis=1)
    loss_mask_BxT = (~is_eos_BxT).astype(np.float32)
    if target_mask_BxT1 is not None:  # of the *target*: 0/1 (is it trained) or a weight
        loss_mask_BxT *= target_mask_BxT1[:, 1:].astype(np.float32)
    batch = {
        "inputs": np.ascontiguousarray(inputs_BxT),
        "targets": np.ascontiguousarray(targets_BxT),
        "positions": (idx_T - last_start_BxT).astype(np.int32),
        "segment_ids": 1 + np.cumsum(starts_BxT, axis=1, dtype=np.int32),
        "loss_mask": loss_mask_BxT,
    }
    if pairs_BxT1 is not None:  # of the targets, like the mask
        batch["pairs"] = np.ascontiguousarray(pairs_BxT1[:, 1:], dtype=np.int32)
        batch["reference"] = np.ascontiguousarray(reference_BxT1[:, 1:], dtype=np.float32)
    return batch


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


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """One token stream (documents each followed by EOS) and, for SFT data, its target mask."""

    tokens: Sequence[int]  # [N] np.ndarray or store.ConcatStream (memory-mapped shards)
    mask: Sequence[int] | None = None  # [N] 1 = the token is a training target; None = all are
    name: str = ""
    doc_ends: np.ndarray | None = None  # [D] document end offsets (whole packing needs them)
    pairs: bool = False  # each document is a DPO pair (`data/packing.py`)
    reference: np.ndarray | None = None  # [D, 2] reference log-prob sums of each pair's halves


def window_source(source: TokenSource, seq_len: int, packing: PackingSpec,
                  eos_id: int) -> Sequence:
    """The windows of a TokenSource: stream windows, or whole-packed ones (pairs always are)."""
    if packing.mode == "stream" and not source.pairs:
        return WindowSource(source, seq_len)
    if source.doc_ends is None:
        raise ValueError(f"whole packing of {source.name or 'a stream'} needs its document ends")
    return PackedWindows(source.tokens, source.mask, source.doc_ends, seq_len,
                         pad_id=packing.pad_id, eos_id=eos_id, overlong=packing.overlong,
                         pairs=source.pairs, reference=source.reference, name=source.name)


Source = TokenSource | PasskeyWindows  # a token stream, or windows generated on demand


@dataclasses.dataclass(frozen=True)
class FimSpec:
    """Fill-in-the-middle: rewrite a `rate` fraction of documents as prefix-suffix-middle."""

    rate: float
    prefix_id: int
    middle_id: int
    suffix_id: int


class WindowSource(Sequence):
    """Random access to the windows of a TokenSource: item i = (tokens, target mask), each [T+1]
    = stream[i*T : i*T + T + 1]; only those T+1 tokens are read (memory-mapped shards)."""

    def __init__(self, source: TokenSource, seq_len: int):
        self.source, self.seq_len = source, seq_len

    def __len__(self) -> int:
        return num_windows(len(self.source.tokens), self.seq_len)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        span = slice(i * self.seq_len, (i + 1) * self.seq_len + 1)
        tokens = np.asarray(self.source.tokens[span], dtype=np.int32)
        if self.source.mask is None:
            return tokens, np.ones(len(tokens), np.uint8)
        return tokens, np.asarray(self.source.mask[span], dtype=np.uint8)


def apply_fim(tokens: np.ndarray, mask: np.ndarray, fim: FimSpec, eos_id: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite each document piece of a [T+1] window, with probability `fim.rate`, as
    PRE prefix SUF suffix MID middle (PSM, Bavarian et al. 2022) at two uniform cut points.

    A piece is a run of tokens between EOS tokens, so EOS positions (and with them segment ids
    and positions) do not move. Three tokens are dropped from the end of a rewritten piece to
    make room for the sentinels, so the window keeps its length; pieces shorter than 5 tokens
    stay as they are. Rewritten pieces are trained on in full (mask 1). A document that crosses
    a window edge is a piece in each window, rewritten (or not) independently.
    """
    tokens, mask = tokens.copy(), mask.copy()
    bounds = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], bounds + 1])
    ends = np.concatenate([bounds, [len(tokens)]])
    for lo, hi in zip(starts, ends, strict=True):
        if hi - lo < 5 or rng.random() >= fim.rate:
            continue
        body = tokens[lo:hi - 3]
        i, j = np.sort(rng.integers(0, len(body) + 1, size=2))
        tokens[lo:hi] = np.concatenate([[fim.prefix_id], body[:i], [fim.suffix_id], body[j:],
                                        [fim.middle_id], body[i:j]])
        mask[lo:hi] = 1
    return tokens, mask


def make_dataset(
    tokens: np.ndarray | Sequence[Source],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    eos_id: int = ByteTokenizer.eos_id,
    rows: slice | None = None,
    sequence_perm: np.ndarray | None = None,
    weights: Sequence[float] | None = None,
    fim: FimSpec | None = None,
    packing: PackingSpec = STREAM,
) -> grain.MapDataset:
    """A random-access dataset whose item s is the batch for step s (a function of seed and s).

    `tokens` is one stream, or several sources mixed by `weights` (grain's deterministic
    weighted interleave of the per-source shuffled windows); generated windows
    (`PasskeyWindows`, their own seed) are independent draws, so they are not shuffled. `rows`
    selects this process's rows of each global batch (all rows when None): a process reads only
    the windows it feeds to its own devices. `sequence_perm` permutes the tokens of every row
    into the sequence-parallel layout. `fim` rewrites documents for fill-in-the-middle, seeded
    by (seed, sample index). `packing` says how token streams become windows.
    """
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"data.seq_len={seq_len} and data.batch_size={batch_size} must be >= 1.")
    sources = [TokenSource(tokens)] if isinstance(tokens, np.ndarray) else list(tokens)
    parts = []
    needed = batch_size if len(sources) == 1 else 1  # a mixture draws on each source by weight
    for i, source in enumerate(sources):
        if isinstance(source, PasskeyWindows):
            if source.seq_len != seq_len:
                raise ValueError(f"PasskeyWindows of seq_len {source.seq_len} != {seq_len}")
            parts.append(grain.MapDataset.source(source))  # independent draws: no shuffle
            continue
        windows_of = window_source(source, seq_len, packing, eos_id)
        n = len(windows_of)
        if n < needed:
            raise DataError(
                f"{len(source.tokens)} tokens{f' in {source.name}' if source.name else ''} give "
                f"{n} windows of data.seq_len={seq_len}+1 tokens, fewer than {needed} (one "
                f"batch of data.batch_size={batch_size}, or one window per mixture source). "
                "Lower data.seq_len or data.batch_size, or "
                "read more text (raise data.max_bytes, 0 = no cap; or prepare more data).")
        ds = grain.MapDataset.source(windows_of)
        if shuffle:  # a fresh permutation every epoch
            ds = ds.shuffle(seed=_shuffle_seed(seed if len(sources) == 1 else [seed, i]))
        parts.append(ds)
    parts = [ds.repeat() if repeat else ds for ds in parts]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    local = range(*(rows or slice(0, batch_size)).indices(batch_size))

    def local_windows(step: int) -> tuple[np.ndarray, ...]:
        """Rows `local` of global batch `step`: tokens and target masks (and DPO's pairs and
        reference), each [B_local, T+1]."""
        picked = []
        for r in local:
            k = step * batch_size + r  # the global sample index
            tokens_T1, mask_T1, *pair_arrays = ds[k]
            if fim is not None and fim.rate > 0:
                tokens_T1, mask_T1 = apply_fim(tokens_T1, mask_T1, fim, eos_id,
                                               np.random.default_rng([seed, k]))
            picked.append((tokens_T1, mask_T1, *pair_arrays))
        return tuple(np.stack(column) for column in zip(*picked, strict=True))

    batches = grain.MapDataset.range(len(ds) // batch_size).map(local_windows)
    features = batches.map(lambda w: batch_features(*w, eos_id=eos_id))
    return features.map(functools.partial(permute_batch, perm=sequence_perm))


def batch_iterator(ds: grain.MapDataset, start_step: int = 0, prefetch: int = 2
                   ) -> grain.DatasetIterator:
    """Grain's iterator over the step-indexed batches, at batch `start_step`; one thread reads
    `prefetch` ahead. Its `get_state()` is what checkpoints save (`iterator_step` reads it)."""
    read_options = grain.ReadOptions(
        num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch
    )
    iterator = iter(ds.to_iter_dataset(read_options))
    if start_step:
        iterator.set_state({"next_index": start_step})
    return iterator


def iterator_step(iterator: grain.DatasetIterator) -> int:
    """The step whose batch `iterator` yields next."""
    return int(iterator.get_state()["next_index"])


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Token sources with sampling weights (one source: weight 1)."""

    sources: tuple[Source, ...]
    weights: tuple[float, ...]
    packing: PackingSpec = STREAM


def eval_batches(
    tokens: np.ndarray | Mixture,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    eos_id: int = ByteTokenizer.eos_id,
    rows: slice | None = None,
    sequence_perm: np.ndarray | None = None,
    packing: PackingSpec | None = None,
) -> list[Batch]:
    """The first `num_batches` batches of the unshuffled validation stream(s) (a fixed list)."""
    mix = tokens if isinstance(tokens, Mixture) else Mixture((TokenSource(tokens),), (1.0,))
    packing = packing or mix.packing
    for source, weight in zip(mix.sources, mix.weights, strict=True):
        if isinstance(source, PasskeyWindows):  # as many windows as anyone asks for
            continue
        n = len(window_source(source, seq_len, packing, eos_id))
        wanted = int(np.ceil(num_batches * batch_size * weight))
        if n < wanted:
            raise DataError(
                f"The validation split{f' of {source.name}' if source.name else ''} has "
                f"{len(source.tokens)} tokens = {n} windows of data.seq_len={seq_len}+1, fewer "
                f"than the {wanted} that train.eval_batches={num_batches} x data.batch_size="
                f"{batch_size} take from it. Lower train.eval_batches, data.seq_len or "
                "data.batch_size, or give validation more data (data.val_fraction and "
                "data.max_bytes for the stdlib; `data prepare --val-fraction`).")
    ds = make_dataset(mix.sources, seq_len=seq_len, batch_size=batch_size, seed=0,
                      eos_id=eos_id, shuffle=False, repeat=False, rows=rows,
                      sequence_perm=sequence_perm, weights=mix.weights, packing=packing)
    return [ds[i] for i in range(num_batches)]


@dataclasses.dataclass(frozen=True)
class DataIds:
    """What training needs to know of the tokenizer: its vocabulary and special ids."""

    vocab_size: int
    eos_id: int
    max_token_id: int  # the largest id in the data (vocab_size - 1 when unknown)
    fim: FimSpec | None  # the FIM sentinels (rate = data.fim_rate), None if it has none
    max_token_where: str = ""  # which shard holds max_token_id ("" when not prepared data)
    packing: PackingSpec = PackingSpec()  # data.packing resolved (`packing_spec`)
    pairs: bool = False  # the data are DPO pairs (`data prepare --dpo`)


def parse_mixture(data_cfg: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """`data.path` (one directory) or `data.mixture` ('DIR=WEIGHT,DIR=WEIGHT') -> [(dir, w)],
    each weight finite and positive, each directory once (`check_mixture_weights` checks that
    they sum to 1)."""
    path, mixture = data_cfg.path, data_cfg.mixture
    if bool(path) == bool(mixture):
        raise ConfigError(
            "data.source='prepared' reads data.path (one prepared directory) or data.mixture "
            f"('DIR=WEIGHT,DIR=WEIGHT'): set exactly one (data.path={path!r}, "
            f"data.mixture={mixture!r}).")
    if path:
        return [(path, 1.0)]
    entries, seen = [], {}
    example = "e.g. data.mixture='data/code=0.3,data/web=0.7'"
    for item in mixture.split(","):
        directory, sep, weight = item.strip().rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not directory or value is None:
            raise ConfigError(f"data.mixture entry {item!r} is not DIR=WEIGHT with a positive "
                              f"weight; {example}.")
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"data.mixture entry {item!r}: the weight {weight.strip()!r} is not "
                              f"a finite positive number (leave a directory out rather than "
                              f"give it weight 0); {example}.")
        key = os.path.realpath(directory)
        if key in seen:
            raise ConfigError(f"data.mixture names the directory {directory!r} twice ({seen[key]!r}"
                              f" and {item.strip()!r}); give each directory once, with its whole "
                              "weight.")
        seen[key] = item.strip()
        entries.append((directory, value))
    return entries


def check_mixture_weights(entries: list[tuple[str, float]]) -> None:
    """A ConfigError unless the weights sum to 1 within 1e-6, giving the normalised ones."""
    total = math.fsum(w for _, w in entries)
    if abs(total - 1) > 1e-6:
        normalised = ",".join(f"{d}={w / total:.10g}" for d, w in entries)
        raise ConfigError(f"data.mixture weights sum to {total:.10g}, not 1 (within 1e-6): they "
                          "are the sampling probabilities of the directories. Write them "
                          f"normalised: data.mixture='{normalised}'.")


def _prepared_ids(data_cfg: ml_collections.ConfigDict) -> tuple[list[tuple[str, float]], DataIds,
                                                                bool]:
    """Read (and check) every manifest of the prepared source and check they agree; returns
    (dirs with weights summing to 1, ids, whether any has a loss mask)."""
    entries = parse_mixture(data_cfg)
    manifests = [(d, store.read_manifest(d)) for d, _ in entries]
    first_dir, first = manifests[0]
    for d, m in manifests[1:]:
        if m["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]:
            raise ConfigError(f"data.mixture: {d} was prepared with tokenizer "
                              f"{m['tokenizer']['spec']!r} and {first_dir} with "
                              f"{first['tokenizer']['spec']!r}; a mixture needs one tokenizer.")
    check_mixture_weights(entries)
    tok = first["tokenizer"]
    if data_cfg.tokenizer != "auto":
        wanted = get_tokenizer(data_cfg.tokenizer)
        if wanted.fingerprint() != tok["fingerprint"]:
            raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} is not the tokenizer "
                              f"{tok['spec']!r} that {first_dir} was prepared with; use "
                              "data.tokenizer=auto (the manifest's) or prepare again.")
    fim_ids = (tok.get("fim_prefix_id"), tok.get("fim_middle_id"), tok.get("fim_suffix_id"))
    fim = FimSpec(data_cfg.fim_rate, *fim_ids) if None not in fim_ids else None
    shards = [(s["max_token_id"], f"shard {s['name']} of {d}") for d, m in manifests
              for split in store.SPLITS for s in m["splits"][split]["shards"]]
    max_id, where = max(shards, default=(-1, ""), key=lambda s: s[0])
    has_mask = any(m["has_loss_mask"] for _, m in manifests)
    pairs = [is_pairs(m) for _, m in manifests]
    if any(pairs) and (len(manifests) > 1 or data_cfg.mixture):
        raise ConfigError(f"data.mixture={data_cfg.mixture!r} includes DPO pairs (`data prepare "
                          "--dpo`); DPO reads one directory: set data.path.")
    ids = DataIds(tok["vocab_size"], tok["eos_id"], max_id, fim, where,
                  packing_spec(data_cfg, has_mask, pairs[0], tok["pad_id"]), pairs[0])
    total = math.fsum(w for _, w in entries)
    return [(d, w / total) for d, w in entries], ids, has_mask


def check_data(cfg: ml_collections.ConfigDict) -> DataIds:
    """`check_data_config`, and the data's ids against `model.vocab_size` (for prepared data:
    every shard's recorded largest id); returns the ids."""
    ids, vocab_size = check_data_config(cfg.data), cfg.model.vocab_size
    objective = cfg.train.objective
    if ids.pairs != (objective == "dpo"):
        what = "holds DPO pairs" if ids.pairs else "holds no DPO pairs (`data prepare --dpo`)"
        raise ConfigError(f"config.train.objective={objective!r} is not allowed: the data "
                          f"({cfg.data.path or cfg.data.source}) {what}; use train.objective="
                          f"{'dpo' if ids.pairs else 'lm'} or other data.")
    if vocab_size < ids.vocab_size:
        raise ConfigError(f"config.model.vocab_size={vocab_size} is not allowed: the data's "
                          f"tokenizer has {ids.vocab_size} ids.")
    if vocab_size <= ids.max_token_id:
        where = ids.max_token_where or "the prepared data"
        raise ConfigError(f"config.model.vocab_size={vocab_size} is not allowed: {where} holds "
                          f"token id {ids.max_token_id}; it must be >= {ids.max_token_id + 1}.")
    return ids


def check_data_config(data_cfg: ml_collections.ConfigDict) -> DataIds:
    """Fail fast on what the data says of a field-checked `data.*`: the tokenizer, the prepared
    paths and manifests, the mixture, FIM sentinels; returns the ids."""
    validate_data(data_cfg)
    if data_cfg.source in ("stdlib", "passkey"):
        tok = _generated_tokenizer(data_cfg)
        fim_ids = tuple(getattr(tok, f"fim_{k}_id", None) for k in ("prefix", "middle", "suffix"))
        fim = FimSpec(data_cfg.fim_rate, *fim_ids) if None not in fim_ids else None
        ids, has_mask = DataIds(tok.vocab_size, tok.eos_id, tok.vocab_size - 1, fim), False
        if data_cfg.source == "passkey":
            check_passkey_config(data_cfg, tok)
    else:
        _, ids, has_mask = _prepared_ids(data_cfg)
    if data_cfg.fim_rate > 0 and ids.fim is None:
        raise ConfigError(f"data.fim_rate={data_cfg.fim_rate} needs FIM sentinel tokens, which "
                          "this tokenizer lacks; train one with `gigajax data train-tokenizer` "
                          "or set data.fim_rate=0.")
    if data_cfg.fim_rate > 0 and (has_mask or data_cfg.source == "passkey"):
        raise ConfigError(f"data.fim_rate={data_cfg.fim_rate} applies to pretraining text; the "
                          f"{'PassKey' if data_cfg.source == 'passkey' else 'SFT'} data here "
                          "has a loss mask. Set data.fim_rate=0.")
    return ids


def _generated_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer of a source that tokenizes text itself (stdlib, passkey): byte for auto."""
    return get_tokenizer("byte" if data_cfg.tokenizer == "auto" else data_cfg.tokenizer)


def data_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer a run with `data_cfg` trains with: data.tokenizer when set, else byte for
    the sources that tokenize text themselves, else the prepared data's (first) manifest's."""
    if data_cfg.tokenizer != "auto" or data_cfg.source in ("stdlib", "passkey"):
        return _generated_tokenizer(data_cfg)
    manifest = store.read_manifest(parse_mixture(data_cfg)[0][0], shards=False)  # spec alone
    return get_tokenizer(manifest["tokenizer"]["spec"])


def build_datasets(
    data_cfg: ml_collections.ConfigDict,
    seed: int,
    rows: slice | None = None,
    sequence_perm: np.ndarray | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> tuple[DataIds, grain.MapDataset, np.ndarray | Mixture]:
    """From the `data` config: (ids, train batches dataset, validation stream(s)).

    `rows`, `sequence_perm`: this process's rows of each training batch, and the sequence
    layout of its tokens (see `make_dataset`); `reference`: DPO pairs' reference log-probs
    per split ([D, 2], `train/reference.py`), zeros when not given.
    """
    ids = check_data_config(data_cfg)
    fim = ids.fim if data_cfg.fim_rate > 0 else None
    if data_cfg.source == "passkey":
        tok, pk = _generated_tokenizer(data_cfg), data_cfg.passkey
        train = [PasskeyWindows(tok, data_cfg.seq_len, seed, "train", pk.key_digits,
                                pk.text_weight, pk.short_rate, pk.min_key_digits)]
        # validation: whole prompts with key_digits-digit keys and the answer's loss alone, so
        # eval_loss is the answer's loss whatever text_weight, short_rate and min_key_digits
        val = Mixture((PasskeyWindows(tok, data_cfg.seq_len, seed, "validation",
                                      pk.key_digits),), (1.0,))
        weights = None
    elif data_cfg.source == "stdlib":
        load = functools.partial(
            load_stdlib_tokens, tokenizer=_generated_tokenizer(data_cfg),
            max_bytes=int(data_cfg.max_bytes) or None, val_fraction=data_cfg.val_fraction)
        train: np.ndarray | list[Source] = load("train")
        weights, val = None, load("validation")
    else:
        entries, _, _ = _prepared_ids(data_cfg)
        reference = reference or {}
        train = prepared_sources(entries, "train", ids, reference.get("train"))
        val_sources = prepared_sources(entries, "validation", ids, reference.get("validation"))
        weights = [w for _, w in entries]
        val = Mixture(tuple(val_sources), tuple(weights), ids.packing)
    train_ds = make_dataset(train, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
                            seed=seed, eos_id=ids.eos_id, rows=rows, sequence_perm=sequence_perm,
                            weights=weights, fim=fim, packing=ids.packing)
    return ids, train_ds, val


def prepared_sources(entries: list[tuple[str, float]], split: str, ids: DataIds,
                     reference: np.ndarray | None = None) -> list[TokenSource]:
    """One TokenSource per prepared directory of `entries` for `split` (document ends read
    when they are packed whole; DPO pairs with their `reference` log-probs, [D, 2])."""
    opened = [(d, store.open_split(d, split)) for d, _ in entries]
    whole = ids.packing.mode == "whole" or ids.pairs
    return [TokenSource(s.tokens, s.mask, f"{d} ({split})",
                        s.document_ends() if whole else None, ids.pairs, reference)
            for d, s in opened]
