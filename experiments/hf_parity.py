"""Logit parity with transformers on the committed HF fixtures: each family x RoPE scaling, on one
device and under sequence-parallel layouts (zigzag ring, Ulysses, hybrid) and tensor parallel,
and the mixtures of experts under expert parallelism too. Prints the max |logit difference|
table (fp32; "-" where a layout does not apply) and writes JSON and CSV.

The reference logits were made by transformers itself (tests/fixtures/make_hf_fixtures.py): 2 x 64
tokens against an original context of 32, so half the positions lie beyond it.

    python experiments/hf_parity.py --output runs/hf_parity.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import gigajax

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
FP32 = {"model.dtype": "float32", "attention.block_q": 16, "attention.block_kv": 16}
LAYOUTS = {
    "1 device": {},
    "ring x4 zigzag": {"mesh.sequence": 4, "attention.layout": "zigzag"},
    "ring x8 striped": {"mesh.sequence": 8, "attention.layout": "striped"},
    "ulysses x2": {"mesh.sequence": 2, "attention.sp_impl": "ulysses"},
    "tensor x2, fsdp x2": {"mesh.tensor": 2, "mesh.fsdp": 2},
    "expert x2": {"mesh.expert": 2},
    "expert x2, tensor x2": {"mesh.expert": 2, "mesh.tensor": 2},
}
EXPERT_LAYOUTS = ("expert x2", "expert x2, tensor x2")  # MoE fixtures only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/hf_parity.json", help="JSON path (CSV beside it)")
    p.add_argument("--fixtures", default="", help="comma-separated names (default: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gigajax.simulate_cpu_devices(8)
    import numpy as np

    from gigajax.eval.logits import logits_under_layout

    index = json.loads((FIXTURES / "fixtures.json").read_text())["fixtures"]
    names = args.fixtures.split(",") if args.fixtures else sorted(index)
    rows, start = [], time.perf_counter()
    for name in names:
        ref = np.load(FIXTURES / name / "reference.npz")
        tokens, expected = ref["input_ids"].astype(np.int32), ref["logits"]
        row = {"fixture": name, "family": index[name]["family"],
               "rope": index[name]["rope_type"]}
        moe = bool(gigajax.load_config(FIXTURES / name).model.moe.n_routed_experts)
        for layout, overrides in LAYOUTS.items():
            if layout in EXPERT_LAYOUTS and not moe:
                row[layout] = None
                continue
            logits = logits_under_layout(FIXTURES / name, tokens, {**FP32, **overrides})
            row[layout] = float(np.abs(logits - expected).max())
        rows.append(row)
        print(f"{name:<24}{row['family']:<9}{row['rope']:<9}" + "".join(
            f"{'-' if row[k] is None else format(row[k], '.2e'):>22}" for k in LAYOUTS),
            flush=True)
    worst = max(row[k] for row in rows for k in LAYOUTS if row[k] is not None)
    print(f"worst max |logit difference|: {worst:.2e} over {len(rows)} fixtures x "
          f"{len(LAYOUTS)} layouts ({time.perf_counter() - start:.0f} s)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"layouts": LAYOUTS, "rows": rows, "worst": worst}, indent=2))
    with output.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
