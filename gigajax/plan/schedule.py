"""Causal ring attention's schedule: each device's work at each ring step, per sequence layout.

At ring step i device r attends its queries to the K/V block that started on device r - i; the
ring advances in lock step, so a step lasts as long as its busiest device, and the critical path
is the sum over steps of the largest per-device work. Work is counted two ways from the layout
permutation itself (`ops/layouts.py`), nothing is timed:

  pairs   allowed (query, key) pairs under the causal mask: the ideal, mask-exact kernel
  tiles   block_q x block_kv tiles with any allowed pair: what the blockwise kernel computes
          (it skips wholly masked tiles)

Zigzag's ideal speed-up over the contiguous ring is (2N - 1) / N (1.875 at N = 8).
"""

from __future__ import annotations

import numpy as np

from gigajax.ops.layouts import layout_permutation


def step_work(n: int, tokens_per_device: int, layout: str, block: int) -> dict[str, np.ndarray]:
    """Work [step, device] in allowed pairs and in non-empty tiles."""
    seq_len = n * tokens_per_device
    shards = layout_permutation(seq_len, n, layout).reshape(n, tokens_per_device)
    pairs, tiles = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    tiles_per_side = tokens_per_device // block
    for step in range(n):
        for device in range(n):
            q, kv = shards[device], shards[(device - step) % n]
            allowed = kv[None, :] <= q[:, None]  # [Tq, Tk] causal
            pairs[step, device] = allowed.sum()
            tiled = allowed.reshape(tiles_per_side, block, tiles_per_side, block)
            tiles[step, device] = tiled.any(axis=(1, 3)).sum()
    return {"pairs": pairs, "tiles": tiles}


def summary(work: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """The critical path of `work` [step, device], its speed-up over `baseline`'s, and the busy
    fraction (1 = no device ever waits)."""
    critical = int(work.max(axis=1).sum())
    n = work.shape[1]
    return {"critical_path": critical,
            "speedup_vs_contiguous": float(baseline.max(axis=1).sum() / critical),
            "busy_fraction": float(work.sum() / (n * critical))}
