"""MoE train-step time and compiled memory by dispatch and layout, on simulated CPU devices:
dropless (ragged) against capacity dispatch, and expert-parallel layouts against data
parallelism (EP=1), in one process so that every row shares the machine's state.

Each variant's train step (`train.loop.build_training`: AdamW, the config's remat) is compiled
ahead of time; XLA's per-device memory (`plan.planner.memory_of`: arguments + outputs +
temporaries - donated) comes from that compilation, nothing run. Then `--warmup` steps run
untimed and `--rounds` rounds of `--steps` steps are timed, each variant in turn per round (a
change of load hits every variant alike); the step time is the median round's. Ratios are
against the first variant.

    python experiments/bench_moe.py --out runs/bench_moe --steps 3 --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
# name -> config overrides; mesh axes not named are 1
VARIANTS = {
    "ragged, data=8 (EP=1)": ["mesh.data=8"],
    "capacity 1.25, data=8": ["mesh.data=8", "model.moe.dispatch=capacity"],
    "ragged, expert=8": ["mesh.expert=8"],
    "ragged, expert=4 x data=2": ["mesh.expert=4", "mesh.data=2"],
    "ragged, expert=2 x fsdp=2 x tensor=2": ["mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "ragged, expert=2 x sequence=4": ["mesh.expert=2", "mesh.sequence=4"],
    "capacity 1.25, expert=8": ["mesh.expert=8", "model.moe.dispatch=capacity"],
}
FIELDS = ("variant", "devices", "compiled_mib", "temp_mib", "arguments_mib", "step_ms",
          "tokens_per_s", "step_ratio", "memory_ratio", "loss_end")


def prepare(name: str, overrides: list[str], config: Path, extra: list[str]):
    """A compiled train step, its state and batches, and its compiled memory."""
    import jax
    import numpy as np

    from gigajax.config import load_config
    from gigajax.parallel.mesh import make_mesh, sequence_permutation
    from gigajax.parallel.multihost import place_batch
    from gigajax.plan.planner import abstract_batch, memory_of
    from gigajax.train.loop import build_training

    mesh_flags = [f"mesh.{a}=1" for a in ("data", "fsdp", "expert", "sequence", "tensor")]
    cfg = load_config(config, [f"--config.{o}" for o in (*mesh_flags, *overrides)] + extra)
    devices = int(np.prod([cfg.mesh[a] for a in cfg.mesh]))
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices], cfg.attention)
    with jax.set_mesh(mesh):
        training = build_training(cfg, mesh)
        compiled = training.train_step.lower(training.state.abstract,
                                             abstract_batch(cfg, mesh)).compile()
        memory = memory_of(compiled)
        state = training.state.init()
    B, T = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1))
    perm = sequence_permutation(mesh, T, cfg.attention.layout)
    order = np.arange(T) if perm is None else perm
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(T), (B, T)),
             "segment_ids": np.ones((B, T)), "loss_mask": np.ones((B, T))}
    dtypes = {"loss_mask": np.float32}
    batch = {k: np.ascontiguousarray(v[:, order]).astype(dtypes.get(k, np.int32))
             for k, v in batch.items()}
    placed = place_batch(batch, mesh, B)
    return {"name": name, "mesh": mesh, "step": compiled, "state": state, "batch": placed,
            "memory": memory, "devices": devices, "tokens": B * T, "rounds": [], "loss": None}


def run_steps(variant: dict, steps: int) -> float:
    """`steps` steps dispatched back to back, one wait at the end; seconds."""
    import jax

    start = time.perf_counter()
    state, metrics = variant["state"], None
    for _ in range(steps):
        state, metrics = variant["step"](state, variant["batch"])
    jax.block_until_ready(state)
    variant["state"] = state
    if metrics is not None:
        variant["loss"] = float(metrics["loss"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_moe")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_moe.py"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="';'-separated names of VARIANTS")
    args, extra = parser.parse_known_args()  # the rest: --config.* flags for every variant
    from gigajax.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(8)
    names = [n for n in args.variants.split(";") if n]
    variants = [prepare(n, VARIANTS[n], Path(args.config), extra) for n in names]
    for v in variants:
        run_steps(v, args.warmup)
    for _ in range(args.rounds):
        for v in variants:
            v["rounds"].append(run_steps(v, args.steps))
    rows = []
    for v in variants:
        step_s = statistics.median(v["rounds"]) / args.steps
        rows.append({"variant": v["name"], "devices": v["devices"],
                     "compiled_mib": v["memory"]["total"] / 2**20,
                     "temp_mib": v["memory"]["temp"] / 2**20,
                     "arguments_mib": v["memory"]["arguments"] / 2**20,
                     "step_ms": 1000 * step_s, "tokens_per_s": v["tokens"] / step_s,
                     "loss_end": v["loss"]})
    for row in rows:
        row["step_ratio"] = row["step_ms"] / rows[0]["step_ms"]
        row["memory_ratio"] = row["compiled_mib"] / rows[0]["compiled_mib"]
    print(f"{'variant':<38} {'MiB/dev':>8} {'temp':>7} {'args':>6} {'ms/step':>8} "
          f"{'tok/s':>7} {'step x':>7} {'mem x':>6}")
    for r in rows:
        print(f"{r['variant']:<38} {r['compiled_mib']:>8.1f} {r['temp_mib']:>7.1f} "
              f"{r['arguments_mib']:>6.1f} {r['step_ms']:>8.0f} {r['tokens_per_s']:>7.0f} "
              f"{r['step_ratio']:>7.2f} {r['memory_ratio']:>6.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_moe.json").write_text(json.dumps(rows, indent=1))
    with open(out / "bench_moe.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'bench_moe.json'} and bench_moe.csv")


if __name__ == "__main__":
    main()
