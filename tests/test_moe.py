"""Mixture of experts (`ops/moe_dispatch.py`, `model/moe.py`): routing equals a per-token loop,
the dropless (ragged) and the capacity dispatch equal a per-token loop over experts and each
other when nothing is dropped (outputs and gradients), capacity drops the right assignments and
counts them, and the auxiliary losses have their known values."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigajax.config import ModelConfig, MoEConfig, base_config, load_config, validate
from gigajax.config.hf import to_hf_config
from gigajax.config.schema import MOE_DISPATCHES, MOE_ROUTER_SCORES
from gigajax.errors import ConfigError
from gigajax.model.decoder import Decoder
from gigajax.model.moe import MoE, RoutingBias
from gigajax.ops import moe_dispatch

T, D, X, F, K = 24, 16, 6, 8, 2


def _case(seed=0, t=T, x=X):
    """Tokens [T, D], router logits [T, X] and expert weights, float32, sharp enough that the
    experts differ."""
    r = np.random.default_rng(seed)
    return (r.normal(size=(t, D)).astype(np.float32), r.normal(size=(t, x)).astype(np.float32),
            r.normal(size=(x, D, F)).astype(np.float32) / 2,
            r.normal(size=(x, D, F)).astype(np.float32) / 2,
            r.normal(size=(x, F, D)).astype(np.float32) / 2)


def _route_loop(logits_TX, top_k, score, renormalize, bias_X):
    """Per-token routing in float64: the top-k of score + bias, weighted by the scores."""
    weights, experts = [], []
    for row in logits_TX.astype(np.float64):
        s = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if score == "softmax" \
            else 1 / (1 + np.exp(-row))
        chosen = np.argsort(-(s + bias_X), kind="stable")[:top_k]
        w = s[chosen] / s[chosen].sum() if renormalize else s[chosen]
        weights.append(w), experts.append(chosen)
    return np.array(weights), np.array(experts)


def _moe_loop(x_TD, weights_TK, experts_TK, gate_XDF, up_XDF, down_XFD):
    """sum_k w[t, k] * SwiGLU_{e[t, k]}(x[t]), one token and one expert at a time, float64."""
    x = x_TD.astype(np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights_TK[t], experts_TK[t], strict=True):
            g, u = x[t] @ gate_XDF[e], x[t] @ up_XDF[e]
            out[t] += w * ((g / (1 + np.exp(-g)) * u) @ down_XFD[e])
    return out


def test_the_choice_tuples_are_the_ones_the_ops_implement():
    assert moe_dispatch.ROUTER_SCORES == MOE_ROUTER_SCORES
    assert MOE_DISPATCHES == ("ragged", "capacity")


@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("softmax", False),
                                               ("sigmoid", True)])
def test_routing_equals_a_per_token_loop(score, renormalize):
    _, logits, *_ = _case()
    bias = np.linspace(-0.3, 0.3, X).astype(np.float32) if score == "sigmoid" else np.zeros(X)
    weights, experts, scores = moe_dispatch.route(jnp.asarray(logits), K, score, renormalize,
                                                  jnp.asarray(bias, jnp.float32))
    want_w, want_e = _route_loop(logits, K, score, renormalize, bias)
    np.testing.assert_array_equal(np.asarray(experts), want_e)
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-6)
    assert scores.shape == (T, X) and scores.dtype == jnp.float32


def test_the_balancing_bias_moves_the_choice_not_the_weights():
    _, logits, *_ = _case()
    bias = np.zeros(X, np.float32)
    bias[5] = 10.0  # expert 5 is in every token's top-k
    weights, experts, scores = moe_dispatch.route(jnp.asarray(logits), K, "sigmoid", False,
                                                  jnp.asarray(bias))
    assert (np.asarray(experts) == 5).any(-1).all()
    picked = np.take_along_axis(np.asarray(scores), np.asarray(experts), -1)
    np.testing.assert_array_equal(np.asarray(weights), picked)  # unbiased scores
    with pytest.raises(ValueError, match="router score 'relu'"):
        moe_dispatch.route(jnp.asarray(logits), K, "relu")


def test_ragged_dispatch_equals_a_per_token_loop_over_experts():
    x, logits, gate, up, down = _case()
    weights, experts, _ = moe_dispatch.route(jnp.asarray(logits), K)
    got = moe_dispatch.ragged_experts(jnp.asarray(x), weights, experts, jnp.asarray(gate),
                                      jnp.asarray(up), jnp.asarray(down))
    want = _moe_loop(x, np.asarray(weights), np.asarray(experts), gate, up, down)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # a control: the loop with another expert per assignment is far off
    wrong = _moe_loop(x, np.asarray(weights), (np.asarray(experts) + 1) % X, gate, up, down)
    assert np.abs(np.asarray(got) - wrong).max() > 0.1


def test_an_expert_no_token_chose_is_skipped():
    x, logits, gate, up, down = _case()
    logits[:, 3] = -30.0  # expert 3 is never in a top-2
    weights, experts, _ = moe_dispatch.route(jnp.asarray(logits), K)
    assert not (np.asarray(experts) == 3).any()
    got = moe_dispatch.ragged_experts(jnp.asarray(x), weights, experts, jnp.asarray(gate),
                                      jnp.asarray(up), jnp.asarray(down))
    want = _moe_loop(x, np.asarray(weights), np.asarray(experts), gate, up, down)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _both_dispatches(x, logits, gate, up, down, capacity):
    """Loss sum(y * probe) of each dispatch and its gradients in x, the router logits and
    the three expert weights."""
    probe = np.random.default_rng(9).normal(size=(T, D)).astype(np.float32)

    def loss(dispatch, *args):
        x, logits, gate, up, down = args
        weights, experts, _ = moe_dispatch.route(logits, K)
        if dispatch == "ragged":
            y = moe_dispatch.ragged_experts(x, weights, experts, gate, up, down)
        else:
            y, _ = moe_dispatch.capacity_experts(x, weights, experts, gate, up, down, capacity)
        return jnp.sum(y * probe)

    args = tuple(jnp.asarray(a) for a in (x, logits, gate, up, down))
    return {name: jax.value_and_grad(lambda *a, n=name: loss(n, *a), argnums=range(5))(*args)
            for name in ("ragged", "capacity")}


def test_capacity_dispatch_equals_ragged_when_nothing_is_dropped():
    x, logits, gate, up, down = _case()
    weights, experts, _ = moe_dispatch.route(jnp.asarray(logits), K)
    capacity = int(np.bincount(np.asarray(experts).ravel(), minlength=X).max())
    y, dropped = moe_dispatch.capacity_experts(jnp.asarray(x), weights, experts,
                                               jnp.asarray(gate), jnp.asarray(up),
                                               jnp.asarray(down), capacity)
    assert int(dropped) == 0
    want = _moe_loop(x, np.asarray(weights), np.asarray(experts), gate, up, down)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    results = _both_dispatches(x, logits, gate, up, down, capacity)
    (loss_r, grads_r), (loss_c, grads_c) = results["ragged"], results["capacity"]
    np.testing.assert_allclose(float(loss_c), float(loss_r), rtol=1e-5)
    for g_r, g_c in zip(grads_r, grads_c, strict=True):
        np.testing.assert_allclose(np.asarray(g_c), np.asarray(g_r), rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(g_r).max()))
    assert float(jnp.abs(grads_r[1]).max()) > 0  # the router learns through the weights


def test_capacity_drops_second_choices_first_and_counts_them():
    # every token's first choice is expert 0 and its second expert 1 or 2
    experts = np.stack([np.zeros(8, int), np.array([1, 2] * 4)], -1).astype(np.int32)
    dispatch, dropped = moe_dispatch.capacity_dispatch(jnp.asarray(experts), 3, capacity=3)
    dispatch = np.asarray(dispatch)  # [T, K, X, C]
    assert dispatch.shape == (8, 2, 3, 3)
    assert int(dropped) == 5 + 2  # expert 0: 8 first choices, 3 kept; experts 1, 2: 4 each
    np.testing.assert_array_equal(dispatch[:3, 0, 0].argmax(-1), [0, 1, 2])  # in token order
    assert dispatch[3:, 0].sum() == 0
    np.testing.assert_array_equal(dispatch[:, 1].sum((-1, -2)), [1] * 6 + [0] * 2)
    assert dispatch.sum((0, 1)).max() == 1  # a slot holds one assignment


def test_dropped_assignments_add_nothing():
    x, logits, gate, up, down = _case()
    weights, experts, _ = moe_dispatch.route(jnp.asarray(logits), K)
    y, dropped = moe_dispatch.capacity_experts(jnp.asarray(x), weights, experts,
                                               jnp.asarray(gate), jnp.asarray(up),
                                               jnp.asarray(down), capacity=2)
    dispatch, _ = moe_dispatch.capacity_dispatch(experts, X, 2)
    kept = np.asarray(dispatch).sum((-1, -2)).astype(bool)  # [T, K]
    assert int(dropped) == (~kept).sum() > 0
    want = _moe_loop(x, np.where(kept, np.asarray(weights), 0.0), np.asarray(experts),
                     gate, up, down)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_expert_capacity():
    assert moe_dispatch.expert_capacity(100, 2, 8, 1.0) == 25
    assert moe_dispatch.expert_capacity(100, 2, 8, 1.25) == 32  # ceil(31.25)
    assert moe_dispatch.expert_capacity(1, 1, 64, 1.0) == 1


def test_auxiliary_losses_have_their_known_values():
    uniform_scores = jnp.full((8, 4), 0.25)
    balanced = jnp.asarray([[0], [1], [2], [3]] * 2, jnp.int32)
    assert float(moe_dispatch.load_balance_loss(uniform_scores, balanced)) == pytest.approx(1.0)
    collapsed_scores = jax.nn.one_hot(jnp.zeros(8, int), 4)
    collapsed = jnp.zeros((8, 1), jnp.int32)
    assert float(moe_dispatch.load_balance_loss(collapsed_scores, collapsed)) == \
        pytest.approx(4.0)
    np.testing.assert_allclose(np.asarray(moe_dispatch.expert_load(balanced, 4)), [0.25] * 4)
    logits = jnp.asarray([[0.0, 0.0], [1.0, 3.0]])
    want = (np.log(2) ** 2 + np.log(np.exp(1) + np.exp(3)) ** 2) / 2
    assert float(moe_dispatch.router_z_loss(logits)) == pytest.approx(want, rel=1e-6)
    bias = moe_dispatch.balance_bias_update(jnp.zeros(4), jnp.asarray([0.4, 0.1, 0.25, 0.25]),
                                            0.01)
    np.testing.assert_allclose(np.asarray(bias), [-0.01, 0.01, 0.0, 0.0])


def _model_cfg(**moe) -> ModelConfig:
    cfg = base_config()
    cfg.model.update(d_model=D, n_heads=2, n_kv_heads=2, mlp_dim=F)
    base = ModelConfig.from_config(cfg)
    return dataclasses.replace(base, moe=MoEConfig(**{"n_routed_experts": X, "top_k": K,
                                                      **moe}), dtype="float32")


@pytest.mark.parametrize("shared", [0, 2])
def test_the_moe_layer_is_shared_experts_plus_routed_ones(shared):
    cfg = _model_cfg(n_shared_experts=shared, expert_mlp_dim=4)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    assert layer.w_gate.shape == (X, D, 4) and layer.w_down.shape == (X, 4, D)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, D)), jnp.float32)
    y, stats = layer(x)
    x_ND = np.asarray(x).reshape(-1, D)
    weights, experts, _ = moe_dispatch.route(jnp.asarray(x_ND) @ layer.router[...], K)
    want = _moe_loop(x_ND, np.asarray(weights), np.asarray(experts), np.asarray(layer.w_gate[...]),
                     np.asarray(layer.w_up[...]), np.asarray(layer.w_down[...]))
    if shared:
        assert layer.shared.w_gate.shape == (D, shared * 4)
        want = want + np.asarray(layer.shared(x)).reshape(-1, D)
    else:
        assert layer.shared is None
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-5, atol=1e-6)
    assert stats.load_X.shape == (X,) and float(stats.load_X.sum()) == pytest.approx(1.0)
    assert float(stats.dropped_fraction) == 0.0 and float(stats.load_balance_loss) >= 1.0 - 1e-6


def test_the_layer_s_dispatches_agree_and_the_bias_gets_no_gradient():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, D)), jnp.float32)
    results = {}
    for dispatch in ("ragged", "capacity"):
        layer = MoE(_model_cfg(dispatch=dispatch, capacity_factor=float(X) / K,
                               n_shared_experts=1), rngs=nnx.Rngs(0))

        def loss(layer):
            y, stats = layer(x)
            return jnp.sum(y ** 2) + stats.load_balance_loss + stats.router_z_loss

        results[dispatch] = (nnx.value_and_grad(loss)(layer), layer)
    (loss_r, grads_r), layer_r = results["ragged"]
    (loss_c, grads_c), _ = results["capacity"]
    np.testing.assert_allclose(float(loss_c), float(loss_r), rtol=1e-5)
    flat_r, flat_c = dict(nnx.to_flat_state(grads_r)), dict(nnx.to_flat_state(grads_c))
    assert set(flat_r) == set(flat_c) and not any("routing_bias" in str(p) for p in flat_r)
    for path, g in flat_r.items():
        np.testing.assert_allclose(np.asarray(flat_c[path][...]), np.asarray(g[...]),
                                   rtol=1e-4, atol=1e-4 * float(jnp.abs(g[...]).max()),
                                   err_msg=str(path))
    assert isinstance(layer_r.routing_bias, RoutingBias)
    _, stats = MoE(_model_cfg(dispatch="capacity", capacity_factor=0.5),
                   rngs=nnx.Rngs(0))(x)
    assert 0.0 < float(stats.dropped_fraction) < 1.0


# --- the decoder with MoE blocks (configs/tiny_moe.py) ------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny_moe.py"
# tiny_moe shrunk: 2 blocks (1 dense, 1 MoE), 8 windows of 64 tokens
SHRUNK = ["--config.model.n_layers=2", "--config.data.seq_len=64", "--config.data.batch_size=8",
          "--config.data.max_bytes=200000"]

BAD_MOE = [
    ("tiny.py", "model.moe.top_k=3", "model.moe.top_k"),  # a dense model: MoE fields apply not
    ("tiny_moe.py", "model.moe.top_k=9", "model.moe.top_k"),
    ("tiny_moe.py", "model.moe.first_dense_layers=4", "model.moe.first_dense_layers"),
    ("tiny_moe.py", "model.moe.score=relu", "model.moe.score"),
    ("tiny_moe.py", "model.moe.dispatch=dense", "model.moe.dispatch"),
    ("tiny_moe.py", "model.moe.capacity_factor=2.0", "model.moe.capacity_factor"),
    ("tiny_moe.py", "model.moe.capacity_factor=0", "model.moe.capacity_factor"),
    ("tiny_moe.py", "model.lora.rank=4", "model.lora.rank"),
]


@pytest.mark.parametrize("config,override,field", BAD_MOE, ids=[b[1] for b in BAD_MOE])
def test_bad_moe_configs_name_their_field(config, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / config, ["--config." + override])


def test_dpo_and_hf_export_refuse_a_moe_model_clearly():
    """DPO refuses a MoE model; HF export refuses tiny_moe's shared expert, which Mixtral and
    Qwen3-MoE lack (tests/test_hf_moe.py has the exportable MoE models)."""
    cfg = load_config(TINY_MOE)
    cfg.train.objective, cfg.data.source, cfg.data.path = "dpo", "prepared", "/nowhere"
    with pytest.raises(ConfigError, match="train.objective.*mixture-of-experts"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"model\.moe\.n_shared_experts=1: cannot export"):
        to_hf_config(load_config(TINY_MOE), "float32", {})


def _moe_decoder(*overrides):
    cfg = load_config(TINY_MOE, [*SHRUNK, *overrides])
    return cfg, Decoder.from_config(cfg)


def test_the_first_blocks_stay_dense_and_the_rest_have_experts():
    from gigajax.parallel.shardings import abstract_model

    def shapes(*overrides):
        cfg = ModelConfig.from_config(load_config(TINY_MOE, list(overrides)))
        _, state = abstract_model(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        return {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(state)}

    got = shapes()
    assert got["blocks/mlp/w_gate"] == (1, 128, 384)  # block 1: the dense SwiGLU
    assert got["moe_blocks/mlp/w_gate"] == (3, 8, 128, 96)  # blocks 2-4: 8 experts each
    assert got["moe_blocks/mlp/shared/w_gate"] == (3, 128, 96)
    assert got["moe_blocks/mlp/router"] == (3, 128, 8)
    all_moe = shapes("--config.model.moe.first_dense_layers=0")
    assert not any(p.startswith("blocks/") for p in all_moe)
    assert all_moe["moe_blocks/mlp/w_up"] == (4, 8, 128, 96)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 32)))
    stats = nnx.jit(lambda m, t: m.features_and_stats(t)[1])(
        _moe_decoder("--config.model.moe.first_dense_layers=0")[1], tokens)
    assert stats.load_X.shape == (2, 8) and stats.router_z_loss.shape == (2,)
    dense = Decoder.from_config(load_config(ROOT / "configs" / "tiny.py", SHRUNK))
    assert jax.eval_shape(lambda t: dense.features_and_stats(t)[1], tokens) is None


def test_unrolled_layers_and_remat_equal_the_scanned_layers():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 64)))

    def loss_and_grads(*overrides):
        _, model = _moe_decoder(*overrides)

        def loss(model):
            x, stats = model.features_and_stats(tokens)
            return jnp.mean(model.logits(x) ** 2) + jnp.sum(stats.load_balance_loss)

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), dict(nnx.to_flat_state(grads))

    ref_value, ref_grads = loss_and_grads()
    for overrides in (["--config.model.scan_layers=false"], ["--config.model.remat=full"]):
        value, grads = loss_and_grads(*overrides)
        assert value == pytest.approx(ref_value, rel=1e-6), overrides
        for path, g in ref_grads.items():
            np.testing.assert_allclose(np.asarray(grads[path][...]), np.asarray(g[...]),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{overrides} {path}")


def test_decoding_with_a_cache_equals_the_full_forward():
    _, model = _moe_decoder("--config.model.moe.first_dense_layers=1")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 384, (2, 24)))
    cache = model.init_cache(2, 32)
    first, cache = model.decode(tokens[:, :16], cache, jnp.int32(0))
    rest, _ = model.decode(tokens[:, 16:], cache, jnp.int32(16))
    np.testing.assert_allclose(np.asarray(jnp.concatenate([first, rest], 1)),
                               np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)


def test_the_objective_adds_the_weighted_auxiliary_losses():
    from gigajax.train.step import make_loss_fn

    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 384, (4, 65)))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(64), (4, 64)),
             "segment_ids": jnp.ones((4, 64), jnp.int32), "loss_mask": jnp.ones((4, 64))}
    results = {}
    for weight in (0.0, 0.5):
        _, model = _moe_decoder(f"--config.model.moe.aux_loss_weight={weight}",
                                "--config.model.moe.z_loss_weight=0.1")
        graphdef, params = nnx.split(model)
        loss_fn = make_loss_fn(graphdef)
        (objective, (nll_sum, count, sums)), grads = jax.jit(jax.value_and_grad(
            loss_fn, has_aux=True))(params, batch)
        results[weight] = grads
        balance, z = sums["moe_balance_loss"] / count, sums["moe_z_loss"] / count
        assert float(count) == 256.0 and float(balance) >= 1.0 - 1e-6
        np.testing.assert_allclose(float(objective),
                                   float(nll_sum + count * (weight * balance + 0.1 * z)),
                                   rtol=1e-6)
        assert 1.0 <= float(sums["moe_load_max"] / count) <= 8.0
        assert float(sums["moe_dropped"]) == 0.0
    router = ("moe_blocks", "mlp", "router")
    flat = {w: dict(nnx.to_flat_state(g)) for w, g in results.items()}
    difference = np.abs(np.asarray(flat[0.5][router][...]) - np.asarray(flat[0.0][router][...]))
    assert difference.max() > 1e-6  # the balance loss reaches the router
    np.testing.assert_array_equal(np.asarray(flat[0.5][("lm_head",)][...]),  # after the
                                  np.asarray(flat[0.0][("lm_head",)][...]))  # experts: nll only


def test_active_parameters_count_top_k_of_the_routed_experts():
    from gigajax.model.inventory import matmul_params

    cfg = ModelConfig.from_config(load_config(TINY_MOE))
    dense_like = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, top_k=8))
    experts = 3 * 8 * 3 * 128 * 96  # 3 MoE blocks x 8 experts x 3 matrices
    assert matmul_params(dense_like) - matmul_params(cfg) == pytest.approx(experts * 6 / 8)


@pytest.mark.parametrize("dispatch,layouts", [
    ("ragged", "fsdp=2,sequence=2,tensor=2"),
    ("capacity", "fsdp=4,tensor=2"),
])
def test_moe_under_the_dense_layouts_equals_one_device(dispatch, layouts):
    """Expert weights shard like the dense MLP's (embed over fsdp, mlp over tensor) and GSPMD
    places the dispatch: loss 1e-5 and gradients 1e-4 relative to one device."""
    import gigajax

    overrides = [*SHRUNK, f"--config.model.moe.dispatch={dispatch}"]
    if dispatch == "capacity":
        overrides.append("--config.model.moe.capacity_factor=1.0")  # some assignments drop
    rows = gigajax.check_layouts(load_config(TINY_MOE, overrides), layouts, steps=2)
    for row in rows:
        assert row["ok"], row
        assert row["loss_rel_diff"] <= 1e-5 and row["grad_rel_diff"] <= 1e-4, row


def test_a_moe_run_logs_its_expert_metrics(tmp_path):
    import json

    import gigajax

    cfg = load_config(TINY_MOE, [*SHRUNK, "--config.mesh.data=8", "--config.train.steps=2",
                                 "--config.train.log_every=1", "--config.train.eval_every=2",
                                 "--config.train.eval_batches=1",
                                 "--config.train.checkpoint_every=2"])
    gigajax.train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["moe_balance_loss"] >= 1.0 - 1e-6 and 1.0 <= row["moe_load_max"] <= 8.0
        assert row["moe_dropped"] == 0.0 and row["moe_z_loss"] > 0
    assert rows[-1]["eval_moe_load_max"] >= 1.0


def test_the_routing_bias_moves_towards_balance_outside_the_optimizer(tmp_path):
    """bias_update_rate: after each step every layer's bias moves by the rate against its
    logged load (DeepSeek-V3), and the optimizer holds no state for it (no weight decay)."""
    import json

    import optax

    import gigajax
    from gigajax.checkpoint.params import read_params
    from gigajax.parallel.mesh import make_mesh
    from gigajax.train.state import StateBuilder, layout_for

    rate = 0.01
    cfg = load_config(TINY_MOE, [*SHRUNK, "--config.mesh.data=8", "--config.train.steps=2",
                                 "--config.train.log_every=1", "--config.train.eval_every=2",
                                 "--config.train.eval_batches=1",
                                 "--config.train.checkpoint_every=2",
                                 f"--config.model.moe.bias_update_rate={rate}"])
    gigajax.train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loads = np.array([row["moe_load"] for row in rows])  # [steps, MoE layers, X]
    assert loads.shape == (2, 1, 8) and np.allclose(loads.sum(-1), 1.0)
    assert np.array(rows[-1]["eval_moe_load"]).shape == (1, 8)
    bias = np.asarray(read_params(tmp_path).params["moe_blocks"]["mlp"]["routing_bias"])
    want = rate * np.sign(1 / 8 - loads).sum(0)
    np.testing.assert_allclose(bias, want, atol=1e-7)
    assert np.abs(bias).max() > 0  # the control: tiny_moe's router is not balanced at start
    mesh = make_mesh(cfg.mesh)
    builder = StateBuilder(cfg, mesh, layout_for(cfg, mesh), optax.adamw(1e-3))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(builder.abstract["opt_state"])[0]]
    assert paths and not any("routing_bias" in p for p in paths)
