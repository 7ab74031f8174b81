"""Save and restore times of a config's full train state (params + AdamW moments) with Checkpointer.

Builds the state with `StateBuilder` on a 1-device mesh (the config's mesh axes set to 1), fills the
optimizer moments with noise (zeros would compress to nothing; a running job's moments do not),
then times: the async `save` call, the time until `wait()` returns (data written, checksums
recorded, directory committed), a second save, the checksum verification alone, and
`restore_latest` (verification + Orbax restore into the target shardings). Prints a table and
writes JSON.

    python experiments/checkpoint_timing.py --config configs/small.py --out runs/ckpt_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gigajax.checkpoint.manager import Checkpointer, verify_checksums, write_checksums
from gigajax.config import load_config
from gigajax.parallel.mesh import make_mesh
from gigajax.train.optim import make_optimizer
from gigajax.train.state import StateBuilder, layout_for


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.py")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()

    cfg = load_config(args.config, [])
    cfg.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        builder = StateBuilder(cfg, mesh, layout_for(cfg, mesh), tx)
        state, init_s = timed(lambda: jax.block_until_ready(builder.init()))

        def noisy(tree):  # AdamW moments of a running job: not zeros
            leaves, treedef = jax.tree.flatten(tree)
            keys = jax.random.split(jax.random.key(0), len(leaves))
            return jax.tree.unflatten(treedef, [
                jax.random.normal(k, x.shape, x.dtype) * 1e-3
                if jnp.issubdtype(x.dtype, jnp.floating) else x
                for k, x in zip(keys, leaves, strict=True)])

        state["opt_state"] = jax.block_until_ready(jax.jit(
            noisy, out_shardings=builder.shardings["opt_state"])(state["opt_state"]))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))

    directory = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_timing_"))
    shutil.rmtree(directory, ignore_errors=True)
    checkpointer = Checkpointer(directory, log=lambda s: None)
    meta = {"config": json.loads(cfg.to_json_best_effort())}
    rows = {}
    for step in (1, 2):
        _, rows[f"save {step}: call returns"] = timed(
            lambda s=step: checkpointer.save(s, state, {**meta, "step": s}))
        _, rows[f"save {step}: wait() returns"] = timed(checkpointer.wait)
    disk = sum(p.stat().st_size for p in (directory / "2").rglob("*") if p.is_file())
    _, rows["verify checksums (sha256)"] = timed(lambda: verify_checksums(directory / "2"))
    _, rows["write checksums (part of each wait)"] = timed(lambda: write_checksums(directory / "2"))
    checkpointer = Checkpointer(directory, log=lambda s: None)  # as a restarted run would
    with jax.set_mesh(mesh):
        (restored, _, step), rows["restore_latest (verify + restore)"] = timed(
            lambda: jax.block_until_ready(checkpointer.restore_latest(builder.abstract)))
    checkpointer.close()
    got, want = jax.device_get(restored), jax.device_get(state)
    assert step == 2 and all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    if not args.dir:
        shutil.rmtree(directory)

    result = {"config": args.config, "mesh": "1 device", "device": str(jax.devices()[0]),
              "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
              "params": n_params, "state_mb": state_bytes / 2**20, "disk_mb": disk / 2**20,
              "init_s": init_s, "seconds": rows}
    print(f"{args.config}: {n_params / 1e6:.1f}M params, state {state_bytes / 2**20:.0f} MB "
          f"in memory, {disk / 2**20:.0f} MB on disk (one step), {result['device']}")
    for name, seconds in rows.items():
        print(f"  {name:36s} {seconds:8.2f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
