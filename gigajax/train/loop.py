"""The training loop: data -> jitted step -> metrics/logging -> eval -> checkpoint, resumable.

Everything a run writes lives in its workdir: `metrics.jsonl` (one JSON object per logged step),
`tb/` (TensorBoard scalars), `checkpoints/<step>/` (Orbax: state, config, data-iterator state)
and `config.json`. Running the same command again resumes from the latest readable checkpoint
(a corrupt newest one is set aside and the one before it used); a run with no checkpoint yet
starts from `train.init_from`'s params when set (fine-tuning, e.g. with RoPE scaling). SIGTERM
(preemption) lets the step in flight finish, saves, and exits; with several processes all stop at
the step JAX's preemption service has them agree on. Ctrl-C saves too when it lands between steps
(one process only). `train.nonfinite=stop` saves the last good state and exits on a NaN/Inf loss;
a run whose last `DROPPED_CHECK_STEPS` steps were all dropped stops with exit 3 either way.
Everything that can refuse a run (config, layout, data, `init_from`, a resume's saved state) is
checked before the run writes its first file, and `config.json` is replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.checkpoint import params as params_checkpoint
from gigajax.checkpoint.manager import Checkpointer
from gigajax.config import ModelConfig
from gigajax.data.pipeline import batch_iterator, build_datasets, eval_batches, iterator_step
from gigajax.errors import GigajaxError
from gigajax.parallel.mesh import make_mesh, sequence_permutation
from gigajax.parallel.multihost import BATCH_SPEC, is_main_process, place_batch, process_rows
from gigajax.parallel.rules import Layout
from gigajax.train import reference as dpo_reference
from gigajax.train.flops import flops_per_token, peak_flops_per_device
from gigajax.train.logger import MetricsLogger
from gigajax.train.objectives import make_objective_loss_fn
from gigajax.train.optim import make_optimizer
from gigajax.train.preflight import notes as config_notes
from gigajax.train.preflight import preflight
from gigajax.train.signals import Preempted, SigtermStop
from gigajax.train.state import StateBuilder, TrainState, layout_for
from gigajax.train.step import make_eval_step, make_train_step
from gigajax.train.workdir import check_workdir, write_text_atomic


@dataclasses.dataclass
class Training:
    """Everything compiled for one (config, mesh): state layout and the jitted steps."""

    layout: Layout
    state: StateBuilder
    train_step: Callable  # (state, batch) -> (state, metrics); donates the state
    eval_step: Callable  # (params, batch) -> (nll_sum, token_count)
    schedule: optax.Schedule


def build_training(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Training:
    """Check the layout, derive every sharding, and jit the steps with them pinned."""
    layout = layout_for(cfg, mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    state = StateBuilder(cfg, mesh, layout, tx)
    batch = NamedSharding(mesh, BATCH_SPEC)
    replicated = NamedSharding(mesh, PartitionSpec())
    t, lora = cfg.train, cfg.model.lora
    loss_fn = make_objective_loss_fn(cfg, state.graphdef, layout.activations)
    train_step = jax.jit(
        make_train_step(state.graphdef, tx, schedule, t.microbatches, t.z_loss,
                        layout.activations, t.loss_chunks, lora=state.lora,
                        dropout_seed=t.seed if state.lora and lora.dropout > 0 else None,
                        loss_fn=loss_fn, bias_update_rate=cfg.model.moe.bias_update_rate),
        in_shardings=(state.shardings, batch), out_shardings=(state.shardings, replicated),
        donate_argnums=0)
    eval_loss_fn = loss_fn if t.objective == "dpo" else None  # lm: without z-loss
    eval_step = jax.jit(make_eval_step(state.graphdef, layout.activations, t.loss_chunks,
                                       eval_loss_fn),
                        in_shardings=(state.shardings["params"], batch),
                        out_shardings=replicated)
    return Training(layout, state, train_step, eval_step, schedule)


def evaluate(eval_fn, params, batches: list[dict[str, jax.Array]]) -> float:
    """Mean next-token loss over the fixed validation batches (weighted by token count)."""
    return evaluate_metrics(eval_fn, params, batches)["loss"]


def evaluate_metrics(eval_fn, params, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
    """The validation loss and the objective's metrics (DPO: reward margin, accuracy, ...),
    each a mean over the fixed validation batches' tokens (or pairs): floats, and nested
    lists for vectors (a MoE model's per-layer load)."""
    sums = jax.device_get([eval_fn(params, b) for b in batches])
    count = max(sum(float(s[1]) for s in sums), 1.0)
    names = sums[0][2] if sums and len(sums[0]) > 2 else {}
    extra = {k: np.sum([s[2][k] for s in sums], 0) / count for k in names}
    extra = {k: float(v) if v.ndim == 0 else v.tolist() for k, v in extra.items()}
    return {"loss": float(sum(s[0] for s in sums)) / count, **extra}


class NonFiniteStop(GigajaxError):
    """train.nonfinite=stop: a step had a non-finite loss or gradient norm; the last good state
    was saved (exit code 3)."""

    exit_code = 3


# A run whose last this many steps in a row (or all of a shorter run) were dropped stops with
# exit 3: it trains nothing (a learning rate that sent the weights far off, broken data). A few
# bad batches in a row do not stop it.
DROPPED_CHECK_STEPS = 10


@dataclasses.dataclass
class DroppedRun:
    """Steps dropped in a row, counted at logged steps from the state's `skipped` counter: an
    interval counts only when every step in it was dropped."""

    last_step: int
    last_skipped: int
    run: int = 0

    def update(self, step: int, skipped: int) -> None:
        steps = step - self.last_step
        self.run = self.run + steps if skipped - self.last_skipped == steps else 0
        self.last_step, self.last_skipped = step, skipped


def has_checkpoints(directory: Path) -> bool:
    """Whether a run's checkpoints directory holds a step (Orbax names them by the step)."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def read_init_from(init_from: str, notes: list[str], require_checksums: bool = True
                   ) -> params_checkpoint.Params | None:
    """The params of `train.init_from` (a workdir's latest step, a step directory or a params
    checkpoint), read before the run writes anything; None when it is not set."""
    if not init_from:
        return None
    found = params_checkpoint.read_params(init_from, flag="train.init_from",
                                          require_checksums=require_checksums, log=notes.append)
    step = f" (step {found.step})" if found.step is not None else ""
    notes.append(f"params from {found.path}{step}; optimizer state and step start fresh")
    return found


def initial_state(builder: StateBuilder, found: params_checkpoint.Params | None,
                  init_from: str) -> TrainState:
    """Step 0: fresh parameters, or the params of `train.init_from` with a new optimizer."""
    if found is None:
        return builder.init()
    return builder.from_params(found.params, f"train.init_from={init_from}")


def all_dropped(run: int, done: int, metrics: dict[str, jax.Array],
                cfg: ml_collections.ConfigDict) -> NonFiniteStop:
    """The error for a run whose last `run` steps (up to step `done`) were all dropped."""
    return NonFiniteStop(
        f"steps {done - run + 1}-{done} were all dropped: each had a non-finite loss or "
        f"gradient norm (the last: loss {float(metrics['loss'])}, gradient norm "
        f"{float(metrics['grad_norm'])}), so training stopped; nothing was saved after the "
        f"last checkpoint. Lower optim.lr (now {cfg.optim.lr:g}), raise optim.warmup_steps, or "
        "check the data and model.init_std, then rerun.")


def _dpo_reference(cfg: ml_collections.ConfigDict, workdir: Path, training: Training, mesh: Mesh,
                   rows: slice, perm, state: TrainState, resumed: bool, notes: list[str]
                   ) -> tuple[dpo_reference.Reference, bool]:
    """The DPO reference (`train/reference.py`): the workdir's, or computed from the starting
    parameters: this state's on a fresh run, re-read or re-initialised on a resumed one."""
    def compute() -> dpo_reference.Reference:
        params = state["params"]
        if resumed:
            found = read_init_from(cfg.train.init_from, [], cfg.checkpoint.require_checksums)
            params = initial_state(training.state, found, cfg.train.init_from)["params"]
        return dpo_reference.compute_reference(
            cfg, mesh, training.state.graphdef, params, training.state.shardings["params"],
            training.layout.activations, rows, perm)

    return dpo_reference.load_or_compute(cfg, workdir, compute, notes.append)


@dataclasses.dataclass
class RunResult:
    """What `train` ends with: the final train state (on the mesh), the last logged metrics
    (`summary`; only `step` when there was nothing to do) and the step the run started at."""

    state: TrainState
    summary: dict[str, Any]
    start_step: int


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True
          ) -> RunResult:
    """Train (or resume) per `cfg` in `workdir`: `preflight` first, then the loop (module doc).

    The devices must exist (`parallel/devices.py`); the SIGTERM handler, the progress bar and
    the files are released when it returns or raises, so it can run again in the same process.
    """
    multi_process = jax.process_count() > 1
    sigterm = SigtermStop(multi_process)  # first: a SIGTERM from now on stops the run cleanly
    try:
        preflight(cfg)
        return _train(cfg, check_workdir(workdir), progress, sigterm, multi_process)
    finally:
        sigterm.restore()


def _train(cfg: ml_collections.ConfigDict, workdir: Path, progress: bool, sigterm: SigtermStop,
           multi_process: bool) -> RunResult:
    main = is_main_process()
    mesh = make_mesh(cfg.mesh, attention_cfg=cfg.attention)
    t, batch_size = cfg.train, cfg.data.batch_size
    with jax.set_mesh(mesh):
        # Everything that can refuse the run comes before its first file: the steps compile
        # against the layout, the data opens, init_from is read, a resume restores.
        training = build_training(cfg, mesh)
        rows = process_rows(mesh, batch_size)  # this process reads only its own rows
        perm = sequence_permutation(mesh, cfg.data.seq_len, cfg.attention.layout)
        ids, train_ds, val_data = build_datasets(cfg.data, t.seed, rows, perm)
        data_iter = batch_iterator(train_ds)  # its state is saved with every checkpoint
        notes: list[str] = config_notes(cfg)  # printed once the logger exists
        resuming = has_checkpoints(workdir / "checkpoints")
        found = None if resuming else read_init_from(t.init_from, notes,
                                                     cfg.checkpoint.require_checksums)
        val = [place_batch(b, mesh, batch_size) for b in eval_batches(
            val_data, seq_len=cfg.data.seq_len, batch_size=batch_size,
            num_batches=t.eval_batches, eos_id=ids.eos_id, rows=rows, sequence_perm=perm)]
        checkpointer = Checkpointer(workdir / "checkpoints", cfg.checkpoint.max_to_keep,
                                    cfg.checkpoint.keep_every, cfg.checkpoint.async_save,
                                    log=notes.append,
                                    require_checksums=cfg.checkpoint.require_checksums)
        try:
            restored = checkpointer.restore_latest(training.state.abstract, data_iter)
            state = restored[0] if restored else initial_state(training.state, found,
                                                               t.init_from)
        except BaseException:
            checkpointer.close()  # no Orbax thread left behind a refused resume
            raise
        reference = None
        if t.objective == "dpo":  # before step 1: the pairs' reference log-probs, in every batch
            reference, write_reference = _dpo_reference(cfg, workdir, training, mesh, rows, perm,
                                                        state, restored is not None, notes)
            ids, train_ds, val_data = build_datasets(cfg.data, t.seed, rows, perm, reference)
            data_iter = batch_iterator(train_ds, iterator_step(data_iter))
            val = [place_batch(b, mesh, batch_size) for b in eval_batches(
                val_data, seq_len=cfg.data.seq_len, batch_size=batch_size,
                num_batches=t.eval_batches, eos_id=ids.eos_id, rows=rows, sequence_perm=perm)]
            notes.append("DPO pairs: " + dpo_reference.pair_windows(cfg, "train").summary())
        found = None  # init_from's host copy (or lazy HF reader) is not needed once placed
        start = int(state["step"])
        if (position := iterator_step(data_iter)) != start:  # no data state in the checkpoint
            notes.append(f"the data iterator is at batch {position}, the state at step {start}: "
                         f"reading from batch {start} (batches are indexed by step)")
            data_iter = batch_iterator(train_ds, start)
        if main:  # the run is accepted: only now is its config (re)written
            workdir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(workdir / "config.json", cfg.to_json_best_effort(indent=2))
            if reference is not None and write_reference:
                dpo_reference.write_reference(workdir, cfg, reference)
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        model_flops = flops_per_token(ModelConfig.from_config(cfg), cfg.data.seq_len)
        logger = MetricsLogger(workdir, start, t.steps, t.log_every, batch_size * cfg.data.seq_len,
                               progress=progress and main, enabled=main,
                               peak_flops=peak_flops_per_device(t.peak_flops_per_device)
                               * mesh.size, flops_per_token=model_flops)
        for note in notes:
            logger.info(note)
        checkpointer.log = logger.info  # messages of later (background) saves
        logger.info(f"{n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)} on "
                    f"{jax.device_count()} {jax.default_backend()} devices in "
                    f"{jax.process_count()} process(es); "
                    + (f"resuming at step {start}" if start else "starting at step 0"))
        meta = {"config": json.loads(cfg.to_json_best_effort())}

        def save(step: int, force: bool = False) -> None:
            checkpointer.save(step, state, {**meta, "step": step}, data_iter, force=force)

        try:
            if start < t.steps and sigterm.before_start():
                logger.info(f"SIGTERM before step {start + 1}: nothing new to save")
                raise Preempted(f"before step {start + 1}")
            dropped = DroppedRun(start, int(state["skipped"]))
            for step in range(start, t.steps):
                state, metrics = training.train_step(state, place_batch(next(data_iter), mesh,
                                                                        batch_size))
                done = step + 1
                diverged = t.nonfinite == "stop" and bool(metrics["nonfinite"])  # syncs
                if not diverged and (done % t.log_every == 0 or done == t.steps):
                    dropped.update(done, int(metrics["skipped"]))  # fetched by the logger too
                    if dropped.run >= min(DROPPED_CHECK_STEPS, t.steps - start):
                        logger.record(done, metrics)
                        raise all_dropped(dropped.run, done, metrics, cfg)
                preempted = sigterm.reached(done)
                stopping = preempted or diverged
                is_eval = not stopping and (done % t.eval_every == 0 or done == t.steps)
                is_save = stopping or done % t.checkpoint_every == 0 or done == t.steps
                eval_loss, eval_metrics, paused = None, None, 0.0
                if is_eval or is_save:  # not training time: leave it out of tokens/s
                    jax.block_until_ready(metrics)
                    pause_start = time.perf_counter()
                    if is_eval:
                        eval_metrics = evaluate_metrics(training.eval_step, state["params"], val)
                        eval_loss = eval_metrics.pop("loss")
                    if is_save:
                        save(done, force=stopping)
                    paused = time.perf_counter() - pause_start
                logger.record(done, metrics, eval_loss, paused, eval_metrics)
                if diverged:
                    raise NonFiniteStop(
                        f"step {done} had a non-finite loss ({float(metrics['loss'])}), "
                        f"gradient norm ({float(metrics['grad_norm'])}) or update; it was dropped "
                        f"and the last good state is saved as checkpoint {done} (train.nonfinite"
                        "=stop). Lower optim.lr or raise optim.warmup_steps, or set "
                        "train.nonfinite=skip, and rerun to resume after that batch.")
                if preempted:
                    logger.info(f"SIGTERM: saved step {done}" + (
                        f" on all {jax.process_count()} processes" if multi_process else ""))
                    raise Preempted(f"step {done}")
        except (Preempted, NonFiniteStop):  # (saved already, or nothing worth saving)
            raise
        except KeyboardInterrupt:
            if multi_process:  # no step that all processes agree on: a save could hang
                logger.info("interrupted: the last saved checkpoint stands (a multi-process run "
                            "saves on SIGTERM, when all processes can agree on a step)")
                raise
            try:
                done = int(state["step"])
            except RuntimeError:  # interrupted inside a step whose input buffers were donated
                done = None
            if done is None:
                logger.info("interrupted mid-step: the last saved checkpoint stands")
                raise  # the KeyboardInterrupt
            logger.info(f"interrupted: saving a checkpoint at step {done} before exiting")
            save(done, force=True)
            raise
        finally:
            try:
                checkpointer.wait()
                checkpointer.close()
            finally:
                logger.close()
    return RunResult(state, logger.summary or {"step": start}, start)
