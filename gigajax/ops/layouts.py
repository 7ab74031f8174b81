"""Sequence layouts for ring attention: which global tokens each of the N devices holds.

The sequence axis is permuted once, in the data path, and then split into N contiguous shards,
so device r holds permuted positions [r T/N, (r+1) T/N). A layout is the permutation `perm`
with `permuted[j] = original[perm[j]]`:

  contiguous  device r holds tokens [r T/N, (r+1) T/N) (perm is the identity)
  striped     device r holds tokens r, r+N, r+2N, ... (Brandon et al. 2023, "Striped Attention")
  zigzag      the sequence cut in 2N chunks; device r holds chunks r and 2N-1-r, so under a causal
              mask every device does the same work at every ring step

Inputs, targets, positions (RoPE and masks use the *global* positions), segment ids and loss
masks are all permuted with the same `perm`; a per-token loss needs no un-permuting. Anything
that needs the original order (generation, inspection) applies `inverse_permutation`.
"""

from __future__ import annotations

import numpy as np

SEQUENCE_LAYOUTS = ("contiguous", "striped", "zigzag")


def chunks_per_device(layout: str) -> int:
    """How many equal chunks of the sequence each device holds (zigzag: 2)."""
    return 2 if layout == "zigzag" else 1


def layout_permutation(seq_len: int, n: int, layout: str) -> np.ndarray:
    """perm [T] int32: the global token index at each permuted position."""
    if layout not in SEQUENCE_LAYOUTS:
        raise ValueError(f"sequence layout {layout!r} is not one of {SEQUENCE_LAYOUTS}")
    if seq_len % (n * chunks_per_device(layout)):
        raise ValueError(f"{seq_len} tokens do not split into {n * chunks_per_device(layout)} "
                         f"equal chunks ({n} devices, layout {layout!r})")
    index = np.arange(seq_len, dtype=np.int32)
    if layout == "contiguous" or n == 1:
        return index
    if layout == "striped":  # [T/N, N] -> [N, T/N]: device r takes column r
        return index.reshape(seq_len // n, n).T.reshape(-1)
    chunks = index.reshape(2 * n, seq_len // (2 * n))  # zigzag
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """inv with `original = permuted[..., inv]`."""
    return np.argsort(perm).astype(np.int32)


def permute_sequence(x: np.ndarray, perm: np.ndarray, axis: int = 1) -> np.ndarray:
    """x [B, T, ...] in original order -> the same tokens in layout order along `axis`."""
    return np.take(x, perm, axis=axis)
