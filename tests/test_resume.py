"""Fault tolerance of the training loop: kill -9 and resume is bitwise exact (parameters, and
the batches seen in order), and non-finite steps are skipped or stop the run as configured."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from support import subprocess_env

from gigajax.checkpoint.manager import Checkpointer
from gigajax.cli import main as cli_main
from gigajax.config import load_config
from gigajax.parallel.mesh import make_mesh
from gigajax.train import loop
from gigajax.train.loop import NonFiniteStop, build_training, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
RUN = ["--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.n_layers=2",
       "--config.data.seq_len=64", "--config.data.batch_size=8",
       "--config.data.max_bytes=300000", "--config.attention.block_q=32",
       "--config.attention.block_kv=32", "--config.train.log_every=1",
       "--config.train.eval_every=6", "--config.optim.warmup_steps=3",
       "--config.model.dtype=float32", "--config.mesh.data=-1"]

# Runs `gigajax train` and SIGKILLs itself right after step $KILL_AT is recorded (which is after
# that step's checkpoint save, when there is one, has been started asynchronously).
KILLER = """
import os, signal, sys
from gigajax.train import loop
kill_at, record = int(os.environ["KILL_AT"]), loop.MetricsLogger.record
def record_then_die(self, step, *args, **kwargs):
    record(self, step, *args, **kwargs)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
loop.MetricsLogger.record = record_then_die
from gigajax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_train(workdir: Path, kill_at: int | None, *overrides: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["KILL_AT"] = str(kill_at or -1)
    args = [sys.executable, "-c", KILLER, "train", "--config", str(TINY), "--workdir",
            str(workdir), "--no-progress", *RUN, *overrides]
    return subprocess.run(args, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir: Path, step: int, *overrides: str):
    """The state saved at `step` in `workdir` (restored onto all 8 devices), as numpy arrays."""
    cfg = load_config(TINY, [*RUN, *overrides])
    mesh = make_mesh(cfg.mesh, attention_cfg=cfg.attention)
    with jax.set_mesh(mesh):
        training = build_training(cfg, mesh)
        checkpointer = Checkpointer(workdir / "checkpoints")
        state, _ = checkpointer.restore(step, training.state.abstract)
        checkpointer.close()
    return jax.device_get(state)


@pytest.mark.slow(seconds=120)
def test_kill_9_at_three_steps_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """SIGKILL after step 5 (mid-interval), after step 8 (just after checkpoint 8's asynchronous
    save started; it may or may not be complete) and after step 11; each time rerun. The final
    parameters and optimizer state are bitwise those of a run never interrupted, and every step
    saw the same batch (its loss is bitwise the same)."""
    overrides = ["--config.train.steps=12", "--config.train.checkpoint_every=4",
                 "--config.mesh.data=2"]  # the subprocesses simulate 2 CPU devices
    straight = run_train(tmp_path / "straight", None, *overrides)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    for kill_at in (5, 8, 11):
        result = run_train(killed, kill_at, *overrides)
        assert result.returncode == -signal.SIGKILL, result.stderr
    resumed = run_train(killed, None, *overrides)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr
    assert "the data iterator is at batch" not in resumed.stderr  # its state came back too
    a, b = read_metrics(tmp_path / "straight"), read_metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in a] == [
        (r["loss"], r["grad_norm"], r.get("eval_loss")) for r in b]
    want, got = final_state(tmp_path / "straight", 12), final_state(killed, 12)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(x, y)


def poison(step_to_poison: int, monkeypatch) -> None:
    """Make the training batch of `step_to_poison` give a NaN loss (a NaN in its loss mask)."""
    build = loop.build_datasets

    def build_poisoned(*args, **kwargs):
        ids, ds, val = build(*args, **kwargs)

        def maybe_poison(index, batch):
            if index == step_to_poison:
                batch = {**batch, "loss_mask": batch["loss_mask"].copy()}
                batch["loss_mask"][0, 0] = np.nan
            return batch

        return ids, ds.map_with_index(maybe_poison), val

    monkeypatch.setattr(loop, "build_datasets", build_poisoned)


def nan_run_config(steps: int, policy: str = "skip", checkpoint_every: int = 100):
    return load_config(TINY, [*RUN, f"--config.train.steps={steps}",
                              "--config.optim.warmup_steps=1", "--config.optim.schedule=constant",
                              f"--config.train.nonfinite={policy}",
                              f"--config.train.checkpoint_every={checkpoint_every}",
                              "--config.checkpoint.async_save=false"])


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path, monkeypatch):
    """Steps 1-2 clean, step 3 poisoned: after 3 steps the state equals the clean 2-step state
    (only `step` and `skipped` differ), training goes on, and the count is logged."""
    train(nan_run_config(2), tmp_path / "clean", progress=False)
    poison(2, monkeypatch)  # batch index 2 = step 3
    train(nan_run_config(4, checkpoint_every=1), tmp_path / "poisoned", progress=False)
    rows = read_metrics(tmp_path / "poisoned")
    assert np.isnan(rows[2]["loss"]) and rows[2]["skipped"] == 1 and rows[1]["skipped"] == 0
    assert np.isfinite(rows[3]["loss"]) and rows[3]["skipped"] == 1
    clean = final_state(tmp_path / "clean", 2)
    skipped = final_state(tmp_path / "poisoned", 3)
    assert int(skipped["step"]) == 3 and int(skipped["skipped"]) == 1
    for key in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(clean[key]), jax.tree.leaves(skipped[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    after = final_state(tmp_path / "poisoned", 4)["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))


def test_nonfinite_stop_saves_the_last_good_state_and_exits_3(tmp_path, monkeypatch, capsys):
    train(nan_run_config(2), tmp_path / "clean", progress=False)
    poison(2, monkeypatch)
    with pytest.raises(NonFiniteStop, match="step 3.*checkpoint 3"):
        train(nan_run_config(6, "stop"), tmp_path / "stopped", progress=False)
    saved = final_state(tmp_path / "stopped", 3)
    clean = final_state(tmp_path / "clean", 2)
    for x, y in zip(jax.tree.leaves(clean["params"]), jax.tree.leaves(saved["params"]),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    assert sorted(int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [3]
    code = cli_main(["train", "--config", str(TINY), "--workdir", str(tmp_path / "cli"),
                     "--no-progress", *RUN, "--config.train.steps=6",
                     "--config.optim.warmup_steps=1", "--config.optim.schedule=constant",
                     "--config.train.nonfinite=stop"])
    assert code == 3 and "non-finite" in capsys.readouterr().err
