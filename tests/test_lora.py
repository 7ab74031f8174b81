"""LoRA (model/lora.py): adapters start as the base model, train alone (the base weights bitwise
unchanged, out of the optimizer state), shard like their base weights and train under a
sharded layout as on one device, merge into the base weights exactly, and load for generation
without merging. fp32 throughout: logits 1e-5 relative, the layout matrix's tolerances."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import TINY_MODEL

import gigajax
from gigajax.checkpoint.manager import Checkpointer
from gigajax.checkpoint.params import load_params, read_params
from gigajax.cli import main as cli_main
from gigajax.config import ModelConfig, load_config
from gigajax.data.pipeline import build_datasets
from gigajax.model import Decoder, lora
from gigajax.parallel.mesh import make_mesh
from gigajax.plan.equivalence import GRAD_RTOL, LOSS_RTOL, max_relative_difference, run_layout
from gigajax.plan.layouts import parse_layouts
from gigajax.train.loop import build_training
from gigajax.train.step import make_loss_fn

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
LORA = ["--config.model.lora.rank=4", "--config.model.lora.alpha=8"]
# the layout matrix's test model (tests/test_layouts.py) with LoRA on every projection
MATRIX_MODEL = ["--config.model.d_model=64", "--config.model.mlp_dim=128",
                "--config.model.n_layers=2", "--config.data.seq_len=64",
                "--config.data.batch_size=8", "--config.data.max_bytes=300000",
                "--config.attention.block_q=32", "--config.attention.block_kv=32",
                "--config.optim.warmup_steps=1", "--config.train.z_loss=1e-4", *LORA]


def small_model_config(**lora_fields) -> ModelConfig:
    overrides = [f"--config.model.lora.{k}={v}" for k, v in lora_fields.items()]
    cfg = load_config(TINY, ["--config.model.d_model=32", "--config.model.mlp_dim=64",
                             "--config.model.n_layers=2", "--config.model.vocab_size=64",
                             "--config.model.max_seq_len=64", "--config.attention.block_q=8",
                             "--config.attention.block_kv=8", "--config.data.seq_len=64",
                             *overrides])
    return ModelConfig.from_config(cfg)


def logits_of(cfg: ModelConfig, pure: dict, tokens_BT) -> np.ndarray:
    """Jitted logits of the Decoder of `cfg` holding the pure-dict params `pure`."""
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, pure)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens_BT))


def random_adapters(pure: dict, seed: int = 1) -> dict:
    """`pure` with every adapter's B (zero at init) drawn at random, so the update is not 0."""
    rng = np.random.default_rng(seed)
    blocks = {part: {key: ({"a": v["a"], "b": rng.normal(0, 0.5, v["b"].shape).astype(np.float32)}
                           if key.endswith(lora.SUFFIX) else v) for key, v in tree.items()}
              for part, tree in pure["blocks"].items()}
    return {**pure, "blocks": blocks}


TOKENS = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)


def test_adapters_start_as_the_base_model():
    """B = 0: step 0 computes the base model's logits exactly, and the base weights of a seed
    are the plain model's (the adapters are created after them)."""
    plain, with_lora = small_model_config(), small_model_config(rank=4)
    base = nnx.to_pure_dict(nnx.state(Decoder(plain, rngs=nnx.Rngs(0))))
    adapted = nnx.to_pure_dict(nnx.state(Decoder(with_lora, rngs=nnx.Rngs(0))))
    assert lora.has_adapters(adapted) and not lora.has_adapters(base)
    merged = lora.merge(adapted, with_lora)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logits_of(with_lora, adapted, TOKENS),
                                  logits_of(plain, base, TOKENS))


def test_merged_weights_give_the_adapted_model_s_logits():
    """With B random, the plain model holding W + (alpha/R) A B computes the LoRA model's
    logits (fp32, 1e-5); the control: the adapters do change the logits and the weights."""
    with_lora, plain = small_model_config(rank=4, alpha=8), small_model_config()
    adapted = random_adapters(nnx.to_pure_dict(nnx.state(Decoder(with_lora, rngs=nnx.Rngs(0)))))
    merged = lora.merge(adapted, with_lora)
    want = logits_of(with_lora, adapted, TOKENS)
    got = logits_of(plain, merged, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    base = {k: v for k, v in adapted["blocks"]["attn"].items() if not k.endswith(lora.SUFFIX)}
    assert not np.allclose(merged["blocks"]["attn"]["wq"], base["wq"])  # not a no-op
    base_logits = logits_of(plain, lora.merge(nnx.to_pure_dict(nnx.state(
        Decoder(with_lora, rngs=nnx.Rngs(0)))), with_lora), TOKENS)
    assert np.abs(base_logits - want).max() > 1e-2 * np.abs(want).max()


def test_only_the_targets_get_adapters_and_each_is_a_rank_r_update():
    """targets=q,down: adapters on wq and w_down only; A [L, in..., R], B [L, R, out...]."""
    cfg = small_model_config(rank=2, targets="q,down")
    pure = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0))))
    adapters = {f"{part}/{key}": jax.tree.map(np.shape, tree)
                for part, branch in pure["blocks"].items() for key, tree in branch.items()
                if key.endswith(lora.SUFFIX)}
    assert adapters == {"attn/wq_lora": {"a": (2, 32, 2), "b": (2, 2, 4, 8)},
                        "mlp/w_down_lora": {"a": (2, 64, 2), "b": (2, 2, 32)}}


def test_dropout_only_in_training_and_reproducible():
    """LoRA dropout acts with a key (training) and not without (evaluation, generation): the
    loss without a key equals the dropout-free model's; with a key it differs, the same key
    gives the same loss."""
    with_dropout, without = small_model_config(rank=4, dropout=0.5), small_model_config(rank=4)
    model = Decoder(with_dropout, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, random_adapters(nnx.to_pure_dict(state)))
    plain_graphdef, _ = nnx.split(Decoder(without, rngs=nnx.Rngs(0)))
    batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1),
             "positions": jnp.broadcast_to(jnp.arange(16), TOKENS.shape),
             "segment_ids": jnp.ones_like(TOKENS), "loss_mask": jnp.ones(TOKENS.shape)}

    def loss(graphdef, key):
        return float(jax.jit(lambda s, k: make_loss_fn(graphdef)(s, batch, k)[0])(state, key))

    key = jax.random.key(0)
    assert loss(graphdef, None) == loss(plain_graphdef, None)
    assert loss(graphdef, key) == loss(graphdef, key) != loss(graphdef, None)
    assert loss(graphdef, jax.random.key(1)) != loss(graphdef, key)


@pytest.fixture(scope="module")
def batches():
    cfg = load_config(TINY, MATRIX_MODEL)
    _, train_ds, _ = build_datasets(cfg.data, cfg.train.seed)
    first = next(s for s in range(1000) if train_ds[s]["segment_ids"].max() > 1)
    return [train_ds[first + i] for i in range(3)]


@pytest.fixture(scope="module")
def reference(batches):
    return run_layout(load_config(TINY, MATRIX_MODEL), {}, batches)


def base_and_adapters(tree) -> tuple[list, list]:
    """The leaves of a params tree (State or pure dict): (base weights, adapters)."""
    def is_adapter(path) -> bool:
        return any(str(getattr(k, "key", "")).endswith(lora.SUFFIX) for k in path)

    flat = jax.tree_util.tree_leaves_with_path(tree)
    return [x for p, x in flat if not is_adapter(p)], [x for p, x in flat if is_adapter(p)]


@pytest.mark.slow(seconds=15)
def test_lora_under_fsdp_sequence_tensor_equals_one_device(batches, reference):
    """fsdp=2 x sequence=2 (zigzag ring) x tensor=2: losses, the adapters' gradients and the
    parameters after 3 steps as on one device; on both, the base weights bitwise unchanged
    and only the adapters differentiated; each adapter sharded like its base weight's dims."""
    run = run_layout(load_config(TINY, MATRIX_MODEL),
                     parse_layouts("fsdp=2,sequence=2,tensor=2")[0], batches)
    np.testing.assert_allclose(run.losses, reference.losses, rtol=LOSS_RTOL)
    assert max_relative_difference(run.grads, reference.grads) <= GRAD_RTOL
    assert max_relative_difference(run.params, reference.params) <= GRAD_RTOL
    for result in (run, reference):
        base_after, adapters_after = base_and_adapters(result.params)
        base_before, adapters_before = base_and_adapters(result.initial)
        for after, before in zip(base_after, base_before, strict=True):
            np.testing.assert_array_equal(after, before)  # frozen: bitwise
        assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(adapters_after, adapters_before,
                                                              strict=True))
        assert len(jax.tree.leaves(result.grads)) == len(adapters_after) == 14  # 7 x (A, B)

    def spec(part: str, adapter: str) -> tuple:
        weight, matrix = adapter.split(".")
        return run.param_specs[f"['blocks']['{part}']['{weight}']['{matrix}'].value"]

    assert spec("attn", "wq_lora.a") == (None, "fsdp", None)  # [L, D, R]: D as wq's
    assert spec("attn", "wq_lora.b") == (None, None, "tensor", None)  # [L, R, H, E]: H as wq's
    assert spec("attn", "wk_lora.b") == (None, None, "tensor", None)  # K=2 KV heads split
    assert spec("attn", "wo_lora.a") == (None, "tensor", None, None)  # [L, H, E, R]
    assert spec("attn", "wo_lora.b") == (None, None, "fsdp")  # [L, R, D]
    assert spec("mlp", "w_up_lora.b") == (None, None, "tensor")  # [L, R, F]
    assert spec("mlp", "w_down_lora.a") == (None, "tensor", None)  # [L, F, R]
    assert spec("mlp", "w_down_lora.b") == (None, None, "fsdp")


def test_the_optimizer_state_holds_the_adapters_only():
    """Adam's two moments per adapter, nothing for the base weights (abstract: no compile)."""
    cfg = load_config(TINY, [*MATRIX_MODEL, "--config.mesh.data=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
        abstract = build_training(cfg, mesh).state.abstract
    _, adapters = base_and_adapters(abstract["params"])
    moments = [x for x in jax.tree.leaves(abstract["opt_state"]) if x.ndim]
    assert sorted(x.shape for x in moments) == sorted([x.shape for x in adapters] * 2)
    assert sum(math.prod(x.shape) for x in moments) == 2 * sum(math.prod(x.shape)
                                                               for x in adapters)


# a LoRA run through the API: 8 data-parallel devices, dropout on, a checkpoint at step 3
RUN = [*TINY_MODEL, *LORA, "--config.model.lora.dropout=0.1", "--config.data.max_bytes=200000",
       "--config.train.steps=3", "--config.train.eval_every=100", "--config.optim.lr=1e-2",
       "--config.optim.warmup_steps=0", "--config.model.dtype=float32",
       "--config.checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "run"
    run = gigajax.train(load_config(TINY, RUN), workdir, progress=False)
    return workdir, run


@pytest.mark.slow(seconds=10)
def test_a_lora_run_restores_exactly_and_keeps_its_base(lora_run, tmp_path):
    """The checkpoint of a LoRA run restores bitwise (params and the adapters' moments); its
    base weights are the initial ones, and `load` runs it unmerged with the merged logits."""
    workdir, run = lora_run
    cfg = load_config(TINY, RUN)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        builder = build_training(cfg, mesh).state
        checkpointer = Checkpointer(workdir / "checkpoints")
        restored, _, step = checkpointer.restore_latest(builder.abstract)
        checkpointer.close()
        start = builder.init()["params"]  # what the run started from (the same jitted init)
    assert step == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(run.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(*(base_and_adapters(p)[0] for p in (restored["params"], start)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base never changed
    plain_cfg = ModelConfig.from_config(load_config(TINY, [*RUN, "--config.model.lora.rank=0"]))
    initial = lora.merge(jax.device_get(nnx.to_pure_dict(start)), ModelConfig.from_config(cfg))

    merged_dir = tmp_path / "merged"
    gigajax.merge_lora(workdir, merged_dir)
    text = "def main():\n    return"
    unmerged, merged = gigajax.load(workdir), gigajax.load(merged_dir)
    assert merged.config.model.lora.rank == 0 and unmerged.config.model.lora.rank == 4
    want = unmerged.logits(text)
    np.testing.assert_allclose(merged.logits(text), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    assert unmerged.generate(text, 8) == merged.generate(text, 8)
    base = logits_of(plain_cfg, initial, jnp.asarray(merged.encode(text))[None])[0]
    assert np.abs(base - want).max() > 1e-4  # the control: the adapters did train


def test_merge_lora_cli_writes_the_plain_model_and_to_hf_merges(lora_run, tmp_path, capsys):
    """`gigajax ckpt merge-lora` writes W + (alpha/R) A B without adapters and the config with
    LoRA off; `convert to-hf` of the LoRA run writes the same merged tensors."""
    from safetensors.numpy import load_file

    workdir, _ = lora_run
    out = tmp_path / "merged"
    assert cli_main(["ckpt", "merge-lora", "--checkpoint", str(workdir), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    params, meta = load_params(out)
    found = read_params(workdir)
    want = lora.merge(found.params, ModelConfig.from_config(load_config(TINY, RUN)))
    assert not lora.has_adapters(params) and meta["config"]["model"]["lora"]["rank"] == 0
    assert meta["made_by"] == "merge-lora" and meta["source_steps"] == [3]
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)
    gigajax.to_hf(workdir, tmp_path / "hf_lora", dtype="float32")
    gigajax.to_hf(out, tmp_path / "hf_merged", dtype="float32")
    lora_tensors = load_file(tmp_path / "hf_lora" / "model.safetensors")
    merged_tensors = load_file(tmp_path / "hf_merged" / "model.safetensors")
    assert sorted(lora_tensors) == sorted(merged_tensors) and not any(
        "lora" in name for name in lora_tensors)
    for name, tensor in merged_tensors.items():
        np.testing.assert_array_equal(lora_tensors[name], tensor)
    hf_config = json.loads((tmp_path / "hf_lora" / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 2
    assert cli_main(["ckpt", "merge-lora", "--checkpoint", str(out), "--out",
                     str(tmp_path / "again")]) == 2  # a plain model: nothing to merge
    assert "holds no LoRA adapters" in capsys.readouterr().err


def test_a_lora_run_starts_from_a_plain_checkpoint_with_fresh_adapters(lora_run, tmp_path):
    """train.init_from of a plain model's params (here the merged run): the base weights are
    those params, the adapters start fresh (B = 0), the optimizer state covers the adapters."""
    from gigajax.train.loop import initial_state, read_init_from

    workdir, _ = lora_run
    gigajax.merge_lora(workdir, tmp_path / "plain")
    cfg = load_config(TINY, [*RUN, "--config.mesh.data=1", "--config.mesh.fsdp=2",
                             "--config.mesh.tensor=2"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    with jax.set_mesh(mesh):
        builder = build_training(cfg, mesh).state
        state = initial_state(builder, read_init_from(str(tmp_path / "plain"), []), "x")
    plain, _ = load_params(tmp_path / "plain")
    pure = nnx.to_pure_dict(state["params"])
    for part, tree in pure["blocks"].items():
        for key, value in tree.items():
            if key.endswith(lora.SUFFIX):
                assert not np.any(np.asarray(value["b"])) and np.any(np.asarray(value["a"]))
            else:
                np.testing.assert_array_equal(np.asarray(value), plain["blocks"][part][key])
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim) == 2 * sum(
        x.size for x in base_and_adapters(state["params"])[1])
