"""Config loading, overrides and validation: every bad value is a ConfigError naming its field."""

import subprocess
import sys
from pathlib import Path

import pytest

import gigajax
from gigajax.config import ModelConfig, apply_overrides, base_config, load_config
from gigajax.errors import ConfigError
from gigajax.parallel.mesh import mesh_shape

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


@pytest.mark.parametrize("name", ["tiny", "small", "llama2_7b", "llama3_8b"])
def test_shipped_configs_load_and_validate(name):
    model = ModelConfig.from_config(load_config(ROOT / "configs" / f"{name}.py"))
    assert model.dtype in ("float32", "bfloat16")  # 'auto' is resolved for this backend


def test_auto_dtype_is_float32_on_cpu_and_yarn_defaults_to_the_pretraining_length():
    cfg = load_config(TINY, ["--config.model.dtype=auto", "--config.model.rope_scaling.type=yarn",
                             "--config.model.rope_scaling.type=linear",
                             "--config.model.rope_scaling.factor=4"])
    model = ModelConfig.from_config(cfg)
    assert model.dtype == "float32"
    assert model.rope.original_max_seq_len == cfg.model.max_seq_len // 4


def test_overrides_are_typed():
    cfg = load_config(TINY, ["--config.train.steps=70", "--config.optim.lr=1", "--config.model."
                             "scan_layers=false", "--config.model.dtype=bfloat16",
                             "--config.model.rope_scaling.type=linear",
                             "--config.model.rope_scaling.factor=4"])
    assert cfg.train.steps == 70 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.scan_layers is False and cfg.model.dtype == "bfloat16"
    assert cfg.model.rope_scaling.factor == 4.0


BAD = [
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("model.d_model=130", "model.d_model"),
    ("model.dtype=float8", "model.dtype"),
    ("model.remat=some", "model.remat"),
    ("model.rope_scaling.type=ntk", "model.rope_scaling.type"),
    ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor"),
    ("model.sliding_window=-1", "model.sliding_window"),
    ("model.n_layers=0", "model.n_layers"),
    ("train.loss_chunks=0", "train.loss_chunks"),
    ("train.loss_chunks=3", "train.loss_chunks"),  # does not divide data.seq_len
    ("attention.impl=flash3", "attention.impl"),
    ("attention.block_q=0", "attention.block_q"),
    ("data.seq_len=100000", "data.seq_len"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("train.microbatches=3", "train.microbatches"),
    ("train.steps=-5", "train.steps"),
    ("mesh.sequence=3", "data.seq_len"),  # 256 tokens in 2 x 3 zigzag chunks
    ("attention.sp_impl=megatron", "attention.sp_impl"),
    ("attention.layout=spiral", "attention.layout"),
    ("attention.ulysses_degree=0", "attention.ulysses_degree"),
    ("sharding.zero_stage=2", "sharding.zero_stage"),
    ("sharding.megatron_sp=maybe", "sharding.megatron_sp"),
    ("mesh.tensor=3", "model.n_heads"),
    ("mesh.data=0", "mesh.data"),
    ("model.head_dim=7", "model.head_dim"),
    ("optim.name=sgd", "optim.name"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.wsd_decay_fraction=0", "optim.wsd_decay_fraction"),
    ("optim.schedule=step", "optim.schedule"),
    ("data.source=c4", "data.source"),
    ("data.tokenizer=gpt2", "data.tokenizer"),
    ("model.vocab_size=200", "model.vocab_size"),
    ("model.rope_scaling.original_max_seq_len=-2", "model.rope_scaling.original_max_seq_len"),
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1", "model.lora.dropout"),
    ("model.lora.dropout=-0.1", "model.lora.dropout"),
    ("model.lora.targets=", "model.lora.targets"),  # names no projection
    ("model.lora.targets=q,x", "model.lora.targets"),
    ("model.lora.targets=attn", "model.lora.targets"),
    ("model.lora.targets=' , '", "model.lora.targets"),
]


@pytest.mark.parametrize("override,field", BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_their_field(override, field):
    """The API's load_config checks everything: fields, the layout's splits, the data."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        gigajax.load_config(TINY, "--config." + override)


@pytest.mark.parametrize("override,expected", [
    ("train.stepz=3", "Unknown config field 'train.stepz'"),
    ("trian.steps=3", "Unknown config section 'trian'"),
    ("train.steps=many", "train.steps"),
    ("train.steps", "form"),
])
def test_bad_overrides_are_explained(override, expected):
    cfg = base_config()
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(cfg, [override])


def test_lora_errors_are_one_line_naming_the_allowed_projections():
    with pytest.raises(ConfigError) as error:
        gigajax.load_config(TINY, "--config.model.lora.targets=q,x")
    assert "\n" not in str(error.value) and "q, k, v, o, gate, up, down" in str(error.value)
    assert "attention, mlp, all" in str(error.value)


def test_lora_targets_take_projections_and_shorthands_in_model_order():
    def targets(text):
        return ModelConfig.from_config(load_config(TINY, [
            "--config.model.lora.rank=4", f"--config.model.lora.targets={text}"])).lora.targets

    assert targets("v,q") == ("q", "v")
    assert targets("attention,up") == ("q", "k", "v", "o", "up")
    assert targets("mlp") == ("gate", "up", "down")
    assert targets("all") == ("q", "k", "v", "o", "gate", "up", "down")
    assert ModelConfig.from_config(load_config(TINY)).lora.rank == 0  # off by default


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs" / "nope.py")


def test_mesh_product_must_match_devices():
    cfg = base_config()
    cfg.mesh.data = 3
    with pytest.raises(ConfigError, match="data=3"):
        mesh_shape(cfg.mesh, 8)
    cfg.mesh.data = -1
    assert mesh_shape(cfg.mesh, 8)["data"] == 8


def test_cli_prints_config_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gigajax.cli", "train", "--config", str(TINY), "--workdir",
         str(tmp_path), "--config.model.n_kv_heads=3"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "model.n_kv_heads" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name,billions", [("small", 0.124), ("llama2_7b", 6.74),
                                           ("llama3_8b", 8.03)])
def test_shipped_configs_have_their_published_sizes(name, billions):
    """Abstract init (no memory used) counts the parameters of each shipped shape."""
    import jax
    from flax import nnx

    from gigajax.model import Decoder

    cfg = ModelConfig.from_config(load_config(ROOT / "configs" / f"{name}.py"))
    with nnx.use_eager_sharding(False):
        state = jax.eval_shape(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(0))))
    count = sum(x.size for x in jax.tree.leaves(state))
    assert abs(count / 1e9 - billions) / billions < 0.01, count
