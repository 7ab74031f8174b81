"""Train step and loop: accumulation equivalence, end-to-end CLI training, exact resume."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from support import subprocess_env

from gigajax.config import load_config
from gigajax.parallel.mesh import make_mesh
from gigajax.parallel.multihost import place_batch
from gigajax.train.loop import train
from gigajax.train.state import StateBuilder, layout_for
from gigajax.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
SMALL_RUN = ["--config.model.d_model=64", "--config.model.mlp_dim=128",
             "--config.model.n_layers=2", "--config.data.seq_len=64",
             "--config.data.batch_size=8", "--config.data.max_bytes=300000",
             "--config.attention.block_q=32", "--config.attention.block_kv=32"]


def random_batch(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(0, vocab, (batch, length)).astype(np.int32),
        "targets": rng.integers(0, vocab, (batch, length)).astype(np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, length), np.int32),
        # uneven masks: microbatches hold different token counts, so normalisation matters
        "loss_mask": (rng.random((batch, length)) < 0.3 + 0.6 * (
            np.arange(batch)[:, None] % 3 == 0)).astype(np.float32),
    }


def one_step(data_parallel: int, microbatches: int):
    """Initial state and (state, metrics) after one SGD step on a fixed batch."""
    cfg = load_config(TINY, SMALL_RUN + [f"--config.mesh.data={data_parallel}"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:data_parallel])
    tx = optax.sgd(0.5)
    with jax.set_mesh(mesh):
        layout = layout_for(cfg, mesh)
        builder = StateBuilder(cfg, mesh, layout, tx)
        state = builder.init()
        batch = place_batch(random_batch(8, 64, cfg.model.vocab_size), mesh, 8)
        step = jax.jit(make_train_step(builder.graphdef, tx, optax.constant_schedule(0.5),
                                       microbatches, rules=layout.activations))
        return jax.device_get(state), jax.device_get(step(state, batch))


def test_four_microbatches_on_two_devices_equal_one_batch_on_one():
    """Accumulating 4 microbatches, data parallel over 2 devices, gives the single-device update."""
    state, (one, one_metrics) = one_step(1, 1)
    _, (four, four_metrics) = one_step(2, 4)
    np.testing.assert_allclose(four_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(four["params"]), jax.tree.leaves(one["params"]), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(one["params"]),
                                                    jax.tree.leaves(state["params"]), strict=False)]
    assert min(moved) > 0  # the step really changed every parameter


def cli_command(workdir, *overrides):
    """`gigajax train` in a fresh process that simulates the devices the mesh asks for."""
    args = [sys.executable, "-m", "gigajax.cli", "train", "--config", str(TINY), "--workdir",
            str(workdir), "--no-progress", *SMALL_RUN, *overrides]
    return {"args": args, "cwd": ROOT, "text": True,
            "env": subprocess_env()}


def cli(workdir, *overrides):
    return subprocess.run(**cli_command(workdir, *overrides), capture_output=True, timeout=600)


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().split("\n")
            if line]


@pytest.mark.slow(seconds=60)
def test_cli_trains_tiny_and_resumes(tmp_path):
    run = cli(tmp_path, "--config.train.steps=50", "--config.train.eval_every=25",
              "--config.optim.warmup_steps=10")
    assert run.returncode == 0, run.stderr
    rows = read_metrics(tmp_path)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < np.log(384)  # validation loss falls
    assert rows[-1]["step"] == 50 and (tmp_path / "checkpoints" / "50").is_dir()
    assert (tmp_path / "tb").is_dir() and rows[-1]["tokens_per_s"] > 0

    resumed = cli(tmp_path, "--config.train.steps=60", "--config.train.eval_every=25",
                  "--config.optim.warmup_steps=10")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 50" in resumed.stderr
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == sorted(steps) and steps[-1] == 60 and steps.count(50) == 1

    again = cli(tmp_path, "--config.train.steps=60", "--config.optim.warmup_steps=10")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr


@pytest.mark.slow(seconds=60)
def test_resume_gives_the_same_run_as_no_interruption(tmp_path):
    """10 steps, stop, 10 more: the same losses (bit for bit) as 20 steps in one go."""
    overrides = SMALL_RUN + ["--config.mesh.data=-1", "--config.optim.schedule=constant",
                             "--config.optim.warmup_steps=5", "--config.train.log_every=1",
                             "--config.train.eval_every=10", "--config.checkpoint.async_save=false"]
    straight = load_config(TINY, overrides + ["--config.train.steps=20"])
    train(straight, tmp_path / "straight", progress=False)
    train(load_config(TINY, overrides + ["--config.train.steps=10"]), tmp_path / "split",
          progress=False)
    train(straight, tmp_path / "split", progress=False)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 21))
    assert [(r["loss"], r.get("eval_loss")) for r in a] == [
        (r["loss"], r.get("eval_loss")) for r in b]


@pytest.mark.slow(seconds=40)
def test_sigterm_saves_a_checkpoint_that_the_next_run_resumes(tmp_path):
    """A killed run (SIGTERM, as on preemption) saves where it stopped; rerunning continues."""
    import signal
    import time

    overrides = ["--config.train.log_every=1", "--config.train.checkpoint_every=100000",
                 "--config.optim.warmup_steps=2", "--config.optim.schedule=constant"]
    proc = subprocess.Popen(**cli_command(tmp_path, "--config.train.steps=100000", *overrides),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")
                                          >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    resumed = cli(tmp_path, f"--config.train.steps={saved[0] + 2}", *overrides)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {saved[0]}" in resumed.stderr
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-2:] == [saved[0] + 1, saved[0] + 2]


def test_every_logged_line_carries_the_eta(tmp_path, capsys):
    """Piped and SLURM logs have no progress bar: each step line ends with the ETA."""
    import jax.numpy as jnp

    from gigajax.train.logger import MetricsLogger, format_duration

    assert [format_duration(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]
    logger = MetricsLogger(tmp_path, 0, 100, 10, 1024, progress=False)
    metrics = {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0), "lr": jnp.float32(1e-3)}
    for step in range(1, 21):
        logger.record(step, metrics)
    logger.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and all(" eta " in line for line in lines)
