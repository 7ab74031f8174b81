"""Hugging Face import and export: logits equal to transformers' own (fp32, 1e-4 absolute) on the
committed fixtures (tests/fixtures/make_hf_fixtures.py made them with transformers: each family
and RoPE scaling, Mixtral and Qwen3-MoE, 64 tokens against an original context of 32), on one
device and under a ring and a Ulysses layout; export is the identity on every tensor; bad input
is a one-line error. tests/test_hf_moe.py has the mixtures of experts' own tests.

The fixtures' weights are sharp (logit std 2.5-3): the fixture script checks that dropping any
feature a fixture covers moves its logits by more than 1e-2, and a control here proves that a
wrong tensor mapping fails the 1e-4 test.
"""

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file
from support import subprocess_env

import gigajax
from gigajax.checkpoint import convert, hf
from gigajax.checkpoint.params import read_params
from gigajax.config import ModelConfig
from gigajax.config.hf import from_hf_config
from gigajax.errors import ConfigError, GigajaxError
from gigajax.eval.logits import logits_under_layout
from gigajax.parallel.mesh import make_mesh
from gigajax.train.state import StateBuilder, layout_for

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
NAMES = sorted(json.loads((FIXTURES / "fixtures.json").read_text())["fixtures"])
LOGIT_ATOL = 1e-4  # fp32
FP32 = {"model.dtype": "float32", "attention.block_q": 16, "attention.block_kv": 16}
LAYOUTS = {"one device": {},
           "zigzag ring over 4": {"mesh.sequence": 4, "attention.layout": "zigzag"},
           "ulysses over 2": {"mesh.sequence": 2, "attention.sp_impl": "ulysses"}}


def reference(name: str) -> tuple[np.ndarray, np.ndarray]:
    ref = np.load(FIXTURES / name / "reference.npz")
    return ref["input_ids"].astype(np.int32), ref["logits"]


def hf_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_imported_logits_equal_transformers_on_one_device(name):
    tokens, expected = reference(name)
    lm = gigajax.load(FIXTURES / name, "model.dtype=float32")
    assert np.abs(lm.logits(tokens) - expected).max() <= LOGIT_ATOL


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "one device"])
@pytest.mark.parametrize("name", ["llama_yarn", "llama3", "llama_dynamic", "mistral", "qwen2",
                                  "qwen3", "llama32_tied"])
def test_imported_logits_equal_transformers_under_sequence_parallel_layouts(name, layout):
    """Each scaling, the sliding window, biases, q/k norms and tied embeddings, streamed into
    the layout's shardings, at positions 32..63 beyond the original context as well."""
    tokens, expected = reference(name)
    logits = logits_under_layout(FIXTURES / name, tokens, {**FP32, **LAYOUTS[layout]})
    assert np.abs(logits - expected).max() <= LOGIT_ATOL
    assert np.abs(logits[:, 32:] - expected[:, 32:]).max() <= LOGIT_ATOL


def swapped_table(table, a: tuple[str, ...], b: tuple[str, ...]):
    """`table` with the HF names of our parameters `a` and `b` exchanged (a wrong mapping)."""

    def swapped(cfg):
        rows = table(cfg)
        names = {r.ours: r.hf for r in rows}
        return [dataclasses.replace(r, hf=names[b] if r.ours == a else names[a]
                                    if r.ours == b else r.hf) for r in rows]

    return swapped


def test_a_wrong_tensor_mapping_fails_the_parity_test(monkeypatch):
    """Control: the same test with k and v swapped (same shapes) is far outside tolerance."""
    tokens, expected = reference("llama")
    monkeypatch.setattr(hf, "tensor_table", swapped_table(
        hf.tensor_table, ("blocks", "attn", "wk"), ("blocks", "attn", "wv")))
    lm = gigajax.load(FIXTURES / "llama", "model.dtype=float32")
    assert np.abs(lm.logits(tokens) - expected).max() > 1e-2


def test_a_wrong_rope_scaling_fails_the_parity_test():
    """Control: the YaRN fixture run with plain RoPE (or with the factor off) does not match."""
    tokens, expected = reference("llama_yarn")
    for overrides in (["model.rope_scaling.type=none", "model.rope_scaling.factor=1.0",
                       "model.rope_scaling.original_max_seq_len=0"],
                      ["model.rope_scaling.factor=2.0"]):
        lm = gigajax.load(FIXTURES / "llama_yarn", "model.dtype=float32", *overrides)
        assert np.abs(lm.logits(tokens) - expected).max() > 1e-2


@pytest.mark.parametrize("name", ["llama_sharded", "qwen2", "qwen3", "llama32_tied",
                                  "llama_yarn_notruncate", "llama_legacy_spelling", "mistral",
                                  "mixtral", "qwen3_moe"])
def test_import_then_export_is_the_identity_on_every_tensor(name, tmp_path):
    converted, exported = tmp_path / "gigajax", tmp_path / "hf"
    gigajax.from_hf(FIXTURES / name, converted)
    gigajax.to_hf(converted, exported, dtype="float32", max_shard_size="100KB")
    source, written = safetensors_of(FIXTURES / name), safetensors_of(exported)
    assert sorted(written) == sorted(source)
    for key, value in source.items():
        assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key
    assert (exported / "tokenizer.json").read_bytes() == (
        FIXTURES / name / "tokenizer.json").read_bytes()
    index = json.loads((exported / hf.INDEX).read_text())  # 100KB shards: several files
    assert len(set(index["weight_map"].values())) > 1
    # the exported config.json reads back as the same gigajax model
    again = from_hf_config(json.loads((exported / "config.json").read_text())).model.to_dict()
    assert again == from_hf_config(hf_config(name)).model.to_dict()


def test_an_hf_directory_exports_to_itself(tmp_path):
    """to_hf reads an HF directory lazily, layer by layer, and writes the same tensors."""
    gigajax.to_hf(FIXTURES / "llama_sharded", tmp_path / "hf", dtype="float32")
    source, written = safetensors_of(FIXTURES / "llama_sharded"), safetensors_of(tmp_path / "hf")
    assert sorted(written) == sorted(source)
    assert all(np.array_equal(written[k], v) for k, v in source.items())
    assert not (tmp_path / "hf" / hf.INDEX).exists()  # 5GB shards: one file


def safetensors_of(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def test_converted_checkpoint_is_a_config_a_load_and_an_init_from(tmp_path):
    converted = tmp_path / "gigajax"
    written = gigajax.from_hf(FIXTURES / "qwen2", converted)
    assert written["num_params"] == sum(v.size for v in safetensors_of(FIXTURES / "qwen2")
                                        .values())
    tokens, expected = reference("qwen2")
    assert np.abs(gigajax.load(converted).logits(tokens) - expected).max() <= LOGIT_ATOL
    cfg = gigajax.load_config(converted)  # --config DIR
    assert cfg.model.qkv_bias and cfg.model.rope_scaling.type == "yarn"
    assert cfg.data.tokenizer == str(converted / "tokenizer" / "tokenizer.json")
    assert gigajax.load_config(FIXTURES / "qwen2").model.to_dict() == cfg.model.to_dict()


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("source", ["hf_dir", "converted"])
def test_train_init_from_an_hf_directory_starts_from_its_params(source, tmp_path):
    """`--config HF_DIR --config.train.init_from=HF_DIR` (or the converted checkpoint) trains on
    a layout (fsdp=2, each device reading its own shards), starting from the imported params:
    at a learning rate of 1e-9 they are still the HF tensors after two steps."""
    init = FIXTURES / "llama"
    if source == "converted":
        init = tmp_path / "gigajax"
        gigajax.from_hf(FIXTURES / "llama", init)
    cfg = gigajax.load_config(init, f"train.init_from={init}", "train.steps=2",
                              "train.log_every=1", "train.eval_every=1000",
                              "train.checkpoint_every=2", "data.batch_size=8",
                              "data.max_bytes=20000", "mesh.data=4", "mesh.fsdp=2", "optim.lr=1e-9",
                              "optim.warmup_steps=1", "model.dtype=float32",
                              "attention.block_q=16", "attention.block_kv=16")
    run = gigajax.train(cfg, tmp_path / "run", progress=False)
    final = read_params(tmp_path / "run").params
    tensors = safetensors_of(FIXTURES / "llama")
    np.testing.assert_allclose(final["embed"], tensors["model.embed_tokens.weight"], atol=1e-6)
    np.testing.assert_allclose(final["blocks"]["mlp"]["w_down"][1],
                               tensors["model.layers.1.mlp.down_proj.weight"].T, atol=1e-6)
    assert np.isfinite(run.summary["loss"])


def copy_fixture(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def bad_inputs():
    """(case, how to break a copy of a fixture, the error's words)."""
    def missing_shard(d):
        (d / "model-00002-of-00005.safetensors").unlink()

    def missing_index_entry(d):
        index = json.loads((d / hf.INDEX).read_text())
        del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        (d / hf.INDEX).write_text(json.dumps(index))

    def wrong_shape(d):
        tensors = load_file(str(d / "model.safetensors"))
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    def wrong_dtype(d):
        tensors = load_file(str(d / "model.safetensors"))
        tensors["model.norm.weight"] = np.zeros((64,), np.int8)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    def extra_tensor(d):
        tensors = load_file(str(d / "model.safetensors"))
        tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    def small_vocab(d):
        edit_config(d, vocab_size=300)

    def missing_expert(d):
        tensors = load_file(str(d / "model.safetensors"))
        del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})

    return [
        ("llama_sharded", missing_shard, "names shard model-00002-of-00005.safetensors"),
        ("llama_sharded", missing_index_entry, "model.layers.1.mlp.up_proj.weight"),
        ("llama", wrong_shape, "'model.layers.0.self_attn.k_proj.weight' has shape [16, 64]"),
        ("llama", wrong_dtype, "'model.norm.weight' has dtype I8"),
        ("llama", extra_tensor, "'model.layers.0.self_attn.o_proj.bias' has no place"),
        ("llama", small_vocab, "the tokenizer has 320 tokens but config.json's vocab_size is 300"),
        ("llama", lambda d: edit_config(d, architectures=["GPT2LMHeadModel"]),
         "architectures=['GPT2LMHeadModel'] is not supported"),
        ("llama", lambda d: edit_config(d, hidden_act="gelu"), "hidden_act='gelu'"),
        ("llama", lambda d: edit_config(d, attention_bias=True), "attention_bias=True"),
        ("llama", lambda d: edit_config(d, rope_parameters={"rope_type": "longrope",
                                                            "rope_theta": 1e4}),
         "rope_type='longrope' is not supported"),
        ("llama", lambda d: edit_config(d, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1e4,
                                                            "beta_fast": 8.0}),
         "rope parameter 'beta_fast' is not used by rope_type='linear'"),
        ("llama", lambda d: edit_config(d, made_up_field=3), "field 'made_up_field'"),
        ("qwen3", lambda d: edit_config(d, use_sliding_window=True, layer_types=[
            "full_attention", "sliding_attention"]), "use_sliding_window=True"),
        ("llama", lambda d: edit_config(d, hidden_size=None), "hidden_size is missing"),
        ("llama", lambda d: edit_config(d, num_attention_heads=2.5),
         "num_attention_heads=2.5 is not a positive integer"),
        ("llama", lambda d: edit_config(d, rope_parameters=[1, 2]),
         "rope_parameters=[1, 2] is not a JSON object"),
        ("llama", lambda d: edit_config(d, rope_parameters={"rope_type": "linear",
                                                            "factor": "two"}),
         "rope parameter factor='two' is not a number"),
        ("qwen2", lambda d: edit_config(d, use_mrope=True), "use_mrope=True"),
        ("qwen3_moe", lambda d: edit_config(d, decoder_sparse_step=2), "decoder_sparse_step=2"),
        ("qwen3_moe", lambda d: edit_config(d, mlp_only_layers=[1]), "mlp_only_layers=[1]"),
        ("qwen3_moe", lambda d: edit_config(d, num_experts=4), "it differs from "
         "num_local_experts=8"),
        ("qwen3_moe", lambda d: edit_config(d, num_experts_per_tok=9), "num_experts_per_tok=9"),
        ("mixtral", lambda d: edit_config(d, router_jitter_noise=0.1), "router_jitter_noise=0.1"),
        ("mixtral", lambda d: edit_config(d, num_local_experts=None),
         "num_local_experts is missing"),
        ("llama", lambda d: edit_config(d, num_local_experts=4), "field 'num_local_experts'"),
        ("mixtral", missing_expert, "'model.layers.1.block_sparse_moe.experts.3.w2.weight' is "
         "missing"),
        ("llama", lambda d: (d / "config.json").unlink(), "has no config.json"),
        ("llama", lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    ]


@pytest.mark.parametrize("name,breakage,words", bad_inputs(),
                         ids=[f"{b[0]}-{b[1].__name__}" if b[1].__name__ != "<lambda>" else
                              f"{b[0]}-{b[2][:24]}" for b in bad_inputs()])
def test_bad_hf_directories_are_errors_naming_the_file_or_field(name, breakage, words,
                                                                tmp_path):
    directory = copy_fixture(name, tmp_path)
    breakage(directory)
    with pytest.raises((GigajaxError, ConfigError)) as error:
        gigajax.from_hf(directory, tmp_path / "out")
    assert words in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_failure_while_writing_leaves_no_output_and_no_temporary(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        gigajax.to_hf(FIXTURES / "llama", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_left_by_a_dead_writer_is_removed(tmp_path):
    stale = tmp_path / ".out.999999999.x1y2.tmp"  # no such pid
    (stale / "out").mkdir(parents=True)
    gigajax.from_hf(FIXTURES / "llama", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_moved_conversion_finds_its_tokenizer(tmp_path):
    gigajax.from_hf(FIXTURES / "qwen3", tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    lm = gigajax.load(tmp_path / "b")
    assert lm.tokenizer.spec == str(tmp_path / "b" / "tokenizer" / "tokenizer.json")
    written = gigajax.to_hf(tmp_path / "b", tmp_path / "hf")
    assert "tokenizer.json" in written["files"]


def test_qwen_sliding_window_survives_import_and_export(tmp_path):
    source = copy_fixture("qwen2", tmp_path)
    edit_config(source, use_sliding_window=True, sliding_window=16,
                layer_types=["sliding_attention"] * 2)
    gigajax.from_hf(source, tmp_path / "g")
    assert gigajax.load_config(tmp_path / "g").model.sliding_window == 16
    gigajax.to_hf(tmp_path / "g", tmp_path / "h", dtype="float32")
    exported = json.loads((tmp_path / "h" / "config.json").read_text())
    assert exported["use_sliding_window"] and exported["sliding_window"] == 16
    assert exported["layer_types"] == ["sliding_attention"] * 2
    assert from_hf_config(exported).model.sliding_window == 16


def test_the_api_is_quiet_and_the_cli_reports(tmp_path, capsys):
    gigajax.from_hf(FIXTURES / "llama", tmp_path / "a")
    gigajax.to_hf(tmp_path / "a", tmp_path / "b")
    assert capsys.readouterr().out == ""
    assert oct((tmp_path / "b" / "model.safetensors").stat().st_mode & 0o777) != "0o600"


def test_an_unknown_field_is_accepted_when_named(tmp_path):
    directory = copy_fixture("llama", tmp_path)
    edit_config(directory, made_up_field=3)
    gigajax.from_hf(directory, tmp_path / "out", ignore=["made_up_field"])
    assert (tmp_path / "out" / "checksums.json").is_file()


def test_an_existing_output_is_refused_unless_overwrite_and_then_replaced_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(GigajaxError, match="already exists.*--overwrite"):
        gigajax.from_hf(FIXTURES / "llama", out)
    gigajax.from_hf(FIXTURES / "llama", out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "checksums.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with pytest.raises(GigajaxError, match="already exists"):
        gigajax.to_hf(out, out)


def test_convert_cli_round_trip(tmp_path):
    """The commands in fresh processes (their errors: tests/test_cli_errors.py)."""
    def gigajax_cli(*args):
        return subprocess.run([sys.executable, "-m", "gigajax.cli", *map(str, args)],
                              capture_output=True, text=True, env=subprocess_env(), timeout=300)

    done = gigajax_cli("convert", "from-hf", FIXTURES / "mistral", "--out", tmp_path / "g")
    assert done.returncode == 0, done.stderr
    done = gigajax_cli("convert", "to-hf", tmp_path / "g", "--out", tmp_path / "h",
                       "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "h" / "config.json").read_text())["sliding_window"] == 16
    assert done.stdout.startswith(f"wrote {tmp_path / 'h'} from ")  # the CLI reports
    done = gigajax_cli("convert", "from-hf", FIXTURES / "mistral", "--out", tmp_path / "g")
    assert done.returncode == 2 and "already exists" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_shard_plan_and_sizes():
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("2GiB") == 2 * 2**30
    assert hf.shard_plan([("a", 6), ("b", 6), ("c", 20), ("d", 1)], 10) == [
        ["a"], ["b"], ["c"], ["d"]]
    assert hf.shard_plan([("a", 3), ("b", 3), ("c", 3), ("d", 3)], 10) == [["a", "b", "c"],
                                                                           ["d"]]


def test_lazy_tensors_read_only_the_slices_asked_for():
    cfg = ModelConfig.from_config(gigajax.load_config(FIXTURES / "llama"))
    params = hf.hf_params(FIXTURES / "llama", cfg)
    wq = params["blocks"]["attn"]["wq"]  # [L, D, H, E] from q_proj [H*E, D] per layer
    full = np.asarray(wq)
    part = wq[1:2, 16:48, 2:4, :]
    np.testing.assert_array_equal(part, full[1:2, 16:48, 2:4, :])
    q_proj = load_file(str(FIXTURES / "llama" / "model.safetensors"))[
        "model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(full[1], q_proj.T.reshape(64, 4, 16))
    wq.bytes_read = 0
    wq[0:1, 0:32, 0:2, :]  # a quarter of one layer: a quarter of one layer's bytes are read
    assert wq.bytes_read == 32 * 2 * 16 * 4


@pytest.mark.parametrize("mesh", ["mesh.fsdp=8", "mesh.data=8"])
def test_streaming_into_a_layout_reads_each_byte_once(mesh):
    """Placed over fsdp=8 (every parameter split on `embed`) each device asks for its own
    eighth; over data=8 (replicated) one read serves all 8 devices: either way the slices
    returned add up to the checkpoint's tensors once (bytes returned by get_slice, not pages
    the OS touched: a column slice of a row-major tensor touches most of its pages)."""
    cfg = gigajax.load_config(FIXTURES / "llama", mesh, "data.batch_size=8")
    mesh = make_mesh(cfg.mesh, jax.devices())
    builder = StateBuilder(cfg, mesh, layout_for(cfg, mesh), optax.identity())
    lazy = read_params(FIXTURES / "llama").params
    builder.from_params(lazy, "llama")
    leaves = jax.tree.leaves(lazy)
    total = sum(v.nbytes for v in safetensors_of(FIXTURES / "llama").values())
    assert sum(leaf.bytes_read for leaf in leaves) == total


# The live tests below need torch and transformers (the [hf] extra); CI skips them.


@pytest.mark.slow(seconds=30)
def test_live_transformers_loads_our_export_with_the_same_logits(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch as torch_module

    tokens, _ = reference("qwen3")
    converted, exported = tmp_path / "g", tmp_path / "h"
    gigajax.from_hf(FIXTURES / "qwen3", converted)
    ours = gigajax.load(converted, "model.dtype=float32").logits(tokens)
    gigajax.to_hf(converted, exported, dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        exported, dtype=torch_module.float32, attn_implementation="eager").eval()
    with torch_module.no_grad():
        theirs = model(torch_module.tensor(tokens, dtype=torch_module.long)).logits.numpy()
    assert np.abs(theirs - ours).max() <= LOGIT_ATOL


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 16}])
def test_live_a_model_saved_by_transformers_imports_with_its_logits(rope, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch as torch_module

    torch_module.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
        rope_parameters={"rope_theta": 500000.0, **(rope or {"rope_type": "default"})})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch_module.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, 300, (2, 48))  # no tokenizer saved: byte
    with torch_module.no_grad():
        theirs = model(torch_module.tensor(tokens)).logits.numpy()
    ours = gigajax.load(tmp_path / "hf", "model.dtype=float32").logits(tokens.astype(np.int32))
    assert np.abs(theirs - ours).max() <= LOGIT_ATOL


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("name", ["llama_yarn_notruncate", "llama3", "llama_dynamic", "mistral",
                                  "qwen2_sliding", "mixtral", "qwen3_moe"])
def test_live_exports_of_every_kind_give_transformers_the_source_logits(name, tmp_path):
    """transformers on our export equals transformers on the source, for the scalings, the
    window, a Qwen model with sliding windows on every layer, and the mixtures of experts."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch as torch_module

    source = FIXTURES / name
    if name == "qwen2_sliding":
        source = copy_fixture("qwen2", tmp_path)
        edit_config(source, use_sliding_window=True, sliding_window=16,
                    layer_types=["sliding_attention"] * 2)
    tokens, _ = reference(name.removesuffix("_sliding"))

    def transformers_logits(directory):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_module.float32, attn_implementation="eager").eval()
        with torch_module.no_grad():
            return model(torch_module.tensor(tokens, dtype=torch_module.long)).logits.numpy()

    gigajax.from_hf(source, tmp_path / "g")
    gigajax.to_hf(tmp_path / "g", tmp_path / "h", dtype="float32")
    expected = transformers_logits(source)
    assert np.abs(transformers_logits(tmp_path / "h") - expected).max() <= LOGIT_ATOL
    ours = gigajax.load(tmp_path / "g", "model.dtype=float32").logits(tokens)
    assert np.abs(ours - expected).max() <= LOGIT_ATOL


def test_the_passkey_fixture_retrieves_the_key_at_its_training_length():
    result = gigajax.eval_passkey(ROOT / "tests" / "fixtures" / "passkey_tiny", "256",
                                  depths="0,0.5,1", samples=5)
    assert result["runs"][0]["mean"] >= 0.9


@pytest.mark.slow(seconds=40)
def test_extend_context_round_trips_fine_tunes_on_the_ring_and_exports(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "extend_context", ROOT / "experiments" / "extend_context.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path / "ext"), "--quick"]) == 0
    result = json.loads((tmp_path / "ext" / "extend_context.json").read_text())
    assert result["round_trip"]["max_tensor_diff"] == 0 == result["round_trip"]["max_logit_diff"]
    assert [r["title"] for r in result["runs"]][:2] == ["as trained", "YaRN x4, zero-shot"]
    cfg = result["finetune"]["config"]
    assert cfg["mesh"]["sequence"] == 8 and cfg["attention"]["layout"] == "zigzag"
    assert cfg["model"]["rope_scaling"]["type"] == "yarn"
    assert cfg["model"]["rope_scaling"]["factor"] == 4.0
    compared = result["transformers"]
    assert "skipped" in compared or compared["max_abs_logit_diff_first_tokens"] < 1e-4
