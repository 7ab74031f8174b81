"""DPO (`train.objective=dpo`, train/objectives.py): ln 2 at step 0, the gradient of the paper's
loss (and its label-smoothed form) against one derived by hand, the synthetic preference task
learnt, DPO with LoRA under a sharded layout as on one device, bad pairs and bad config values
refused, and a resumed run keeping its stored reference. fp32 throughout."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gigajax
from gigajax.config import ModelConfig, load_config
from gigajax.data.packing import max_pairs
from gigajax.data.pipeline import build_datasets
from gigajax.data.prepare import prepare
from gigajax.data.synthetic import preference_records
from gigajax.errors import ConfigError, DataError
from gigajax.model import Decoder
from gigajax.ops.layouts import layout_permutation, permute_sequence
from gigajax.ops.loss import pair_sums
from gigajax.plan.equivalence import GRAD_RTOL, LOSS_RTOL, max_relative_difference, run_layout
from gigajax.plan.layouts import parse_layouts
from gigajax.train import reference as dpo_reference
from gigajax.train.objectives import dpo_sums, make_dpo_loss_fn, make_pair_log_probs_fn

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
LN2 = math.log(2.0)
BETA = 1.0
STEPS = 300
# experiments/dpo_synthetic.py's task on a 2-layer d_model 64 model: 1,000 pairs, 64-token windows
MODEL = ["--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.n_layers=2",
         "--config.model.max_seq_len=64", "--config.model.dtype=float32",
         "--config.data.seq_len=64", "--config.data.batch_size=8",
         "--config.attention.block_q=32", "--config.attention.block_kv=32",
         "--config.data.source=prepared", "--config.train.objective=dpo",
         f"--config.dpo.beta={BETA}"]
RUN = ["--config.optim.lr=3e-3", "--config.optim.warmup_steps=10",
       "--config.optim.weight_decay=0.0", "--config.mesh.data=-1",
       "--config.checkpoint.async_save=false", f"--config.train.steps={STEPS}",
       "--config.train.log_every=1", f"--config.train.eval_every={STEPS // 3}",
       "--config.train.eval_batches=4", f"--config.train.checkpoint_every={STEPS}"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """`data prepare --dpo` of the synthetic preference task (the rule: repeat the last letter)."""
    out = tmp_path_factory.mktemp("dpo")
    records = out / "pairs.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in preference_records(1000, seed=0)))
    prepare([str(records)], "byte", out / "data", dpo=True, val_fraction=0.1, workers=1,
            progress=False, echo=None)
    return out / "data"


def config(pairs_dir: Path, *overrides: str):
    return load_config(TINY, [*MODEL, f"--config.data.path={pairs_dir}", *overrides])


@pytest.fixture(scope="module")
def dpo_run(pairs_dir, tmp_path_factory):
    """A real DPO run on one device from the seeded initialisation: (workdir, metrics rows)."""
    workdir = tmp_path_factory.mktemp("dpo_run") / "run"
    gigajax.train(config(pairs_dir, *RUN), workdir, progress=False)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, rows


@pytest.fixture(scope="module")
def tiny_case(pairs_dir):
    """Two real packed windows of pairs, a model, its params and the pairs' log-probs under
    them (the reference): (cfg, graphdef, params, batch with `reference` set, reference)."""
    cfg = config(pairs_dir)
    graphdef, params = nnx.split(Decoder(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0)))
    _, train_ds, _ = build_datasets(cfg.data, cfg.train.seed)
    batch = {k: v[:2] for k, v in train_ds[0].items()}
    num_pairs = max_pairs(cfg.data.seq_len)
    ref_BP2 = np.asarray(jax.jit(make_pair_log_probs_fn(graphdef, num_pairs))(params, batch))
    return cfg, graphdef, params, with_reference(batch, ref_BP2), ref_BP2


def with_reference(batch: dict, ref_BP2: np.ndarray) -> dict:
    """`batch` with each pair half's reference sum on the half's last token (as the pipeline
    puts it on its EOS), so `pair_sums(reference, pairs)` gives back `ref_BP2`."""
    reference_BT = np.zeros(batch["pairs"].shape, np.float32)
    for b, p, half in np.ndindex(ref_BP2.shape):
        where = np.flatnonzero(batch["pairs"][b] == (p + 1) * (1 - 2 * half))
        if len(where):
            reference_BT[b, where[-1]] = ref_BP2[b, p, half]
    return {**batch, "reference": reference_BT}


def test_dpo_loss_is_ln2_when_the_policy_is_the_reference(tiny_case, dpo_run):
    """m = 0: -log sigmoid(0) = ln 2 with or without label smoothing, from `dpo_sums`, from the
    loss function at the reference's params, and as the first logged loss of a real run."""
    rng = np.random.default_rng(0)
    logp_BP2 = rng.normal(-20.0, 5.0, (3, 4, 2)).astype(np.float32)
    valid_BP = rng.random((3, 4)) < 0.7
    for eps in (0.0, 0.2):
        loss_sum, count, sums = dpo_sums(logp_BP2, logp_BP2, valid_BP, BETA, eps)
        assert float(count) == valid_BP.sum()
        np.testing.assert_allclose(float(loss_sum) / float(count), LN2, rtol=1e-6)
        assert all(float(v) == 0.0 for v in sums.values())  # no reward, no pair with m > 0

    cfg, graphdef, params, batch, _ = tiny_case
    loss_fn = make_dpo_loss_fn(graphdef, BETA, 0.0, max_pairs(cfg.data.seq_len))
    loss_sum, (_, count, _) = jax.jit(loss_fn)(params, batch)
    assert float(count) >= 3  # whole pairs of two windows
    np.testing.assert_allclose(float(loss_sum) / float(count), LN2, rtol=1e-5)

    _, rows = dpo_run
    assert rows[0]["step"] == 1
    np.testing.assert_allclose(rows[0]["loss"], LN2, rtol=1e-5)
    assert abs(rows[0]["reward_margin"]) < 1e-4 and abs(rows[0]["chosen_reward"]) < 1e-4


@pytest.mark.parametrize("eps", [0.0, 0.2], ids=["plain", "label_smoothing"])
def test_dpo_gradient_equals_the_hand_derived_one(tiny_case, eps):
    """At params where m != 0 (the reference's, perturbed): d loss / d params =
    sum over pairs of -beta ((1-eps) sigmoid(-beta m) - eps sigmoid(beta m)) (grad pi_c -
    grad pi_r), each pair half's log-prob gradient taken on its own (jax.grad)."""
    cfg, graphdef, params, batch, ref_BP2 = tiny_case
    num_pairs = max_pairs(cfg.data.seq_len)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    policy = jax.tree.map(lambda x: x + 0.05 * jnp.std(x) * jax.random.normal(next(keys), x.shape),
                          params)
    pair_log_probs = make_pair_log_probs_fn(graphdef, num_pairs)
    pi_BP2 = np.asarray(jax.jit(pair_log_probs)(policy, batch), np.float64)
    # d pi[b, p, half] / d params, each on its own (one jitted grad, the index traced)
    grad_half = jax.jit(jax.grad(lambda p, b, q, h: pair_log_probs(p, batch)[b, q, h]))
    counts_BP2 = np.asarray(pair_sums(batch["loss_mask"], batch["pairs"], num_pairs))
    valid_BP = (counts_BP2[..., 0] > 0) & (counts_BP2[..., 1] > 0)
    m_BP = ((pi_BP2[..., 0] - ref_BP2[..., 0]) - (pi_BP2[..., 1] - ref_BP2[..., 1])) * valid_BP
    assert np.abs(m_BP[valid_BP]).min() > 1e-3  # away from the m = 0 of step 0

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    coef_BP = -BETA * ((1 - eps) * sigmoid(-BETA * m_BP) - eps * sigmoid(BETA * m_BP))
    want = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), jax.device_get(policy))
    for b, q in zip(*np.nonzero(valid_BP), strict=True):
        chosen, rejected = (jax.device_get(grad_half(policy, b, q, h)) for h in (0, 1))
        want = jax.tree.map(lambda w, c, r, k=coef_BP[b, q]: w + k * (np.float64(c) - r),
                            want, chosen, rejected)
    loss_fn = make_dpo_loss_fn(graphdef, BETA, eps, num_pairs)
    got = jax.jit(jax.grad(lambda p: loss_fn(p, batch)[0]))(policy)
    assert max_relative_difference(jax.device_get(got), want) <= 1e-5
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(want)) > 1e-3  # not all zero


@pytest.mark.slow(seconds=20)
def test_held_out_preference_accuracy_rises_above_0_9(dpo_run):
    """The synthetic preference task is learnt: held-out accuracy (share of pairs with m > 0)
    from chance to > 0.9 and the held-out loss well under ln 2 within 300 steps."""
    _, rows = dpo_run
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["eval_accuracy"] > 0.9
    assert evals[-1]["eval_loss"] < 0.6 * LN2
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] > 0


def test_pair_sums_are_the_same_in_ring_order():
    """A ring permutes every [B, T] array of a batch together (zigzag, striped); the sums over
    each pair half do not depend on the order."""
    rng = np.random.default_rng(0)
    pairs_BT = np.zeros((2, 64), np.int32)
    pairs_BT[:, 0:20], pairs_BT[:, 20:37], pairs_BT[:, 37:50], pairs_BT[:, 50:61] = 1, -1, 2, -2
    values_BT = rng.normal(size=(2, 64)).astype(np.float32)
    want = np.asarray(pair_sums(values_BT, pairs_BT, 10))
    for layout in ("zigzag", "striped"):
        perm = layout_permutation(64, 4, layout)
        assert not np.array_equal(perm, np.arange(64))
        got = pair_sums(permute_sequence(values_BT, perm), permute_sequence(pairs_BT, perm), 10)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.abs(want[:, :2]).min() > 0 and not want[:, 2:].any()


@pytest.mark.slow(seconds=20)
def test_dpo_with_lora_under_fsdp_sequence_tensor_equals_one_device(pairs_dir, dpo_run):
    """fsdp=2 x sequence=2 (zigzag ring) x tensor=2, LoRA on every projection, label
    smoothing, a reference away from the policy (m != 0): losses, the adapters' gradients and
    the parameters after 3 steps as on one device."""
    workdir, _ = dpo_run
    rng = np.random.default_rng(0)
    with np.load(workdir / dpo_reference.FILE) as stored:
        reference = {s: stored[s] + rng.normal(0, 1, stored[s].shape).astype(np.float32)
                     for s in ("train", "validation")}
    cfg = config(pairs_dir, "--config.model.lora.rank=4", "--config.model.lora.alpha=8",
                 "--config.dpo.label_smoothing=0.1", "--config.optim.warmup_steps=1")
    _, train_ds, _ = build_datasets(cfg.data, cfg.train.seed, reference=reference)
    batches = [train_ds[s] for s in range(3)]
    assert all(b["reference"].any() and (b["pairs"] < 0).any() for b in batches)
    one = run_layout(cfg, {}, batches)
    run = run_layout(cfg, parse_layouts("fsdp=2,sequence=2,tensor=2")[0], batches)
    assert not any(abs(loss - LN2) < 1e-3 for loss in one.losses)  # m != 0
    np.testing.assert_allclose(run.losses, one.losses, rtol=LOSS_RTOL)
    assert max_relative_difference(run.grads, one.grads) <= GRAD_RTOL
    assert max_relative_difference(run.params, one.params) <= GRAD_RTOL
    assert len(jax.tree.leaves(run.grads)) == 14 and one.param_change > 1e-4  # the adapters


def write_pairs(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_a_pair_without_a_field_is_a_one_line_error_naming_it_and_its_line(tmp_path, field):
    good = {"prompt": "abc", "chosen": "cc", "rejected": "dd"}
    bad = {k: v for k, v in good.items() if k != field}
    path = write_pairs(tmp_path / "pairs.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as error:
        prepare([str(path)], "byte", tmp_path / "out", dpo=True, workers=1, progress=False,
                echo=None)
    message = str(error.value)
    assert "\n" not in message and "pairs.jsonl:3:" in message and f"no {field!r}" in message


@pytest.mark.parametrize("override,field", [("dpo.beta=0", "dpo.beta"),
                                            ("dpo.beta=-0.1", "dpo.beta"),
                                            ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
                                            ("dpo.label_smoothing=-0.1", "dpo.label_smoothing")])
def test_bad_dpo_values_name_their_field(pairs_dir, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        config(pairs_dir, "--config." + override)
    assert "\n" not in str(error.value)


@pytest.mark.slow(seconds=8)
def test_a_resumed_run_keeps_the_stored_reference(pairs_dir, dpo_run, tmp_path):
    """Resumed, a run reads dpo_reference.npz back rather than recomputing it (the file is
    left as it was); without the file, it recomputes it from the starting parameters (the
    seeded initialisation, bitwise the first run's), not from the resumed ones, which have
    moved far from it (the last logged rewards beta (pi - ref))."""
    workdir, rows = dpo_run
    resumed = tmp_path / "run"
    shutil.copytree(workdir, resumed)
    path = resumed / dpo_reference.FILE
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    cfg = config(pairs_dir, *RUN)
    assert gigajax.train(cfg, resumed, progress=False).start_step == STEPS
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime

    path.unlink()
    gigajax.train(cfg, resumed, progress=False)
    with np.load(workdir / dpo_reference.FILE) as first, np.load(path) as again:
        for split in ("train", "validation"):
            np.testing.assert_array_equal(again[split], first[split])
    assert abs(rows[-1]["chosen_reward"] - rows[-1]["rejected_reward"]) > 1.0
