"""The training loop: data -> jitted step -> metrics/logging -> eval -> checkpoint, resumable.

Everything a run writes lives in its workdir: `metrics.jsonl` (one JSON object per logged step),
`tb/` (TensorBoard scalars), `checkpoints/<step>/` (Orbax) and `config.json`. Running the same
command again resumes from the latest checkpoint; an interrupt (Ctrl-C) saves one first.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.config import ModelConfig
from gigajax.data.pipeline import batch_iterator, build_datasets, eval_batches
from gigajax.errors import ConfigError
from gigajax.mesh import make_mesh
from gigajax.model import Decoder
from gigajax.sharding import init_sharded
from gigajax.train.checkpoint import Checkpointer
from gigajax.train.flops import flops_per_token, peak_flops_per_device
from gigajax.train.logger import MetricsLogger
from gigajax.train.optim import make_optimizer
from gigajax.train.step import make_eval_step, make_train_step

BATCH_SPEC = PartitionSpec(("data", "fsdp"), "sequence")


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a host batch [B, T] on the mesh: B over data x fsdp, T over sequence."""
    return jax.device_put(batch, NamedSharding(mesh, BATCH_SPEC))


def init_state(cfg: ml_collections.ConfigDict, mesh: Mesh, tx) -> tuple[nnx.GraphDef, dict]:
    """A fresh train state, each parameter and optimizer moment built in its own sharding."""
    model_cfg = ModelConfig.from_config(cfg)
    graphdef, params = init_sharded(
        lambda: Decoder(model_cfg, rngs=nnx.Rngs(cfg.train.seed)), mesh)
    opt_state = jax.jit(tx.init)(params)
    return graphdef, {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


def check_batch_layout(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over data-parallel devices and microbatches."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = cfg.data.batch_size // cfg.train.microbatches
    if per_micro % dp:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {per_micro} rows per microbatch do not split over the "
            f"{dp} data-parallel devices (mesh.data x mesh.fsdp): make it a multiple of {dp}.")


def _stop_on_sigterm():
    """Treat SIGTERM (cluster preemption, `kill`) like Ctrl-C, so the run saves and exits."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def evaluate(eval_fn, params, batches: list[dict[str, jax.Array]]) -> float:
    """Mean next-token loss over the fixed validation batches (weighted by token count)."""
    sums = [eval_fn(params, b) for b in batches]
    return float(sum(s for s, _ in sums) / max(sum(float(c) for _, c in sums), 1.0))


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True
          ) -> dict[str, Any]:
    """Train (or resume) per `cfg` in `workdir`; returns a summary of the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    mesh = make_mesh(cfg.mesh)
    check_batch_layout(cfg, mesh)
    tokenizer, train_ds, val_tokens = build_datasets(cfg.data, cfg.train.seed)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    t = cfg.train
    with jax.set_mesh(mesh):
        graphdef, state = init_state(cfg, mesh, tx)
        checkpointer = Checkpointer(workdir / "checkpoints", cfg.checkpoint.max_to_keep,
                                    cfg.checkpoint.async_save)
        if (latest := checkpointer.latest_step()) is not None:
            state, _ = checkpointer.restore(latest, state)
        start = int(state["step"])
        train_step = jax.jit(make_train_step(graphdef, tx, schedule, t.microbatches, t.z_loss),
                             donate_argnums=0)
        eval_fn = jax.jit(make_eval_step(graphdef))
        val = [place_batch(b, mesh) for b in eval_batches(
            val_tokens, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
            num_batches=t.eval_batches, eos_id=tokenizer.eos_id)]
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        model_flops = flops_per_token(ModelConfig.from_config(cfg), cfg.data.seq_len)
        logger = MetricsLogger(workdir, start, t.steps, t.log_every,
                               cfg.data.batch_size * cfg.data.seq_len, progress=progress,
                               peak_flops=peak_flops_per_device(t.peak_flops_per_device)
                               * mesh.size, flops_per_token=model_flops)
        logger.info(f"{n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)} on "
                    f"{jax.device_count()} {jax.default_backend()} devices; "
                    + (f"resuming at step {start}" if start else "starting at step 0"))
        meta = {"config": json.loads(cfg.to_json_best_effort())}
        previous_sigterm = _stop_on_sigterm()
        try:
            batches = batch_iterator(train_ds, start)
            for step in range(start, t.steps):
                state, metrics = train_step(state, place_batch(next(batches), mesh))
                done = step + 1
                is_eval = done % t.eval_every == 0 or done == t.steps
                is_save = done % t.checkpoint_every == 0 or done == t.steps
                eval_loss, paused = None, 0.0
                if is_eval or is_save:  # not training time: leave it out of tokens/s
                    jax.block_until_ready(metrics)
                    pause_start = time.perf_counter()
                    if is_eval:
                        eval_loss = evaluate(eval_fn, state["params"], val)
                    if is_save:
                        checkpointer.save(done, state, {**meta, "step": done})
                    paused = time.perf_counter() - pause_start
                logger.record(done, metrics, eval_loss, paused)
        except KeyboardInterrupt:
            try:
                done = int(state["step"])
            except RuntimeError:  # interrupted inside a step whose input buffers were donated
                logger.info("interrupted mid-step: the last saved checkpoint stands")
                raise
            logger.info(f"interrupted: saving a checkpoint at step {done} before exiting")
            checkpointer.save(done, state, {**meta, "step": done}, force=True)
            raise
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
            checkpointer.wait()
            checkpointer.close()
            logger.close()
    return logger.summary or {"step": start}
