"""Checkpoints: retention, data-iterator state, restore onto other meshes, corruption fallback,
no unpickling, and the average/export tools (8 simulated CPU devices)."""

import gc
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
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
from gigajax.checkpoint.manager import CHECKSUMS, Checkpointer
from gigajax.checkpoint.params import average, export, load_params
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
    "truncated, no checksums": lambda d: ((d / CHECKSUMS).unlink(), truncate(d)),
}


# Orbax's failed restore (no checksums) leaves coroutines whose exceptions surface at gc
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
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
import os, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from pathlib import Path
import numpy as np
from jax.experimental import multihost_utils
from gigajax.checkpoint.manager import Checkpointer

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
checkpointer.close()
print("worker ok", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_on_the_fallback(tmp_path):
    """Process 1's shard of step 20 is truncated: both processes fall back to step 10 together
    (process 0 verifies, the verdict is shared), and step 20 is saved again."""
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
    assert "checkpoint 20 is unreadable (state/ocdbt.process_1/" in outputs[0]
    assert "falling back to 10" in outputs[1]


def test_init_from_starts_step_0_from_checkpoint_params_on_another_layout(run, tmp_path):
    """`train.init_from`: the params of a step directory, or of a bf16 export, placed in the
    new layout's shardings, with fresh optimizer moments and step 0; a checkpoint of another
    model size, or no checkpoint at all, is a clear error."""
    from gigajax.train.loop import initial_state

    workdir, params, _ = run
    export(workdir, tmp_path / "bf16", step=300, dtype="bfloat16")
    builder, _ = builder_for("fsdp=4,tensor=2")
    for source, want in [(workdir / "checkpoints" / "200", params[200]),
                         (tmp_path / "bf16", jax.tree.map(
                             lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
                             params[300]))]:
        notes = []
        with jax.set_mesh(builder.mesh):
            state = initial_state(builder, str(source), notes)
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
        initial_state(other, str(workdir), [])
    with pytest.raises(GigajaxError, match="train.init_from .*nope does not exist"):
        initial_state(builder, str(tmp_path / "nope"), [])
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(GigajaxError, match="train.init_from .*empty: .*holds no checkpoint"):
        initial_state(builder, str(tmp_path / "empty"), [])
