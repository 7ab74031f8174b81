"""Two processes x 4 CPU devices (jax.distributed on localhost) train like one process x 8.

Started three ways: explicit coordinator flags, SLURM's environment, and the sbatch template
itself under a stand-in `srun` that starts its tasks on this machine.
"""

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--config", str(ROOT / "configs" / "tiny.py"), "--no-progress",
       "--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.n_layers=2",
       "--config.data.seq_len=64", "--config.data.batch_size=8",
       "--config.data.max_bytes=300000", "--config.attention.block_q=32",
       "--config.attention.block_kv=32", "--config.train.steps=3", "--config.train.log_every=1",
       "--config.optim.warmup_steps=1", "--config.mesh.data=2", "--config.mesh.fsdp=2",
       "--config.mesh.tensor=2"]
ENV = subprocess_env()  # the CLI sets device counts


def free_port() -> int:
    """A free port in 61440..65535: JAX's SLURM coordinator port is 61440 + job id % 4096."""
    for port in random.sample(range(61440, 65536), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 61440..65535")


def gigajax_train(workdir, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "gigajax.cli", "train", "--workdir",
                             str(workdir), *RUN, *extra], cwd=ROOT, env={**ENV, **(env or {})},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process) -> str:
    try:
        out, _ = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:  # a crashed peer can leave the other one waiting
        process.kill()
        out, _ = process.communicate()
    assert process.returncode == 0, out
    return out


def losses(workdir) -> list[float]:
    """Training loss per logged step, then the evaluation losses (at the last step here)."""
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text()
               .splitlines()]
    return [r["loss"] for r in records] + [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    finish(gigajax_train(workdir))
    return losses(workdir)


# SLURM's srun, played on one machine: SLURM_NTASKS copies of the command, each told its rank
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done  # srun's own options
pids=()
for ((rank = 0; rank < SLURM_NTASKS; rank++)); do
    SLURM_PROCID=$rank SLURM_LOCALID=$rank "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def slurm_env(port: int) -> dict[str, str]:
    """A two-task step on localhost; job id `port` makes JAX pick coordinator port `port`."""
    return {"SLURM_JOB_ID": str(port), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2"}


def sbatch(workdir, port: int):
    """`bash experiments/slurm/train.sbatch` as SLURM would run it, srun faked (see above)."""
    bin_dir = Path(workdir) / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**ENV, **slurm_env(port), "SLURM_JOB_NAME": "test", "PATH": f"{bin_dir}:{ENV['PATH']}",
           "CONFIG": str(ROOT / "configs" / "tiny.py"), "WORKDIR": str(workdir),
           "PYTHON": sys.executable}
    overrides = [a for a in RUN if a.startswith("--config.")]  # the script adds --config itself
    return subprocess.Popen(["bash", str(ROOT / "experiments" / "slurm" / "train.sbatch"),
                             *overrides], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def worker(workdir, how: str, rank: int, port: int, *extra: str):
    """Process `rank` of 2, told by flags or (as srun would) by SLURM's environment."""
    if how == "flags":
        return gigajax_train(workdir, *extra, "--coordinator", f"127.0.0.1:{port}",
                             "--num-processes", "2", "--process-id", str(rank))
    return gigajax_train(workdir, *extra, env={**slurm_env(port), "SLURM_PROCID": str(rank),
                                       "SLURM_LOCALID": str(rank)})


# a zigzag ring over all 8 devices: each process holds half of every sequence
SEQUENCE_ACROSS_PROCESSES = ("--config.mesh.data=1", "--config.mesh.fsdp=1",
                             "--config.mesh.tensor=1", "--config.mesh.sequence=8")


@pytest.mark.slow(seconds=50)
@pytest.mark.parametrize("how", ["flags", "slurm", "sbatch", "sequence"])
def test_two_processes_match_one(how, tmp_path, one_process_losses):
    port = free_port()
    if how == "sbatch":
        workers = [sbatch(tmp_path, port)]  # one srun: both tasks' output, interleaved
    elif how == "sequence":
        workers = [worker(tmp_path, "flags", rank, port, *SEQUENCE_ACROSS_PROCESSES)
                   for rank in range(2)]
    else:
        workers = [worker(tmp_path, how, rank, port) for rank in range(2)]
    outputs = [finish(w) for w in workers]
    assert "8 cpu devices in 2 process(es)" in outputs[0]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3  # one writer
    assert (tmp_path / "checkpoints" / "3").is_dir()  # a multi-process Orbax save
    # each process hashed the files it wrote (process 0 also the shared ones)
    record = json.loads((tmp_path / "checkpoints" / "3" / "checksums.json").read_text())
    hashed_by = {name: entry["process"] for name, entry in record["files"].items()}
    assert {p for name, p in hashed_by.items() if "process_1" in name} == {1}, hashed_by
    assert {p for name, p in hashed_by.items() if "process_1" not in name} == {0}, hashed_by
    two = losses(tmp_path)
    assert len(two) == len(one_process_losses) == 4  # 3 steps, then eval (each process its rows)
    for a, b in zip(two, one_process_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.slow(seconds=90)
def test_sigterm_to_one_process_saves_on_all_and_resumes(tmp_path):
    """Preemption of a multi-process run: SIGTERM reaches one process; all save the same step."""
    steady = ["--config.train.checkpoint_every=100000", "--config.optim.schedule=constant"]
    port = free_port()
    workers = [worker(tmp_path, "flags", rank, port, *steady, "--config.train.steps=100000")
               for rank in range(2)]
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")
                                          >= 3):
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGTERM)  # the other process is not told
    outputs = [workers[0].communicate(timeout=300)[0], workers[1].communicate(timeout=300)[0]]
    assert [w.returncode for w in workers] == [130, 130], outputs
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3, saved
    assert f"saved step {saved[0]} on all 2 processes" in outputs[0]
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == saved[0]

    steps = f"--config.train.steps={saved[0] + 2}"
    resumed = [worker(tmp_path, "flags", rank, port, *steady, steps) for rank in range(2)]
    out = [finish(w) for w in resumed][0]
    assert f"resuming at step {saved[0]}" in out
    one = tmp_path / "one"
    finish(gigajax_train(one, *steady, steps))
    assert [r["step"] for r in map(json.loads, metrics.read_text().splitlines())] == list(
        range(1, saved[0] + 3))
    for a, b in zip(losses(tmp_path), losses(one), strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
