"""Every mesh layout trains like one device: losses, gradients and parameters, fp32 (8 CPU devices).

Tolerances (fp32): loss relative 1e-5; gradients and parameters 1e-4 relative to each
parameter's largest entry (max |a - b| / max |b|), worst parameter; gradients also 1e-5 normwise
(||a - b|| / ||b|| per parameter), which a wrong slice of any size fails.
"""

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from gigajax.checkpoint.manager import Checkpointer
from gigajax.config import load_config
from gigajax.data.pipeline import build_datasets
from gigajax.errors import ConfigError, GigajaxError
from gigajax.parallel.mesh import make_mesh
from gigajax.parallel.multihost import place_batch
from gigajax.parallel.rules import Layout, make_layout
from gigajax.plan.equivalence import (
    GRAD_RTOL,
    LOSS_RTOL,
    check_layouts,
    max_relative_difference,
    run_layout,
)
from gigajax.plan.layouts import layout_config, parse_layouts
from gigajax.train.logger import log_console
from gigajax.train.loop import build_training
from gigajax.train.optim import make_optimizer
from gigajax.train.state import StateBuilder

ROOT = Path(__file__).resolve().parents[1]
# H=4 query heads, K=2 KV heads: tensor=2 splits KV heads, tensor=4 replicates them; with the
# Qwen options (q/k/v biases, per-head q/k norms), so every layout splits those parameters too
TEST_MODEL = ["--config.model.d_model=64", "--config.model.mlp_dim=128",
              "--config.model.qkv_bias=true", "--config.model.qk_norm=true",
              "--config.model.n_layers=2", "--config.data.seq_len=64",
              "--config.data.batch_size=8", "--config.data.max_bytes=300000",
              "--config.attention.block_q=32", "--config.attention.block_kv=32",
              "--config.optim.warmup_steps=1", "--config.train.z_loss=1e-4"]
LAYOUTS = [
    "data=8",                                     # pure data parallel
    "fsdp=8",                                     # FSDP / ZeRO-3
    "fsdp=8,zero_stage=1",                        # ZeRO-1: optimizer state only
    "tensor=4",                                   # Megatron TP, KV heads replicated
    "tensor=2,megatron_sp=1",                     # TP + Megatron sequence parallel
    "data=4,tensor=2",                            # dp x tp
    "fsdp=2,tensor=4,megatron_sp=1",              # fsdp x tp (+ sp)
    "data=2,fsdp=2,tensor=2",                     # dp x fsdp x tp
    "data=2,fsdp=2,tensor=2,zero_stage=1,megatron_sp=1",
    # sequence parallelism (tokens permuted into the ring layout by the data path)
    "sequence=8,layout=contiguous",               # ring
    "sequence=8,layout=striped",
    "sequence=8,layout=zigzag",
    "sequence=4,sp_impl=ulysses",                 # all-to-all, K=2 KV heads repeated over 4
    "sequence=8,sp_impl=hybrid,ulysses_degree=4",  # Ulysses 4 inside a ring of 2
    "data=2,sequence=2,tensor=2",                 # dp x sp x tp
    "fsdp=2,sequence=2,tensor=2,megatron_sp=1",   # fsdp x sp x tp + Megatron-SP
]
STEPS = 3


def tiny_test_config(*overrides):
    return load_config(ROOT / "configs" / "tiny.py", [*TEST_MODEL, *overrides])


@pytest.fixture(scope="module")
def batches():
    cfg = tiny_test_config()
    _, train_ds, _ = build_datasets(cfg.data, cfg.train.seed)
    # start at the first batch that packs two documents in a row, so segment ids are exercised
    first = next(s for s in range(1000) if train_ds[s]["segment_ids"].max() > 1)
    return [train_ds[first + i] for i in range(STEPS)]


@pytest.fixture(scope="module")
def reference(batches):
    return run_layout(tiny_test_config(), {}, batches)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_one_device(layout, batches, reference):
    run = run_layout(tiny_test_config(), parse_layouts(layout)[0], batches)
    np.testing.assert_allclose(run.losses, reference.losses, rtol=LOSS_RTOL)
    assert max_relative_difference(run.grads, reference.grads) <= GRAD_RTOL
    assert normwise_difference(run.grads, reference.grads) <= 1e-5
    assert max_relative_difference(run.params, reference.params) <= GRAD_RTOL  # after 3 steps
    assert run.param_change > 1e-4  # the steps did train (lr is 0 only at step 0)


def normwise_difference(tree, reference) -> float:
    """max over leaves of ||a - b|| / ||b||."""
    return max(float(np.linalg.norm(a - b) / np.linalg.norm(b))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True))


def test_microbatches_under_a_sharded_layout_equal_one_batch(batches, reference):
    """Accumulating 2 microbatches under dp x fsdp x tp + SP gives the one-batch steps.

    The parameters alone would not show it: AdamW (and clipping) are invariant to the scale of
    the gradient, so gradients summed but not divided by the token count of all microbatches
    (or scaled by their number) train the same. The gradient norm each step hands the optimizer
    is compared as well, against one batch on one device."""
    cfg = tiny_test_config("--config.train.microbatches=2")
    run = run_layout(cfg, parse_layouts("data=2,fsdp=2,tensor=2,megatron_sp=1")[0], batches)
    np.testing.assert_allclose(run.losses, reference.losses, rtol=LOSS_RTOL)
    np.testing.assert_allclose(run.grad_norms, reference.grad_norms, rtol=1e-5)
    assert max_relative_difference(run.params, reference.params) <= GRAD_RTOL


@pytest.mark.parametrize("layout", ["data=1", "sequence=8,layout=zigzag",
                                    "fsdp=2,sequence=2,tensor=2,megatron_sp=1"])
def test_chunked_loss_under_a_layout_equals_one_device(layout, batches, reference):
    """The head and loss over 4 strided token slices (`train.loss_chunks`) give the same
    losses, gradients and steps as the whole-sequence loss on one device, also when the
    tokens are sequence-sharded (zigzag) and the logits vocabulary-sharded (tensor)."""
    run = run_layout(tiny_test_config("--config.train.loss_chunks=4"),
                     parse_layouts(layout)[0], batches)
    np.testing.assert_allclose(run.losses, reference.losses, rtol=LOSS_RTOL)
    assert max_relative_difference(run.grads, reference.grads) <= GRAD_RTOL
    assert normwise_difference(run.grads, reference.grads) <= 1e-5
    assert max_relative_difference(run.params, reference.params) <= GRAD_RTOL


def test_a_checkpoint_restores_onto_another_layout(tmp_path, batches):
    """Saved under fsdp x tp (ZeRO-3), restored under dp x tp with ZeRO-1: same values, and
    each leaf lands in the new layout's sharding."""
    def training_on(layout):
        cfg = layout_config(tiny_test_config(), layout)
        mesh = make_mesh(cfg.mesh, jax.devices())
        return mesh, build_training(cfg, mesh)

    checkpointer = Checkpointer(tmp_path)
    mesh, training = training_on({"fsdp": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        state = training.state.init()
        state, _ = training.train_step(state, place_batch(batches[0], mesh, 8))  # moments != 0
        checkpointer.save(1, state, {"step": 1})
        checkpointer.wait()
        saved = jax.device_get(state)
    mesh, training = training_on({"data": 4, "tensor": 2, "zero_stage": 1})
    with jax.set_mesh(mesh):
        restored, meta = checkpointer.restore(1, training.state.abstract)
    checkpointer.close()
    assert meta["step"] == 1
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                                   jax.tree.leaves(training.state.shardings), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding == sharding


def shard_shapes(layout: str) -> tuple[dict, dict]:
    """Per-device shapes of each parameter and each first moment under a layout (no compile)."""
    cfg = layout_config(tiny_test_config(), parse_layouts(layout)[0])
    n = math.prod(cfg.mesh.values())
    mesh = make_mesh(cfg.mesh, jax.devices()[:n])
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    builder = StateBuilder(cfg, mesh, make_layout(2, dict(mesh.shape), cfg.sharding.zero_stage,
                                                  cfg.sharding.megatron_sp), tx)

    def shapes(tree):
        return {jax.tree_util.keystr(p).replace("'", ""): tuple(s.sharding.shard_shape(s.shape))
                for p, s in jax.tree_util.tree_leaves_with_path(tree)}

    params = shapes(builder.abstract["params"])
    moments = shapes(builder.abstract["opt_state"][1][0].mu)
    return params, moments


# (layout, parameter, per-device shape of the parameter and of its first moment)
# with L=2, D=64, H=4, K=2, E=16, F=128, V=384
SHARDINGS = [
    ("data=8", "[embed].value", (384, 64), (384, 64)),
    ("data=8", "[blocks][attn][wq].value", (2, 64, 4, 16), (2, 64, 4, 16)),
    ("fsdp=8", "[embed].value", (384, 8), (384, 8)),
    ("fsdp=8", "[blocks][attn][wq].value", (2, 8, 4, 16), (2, 8, 4, 16)),
    ("fsdp=8", "[blocks][mlp][w_down].value", (2, 128, 8), (2, 128, 8)),
    ("fsdp=8", "[blocks][attn_norm][scale].value", (2, 8), (2, 8)),
    ("fsdp=8,zero_stage=1", "[blocks][attn][wq].value", (2, 64, 4, 16), (2, 8, 4, 16)),
    ("fsdp=8,zero_stage=1", "[embed].value", (384, 64), (384, 8)),
    ("tensor=4", "[embed].value", (96, 64), (96, 64)),
    ("tensor=4", "[lm_head].value", (64, 96), (64, 96)),
    ("tensor=4", "[blocks][attn][wq].value", (2, 64, 1, 16), (2, 64, 1, 16)),
    ("tensor=4", "[blocks][attn][wk].value", (2, 64, 2, 16), (2, 64, 2, 16)),  # KV replicated
    ("tensor=4", "[blocks][attn][wo].value", (2, 1, 16, 64), (2, 1, 16, 64)),
    ("tensor=4", "[blocks][mlp][w_gate].value", (2, 64, 32), (2, 64, 32)),
    ("tensor=4", "[blocks][mlp][w_down].value", (2, 32, 64), (2, 32, 64)),
    ("tensor=2", "[blocks][attn][wk].value", (2, 64, 1, 16), (2, 64, 1, 16)),  # KV split
    ("data=2,fsdp=2,tensor=2", "[blocks][attn][wq].value", (2, 32, 2, 16), (2, 32, 2, 16)),
    ("data=2,fsdp=2,tensor=2", "[blocks][mlp][w_up].value", (2, 32, 64), (2, 32, 64)),
]


@pytest.mark.parametrize("layout,name,param_shape,moment_shape", SHARDINGS)
def test_parameter_shardings_follow_the_layout(layout, name, param_shape, moment_shape):
    params, moments = shard_shapes(layout)
    assert params[name] == param_shape
    assert moments[name] == moment_shape


@pytest.mark.parametrize("dropped,axis", [("mlp", "tensor"), ("embed", "fsdp")])
def test_a_rule_table_that_leaves_weights_unsharded_fails_loudly(dropped, axis):
    cfg = layout_config(tiny_test_config(), {"fsdp": 2, "tensor": 4})
    mesh = make_mesh(cfg.mesh, jax.devices())
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    good = make_layout(2, dict(mesh.shape))
    StateBuilder(cfg, mesh, good, tx)  # the real rules pass
    broken = Layout(params={k: v for k, v in good.params.items() if k != dropped},
                    optimizer=good.optimizer, activations=good.activations)
    with pytest.raises(GigajaxError, match=rf"not split over `{axis}`"):
        StateBuilder(cfg, mesh, broken, tx)


BAD_LAYOUTS = [
    ({"data": 3}, [], "devices"),  # 3 x 1 x 1 x 1 != 8 is checked when the mesh is made
    ({"tensor": 4}, ["--config.model.n_heads=2", "--config.model.n_kv_heads=2"], "model.n_heads"),
    ({"tensor": 2}, ["--config.model.n_heads=6", "--config.model.n_kv_heads=3",
                     "--config.model.head_dim=16"], "model.n_kv_heads"),
    ({"tensor": 2}, ["--config.model.vocab_size=385"], "model.vocab_size"),
    ({"tensor": 4}, ["--config.model.mlp_dim=102"], "model.mlp_dim"),
    ({"fsdp": 8}, ["--config.model.d_model=36", "--config.model.head_dim=16"], "model.d_model"),
    ({"data": 8}, ["--config.data.batch_size=4", "--config.train.eval_batches=1"],
     "data.batch_size"),
    ({"data": 4}, ["--config.train.microbatches=4"], "train.microbatches"),
    ({"tensor": 4, "megatron_sp": True}, ["--config.data.seq_len=66"], "data.seq_len"),
    ({"sequence": 8}, ["--config.data.seq_len=40"], "data.seq_len"),  # zigzag: 2 x 8 chunks
    ({"sequence": 8, "sp_impl": "ulysses"}, [], "model.n_heads"),  # 4 heads over 8
    ({"sequence": 2, "tensor": 4, "sp_impl": "ulysses"}, [], "model.n_heads"),  # 1 per shard
    ({"sequence": 8, "sp_impl": "hybrid", "ulysses_degree": 3}, [], "attention.ulysses_degree"),
    ({"sequence": 8, "ulysses_degree": 2}, [], "attention.ulysses_degree"),  # ring ignores it
    ({"sequence": 8}, ["--config.attention.impl=xla"], "attention.impl"),  # ring: blockwise
    ({"sequence": 4, "sp_impl": "ulysses"}, ["--config.data.seq_len=66"], "data.seq_len"),
]


@pytest.mark.parametrize("layout,overrides,field", BAD_LAYOUTS,
                         ids=[b[2] for b in BAD_LAYOUTS])
def test_bad_layouts_are_clear_errors(layout, overrides, field):
    cfg = tiny_test_config(*overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        c = layout_config(cfg, layout)
        make_mesh(c.mesh, jax.devices(), c.attention)


@pytest.mark.parametrize("layout,seq_len", [
    ({"sequence": 4, "sp_impl": "ulysses"}, 68),  # no ring, no zigzag chunks: 68 % 4 suffices
    ({"sequence": 4, "sp_impl": "hybrid", "ulysses_degree": 2}, 68),  # 2 x 2 zigzag chunks, x 2
    ({"sequence": 8, "layout": "striped"}, 72),
])
def test_sequence_lengths_that_split_are_accepted(layout, seq_len):
    layout_config(tiny_test_config(f"--config.data.seq_len={seq_len}"), layout)


def test_layout_strings_are_checked():
    assert parse_layouts("data=8; tensor=2,data=4;fsdp=8,zero_stage=1,megatron_sp=1") == [
        {"data": 8}, {"tensor": 2, "data": 4}, {"fsdp": 8, "zero_stage": 1, "megatron_sp": True}]
    for bad in ("", "dta=8", "data=eight", "data"):
        with pytest.raises(ConfigError):
            parse_layouts(bad)


def ok_column(printed: str) -> dict[str, str]:
    """layout -> the `ok` cell of each row of the printed check-layouts table."""
    cells = [[c.strip() for c in line.strip().strip("│").split("│")]
             for line in printed.splitlines() if line.startswith("│")]
    return {row[0]: row[-1] for row in cells}  # the header's bars are heavy: ┃


def test_check_layouts_table(tmp_path, capsys):
    """One device is the reference row, not a comparison that passes; the layout's row is its
    own run (not one device's again) compared with it; the table says which is which."""
    rows = check_layouts(tiny_test_config(), parse_layouts("tensor=2,data=4"), steps=2,
                         output=tmp_path / "rows.json", console=log_console())
    assert [r["layout"] for r in rows] == ["1 device", "tensor=2,data=4"]
    assert [r.get("reference", False) for r in rows] == [True, False]
    reference, row = rows
    assert row["ok"] and (tmp_path / "rows.json").exists()
    assert row["loss_rel_diff"] == max(abs(a - b) / abs(b) for a, b in zip(
        row["losses"], reference["losses"], strict=True))
    # another program's sums in another order: close to one device's, yet not the same bits
    assert 0 < row["grad_rel_diff"] <= GRAD_RTOL and 0 < row["param_rel_diff"] <= GRAD_RTOL
    assert ok_column(capsys.readouterr().out) == {"1 device": "reference",
                                                  "tensor=2,data=4": "yes"}


def test_check_layouts_reports_each_difference_against_one_device_not_ok(capsys, monkeypatch):
    """With runs made up (nothing trains): a layout off by twice a tolerance in its loss, its
    gradients or its parameters is reported not ok and printed NO; an equal one is ok; each
    layout is run under its own layout, and the reference once, under none."""
    import dataclasses

    from gigajax.plan import equivalence
    from gigajax.plan.layouts import layout_name

    one = equivalence.LayoutRun(
        "1 device", [5.0, 4.0], [2.0, 1.5], {"w": np.array([1.0, -2.0])},
        {"w": np.array([0.5, 3.0])}, 0.1, {})
    off = {"data=2": {},
           "fsdp=2": {"losses": [5.0, 4.0 * (1 + 2 * LOSS_RTOL)]},
           "tensor=2": {"grads": {"w": np.array([1.0, -2.0 * (1 + 2 * GRAD_RTOL)])}},
           "data=4": {"params": {"w": np.array([0.5, 3.0 * (1 + 2 * GRAD_RTOL)])}}}
    calls = []

    def made_up_run(cfg, layout, batches):
        calls.append(layout)
        name = layout_name(layout)
        return one if not layout else dataclasses.replace(one, name=name, **off[name])

    monkeypatch.setattr(equivalence, "run_layout", made_up_run)
    rows = check_layouts(tiny_test_config(), parse_layouts(";".join(off)), steps=2,
                         console=log_console())
    assert calls == [{}, *parse_layouts(";".join(off))]
    assert [(r["layout"], r["ok"], r.get("reference", False)) for r in rows] == [
        ("1 device", True, True), ("data=2", True, False), ("fsdp=2", False, False),
        ("tensor=2", False, False), ("data=4", False, False)]
    assert rows[2]["loss_rel_diff"] == pytest.approx(2 * LOSS_RTOL)
    assert rows[3]["grad_rel_diff"] == pytest.approx(2 * GRAD_RTOL)
    assert rows[4]["param_rel_diff"] == pytest.approx(2 * GRAD_RTOL)
    assert ok_column(capsys.readouterr().out) == {
        "1 device": "reference", "data=2": "yes", "fsdp=2": "NO", "tensor=2": "NO", "data=4": "NO"}
