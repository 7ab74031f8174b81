"""Causal ring attention: each device's work at each ring step, per layout, and the critical path.

At ring step i device r attends its queries to the K/V block that started on device r - i; the
ring advances in lock step, so a step lasts as long as its busiest device, and the critical path
is the sum over steps of the largest per-device work. Work is counted two ways from the layout
permutation itself (`gigajax.ops.layouts`), nothing is timed:

  pairs   allowed (query, key) pairs under the causal mask: the ideal, mask-exact kernel
  tiles   block_q x block_kv tiles with any allowed pair: what the blockwise kernel computes
          (it skips wholly masked tiles)

    python experiments/ring_schedule.py --output runs/ring_schedule.json

Zigzag's ideal speed-up over the contiguous ring is (2N - 1) / N (1.875 at N = 8).
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
from rich.table import Table

from gigajax.ops.layouts import SEQUENCE_LAYOUTS, layout_permutation
from gigajax.train.logger import log_console


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="2,4,8,16,32,64", help="ring sizes N")
    parser.add_argument("--tokens-per-device", type=int, default=256)
    parser.add_argument("--block", type=int, default=32, help="kernel tile (block_q = block_kv)")
    parser.add_argument("--output", default="runs/ring_schedule.json")
    args = parser.parse_args()
    console = log_console()
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        works = {layout: step_work(n, args.tokens_per_device, layout, args.block)
                 for layout in SEQUENCE_LAYOUTS}
        base = {unit: works["contiguous"][unit].max(axis=1).sum() for unit in ("pairs", "tiles")}
        for layout, work in works.items():
            row = {"devices": n, "layout": layout}
            for unit, w in work.items():
                critical = int(w.max(axis=1).sum())
                row[f"{unit}_critical_path"] = critical
                row[f"{unit}_speedup_vs_contiguous"] = float(base[unit] / critical)
                row[f"{unit}_busy_fraction"] = float(w.sum() / (n * critical))  # 1 = no idling
                row[f"{unit}_per_step_max"] = w.max(axis=1).tolist()
                row[f"{unit}_per_step_min"] = w.min(axis=1).tolist()
            rows.append(row)
    table = Table(title=f"causal ring attention: critical path vs contiguous "
                        f"({args.tokens_per_device} tokens per device, tiles of {args.block})")
    for col in ("N", "layout", "speed-up (pairs)", "ideal (2N-1)/N", "busy (pairs)",
                "speed-up (tiles)", "busy (tiles)", "step 1 work, min..max (pairs)"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        n = r["devices"]
        table.add_row(str(n), r["layout"], f"{r['pairs_speedup_vs_contiguous']:.3f}",
                      f"{(2 * n - 1) / n:.3f}" if r["layout"] == "zigzag" else "",
                      f"{r['pairs_busy_fraction']:.2f}", f"{r['tiles_speedup_vs_contiguous']:.3f}",
                      f"{r['tiles_busy_fraction']:.2f}",
                      f"{r['pairs_per_step_min'][1]}..{r['pairs_per_step_max'][1]}"
                      if n > 1 else "")
    console.print(table)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.splitext(args.output)[0] + ".csv", "w", newline="") as f:
        fields = [k for k in rows[0] if not k.endswith(("_max", "_min"))]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {args.output} and its .csv")


if __name__ == "__main__":
    main()
