"""Forward+backward time and TFLOP/s of the attention kernels by sequence length, as ratios to the
reference kernel.

Kernels (`--impls`), all causal self-attention on q [B,T,H,E], k and v [B,T,K,E] (GQA when K < H):
  reference  `ops.attention.reference_attention`: the full [T,T] score matrix, fp32 softmax
  blockwise  `ops.attention.blockwise_attention`: flash-style tiles with a recomputing VJP
  xla        `jax.nn.dot_product_attention(implementation="xla")`
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: GPU only; elsewhere its row
             says "unavailable on <backend>"
  ring       `ops.ring.ring_attention` under `jax.shard_map` over a 1-device `sequence` mesh: the
             ring's own overhead (merge, custom VJP, a send to itself) against `blockwise`

Each kernel is jitted as one function returning (out, dq, dk, dv) for a fixed random cotangent,
compiled ahead of time (compile time reported apart) and run `--warmup` times untimed. Then
`--repeats` rounds time one call of every kernel in turn, each ended by `block_until_ready`
(taking turns, a change of load on a shared machine hits all kernels alike); the table shows
the median and the speed-up over `reference` at the same length, and the largest error of out
and dq relative to it.

FLOPs (model FLOPs, the convention of docs/mfu.md but with the causal discount):
  forward   = 4 * B * H * T^2 * E / 2   (QK^T and PV: 2 FLOPs per multiply-add, half the pairs)
  fwd + bwd = 3 x forward = 6 * B * H * T^2 * E
The backward's four matmuls (dV, dP, dQ, dK) are twice the forward's two; the flash backward's
recomputation of QK^T is not counted (FlashAttention's own benchmarks count it: 3.5 x forward,
so their TFLOP/s read 3.5/3 of ours for the same time). TFLOP/s = fwd+bwd FLOPs / median time.
XLA's `cost_analysis()` FLOPs of the same compiled program are printed beside the formula: for
`reference` and `xla` it counts the full (unmasked) square plus the softmax, about 2x the
formula; for `blockwise` and `ring` a `scan` body is counted once, not per trip, so it is far
below; a cuDNN custom call is not counted at all.

    python experiments/bench_attention.py --seq-lens 512,1024,2048 --heads 8 --kv-heads 4 \
        --head-dim 64 --output runs/bench_attention.json      # also writes bench_attention.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec
from rich.table import Table

from gigajax.config import compute_dtype
from gigajax.ops.attention import blockwise_attention, reference_attention
from gigajax.ops.ring import ring_attention
from gigajax.plan.planner import memory_of
from gigajax.train.logger import log_console

IMPLS = ("reference", "blockwise", "xla", "cudnn", "ring")
FIELDS = ("seq_len", "impl", "status", "median_ms", "min_ms", "tflops", "speedup_vs_reference",
          "formula_gflop", "xla_gflop", "xla_over_formula", "out_rel_err", "dq_rel_err",
          "memory_mb", "compile_s")
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def causal_attention_flops(b: int, t: int, h: int, e: int) -> tuple[float, float]:
    """(forward, forward+backward) model FLOPs of causal attention; formula in the docstring."""
    forward = 4.0 * b * h * t * t * e / 2
    return forward, 3.0 * forward


def ring_at_one_device(block_q: int, block_kv: int) -> Attend:
    """Ring attention as the model calls it (inside shard_map over `sequence`), on one device."""
    mesh = jax.make_mesh((1,), ("sequence",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:1])
    spec = PartitionSpec(None, "sequence")

    def local(q_BTHE, k_BTKE, v_BTKE, positions_BT):
        return ring_attention(q_BTHE, k_BTKE, v_BTKE, axis_name="sequence",
                              positions_BT=positions_BT, block_q=block_q, block_kv=block_kv)[0]

    def attend(q_BTHE, k_BTKE, v_BTKE):
        b, t = q_BTHE.shape[:2]
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)(
            q_BTHE, k_BTKE, v_BTKE, positions_BT)

    return attend


def attention_fn(impl: str, block_q: int, block_kv: int) -> Attend:
    """The causal attention `impl` as a function of (q, k, v) -> out [B,T,H,E]."""
    if impl == "reference":
        return lambda q, k, v: reference_attention(q, k, v, causal=True)[0]
    if impl == "blockwise":
        return lambda q, k, v: blockwise_attention(q, k, v, causal=True, block_q=block_q,
                                                   block_kv=block_kv)[0]
    if impl in ("xla", "cudnn"):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation=impl)
    if impl == "ring":
        return ring_at_one_device(block_q, block_kv)
    raise ValueError(f"unknown attention impl {impl!r}; choose from {IMPLS}")


def forward_backward(attend: Attend) -> Callable:
    """(q, k, v, dout) -> (out, dq, dk, dv): one forward and one backward pass."""
    def run(q, k, v, dout):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(dout.astype(out.dtype)))

    return jax.jit(run)


def xla_flops(compiled: jax.stages.Compiled) -> float | None:
    """`cost_analysis()['flops']` of a compiled program, None where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops", 0.0)
    return float(flops) if flops and flops > 0 else None


def rel_err(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / max |want| in float32."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def first_line(error: Exception) -> str:
    return "error: " + (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def prepare(impl: str, inputs: tuple, args: argparse.Namespace) -> dict:
    """Compile one kernel for these inputs and run it `--warmup` times: a row to time, or a row
    whose status says why not (cuDNN off GPU, out of memory, unsupported dtype)."""
    backend = jax.default_backend()
    if impl == "cudnn" and backend != "gpu":
        return {"status": f"unavailable on {backend}"}
    try:
        start = time.perf_counter()
        fn = forward_backward(attention_fn(impl, args.block_q, args.block_kv))
        compiled = fn.lower(*inputs).compile()
        row = {"status": "ok", "compiled": compiled, "times": [],
               "compile_s": time.perf_counter() - start, "xla_flops": xla_flops(compiled)}
        try:
            row["memory_mb"] = memory_of(compiled)["total"] / 2**20
        except Exception:  # noqa: BLE001 - memory_analysis() is None on some backends
            row["memory_mb"] = None
        for _ in range(args.warmup):
            row["outputs"] = jax.block_until_ready(compiled(*inputs))
    except Exception as error:  # noqa: BLE001 - record it and go on with the other kernels
        return {"status": first_line(error)}
    return row


def time_round(rows: list[dict], inputs: tuple) -> None:
    """One timed call of every kernel still ok, in turn, each to completion: taking turns
    spreads a change of load on a shared machine over all kernels alike."""
    for row in rows:
        if row["status"] != "ok":
            continue
        try:
            start = time.perf_counter()
            row["outputs"] = jax.block_until_ready(row["compiled"](*inputs))
            row["times"].append(time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory at run time
            row["status"] = first_line(error)


def run(args: argparse.Namespace) -> list[dict]:
    """Every (sequence length, kernel) row, with ratios and errors against `reference`."""
    dtype = jnp.dtype(compute_dtype(args.dtype))
    b, h, kh, e = args.batch, args.heads, args.kv_heads, args.head_dim
    impls = sorted(args.impls, key=lambda i: i != "reference")  # the baseline first
    console = log_console()
    table = []
    for t in args.seq_lens:
        keys = jax.random.split(jax.random.key(args.seed), 4)
        shapes = ((b, t, h, e), (b, t, kh, e), (b, t, kh, e), (b, t, h, e))
        inputs = tuple(jax.random.normal(key, s, jnp.float32).astype(dtype)
                       for key, s in zip(keys, shapes, strict=True))
        _, flops = causal_attention_flops(b, t, h, e)
        rows = []
        for impl in impls:
            with console.status(f"T={t} {impl}: compiling"):
                rows.append({"seq_len": t, "impl": impl, "formula_gflop": flops / 1e9,
                             **prepare(impl, inputs, args)})
        for i in range(args.repeats):
            with console.status(f"T={t}: round {i + 1} of {args.repeats}"):
                time_round(rows, inputs)
        base = rows[0] if rows[0]["impl"] == "reference" and rows[0]["status"] == "ok" else None
        for row in rows:
            if row["status"] == "ok" and row["times"]:
                median = statistics.median(row["times"])
                row.update(median_ms=median * 1e3, min_ms=min(row["times"]) * 1e3,
                           tflops=flops / median / 1e12)
                if row["xla_flops"]:
                    row["xla_gflop"] = row["xla_flops"] / 1e9
                    row["xla_over_formula"] = row["xla_flops"] / flops
                if base is not None:
                    row["speedup_vs_reference"] = base["median_ms"] / row["median_ms"]
                    row["out_rel_err"] = rel_err(row["outputs"][0], base["outputs"][0])
                    row["dq_rel_err"] = rel_err(row["outputs"][1], base["outputs"][1])
            console.print(f"T={t:<6} {row['impl']:<10} " + (
                f"{row['median_ms']:9.2f} ms  {row['tflops']:8.4f} TFLOP/s"
                if row.get("median_ms") else row["status"]))
            table.append({k: row.get(k) for k in FIELDS})
    return table


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("T", "impl", "median ms", "min ms", "TFLOP/s", "x ref", "GFLOP", "GFLOP XLA",
                "XLA/GFLOP", "err out", "err dq", "MB", "compile s", "note"):
        table.add_column(col, justify="left" if col in ("impl", "note") else "right")
    for r in rows:
        table.add_row(str(r["seq_len"]), r["impl"], fmt(r["median_ms"], ".2f"),
                      fmt(r["min_ms"], ".2f"), fmt(r["tflops"], ".4f"),
                      fmt(r["speedup_vs_reference"], ".2f"), fmt(r["formula_gflop"], ".3f"),
                      fmt(r["xla_gflop"], ".3f"), fmt(r["xla_over_formula"], ".2f"),
                      fmt(r["out_rel_err"], ".1e"), fmt(r["dq_rel_err"], ".1e"),
                      fmt(r["memory_mb"], ".1f"), fmt(r["compile_s"], ".1f"),
                      "" if r["status"] == "ok" else r["status"])
    log_console().print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--seq-lens", type=ints, default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads K (H % K == 0)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="auto",
                        help="float32 | bfloat16 | float16 | auto (bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--block-q", type=int, default=512, help="blockwise and ring tile")
    parser.add_argument("--block-kv", type=int, default=512, help="blockwise and ring tile")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the median is shown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/bench_attention.json",
                        help="JSON path; the CSV goes beside it with suffix .csv")
    args = parser.parse_args(argv)
    if unknown := [i for i in args.impls if i not in IMPLS]:
        parser.error(f"--impls: unknown {unknown}; choose from {','.join(IMPLS)}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = compute_dtype(args.dtype)
    device = jax.devices()[0]
    rows = run(args)
    print_table(rows, f"causal attention fwd+bwd, B={args.batch} H={args.heads} "
                      f"K={args.kv_heads} E={args.head_dim} {dtype}, {device.device_kind} "
                      f"({jax.default_backend()}), median of {args.repeats}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    meta = {k: v for k, v in vars(args).items() if k != "output"}
    out.write_text(json.dumps(
        {**meta, "dtype": dtype, "backend": jax.default_backend(), "device": device.device_kind,
         "jax": jax.__version__, "machine": platform.machine(),
         "flops_formula": "fwd+bwd = 3 x 4*B*H*T^2*E/2 = 6*B*H*T^2*E", "rows": rows}, indent=2))
    log_console().print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
