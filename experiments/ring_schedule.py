"""Causal ring attention: each device's work at each ring step, per layout, and the critical path
(`gigajax/plan/schedule.py` counts it; nothing is timed), as a table, JSON and CSV.

    python experiments/ring_schedule.py --output runs/ring_schedule.json

Zigzag's ideal speed-up over the contiguous ring is (2N - 1) / N (1.875 at N = 8).
"""

from __future__ import annotations

import argparse
import csv
import json
import os

from rich.table import Table

from gigajax.ops.layouts import SEQUENCE_LAYOUTS
from gigajax.plan.schedule import step_work, summary
from gigajax.train.logger import log_console


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
        for layout, work in works.items():
            row = {"devices": n, "layout": layout}
            for unit, w in work.items():
                for key, value in summary(w, works["contiguous"][unit]).items():
                    row[f"{unit}_{key}"] = value
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
