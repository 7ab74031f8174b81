"""The public Python API (`import gigajax`): what a notebook user does, end to end."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from support import subprocess_env

import gigajax
from gigajax.errors import ConfigError, GigajaxError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
# 8 devices (conftest), a few steps of a smaller tiny model
QUICK = {"train.steps": 4, "train.log_every": 2, "train.eval_every": 4, "train.eval_batches": 1,
         "train.checkpoint_every": 4, "mesh.data": -1, "data.max_bytes": 200_000,
         "data.seq_len": 64, "model.max_seq_len": 128, "attention.block_q": 64,
         "attention.block_kv": 64, "model.n_layers": 2}


def test_the_package_exports_the_api():
    for name in ("load_config", "validate", "simulate_cpu_devices", "train", "load", "plan",
                 "advise", "check_layouts", "build_model", "Decoder", "Run", "LM",
                 "GigajaxError"):
        assert hasattr(gigajax, name), name


def test_load_config_takes_a_file_a_dict_strings_and_keywords():
    cfg = gigajax.load_config(TINY, "train.steps=20", "--config.optim.lr=1e-3",
                              **{"model.remat": "full", "train.seed": 3})
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.remat, cfg.train.seed) == (
        20, 1e-3, "full", 3)
    from_dict = gigajax.load_config({"train": {"steps": 7}, "model": {"d_model": 128}})
    assert from_dict.train.steps == 7 and from_dict.model.d_model == 128
    assert from_dict.optim.name == "adamw"  # the rest are defaults
    saved = gigajax.load_config(json.loads(cfg.to_json_best_effort()))
    assert saved.to_dict() == cfg.to_dict()  # a saved config.json loads back as it was


@pytest.mark.parametrize("source,overrides,match", [
    ({"train": {"stepz": 3}}, {}, "Unknown config field 'train.stepz'"),
    ({"trian": {}}, {}, "Unknown config field 'trian'"),
    (TINY, {"train.steps": "many"}, r"train\.steps"),
    (TINY, {"model.n_kv_heads": 3}, r"model\.n_kv_heads"),
    (TINY, {"mesh.tensor": 3}, r"model\.n_heads"),  # the layout is checked too
    (TINY, {"model": 3}, "is a section"),
])
def test_load_config_errors_name_the_field(source, overrides, match):
    with pytest.raises(ConfigError, match=match):
        gigajax.load_config(source, **overrides)


def test_a_warmup_longer_than_a_short_try_is_accepted():
    cfg = gigajax.load_config(TINY, **{"train.steps": 20})  # tiny warms up over 30
    assert cfg.optim.warmup_steps == 30


def test_decoder_builds_with_and_without_a_mesh():
    from gigajax.parallel.mesh import make_mesh

    cfg = gigajax.load_config(TINY, **{"mesh.data": 2, "mesh.tensor": 4})
    mesh = make_mesh(cfg.mesh, attention_cfg=cfg.attention)
    plain = gigajax.Decoder.from_config(cfg)  # no mesh, no context manager
    with jax.set_mesh(mesh):
        gigajax.Decoder.from_config(cfg)  # under a mesh too (replicated)
    sharded = gigajax.build_model(cfg, mesh=mesh)  # each parameter in the layout's sharding
    assert sharded.blocks.attn.wq[...].sharding.spec[2] == "tensor"  # [L, D, H, E]: heads
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    want = np.asarray(plain(tokens))
    np.testing.assert_array_equal(np.asarray(gigajax.build_model(cfg)(tokens)), want)  # seed 0
    with jax.set_mesh(mesh):
        got = jax.jit(lambda m, x: m(x))(sharded, tokens)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_train_load_generate_and_train_again_in_one_process(tmp_path):
    """A notebook's session: train, read the metrics, load, generate, resume further; the SIGTERM
    handler is the caller's again after each run."""
    handler = signal.getsignal(signal.SIGTERM)
    cfg = gigajax.load_config(TINY, **QUICK)
    run = gigajax.train(cfg, tmp_path, progress=False)
    assert run.step == 4 and run.start_step == 0 and run.workdir == tmp_path
    assert [m["step"] for m in run.metrics] == [2, 4] and "eval_loss" in run.metrics[-1]
    assert int(run.state["step"]) == 4
    assert signal.getsignal(signal.SIGTERM) is handler
    lm = gigajax.load(tmp_path)
    assert lm.step == 4 and lm.config.model.n_layers == 2
    text = lm.generate("def ", 8)
    assert isinstance(text, str) and len(lm.tokenizer.encode(text)) <= 8
    ids = lm.generate(lm.encode("def "), 8, stop_at_eos=False)
    assert ids.shape == (8,) and ids.dtype == np.int32
    logits = lm.logits("import os")
    assert logits.shape == (9, cfg.model.vocab_size) and np.isfinite(logits).all()
    assert lm.logits(np.zeros((2, 5), np.int32)).shape == (2, 5, cfg.model.vocab_size)
    assert 0 < lm.loss("import os\n") < 10
    more = gigajax.train(gigajax.load_config(TINY, **{**QUICK, "train.steps": 6}), tmp_path,
                         progress=False)
    assert more.start_step == 4 and more.step == 6
    assert [m["step"] for m in more.metrics] == [2, 4, 6]
    assert signal.getsignal(signal.SIGTERM) is handler


def test_lm_refuses_what_it_cannot_do(tmp_path):
    gigajax.train(gigajax.load_config(TINY, **{**QUICK, "train.steps": 1}), tmp_path,
                  progress=False)
    lm = gigajax.load(tmp_path)
    with pytest.raises(GigajaxError, match="strategy 'nucleus': choose one of"):
        lm.generate("x", 4, strategy="nucleus")
    with pytest.raises(GigajaxError, match="model.max_seq_len=128"):
        lm.generate("x" * 120, 16)
    with pytest.raises(GigajaxError, match=r"\[0, 384\)"):
        lm.logits([1, 2, 999])
    with pytest.raises(GigajaxError, match="does not exist"):
        gigajax.load(tmp_path / "nothing")


def test_plan_and_advise_return_data():
    cfg = gigajax.load_config(ROOT / "configs" / "llama_30b_128k.py")
    result = gigajax.plan(cfg)  # the mesh's own 64 devices
    assert result["mesh"]["tensor"] == 4 and result["predicted_bytes_per_device"] > 2**30
    advice = gigajax.advise(cfg, max_memory="80GB")
    current = [row for row in advice["layouts"] if row["current"]]
    assert len(current) == 1 and advice["current_rank"] >= 1
    assert advice["layouts"][advice["current_rank"] - 1] is current[0]
    assert "--config.mesh.fsdp=16" in current[0]["flags"]
    with pytest.raises(ConfigError, match="devices=0"):
        gigajax.plan(cfg, devices=0)


def test_check_layouts_reports_a_bad_layout_in_its_row_and_goes_on():
    cfg = gigajax.load_config(TINY, **{k: v for k, v in QUICK.items() if k != "mesh.data"},
                              **{"mesh.data": 2})
    rows = gigajax.check_layouts(cfg, "data=2;tensor=3;data=5", steps=1)
    assert [r["layout"] for r in rows] == ["1 device", "data=2", "tensor=3", "data=5"]
    assert rows[1]["ok"] and rows[1]["loss_rel_diff"] <= 1e-5
    assert not rows[2]["ok"] and "model.n_heads" in rows[2]["error"]
    assert not rows[3]["ok"] and "data.batch_size" in rows[3]["error"]


def _python(code: str, cheap_compile: bool = True, **env) -> subprocess.CompletedProcess:
    clean = subprocess_env(cheap_compile)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**clean, **env})


def test_simulate_cpu_devices_first_in_a_fresh_process_and_too_late_after():
    ok = _python("import gigajax, jax; print(gigajax.simulate_cpu_devices(4), "
                 "jax.device_count())")
    assert ok.returncode == 0 and ok.stdout.split() == ["4", "4"], ok.stderr
    late = _python("import gigajax, jax; jax.numpy.ones(1); gigajax.simulate_cpu_devices(4)")
    assert late.returncode == 1
    assert "already started with 1 CPU device(s) and 4 are wanted" in late.stderr
    assert "simulate_cpu_devices(4) before anything else" in late.stderr


@pytest.mark.slow(seconds=60)
def test_the_issue_s_python_session_in_a_fresh_process(tmp_path):
    """The README's Python example, as a new user runs it: 20 steps of tiny on 2 simulated
    devices, then generation from the saved run. Compiled the default way, as users do:
    20 steps of the whole tiny model run long enough to pay for it (58 CPU-seconds against
    109 with the cheap flags)."""
    code = ("import gigajax\n"
            "gigajax.simulate_cpu_devices(2)\n"
            "cfg = gigajax.load_config('configs/tiny.py', **{'train.steps': 20})\n"
            f"run = gigajax.train(cfg, {str(tmp_path)!r}, progress=False)\n"
            "print('steps', run.step, len(run.metrics))\n"
            f"print(repr(gigajax.load({str(tmp_path)!r}).generate('def ', 16)))\n")
    result = _python(code, cheap_compile=False)
    assert result.returncode == 0, result.stderr
    assert "steps 20 2" in result.stdout  # logged at steps 10 and 20
    assert "warming up over all 20 steps" in result.stderr
    assert "Metadata file does not exist" not in result.stderr


def test_without_device_count_keeps_every_other_flag():
    from gigajax.parallel.devices import without_device_count

    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    assert without_device_count(flags) == "--xla_backend_optimization_level=0"
    assert without_device_count("") == ""
