"""Specification of gigajax.train.optim: descent, schedules, decay mask, clipping, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from gigajax.config import base_config, validate
from gigajax.errors import ConfigError
from gigajax.train.optim import decay_mask, make_optimizer
from gigajax.train.preflight import notes

V, D, C, L = 16, 8, 4, 3  # vocab, model dim, classes, stacked layers


def optim_cfg(**overrides) -> ml_collections.ConfigDict:
    """A valid `optim` config; keyword arguments override fields."""
    cfg = ml_collections.ConfigDict(
        {
            "name": "adamw",
            "lr": 1e-2,
            "warmup_steps": 5,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip_norm": 1.0,
            "moment_dtype": "float32",
            "decay_norms_and_embeddings": False,
        }
    )
    cfg.update(overrides)
    return cfg


def softmax_regression():
    """Params {embed [V,D], norm [D], w [D,C]}, a loss, and a fixed random labelling of tokens."""
    k_embed, k_w, k_y = jax.random.split(jax.random.key(0), 3)
    params = {
        "embed": 0.5 * jax.random.normal(k_embed, (V, D)),
        "norm": jnp.ones((D,)),
        "w": 0.1 * jax.random.normal(k_w, (D, C)),
    }
    tokens = jnp.arange(V)
    labels = jax.random.randint(k_y, (V,), 0, C)

    def loss(p):
        logits_VxC = (p["embed"][tokens] * p["norm"]) @ p["w"]
        return optax.softmax_cross_entropy_with_integer_labels(logits_VxC, labels).mean()

    return params, loss


@pytest.mark.parametrize("name,lr", [("adamw", 5e-2), ("adafactor", 5e-2), ("lion", 3e-2)])
def test_each_optimizer_lowers_softmax_regression_loss(name, lr):
    params, loss = softmax_regression()
    tx, _ = make_optimizer(optim_cfg(name=name, lr=lr, weight_decay=0.01), total_steps=30)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(30):
        params, state = step(params, state)
    assert float(loss(params)) < 0.25 * start  # each reaches < 0.1 * start at these lrs


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_to_peak_then_decays_to_floor(kind):
    _, schedule = make_optimizer(
        optim_cfg(lr=2.0, warmup_steps=10, schedule=kind, min_lr_ratio=0.25), total_steps=50
    )
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 1.0, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 2.0, rtol=1e-6)
    end = 2.0 if kind == "constant" else 0.5
    np.testing.assert_allclose(schedule(50), end, rtol=1e-6)
    np.testing.assert_allclose(schedule(80), end, rtol=1e-6)  # holds past total_steps
    mid = {"cosine": 0.5 + 1.5 * 0.5, "linear": 0.5 + 1.5 * 0.5, "constant": 2.0}[kind]
    np.testing.assert_allclose(schedule(30), mid, rtol=1e-6)  # halfway through the decay
    if kind == "cosine":  # cosine sits above the straight line in the first half of the decay
        np.testing.assert_array_less(0.5 + 1.5 * 0.75, schedule(20))


def test_wsd_stays_flat_then_settles_over_its_last_fraction():
    """schedule=wsd, 100 steps, warmup 10, decay over the last 0.2: flat at lr from step 10 to
    80, then a straight line to lr * min_lr_ratio at step 100."""
    _, schedule = make_optimizer(
        optim_cfg(lr=2.0, warmup_steps=10, schedule="wsd", min_lr_ratio=0.25,
                  wsd_decay_fraction=0.2), total_steps=100)
    np.testing.assert_allclose(schedule(5), 1.0, rtol=1e-6)
    for step in (10, 45, 80):
        np.testing.assert_allclose(schedule(step), 2.0, rtol=1e-6)
    np.testing.assert_allclose(schedule(90), 0.5 + 1.5 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 0.5, rtol=1e-6)
    np.testing.assert_allclose(schedule(130), 0.5, rtol=1e-6)


def stacked_params() -> dict:
    """A model-like tree: w/bias/norm, scanned blocks with [L, D] norms, an embed table."""
    ones = jnp.ones
    return {
        "embed": {"embedding": ones((V, D))},
        "layers": {
            "attn_norm": {"scale": ones((L, D))},
            "mlp": {"kernel": ones((L, D, 2 * D)), "bias": ones((L, 2 * D))},
        },
        "final_norm": {"scale": ones((D,))},
        "head": {"w": ones((D, V)), "b": ones((V,))},
    }


DECAYED = {"['layers']['mlp']['kernel']", "['head']['w']"}


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_zero_grad_update_decays_only_matrices(name):
    lr, wd = 0.1, 0.5
    cfg = optim_cfg(name=name, lr=lr, warmup_steps=0, schedule="constant", weight_decay=wd)
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = stacked_params()
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for path, leaf in jax.tree_util.tree_leaves_with_path(new):
        want = 1.0 - lr * wd if jax.tree_util.keystr(path) in DECAYED else 1.0  # decay scaled by lr
        np.testing.assert_allclose(leaf, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_decay_norms_and_embeddings_decays_everything():
    cfg = optim_cfg(
        warmup_steps=0, schedule="constant", weight_decay=0.5, decay_norms_and_embeddings=True
    )
    tx, _ = make_optimizer(cfg, total_steps=10)
    params = stacked_params()
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for leaf in jax.tree.leaves(optax.apply_updates(params, updates)):
        np.testing.assert_allclose(leaf, 1.0 - 1e-2 * 0.5, rtol=1e-6)


def test_decay_mask_on_nnx_state_of_params():
    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(V, D, rngs=rngs)
            self.norm = nnx.RMSNorm(D, rngs=rngs)
            self.proj = nnx.Linear(D, D, rngs=rngs)

    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    flat = {
        jax.tree_util.keystr(p): m
        for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(state))
    }
    assert {k for k, m in flat.items() if m} == {"['proj']['kernel'].value"}


def test_global_norm_clip_bounds_first_moment():
    grads = {"w": jnp.full((D, C), 1e6), "norm": jnp.full((D,), -1e6)}
    params = jax.tree.map(jnp.zeros_like, grads)
    first_moment_norms = {}
    for clip in (1.0, None):
        tx, _ = make_optimizer(optim_cfg(clip_norm=clip, b1=0.9), total_steps=10)
        _, state = tx.update(grads, tx.init(params), params)
        mu = [leaf for _, leaf in optax.tree.get_all_with_path(state, "mu")]
        first_moment_norms[clip] = float(optax.tree.norm(mu))
    # mu_1 = (1 - b1) * clipped grads, so its norm is (1 - b1) * clip_norm when clipping is on.
    np.testing.assert_allclose(first_moment_norms[1.0], 0.1, rtol=1e-5)
    assert first_moment_norms[None] > 1e5


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_bfloat16_moment_dtype_sets_mu_dtype(name):
    params, _ = softmax_regression()
    tx, _ = make_optimizer(optim_cfg(name=name, moment_dtype="bfloat16"), total_steps=10)
    mus = optax.tree.get_all_with_path(tx.init(params), "mu")
    assert mus
    dtypes = {leaf.dtype for _, mu in mus for leaf in jax.tree.leaves(mu)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "sgd"),
        ("schedule", "step"),
        ("moment_dtype", "float16"),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("warmup_steps", -1),
        ("min_lr_ratio", 1.5),
        ("min_lr_ratio", -0.1),
        ("clip_norm", -1.0),
        ("weight_decay", -0.1),
    ],
)
def test_bad_config_raises_config_error_naming_field(field, value):
    cfg = base_config()
    cfg.optim[field] = value
    with pytest.raises(ConfigError, match=rf"optim\.{field}={value!r}"):
        validate(cfg)


@pytest.mark.parametrize("steps", [0, -5])
def test_nonpositive_total_steps_raises_config_error(steps):
    cfg = base_config()
    cfg.train.steps = steps
    with pytest.raises(ConfigError, match=r"train\.steps"):
        validate(cfg)


def test_a_warmup_longer_than_the_run_warms_up_over_the_whole_run():
    """optim.warmup_steps=30 with train.steps=10: accepted, peak LR reached at the last step."""
    cfg = base_config()
    cfg.optim.update(warmup_steps=30, lr=1e-2, schedule="constant")
    cfg.train.steps = 10
    validate(cfg)
    assert notes(cfg) == ["optim.warmup_steps=30 is longer than train.steps=10: warming up "
                          "over all 10 steps"]
    _, schedule = make_optimizer(cfg.optim, total_steps=10)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10)], [0.0, 5e-3, 1e-2],
                               rtol=1e-6)


@pytest.mark.parametrize("clip", [0.0, None])
def test_clip_norm_zero_or_none_turns_clipping_off(clip):
    tx, _ = make_optimizer(optim_cfg(clip_norm=clip), total_steps=10)
    grads = {"w": jnp.full((2, 2), 1e6)}
    _, state = tx.update(grads, tx.init(grads), grads)
    mu = [leaf for _, leaf in optax.tree.get_all_with_path(state, "mu")]
    np.testing.assert_allclose(float(optax.tree.norm(mu)), 0.1 * 2e6, rtol=1e-5)
