"""Per-device memory of one decoder layer at long context under each sequence-parallel method.

Nothing runs: the forward and backward pass of one `Block` (LLaMA-2 7B shape by default: D 4096,
32 heads, MLP 11008, bf16 compute, blockwise attention in tiles of 512) on one sequence of T
tokens is lowered on abstract inputs and compiled for N simulated CPU devices on the mesh
`sequence=N`; `compiled.memory_analysis()` gives per-device bytes. Per-device memory should fall
as about 1/N. Writes a table, JSON and CSV.

    python experiments/sp_memory.py --lengths 32768,131072,524288,1048576 --devices 1,2,4,8
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

DEVICES = 8
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from rich.table import Table  # noqa: E402

from gigajax.config import ModelConfig, load_config  # noqa: E402
from gigajax.model.block import Block  # noqa: E402
from gigajax.model.rope import rope_cos_sin, rope_frequencies  # noqa: E402
from gigajax.parallel.mesh import SEQUENCE_AXES, make_mesh  # noqa: E402
from gigajax.parallel.rules import make_layout  # noqa: E402
from gigajax.parallel.shardings import (  # noqa: E402
    abstract_model,
    activation_rules,
    param_shardings,
)
from gigajax.train.logger import log_console  # noqa: E402

GiB = 2**30


def methods(n: int, heads: int) -> list[tuple[str, int]]:
    """(sp_impl, ulysses_degree) worth measuring on n devices."""
    if n == 1:
        return [("ring", 1)]
    found = [("ring", 1)]
    if heads % n == 0:
        found.append(("ulysses", n))
    if n >= 4:
        found.append(("hybrid", n // 2))  # Ulysses over n/2, a ring of 2
    return found


def measure(config: str, seq_len: int, n: int, sp_impl: str, degree: int) -> dict:
    """Compile one layer's forward + backward on n devices; XLA's per-device memory."""
    cfg = load_config(config, [f"--config.data.seq_len={seq_len}",
                               f"--config.model.max_seq_len={seq_len}",
                               "--config.data.batch_size=1", f"--config.mesh.sequence={n}",
                               f"--config.attention.sp_impl={sp_impl}",
                               f"--config.attention.ulysses_degree={degree}",
                               "--config.attention.impl=blockwise"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:n], cfg.attention)
    model_cfg = ModelConfig.from_config(cfg)
    layout = make_layout(model_cfg.n_kv_heads, dict(mesh.shape))
    graphdef, abstract = abstract_model(lambda: Block(model_cfg, rngs=nnx.Rngs(0)))
    inv_freq, mscale = rope_frequencies(model_cfg.head_dim, model_cfg.rope_theta)
    dtype = jnp.dtype(model_cfg.dtype)

    def layer_loss(params, x_BTD, positions_BT):
        block = nnx.merge(graphdef, params)
        with activation_rules(layout.activations):
            cos_BTE, sin_BTE = rope_cos_sin(positions_BT, inv_freq, mscale)
            y_BTD, _ = block(x_BTD, cos_BTE, sin_BTE, positions_BT,
                             jnp.ones_like(positions_BT))
        return jnp.sum(y_BTD.astype(jnp.float32))

    tokens = NamedSharding(mesh, PartitionSpec(None, SEQUENCE_AXES))
    shardings = param_shardings(abstract, mesh, layout.params)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    x = jax.ShapeDtypeStruct((1, seq_len, model_cfg.d_model), dtype, sharding=tokens)
    positions = jax.ShapeDtypeStruct((1, seq_len), jnp.int32, sharding=tokens)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))
        memory = grads.lower(params, x, positions).compile().memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return {"seq_len": seq_len, "devices": n, "sp_impl": sp_impl, "ulysses_degree": degree,
            "mesh": {k: v for k, v in mesh.shape.items() if v > 1},
            "argument_gib": memory.argument_size_in_bytes / GiB,
            "temp_gib": memory.temp_size_in_bytes / GiB, "total_gib": total / GiB,
            "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama2_7b.py")
    parser.add_argument("--lengths", default="32768,131072,524288,1048576")
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--output", default="runs/sp_memory.json")
    args = parser.parse_args()
    console = log_console()
    heads = load_config(args.config).model.n_heads
    rows = []
    for seq_len in (int(x) for x in args.lengths.split(",")):
        for n in (int(x) for x in args.devices.split(",")):
            for sp_impl, degree in methods(n, heads):
                with console.status(f"compiling T={seq_len} N={n} {sp_impl}"):
                    rows.append(measure(args.config, seq_len, n, sp_impl, degree))
                r = rows[-1]
                console.print(f"T={seq_len:>8} N={n} {sp_impl:8s} total {r['total_gib']:8.2f} "
                              f"GiB ({r['compile_s']:.0f} s)")
    table = Table(title=f"{args.config}: one layer, forward + backward, per-device memory (GiB)")
    for col in ("T", "N", "sp_impl", "mesh", "arguments", "temp", "total", "x 1 device"):
        table.add_column(col, justify="left" if col in ("sp_impl", "mesh") else "right")
    single = {r["seq_len"]: r["total_gib"] for r in rows if r["devices"] == 1}
    for r in rows:
        ratio = r["total_gib"] / single[r["seq_len"]] if r["seq_len"] in single else float("nan")
        table.add_row(f"{r['seq_len']:,}", str(r["devices"]), r["sp_impl"],
                      " ".join(f"{k}={v}" for k, v in r["mesh"].items()),
                      f"{r['argument_gib']:.2f}", f"{r['temp_gib']:.2f}",
                      f"{r['total_gib']:.2f}", f"{ratio:.3f}")
    console.print(table)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.splitext(args.output)[0] + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "mesh"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {args.output} and its .csv")


if __name__ == "__main__":
    main()
