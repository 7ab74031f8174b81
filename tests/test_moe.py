"""Mixture of experts (`ops/moe_dispatch.py`, `model/moe.py`): routing equals a per-token loop,
the dropless (ragged) and the capacity dispatch equal a per-token loop over experts and each
other when nothing is dropped (outputs and gradients), capacity drops the right assignments and
counts them, and the auxiliary losses have their known values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigajax.config import ModelConfig, MoEConfig, base_config
from gigajax.config.schema import MOE_DISPATCHES, MOE_ROUTER_SCORES
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
