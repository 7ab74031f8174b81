"""Jitted training and evaluation steps: pure functions of (state, batch).

The train state is a plain pytree `{"step", "skipped", "params", "opt_state"}`; the model graph
is fixed once (`nnx.split`) and merged inside the step, so `jax.jit` sees only arrays. Gradient
accumulation scans over microbatches of *summed* losses and divides by the total number of
unmasked tokens once, which makes M microbatches give the same update as one batch of M x.
A step whose loss or gradient norm is not finite keeps the old parameters and optimizer state
(the batch is consumed, `skipped` counts it, metric `nonfinite` is 1). That also covers an
update that would overflow: a finite gradient norm bounds every squared gradient (so both Adam
moments, Lion's and Adafactor's statistics stay finite), and the normalised updates of these
optimizers are a few times `optim.lr` at most, which the config caps at 1. Checking the new
state itself would hold a second copy of it until the check is done (+223 MiB, 8% of the
compiled step of configs/small.py at data=8: docs/design.md). The loop's
`train.nonfinite` policy decides whether training goes on. The optimizer's own counter, which
drives the LR schedule, counts applied updates, so its LR is schedule(step - skipped).

Under LoRA (`lora=True`) the parameters split into the adapters, which are differentiated and
updated, and the frozen rest, which is closed over: no gradient is computed for it, the
optimizer state holds the adapters only, and it leaves the step as it came in (bitwise; the
donated buffers alias). LoRA dropout draws its masks from (seed, step, microbatch), so a
resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gigajax.config import MoEConfig
from gigajax.model.lora import combine, trainable_and_frozen
from gigajax.model.moe import ROUTING_BIAS, MoEStats
from gigajax.ops import moe_dispatch
from gigajax.ops.loss import chunked_cross_entropy_sums
from gigajax.parallel.rules import DATA_PARALLEL, Rules
from gigajax.parallel.shardings import activation_rules

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]
MOE_METRICS = ("moe_balance_loss", "moe_z_loss", "moe_load_max", "moe_dropped")  # moe_objective
MOE_LOAD = "moe_load"  # [MoE layers, X]: each expert's share of its layer's assignments


def make_loss_fn(graphdef: nnx.GraphDef, z_loss: float = 0.0,
                 rules: Rules = DATA_PARALLEL.activations, loss_chunks: int = 1) -> Callable:
    """`loss_fn(params, batch, dropout_key=None) -> (nll_sum + z_sum, (nll_sum, token_count))`.

    `rules` are the layout's activation rules, in force while the model is traced;
    `loss_chunks` > 1 computes the head and loss that many slices of tokens at a time;
    `dropout_key` turns LoRA dropout on (training only). A mixture-of-experts model adds its
    weighted auxiliary losses (`moe_objective`) and returns its metric sums third.
    """

    def loss_fn(params: nnx.State, batch: Batch, dropout_key: jax.Array | None = None):
        model = nnx.merge(graphdef, params)
        with activation_rules(rules):
            x_BTD, stats = model.features_and_stats(batch["inputs"], batch["positions"],
                                                    batch["segment_ids"], dropout_key)
            nll_sum, z_sum, count = chunked_cross_entropy_sums(
                x_BTD, model.logits, batch["targets"], batch["loss_mask"], z_loss, loss_chunks)
        if stats is None:
            return nll_sum + z_sum, (nll_sum, count)
        aux, metric_sums = moe_objective(stats, model.cfg.moe, count)
        return nll_sum + z_sum + aux, (nll_sum, count, metric_sums)

    return loss_fn


def moe_objective(stats: MoEStats, moe: MoEConfig, count: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the auxiliary losses' share of the summed objective, the MoE metrics times `count`).

    The objective is a sum over tokens divided by their global count, so the auxiliary losses,
    means over the batch and the MoE layers, enter multiplied by this batch's count: an
    accumulated step then weighs each microbatch by its tokens. Metrics: the mean balance
    loss and z-loss, the most loaded expert's load over the mean (1: balanced; the worst
    layer), the share of assignments dropped (capacity dispatch), and each layer's load
    vector (`MOE_LOAD`, what the routing-bias update reads)."""
    balance, z = jnp.mean(stats.load_balance_loss), jnp.mean(stats.router_z_loss)
    aux = moe.aux_loss_weight * balance + moe.z_loss_weight * z
    load_max = jnp.max(stats.load_X) * stats.load_X.shape[-1]
    metrics = dict(zip(MOE_METRICS, (balance, z, load_max, jnp.mean(stats.dropped_fraction)),
                       strict=True))
    metrics[MOE_LOAD] = stats.load_X
    return count * aux, {k: count * v for k, v in metrics.items()}


def is_routing_bias(path: tuple) -> bool:
    """Whether a state path is a MoE layer's routing bias (`model.moe.RoutingBias`)."""
    return any(getattr(key, "key", getattr(key, "name", None)) == ROUTING_BIAS for key in path)


def split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """[B, ...] -> [M, B/M, ...] taking rows i, i+M, ... for microbatch i.

    Strided rows keep each data-parallel shard's rows on its own device (no resharding).
    """
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, microbatches: int = 1, z_loss: float = 0.0,
                    rules: Rules = DATA_PARALLEL.activations, loss_chunks: int = 1,
                    lora: bool = False, dropout_seed: int | None = None,
                    loss_fn: Callable | None = None, bias_update_rate: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer step over a global batch, accumulating `microbatches` gradients by scan.

    `lora`: train the adapters only (module doc); `dropout_seed`: LoRA dropout on, its masks
    from (seed, step, microbatch). `loss_fn(params, batch, dropout_key) -> (objective sum,
    (loss sum, count[, metric sums]))` defaults to the next-token loss (`make_loss_fn`);
    `train/objectives.py` has DPO's, whose metric sums (a dict) are divided by the count into
    metrics of the same names. `bias_update_rate` > 0: a MoE model's routing bias (not
    trained: `trainable_and_frozen`) moves towards balance by the step's per-layer load
    (`ops.moe_dispatch.balance_bias_update`, DeepSeek-V3).
    """
    loss_fn = loss_fn or make_loss_fn(graphdef, z_loss, rules, loss_chunks)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, frozen = trainable_and_frozen(state["params"], lora)
        grad_fn = jax.grad(lambda p, b, k: loss_fn(combine(p, frozen), b, k), has_aux=True)
        step_key = (None if dropout_seed is None
                    else jax.random.fold_in(jax.random.key(dropout_seed), state["step"]))
        if microbatches == 1:
            grads, aux = grad_fn(params, batch, step_key)
        else:
            def accumulate(carry, xs):
                microbatch, index = xs
                key = None if step_key is None else jax.random.fold_in(step_key, index)
                return jax.tree.map(jnp.add, carry, grad_fn(params, microbatch, key)), None

            microbatched = split_microbatches(batch, microbatches)
            aux_shapes = jax.eval_shape(
                lambda p, b: loss_fn(combine(p, frozen), b, step_key)[1], params,
                jax.tree.map(lambda x: x[0], microbatched))
            zeros = (jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
            (grads, aux), _ = jax.lax.scan(accumulate, zeros,
                                           (microbatched, jnp.arange(microbatches)))
        nll_sum, count, *extra = aux
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(nll_sum) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)

        def keep_if_bad(new, old):
            return jnp.where(finite, new, old)

        if bias_update_rate and extra and MOE_LOAD in extra[0]:
            load_LX = extra[0][MOE_LOAD] / count  # the step's per-layer load, token-weighted
            frozen = jax.tree.map_with_path(
                lambda path, x: keep_if_bad(moe_dispatch.balance_bias_update(
                    x, load_LX, bias_update_rate), x) if is_routing_bias(path) else x, frozen)

        new_state = {
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
            "params": combine(jax.tree.map(keep_if_bad, optax.apply_updates(params, updates),
                                           params), frozen),
            "opt_state": jax.tree.map(keep_if_bad, opt_state, state["opt_state"])}
        metrics = {"loss": nll_sum / count, "grad_norm": grad_norm,
                   "lr": schedule(state["step"] - state["skipped"]), "tokens": count,
                   "nonfinite": (~finite).astype(jnp.int32), "skipped": new_state["skipped"]}
        metrics.update({k: v / count for k, v in (extra[0] if extra else {}).items()})
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, rules: Rules = DATA_PARALLEL.activations,
                   loss_chunks: int = 1, loss_fn: Callable | None = None
                   ) -> Callable[[nnx.State, Batch], tuple]:
    """`eval_step(params, batch) -> (nll_sum, token_count[, metric sums])`; average over
    batches on the host. `loss_fn`: as for `make_train_step` (default: the next-token loss
    without z-loss)."""
    loss_fn = loss_fn or make_loss_fn(graphdef, rules=rules, loss_chunks=loss_chunks)

    def eval_step(params: nnx.State, batch: Batch):
        return loss_fn(params, batch)[1]

    return eval_step
