"""A run refuses what it cannot do before it writes anything, never replaces a run's files when it
is refused, drops updates that would make the state non-finite, stops a run that trains nothing,
and answers SIGTERM from its first second."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from support import TINY_MODEL, subprocess_env

from gigajax.cli import main as cli_main
from gigajax.config import load_config
from gigajax.errors import GigajaxError
from gigajax.train import loop
from gigajax.train.loop import NonFiniteStop, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
RUN = [*TINY_MODEL, "--config.data.max_bytes=300000", "--config.train.log_every=1",
       "--config.train.eval_every=100", "--config.optim.warmup_steps=0",
       "--config.optim.schedule=constant", "--config.model.dtype=float32",
       "--config.checkpoint.async_save=false"]


def config(*overrides: str):
    return load_config(TINY, [*RUN, *overrides])


def cli(workdir: Path, *overrides: str) -> list[str]:
    return ["train", "--config", str(TINY), "--workdir", str(workdir), "--no-progress", *RUN,
            *overrides]


def step_dirs(workdir: Path) -> list[str]:
    directory = workdir / "checkpoints"
    return sorted(p.name for p in directory.iterdir() if p.name.isdigit()) \
        if directory.is_dir() else []


def poison_from(first: int, monkeypatch) -> None:
    """Batches from index `first` on carry a NaN loss weight: their steps are dropped."""
    build = loop.build_datasets

    def build_poisoned(*args, **kwargs):
        ids, ds, val = build(*args, **kwargs)

        def maybe_poison(index, batch):
            if index >= first:
                batch = {**batch, "loss_mask": batch["loss_mask"].copy()}
                batch["loss_mask"][0, 0] = np.nan
            return batch

        return ids, ds.map_with_index(maybe_poison), val

    monkeypatch.setattr(loop, "build_datasets", build_poisoned)


def test_a_run_whose_every_step_is_dropped_stops_and_saves_nothing(tmp_path, monkeypatch):
    poison_from(0, monkeypatch)
    with pytest.raises(NonFiniteStop, match="steps 1-3 were all dropped.*optim.lr"):
        train(config("--config.train.steps=3"), tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["skipped"] for r in rows] == [1, 2, 3]
    assert step_dirs(tmp_path / "r") == []  # nothing was learned, nothing saved


def test_ten_dropped_steps_in_a_row_stop_a_run_that_had_trained(tmp_path, monkeypatch, capsys):
    poison_from(2, monkeypatch)  # steps 1-2 train, 3 on are dropped
    code = cli_main(cli(tmp_path / "r", "--config.train.steps=40",
                        "--config.train.checkpoint_every=2"))
    err = capsys.readouterr().err
    assert code == 3 and "steps 3-12 were all dropped" in err and "Traceback" not in err
    # dropped steps keep the good parameters, and are saved as usual; the stop saves nothing
    assert sorted(map(int, step_dirs(tmp_path / "r"))) == [6, 8, 10]


def test_a_learning_rate_that_overflows_float32_is_refused():
    with pytest.raises(GigajaxError, match=r"config\.optim\.lr=1e\+39"):
        config("--config.optim.lr=1e39")


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path, capsys):
    run = tmp_path / "r"
    assert cli_main(cli(run, "--config.train.steps=2")) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for change in ("--config.model.d_model=32", "--config.optim.name=lion"):
        code = cli_main(cli(run, "--config.train.steps=4", change))
        err = capsys.readouterr().err
        assert code == 2 and "different train state" in err and "Traceback" not in err
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert after == before, change  # config.json, metrics, checkpoints: byte for byte


def test_a_missing_init_from_writes_nothing(tmp_path, capsys):
    code = cli_main(cli(tmp_path / "new", f"--config.train.init_from={tmp_path / 'nowhere'}"))
    err = capsys.readouterr().err
    assert code == 2 and "train.init_from" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_a_workdir_that_cannot_be_a_directory_is_one_message(tmp_path, capsys, case):
    (tmp_path / "f").write_text("x")
    workdir = tmp_path / "f" if case == "a file" else tmp_path / "f" / "run"
    assert cli_main(cli(workdir, "--config.train.steps=1")) == 2
    err = capsys.readouterr().err
    assert "workdir" in err and "is a file" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no unwritable directory")
def test_an_unwritable_workdir_is_one_message(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli_main(cli(locked / "run", "--config.train.steps=1")) == 2
    assert "not writable" in capsys.readouterr().err


def test_sigterm_during_start_up_stops_the_run_cleanly(tmp_path):
    """The signal lands while JAX is still being imported (the handler is the CLI's first
    statement): the run stops before its first step with exit 130, no traceback, no checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "gigajax.cli", *cli(tmp_path / "r",
                            "--config.train.steps=50")], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "SIGTERM before step 1" in err and "Traceback" not in err
    assert step_dirs(tmp_path / "r") == []


def test_sigterm_during_start_up_of_another_command_exits_143(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "gigajax.cli", "plan", "--config", str(TINY)],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM" in err and "Traceback" not in err


def test_a_failed_run_raises_a_gigajax_error_through_the_api(tmp_path):
    import gigajax

    (tmp_path / "f").write_text("x")
    with pytest.raises(GigajaxError, match="is a file"):
        gigajax.train(config("--config.train.steps=1"), tmp_path / "f", progress=False)
    assert jax.device_count() == 8
