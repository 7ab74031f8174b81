"""Training objectives (`train.objective`): lm, the next-token loss (`step.make_loss_fn`), and
dpo, Direct Preference Optimization (Rafailov et al. 2023) on `data prepare --dpo` pairs.

DPO: with pi_c, pi_r the policy's summed log-probabilities of the chosen and the rejected
response given the prompt, and ref_c, ref_r the reference model's, the margin is
m = (pi_c - ref_c) - (pi_r - ref_r) and the loss of a pair is

    (1 - eps) * -log sigmoid(beta * m) + eps * -log sigmoid(-beta * m)

(eps = dpo.label_smoothing, the conservative DPO form of TRL's "sigmoid" loss; eps = 0 is the
paper's). Its derivative in m is -beta * ((1 - eps) * sigmoid(-beta m) - eps * sigmoid(beta m)).
The loss is summed over the pairs of a batch and divided by their global count, like the token
losses (so microbatches and data parallelism normalise as one batch does). Metrics, means over
pairs: reward margin beta * m, chosen and rejected rewards beta * (pi - ref), and preference
accuracy, the share with m > 0. The reference sums come with the batch (`reference`,
`train/reference.py` computes them once from the starting parameters), so the objective needs
nothing but the params being trained: it works the same whichever of them train (LoRA).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gigajax.data.packing import max_pairs
from gigajax.ops.loss import chunked_pair_log_probs, pair_sums
from gigajax.parallel.rules import DATA_PARALLEL, Rules
from gigajax.parallel.shardings import activation_rules
from gigajax.train.step import Batch, make_loss_fn

DPO_METRICS = ("reward_margin", "chosen_reward", "rejected_reward", "accuracy")


def dpo_pair_losses(margin_BP: jnp.ndarray, beta: float, label_smoothing: float = 0.0
                    ) -> jnp.ndarray:
    """Each pair's DPO loss from its margin (module doc); -log sigmoid(z) = softplus(-z)."""
    z_BP = beta * margin_BP
    eps = label_smoothing
    return (1.0 - eps) * jax.nn.softplus(-z_BP) + eps * jax.nn.softplus(z_BP)


def dpo_sums(policy_BP2: jnp.ndarray, reference_BP2: jnp.ndarray, valid_BP: jnp.ndarray,
             beta: float, label_smoothing: float = 0.0
             ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """(loss sum, pair count, metric sums) over the valid pairs; [..., 2] = (chosen, rejected)."""
    valid_BP = valid_BP.astype(jnp.float32)
    reward_BP2 = beta * (policy_BP2 - reference_BP2)
    margin_BP = (policy_BP2[..., 0] - reference_BP2[..., 0]) - (policy_BP2[..., 1]
                                                                - reference_BP2[..., 1])
    loss_sum = jnp.sum(dpo_pair_losses(margin_BP, beta, label_smoothing) * valid_BP)
    sums = {"reward_margin": jnp.sum(beta * margin_BP * valid_BP),
            "chosen_reward": jnp.sum(reward_BP2[..., 0] * valid_BP),
            "rejected_reward": jnp.sum(reward_BP2[..., 1] * valid_BP),
            "accuracy": jnp.sum((margin_BP > 0) * valid_BP)}
    return loss_sum, jnp.sum(valid_BP), sums


def batch_pairs(batch: Batch, num_pairs: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(reference sums [B, P, 2], valid [B, P]): a slot is a pair when both halves have
    trained tokens."""
    counts_BP2 = pair_sums(batch["loss_mask"], batch["pairs"], num_pairs)
    valid_BP = (counts_BP2[..., 0] > 0) & (counts_BP2[..., 1] > 0)
    return pair_sums(batch["reference"], batch["pairs"], num_pairs), valid_BP


def make_pair_log_probs_fn(graphdef: nnx.GraphDef, num_pairs: int,
                           rules: Rules = DATA_PARALLEL.activations, loss_chunks: int = 1
                           ) -> Callable:
    """`fn(params, batch, dropout_key=None) -> [B, P, 2]`: each pair half's summed response
    log-probability (`dropout_key`: LoRA dropout, training only)."""

    def pair_log_probs(params: nnx.State, batch: Batch,
                       dropout_key: jax.Array | None = None) -> jnp.ndarray:
        model = nnx.merge(graphdef, params)
        with activation_rules(rules):
            x_BTD = model.features(batch["inputs"], batch["positions"], batch["segment_ids"],
                                   dropout_key)
            return chunked_pair_log_probs(x_BTD, model.logits, batch["targets"],
                                          batch["loss_mask"], batch["pairs"], num_pairs,
                                          loss_chunks)

    return pair_log_probs


def make_dpo_loss_fn(graphdef: nnx.GraphDef, beta: float, label_smoothing: float,
                     num_pairs: int, rules: Rules = DATA_PARALLEL.activations,
                     loss_chunks: int = 1) -> Callable:
    """`loss_fn(params, batch, dropout_key=None) -> (loss_sum, (loss_sum, pair_count,
    metric_sums))`, the shape `step.make_train_step` accumulates."""
    pair_log_probs = make_pair_log_probs_fn(graphdef, num_pairs, rules, loss_chunks)

    def loss_fn(params: nnx.State, batch: Batch, dropout_key: jax.Array | None = None):
        reference_BP2, valid_BP = batch_pairs(batch, num_pairs)
        loss_sum, count, sums = dpo_sums(pair_log_probs(params, batch, dropout_key),
                                         reference_BP2, valid_BP, beta, label_smoothing)
        return loss_sum, (loss_sum, count, sums)

    return loss_fn


def make_objective_loss_fn(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                           rules: Rules = DATA_PARALLEL.activations) -> Callable:
    """The loss function of `train.objective` for this config's model and layout."""
    t = cfg.train
    if t.objective == "dpo":
        return make_dpo_loss_fn(graphdef, float(cfg.dpo.beta), float(cfg.dpo.label_smoothing),
                                max_pairs(cfg.data.seq_len), rules, t.loss_chunks)
    return make_loss_fn(graphdef, t.z_loss, rules, t.loss_chunks)
