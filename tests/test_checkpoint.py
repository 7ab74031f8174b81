"""Checkpoints: retention, data-iterator state, restore onto other meshes, corruption fallback,
checkpoints without checksums, hashing spread over processes, no unpickling, and the
average/export tools (8 simulated CPU devices)."""

import gc
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from support import subprocess_env

from gigajax import cli
from gigajax.checkpoint.manager import (
    CHECKSUMS,
    Checkpointer,
    UnverifiedCheckpoint,
    share,
    verify_checksums,
    write_checksums,
    write_process_checksums,
    written_by,
)
from gigajax.checkpoint.params import average, export, load_params, read_params
from gigajax.config import load_config
from gigajax.errors import GigajaxError
from gigajax.parallel.mesh import make_mesh
from gigajax.plan.layouts import layout_config, parse_layouts
from gigajax.train.optim import make_optimizer
from gigajax.train.state import StateBuilder, layout_for

ROOT = Path(__file__).resolve().parents[1]
# the tiny model of tests/test_layouts.py: L=2, D=64, H=4, K=2, F=128, V=384
TEST_MODEL = ["--config.model.d_model=64", "--config.model.mlp_dim=128",
              "--config.model.n_layers=2", "--config.data.seq_len=64",
              "--config.data.batch_size=8", "--config.attention.block_q=32",
              "--config.attention.block_kv=32"]


def builder_for(layout: str, overrides: tuple[str, ...] = ()) -> tuple[StateBuilder, object]:
    """The train state's shapes and shardings of the tiny model under `layout` ('' = 1 device)."""
    cfg = load_config(ROOT / "configs" / "tiny.py", [*TEST_MODEL, *overrides])
    cfg = layout_config(cfg, parse_layouts(layout)[0] if layout else {})
    mesh = make_mesh(cfg.mesh, jax.devices()[:math.prod(cfg.mesh.values())])
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    return StateBuilder(cfg, mesh, layout_for(cfg, mesh), tx), cfg


def perturbed_state(builder: StateBuilder, seed: int):
    """A fresh state with every leaf moved off its init value (moments are 0 at init)."""
    state = builder.init()
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    moved = [x + (rng.integers(1, 100) if jnp.issubdtype(x.dtype, jnp.integer)
                  else rng.standard_normal(x.shape).astype(np.float32)) for x in leaves]
    return jax.device_put(jax.tree.unflatten(treedef, moved), builder.shardings)


def small_state(value: float):
    """A pytree state with an array large enough for its own data file, split over 8 devices."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jnp.arange(256 * 16, dtype=jnp.float32).reshape(256, 16) + value
    return {"step": jnp.int32(value), "params": {"w": jax.device_put(
        w, NamedSharding(mesh, PartitionSpec("x")))}}


def like(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def test_retention_keeps_the_last_k_and_every_multiple_of_m(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2, keep_every=5)
    for step in range(1, 13):
        checkpointer.save(step, {"x": jnp.full((4,), step)}, {"step": step})
    checkpointer.wait()
    assert checkpointer.all_steps() == [5, 10, 11, 12]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [5, 10, 11, 12]
    checkpointer.close()


def test_data_iterator_resumes_where_it_was_saved(tmp_path):
    def iterator():
        return iter(grain.MapDataset.range(100).shuffle(seed=0).repeat().to_iter_dataset())

    reference = iterator()
    expected = [next(reference) for _ in range(20)]
    it = iterator()
    assert [next(it) for _ in range(7)] == expected[:7]
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(7, small_state(7), {"step": 7}, data_iter=it)
    assert [next(it) for _ in range(5)] == expected[7:12]  # consumed after the save
    checkpointer.wait()
    fresh = iterator()
    state, meta, step = checkpointer.restore_latest(like(small_state(0)), data_iter=fresh)
    checkpointer.close()
    assert step == 7 and meta["step"] == 7 and int(state["step"]) == 7
    assert [next(fresh) for _ in range(13)] == expected[7:]


CROSS_MESH = [
    ("fsdp=8", "data=2,tensor=4"),
    ("data=2,tensor=4", "sequence=8"),
    ("sequence=8", "fsdp=2,tensor=4,zero_stage=1"),
    ("tensor=4,megatron_sp=1", "data=8"),
]


@pytest.mark.parametrize("source,target", CROSS_MESH)
def test_train_state_restores_onto_another_layout(tmp_path, source, target):
    """Every leaf comes back bitwise equal and in the target layout's sharding."""
    builder, _ = builder_for(source)
    with jax.set_mesh(builder.mesh):
        state = perturbed_state(builder, seed=1)
        saved = jax.device_get(state)
        checkpointer = Checkpointer(tmp_path)
        checkpointer.save(3, state, {"step": 3})
        checkpointer.wait()
    builder, _ = builder_for(target)
    with jax.set_mesh(builder.mesh):
        restored, meta, step = checkpointer.restore_latest(builder.abstract)
    checkpointer.close()
    assert step == 3 and meta == {"step": 3}
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                                   jax.tree.leaves(builder.shardings), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding == sharding


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir: Path):
    path = largest_file(step_dir / "state")
    os.truncate(path, path.stat().st_size // 2)


def flip_a_byte(step_dir: Path):
    """A flipped bit inside a zstd chunk: Orbax alone restores wrong values without an error."""
    path = largest_file(step_dir / "state")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated file": truncate,
    "deleted file": lambda d: largest_file(d / "state").unlink(),
    "deleted state directory": lambda d: shutil.rmtree(d / "state"),
    "deleted metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "flipped byte": flip_a_byte,
    "truncated meta": lambda d: os.truncate(d / "meta" / "metadata", 3),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_checkpoint_falls_back_to_the_one_before(tmp_path, corrupt):
    checkpointer = Checkpointer(tmp_path)
    for step in (10, 20):
        checkpointer.save(step, small_state(step), {"step": step})
    checkpointer.wait()
    corrupt(tmp_path / "20")
    messages = []
    checkpointer = Checkpointer(tmp_path, log=messages.append)  # a restarted run
    state, meta, step = checkpointer.restore_latest(like(small_state(0)))
    assert step == 10 and meta == {"step": 10}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(small_state(10)["params"]["w"]))
    assert len(messages) == 1 and "checkpoint 20 is unreadable" in messages[0]
    assert "falling back to 10" in messages[0]
    assert checkpointer.all_steps() == [10]
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["20"]
    # the run goes on from step 10 and saves step 20 again
    assert checkpointer.save(20, small_state(21), {"step": 20})
    checkpointer.wait()
    state, _, step = checkpointer.restore_latest(like(small_state(0)))
    checkpointer.close()
    assert step == 20 and int(state["step"]) == 21
    gc.collect()


def state_with_moments(value: int):
    """Params and an optimizer moment; the moment is random (incompressible) and the largest
    array, so the largest data file holds it."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    mu = np.random.default_rng(value).standard_normal((256, 64)).astype(np.float32)
    return {"step": jnp.int32(value),
            "params": {"w": jax.device_put(jnp.full((64, 16), value, jnp.float32), sharding)},
            "opt_state": {"mu": jax.device_put(mu, sharding)}}


def unverified_with_a_flipped_byte(directory: Path) -> None:
    """Checkpoints 10 and 20; step 20 loses its checksums.json and gets a byte flipped in the
    optimizer state."""
    checkpointer = Checkpointer(directory)
    for step in (10, 20):
        checkpointer.save(step, state_with_moments(step), {"step": step})
    checkpointer.wait()
    checkpointer.close()
    (directory / "20" / CHECKSUMS).unlink()
    flip_a_byte(directory / "20")


def test_a_checkpoint_without_checksums_is_refused_and_kept(tmp_path):
    """require_checksums (the default): refused with a message naming the step and the way
    out; nothing is moved aside or restored from an older step."""
    unverified_with_a_flipped_byte(tmp_path)
    messages = []
    checkpointer = Checkpointer(tmp_path, log=messages.append)
    with pytest.raises(UnverifiedCheckpoint, match=r"checkpoint 20 in .* has no checksums\.json"
                       r".*Set checkpoint\.require_checksums=false to restore it anyway, with a "
                       r"warning, or move .*/20 elsewhere"):
        checkpointer.restore_latest(like(state_with_moments(0)))
    checkpointer.close()
    assert messages == [] and checkpointer.all_steps() == [10, 20]
    assert not (tmp_path / "corrupt").exists()


def test_without_require_checksums_it_restores_with_a_warning(tmp_path):
    """require_checksums=False: step 20 restores, a warning names it, and the flipped byte
    comes back as a silently wrong moment (why the default refuses)."""
    unverified_with_a_flipped_byte(tmp_path)
    messages = []
    checkpointer = Checkpointer(tmp_path, log=messages.append, require_checksums=False)
    state, meta, step = checkpointer.restore_latest(like(state_with_moments(0)))
    checkpointer.close()
    assert step == 20 and meta == {"step": 20}
    assert len(messages) == 1 and messages[0].startswith(
        f"warning: checkpoint 20 in {tmp_path} has no checksums.json: restoring it without "
        "verifying its files (checkpoint.require_checksums=false)")
    saved = state_with_moments(20)
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(saved["params"]["w"]))
    assert not np.array_equal(np.asarray(state["opt_state"]["mu"]),
                              np.asarray(saved["opt_state"]["mu"]))


# Orbax's failed restore (no checksums) leaves coroutines whose exceptions surface at gc
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_without_checksums_a_checkpoint_that_fails_to_restore_falls_back(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    for step in (10, 20):
        checkpointer.save(step, small_state(step), {"step": step})
    checkpointer.wait()
    (tmp_path / "20" / CHECKSUMS).unlink()
    truncate(tmp_path / "20")
    messages = []
    checkpointer = Checkpointer(tmp_path, log=messages.append, require_checksums=False)
    _, meta, step = checkpointer.restore_latest(like(small_state(0)))
    checkpointer.close()
    assert step == 10 and meta == {"step": 10} and len(messages) == 2
    assert messages[0].startswith("warning: checkpoint 20 in ")
    assert "checkpoint 20 is unreadable" in messages[1] and "falling back to 10" in messages[1]
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["20"]
    gc.collect()


def test_a_checkpoint_records_every_file_and_restores_without_a_message(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(10, small_state(10), {"step": 10})
    checkpointer.wait()
    record = json.loads((tmp_path / "10" / CHECKSUMS).read_text())["files"]
    on_disk = {str(p.relative_to(tmp_path / "10")) for p in (tmp_path / "10").rglob("*")
               if p.is_file() and p.name not in (CHECKSUMS, "commit_success.txt",
                                                 "_CHECKPOINT_METADATA")}
    assert set(record) == on_disk and {e["process"] for e in record.values()} == {0}
    messages = []
    state, _, step = Checkpointer(tmp_path, log=messages.append).restore_latest(
        like(small_state(0)))
    assert step == 10 and int(state["step"]) == 10 and messages == []


def test_files_are_hashed_by_the_process_that_wrote_them(tmp_path):
    """A two-process save's layout: each process records its own files (named as they will
    be once Orbax renames `state.orbax-checkpoint-tmp/`), process 0 merges, hashes the shared
    files and any file changed since its process hashed it, and removes the records."""
    files = {"state.orbax-checkpoint-tmp/ocdbt.process_1/d/ab": 3000,
             "state.orbax-checkpoint-tmp/ocdbt.process_1/manifest.ocdbt": 10,
             "state.orbax-checkpoint-tmp/array_metadatas/process_1": 20,
             "data.orbax-checkpoint-tmp/process_1-of-2.json": 5,
             "state.orbax-checkpoint-tmp/ocdbt.process_0/d/cd": 3000,
             "state.orbax-checkpoint-tmp/_METADATA": 40, "meta.orbax-checkpoint-tmp/metadata": 7}
    rng = np.random.default_rng(0)
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(rng.bytes(size))
    assert [written_by(n) for n in files] == [1, 1, 1, 1, 0, None, None]
    assert write_process_checksums(tmp_path, 1) == 4
    assert write_process_checksums(tmp_path, 0) == 1
    for item in ("state", "data", "meta"):  # what Orbax's finalization does
        (tmp_path / f"{item}.orbax-checkpoint-tmp").rename(tmp_path / item)
    changed = tmp_path / "state" / "array_metadatas" / "process_1"
    time.sleep(0.01)
    changed.write_bytes(rng.bytes(20))  # same size, rewritten after process 1 hashed it
    write_checksums(tmp_path)
    record = json.loads((tmp_path / CHECKSUMS).read_text())["files"]
    assert {n: e["process"] for n, e in record.items()} == {
        "state/ocdbt.process_1/d/ab": 1, "state/ocdbt.process_1/manifest.ocdbt": 1,
        "state/array_metadatas/process_1": 0, "data/process_1-of-2.json": 1,
        "state/ocdbt.process_0/d/cd": 0, "state/_METADATA": 0, "meta/metadata": 0}
    assert not list(tmp_path.glob("checksums.process_*"))
    assert all(verify_checksums(tmp_path, part, 3) is None for part in range(3))
    flip = tmp_path / "state" / "ocdbt.process_1" / "d" / "ab"
    flip.write_bytes(b"x" + flip.read_bytes()[1:])
    found = [verify_checksums(tmp_path, part, 3) for part in range(3)]
    assert found.count(None) == 2 and "state/ocdbt.process_1/d/ab has a different sha256" in (
        [f for f in found if f][0])


def test_verification_shares_split_the_files_by_bytes():
    files = {f"f{i}": {"size": size} for i, size in enumerate([900, 500, 400, 300, 100, 1, 1])}
    parts = [share(files, part, 3) for part in range(3)]
    assert sorted(sum(parts, [])) == sorted(files)  # each file in exactly one share
    assert [sum(files[n]["size"] for n in p) for p in parts] == [900, 602, 700]


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    for step in (10, 20):
        checkpointer.save(step, small_state(step), {"step": step})
    checkpointer.wait()
    truncate(tmp_path / "10")
    shutil.rmtree(tmp_path / "20" / "state")
    messages = []
    checkpointer = Checkpointer(tmp_path, log=messages.append)
    with pytest.raises(GigajaxError, match=r"every checkpoint .* unreadable.*20 \(.*10 \("):
        checkpointer.restore_latest(like(small_state(0)))
    assert len(messages) == 2 and checkpointer.all_steps() == []
    assert checkpointer.restore_latest(like(small_state(0))) is None  # a fresh start
    checkpointer.close()


def test_a_different_model_is_an_error_not_corruption(tmp_path):
    """Restoring into another tree (a changed config) says so and moves nothing aside."""
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(10, small_state(10), {"step": 10})
    checkpointer.wait()
    other = like(small_state(0))
    other["params"]["w"] = jax.ShapeDtypeStruct((128, 16), jnp.float32,
                                                sharding=other["params"]["w"].sharding)
    with pytest.raises(GigajaxError, match=r"params/w has shape \(256, 16\) in the checkpoint"):
        checkpointer.restore_latest(other)
    checkpointer.close()
    assert checkpointer.all_steps() == [10] and not (tmp_path / "corrupt").exists()


def test_restore_never_unpickles(tmp_path, monkeypatch):
    it = iter(grain.MapDataset.range(100).shuffle(seed=0).repeat().to_iter_dataset())
    next(it)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, small_state(1), {"step": 1}, data_iter=it)
    checkpointer.wait()
    expected = next(it)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint restore unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    fresh = iter(grain.MapDataset.range(100).shuffle(seed=0).repeat().to_iter_dataset())
    state, _, step = Checkpointer(tmp_path).restore_latest(like(small_state(0)), data_iter=fresh)
    assert step == 1 and int(state["step"]) == 1 and next(fresh) == expected


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with checkpoints 100, 200, 300 of the tiny model (1 device), known params:
    multiples of 1/64, so their fp32 sums are exact."""
    workdir = tmp_path_factory.mktemp("run")
    builder, config = builder_for("")
    state = builder.init()
    checkpointer = Checkpointer(workdir / "checkpoints")
    rng = np.random.default_rng(0)
    params = {}
    for step in (100, 200, 300):
        values = jax.tree.map(lambda x: rng.integers(-512, 512, x.shape).astype(np.float32) / 64,
                              jax.device_get(state["params"]))
        state = {**state, "params": jax.device_put(values, builder.shardings["params"])}
        meta = {"config": json.loads(config.to_json_best_effort()), "step": step}
        checkpointer.save(step, state, meta)
        checkpointer.wait()
        params[step] = nnx.to_pure_dict(values)
    checkpointer.close()
    return workdir, params, config


def test_average_is_the_exact_mean(run, tmp_path, capsys):
    workdir, params, config = run
    average(workdir, [100, 200, 300], tmp_path / "avg")
    got, meta = load_params(tmp_path / "avg")
    want = jax.tree.map(lambda a, b, c: (a.astype(np.float64) + b + c) / 3,
                        params[100], params[200], params[300])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=0)  # one fp32 rounding of an exact sum
    assert meta["source_steps"] == [100, 200, 300] and meta["config"] == json.loads(
        config.to_json_best_effort())
    assert meta["num_params"] == sum(x.size for x in jax.tree.leaves(want))
    assert "wrote" in capsys.readouterr().out


def test_ckpt_cli_exit_codes(run, tmp_path, capsys):
    workdir = run[0]
    out = tmp_path / "avg"
    assert cli.main(["ckpt", "average", "--workdir", str(workdir), "--steps", "100,300",
                     "--out", str(out)]) == 0
    assert load_params(out)[1]["source_steps"] == [100, 300]
    assert cli.main(["ckpt", "export", "--workdir", str(workdir), "--step", "200",
                     "--dtype", "bfloat16", "--out", str(tmp_path / "export")]) == 0
    assert load_params(tmp_path / "export")[1]["source_steps"] == [200]
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["ckpt", "average", "--workdir", str(workdir), "--steps", "100,250",
                     "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint of step 250" in (err := capsys.readouterr().err)
    assert "available: 100, 200, 300" in err
    assert cli.main(["ckpt", "average", "--workdir", str(workdir), "--steps", "100",
                     "--out", str(tmp_path / "x")]) == 2
    assert "at least 2 steps" in capsys.readouterr().err
    assert cli.main(["ckpt", "average", "--workdir", str(workdir), "--steps", "100,200",
                     "--out", str(out)]) == 2  # --out exists
    assert cli.main(["ckpt", "export", "--workdir", str(workdir), "--out", str(tmp_path / "y"),
                     "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


def test_average_names_a_parameter_that_differs(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=10)
    params = {**run[1][300], "embed": np.zeros((8, 64), np.float32)}  # V=384 elsewhere
    checkpointer.save(400, {"params": params}, {})
    checkpointer.wait()
    checkpointer.close()
    with pytest.raises(GigajaxError, match=r"checkpoint 400 does not match checkpoint 100: "
                                           r"embed has shape \(8, 64\) in the checkpoint 400 but "
                                           r"\(384, 64\) is wanted"):
        average(workdir, [100, 400], tmp_path / "avg")


def test_params_tools_refuse_a_checkpoint_without_checksums(run, tmp_path):
    """export, average and read_params (train.init_from, generate, eval) apply the same rule:
    refused, naming the step, unless require_checksums=False, which warns through `log`."""
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    (workdir / "checkpoints" / "300" / CHECKSUMS).unlink()
    with pytest.raises(UnverifiedCheckpoint, match=r"checkpoint 300 in .* has no checksums\.json"
                       r".*Set checkpoint\.require_checksums=false to load it anyway"):
        export(workdir, tmp_path / "out")
    with pytest.raises(UnverifiedCheckpoint, match=r"checkpoint 300 .*--allow-unverified"):
        average(workdir, [100, 300], tmp_path / "avg", allow_hint="Pass --allow-unverified.")
    with pytest.raises(UnverifiedCheckpoint, match=r"^train\.init_from .*: checkpoint 300 in"):
        read_params(workdir, flag="train.init_from")
    with pytest.raises(UnverifiedCheckpoint, match=r"checkpoint 300 \(.*/300\) has no"):
        read_params(workdir / "checkpoints" / "300")
    assert not (tmp_path / "out").exists() and not (tmp_path / "avg").exists()
    warnings = []
    export(workdir, tmp_path / "out", require_checksums=False, log=warnings.append)
    found = read_params(workdir, require_checksums=False, log=warnings.append)
    assert found.step == 300 and len(warnings) == 2
    assert all(w.startswith("warning: checkpoint 300 in ") and "has no checksums.json" in w
               for w in warnings)
    np.testing.assert_array_equal(load_params(tmp_path / "out")[0]["embed"], run[1][300]["embed"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trips(run, tmp_path, dtype):
    workdir, params, config = run
    export(workdir, tmp_path / "out", dtype=dtype)  # the latest step: 300
    got, meta = load_params(tmp_path / "out")
    want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                           else np.float32), params[300])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    assert meta["source_steps"] == [300] and meta["dtype"] == dtype
    assert meta["config"]["model"]["d_model"] == 64


WORKER = """
import json, os, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from pathlib import Path
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from gigajax.checkpoint.manager import Checkpointer

me, out = jax.process_index(), Path(sys.argv[3])
mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
def values(value):
    return np.arange(256 * 16, dtype=np.float32).reshape(256, 16) + value
def state(value):
    w = values(value)
    return {"w": jax.make_array_from_callback(w.shape, sharding, lambda index: w[index])}
checkpointer = Checkpointer(sys.argv[3])
for step in (10, 20):
    checkpointer.save(step, state(step), {"step": step})
checkpointer.wait()
multihost_utils.sync_global_devices("saved")
if jax.process_index() == 0:  # the data file that process 1 wrote
    data = Path(sys.argv[3], "20", "state", "ocdbt.process_1", "d")
    os.truncate(max(data.iterdir(), key=lambda p: p.stat().st_size), 10)
multihost_utils.sync_global_devices("corrupted")
checkpointer = Checkpointer(sys.argv[3], log=lambda message: print(message, flush=True))
like = {"w": jax.ShapeDtypeStruct((256, 16), np.float32, sharding=sharding)}
restored, meta, step = checkpointer.restore_latest(like)
w = multihost_utils.process_allgather(restored["w"], tiled=True)
assert step == 10 and np.array_equal(w, values(10))
assert checkpointer.save(20, state(21), {"step": 20})
checkpointer.wait()
assert checkpointer.restore_latest(like)[2] == 20
# each process hashed the files it wrote; process 0 the shared ones, and merged the records
if me == 0:
    files = json.loads((out / "20" / "checksums.json").read_text())["files"]
    assert {e["process"] for n, e in files.items() if "process_1" in n} == {1}, files
    assert {e["process"] for n, e in files.items() if "process_1" not in n} == {0}, files
    assert not list((out / "20").glob("checksums.process_*"))

def outcome():
    try:
        checkpointer.restore_latest(like)
    except Exception as error:
        return f"{type(error).__name__}: {error}"

# a restore that fails on process 1 only stops both, with process 1's message
real = ocp.CompositeCheckpointHandler.restore
if me == 1:
    def out_of_memory(*args, **kwargs):
        raise MemoryError("injected on process 1")
    ocp.CompositeCheckpointHandler.restore = out_of_memory
print("one-sided:", outcome(), flush=True)
ocp.CompositeCheckpointHandler.restore = real
multihost_utils.sync_global_devices("failed")
if me == 0:
    (out / "20" / "checksums.json").unlink()
multihost_utils.sync_global_devices("unverified")
print("unverified:", outcome(), flush=True)
assert checkpointer.all_steps() == [10, 20]  # neither failure moved anything aside
checkpointer.close()
print("worker ok", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hash_verify_and_fail_together(tmp_path):
    """Two processes: process 1's shard of step 20 is truncated, both fall back to step 10
    together (each verifies a share, the verdict is shared), and step 20 is saved again, each
    process hashing its own files. A restore failing on process 1 alone, and a checkpoint
    without checksums, stop both processes with the message (no hang)."""
    port = free_port()
    env = subprocess_env()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(tmp_path)],
                                cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for i in range(2)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:  # a failed peer can leave the other one waiting
            worker.kill()
            outputs.append(worker.communicate()[0])
    for worker, out in zip(workers, outputs, strict=True):
        assert worker.returncode == 0 and "worker ok" in out, out
    for out in outputs:
        assert "checkpoint 20 is unreadable (state/ocdbt.process_1/" in out
        assert "falling back to 10" in out
        assert "unverified: UnverifiedCheckpoint: checkpoint 20 in " in out
    assert "one-sided: RuntimeError: restoring checkpoint 20 in " in outputs[0]
    assert "MemoryError: injected on process 1 (on process 1)" in outputs[0]
    assert "one-sided: MemoryError: injected on process 1" in outputs[1]


def test_init_from_starts_step_0_from_checkpoint_params_on_another_layout(run, tmp_path):
    """`train.init_from`: the params of a step directory, or of a bf16 export, placed in the
    new layout's shardings, with fresh optimizer moments and step 0; a checkpoint of another
    model size, or no checkpoint at all, is a clear error."""
    from gigajax.train.loop import initial_state, read_init_from

    def start(builder, init_from: str, notes: list[str]):
        return initial_state(builder, read_init_from(init_from, notes), init_from)

    workdir, params, _ = run
    export(workdir, tmp_path / "bf16", step=300, dtype="bfloat16")
    builder, _ = builder_for("fsdp=4,tensor=2")
    for source, want in [(workdir / "checkpoints" / "200", params[200]),
                         (tmp_path / "bf16", jax.tree.map(
                             lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
                             params[300]))]:
        notes = []
        with jax.set_mesh(builder.mesh):
            state = start(builder, str(source), notes)
        assert int(state["step"]) == 0 and int(state["skipped"]) == 0
        got = nnx.to_pure_dict(state["params"])
        for g, w, sharding in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                                  jax.tree.leaves(builder.shardings["params"]), strict=True):
            assert g.dtype == np.float32 and g.sharding == sharding
            np.testing.assert_array_equal(np.asarray(g), w)
        assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state["opt_state"])
                   if m.ndim)  # Adam moments start at zero
        assert len(notes) == 1 and str(source) in notes[0]
        assert ("(step 200)" in notes[0]) == (source.name == "200")
    other, _ = builder_for("", ("--config.model.d_model=32",))
    with pytest.raises(GigajaxError, match="do not fit this config's model: .* has shape"):
        start(other, str(workdir), [])
    with pytest.raises(GigajaxError, match="train.init_from .*nope does not exist"):
        start(builder, str(tmp_path / "nope"), [])
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(GigajaxError, match="train.init_from .*empty: .*holds no checkpoint"):
        start(builder, str(tmp_path / "empty"), [])
