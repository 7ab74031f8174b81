"""Train step and loop: accumulation equivalence, end-to-end CLI training, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gigajax.config import load_config
from gigajax.mesh import make_mesh
from gigajax.train.loop import init_state, train
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
        "inputs": jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        # uneven masks: microbatches hold different token counts, so normalisation matters
        "loss_mask": jnp.asarray(rng.random((batch, length)) < 0.3 + 0.6 * (
            np.arange(batch)[:, None] % 3 == 0), jnp.float32),
    }


def test_four_microbatches_equal_one_batch():
    """Summed-loss accumulation over 4 microbatches gives the same update as one 4x batch."""
    cfg = load_config(TINY, SMALL_RUN + ["--config.mesh.data=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optax.sgd(0.5)
    with jax.set_mesh(mesh):
        graphdef, state = init_state(cfg, mesh, tx)
        batch = random_batch(8, 64, cfg.model.vocab_size)
        results = [jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(0.5), m))(
            state, batch) for m in (1, 4)]
    (one, one_metrics), (four, four_metrics) = results
    np.testing.assert_allclose(four_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(four["params"]), jax.tree.leaves(one["params"]), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(one["params"]),
                                                    jax.tree.leaves(state["params"]), strict=False)]
    assert min(moved) > 0  # the step really changed every parameter


def cli(workdir, *overrides):
    """Run `gigajax train` in a fresh process that simulates the devices the mesh asks for."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "gigajax.cli", "train", "--config", str(TINY), "--workdir",
         str(workdir), "--no-progress", *SMALL_RUN, *overrides],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().split("\n")
            if line]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_the_next_run_resumes(tmp_path):
    """A killed run (SIGTERM, as on preemption) saves where it stopped; rerunning continues."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [sys.executable, "-m", "gigajax.cli", "train", "--config", str(TINY), "--workdir",
            str(tmp_path), "--no-progress", *SMALL_RUN, "--config.train.steps=100000",
            "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
            "--config.optim.warmup_steps=2", "--config.optim.schedule=constant"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
    resumed = cli(tmp_path, f"--config.train.steps={saved[0] + 2}", *args[-4:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {saved[0]}" in resumed.stderr
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-2:] == [saved[0] + 1, saved[0] + 2]
