"""Next-token cross entropy with a loss mask and optional z-loss, as sums ready for any sharding.

The step divides the summed loss by the *global* number of unmasked tokens, so microbatching,
data parallelism and (later) sequence sharding all normalise the same way as one big batch.
`chunked_cross_entropy_sums` computes the same sums with 1/n of the logits alive at a time: at
1M tokens per sequence the fp32 logits over a 32k vocabulary would otherwise outweigh the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BTV: jnp.ndarray, targets_BT: jnp.ndarray,
                       loss_mask_BT: jnp.ndarray, z_loss: float = 0.0
                       ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(sum of masked token NLL, sum of masked z-loss terms, number of unmasked tokens), float32.

    z-loss (PaLM, Chowdhery et al. 2022): `z_loss * logsumexp(logits)^2` keeps logits from drifting.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    mask_BT = loss_mask_BT.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    # a masked sum rather than a gather, so a vocab-sharded logits array needs no all-gather
    vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
    target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), -1)
    nll_sum = jnp.sum((lse_BT - target_logit_BT) * mask_BT)
    z_sum = z_loss * jnp.sum(jnp.square(lse_BT) * mask_BT)
    return nll_sum, z_sum, jnp.sum(mask_BT)


def chunked_cross_entropy_sums(x_BTD: jnp.ndarray, logits_fn: Callable[[jnp.ndarray], jnp.ndarray],
                               targets_BT: jnp.ndarray, loss_mask_BT: jnp.ndarray,
                               z_loss: float = 0.0, chunks: int = 1
                               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`cross_entropy_sums(logits_fn(x_BTD), ...)` computed `chunks` slices of tokens at a time.

    Slice j holds tokens j, j + n, j + 2n, ... (n = chunks): strided, so a sequence-sharded T
    stays sharded the same way in every slice when T / n splits evenly over the devices that
    share the sequence (otherwise XLA reshards each slice: correct, slower). A `lax.scan`
    over the slices under `jax.checkpoint` keeps only each slice's inputs; the backward pass
    recomputes one slice's logits at a time. The sums are order-free, so the result equals the
    unchunked one up to float rounding.
    """
    if chunks == 1:
        return cross_entropy_sums(logits_fn(x_BTD), targets_BT, loss_mask_BT, z_loss)
    B, T = targets_BT.shape
    if T % chunks:
        raise ValueError(f"{chunks} loss chunks do not divide the {T} tokens of a sequence")

    def strided(a):  # [B, T, ...] -> [n, B, T/n, ...]: slice j = tokens j, j+n, ...
        return jnp.moveaxis(a.reshape(B, T // chunks, chunks, *a.shape[2:]), 2, 0)

    @jax.checkpoint
    def add_slice(sums, xs):
        x_BCD, targets_BC, mask_BC = xs
        parts = cross_entropy_sums(logits_fn(x_BCD), targets_BC, mask_BC, z_loss)
        return tuple(a + b for a, b in zip(sums, parts, strict=True)), None

    zeros = (jnp.zeros((), jnp.float32),) * 3
    sums, _ = jax.lax.scan(add_slice, zeros,
                           (strided(x_BTD), strided(targets_BT), strided(loss_mask_BT)))
    return sums


def pair_sums(values_BT: jnp.ndarray, pairs_BT: jnp.ndarray, num_pairs: int) -> jnp.ndarray:
    """[B, P, 2]: the sums of `values_BT` over the tokens of each pair's chosen (+p) and
    rejected (-p) half, p = 1..num_pairs (DPO pairs, `data/packing.py`).

    A masked sum over a one-hot of the pair slots rather than a scatter, so a sequence-sharded
    T reduces by an all-reduce like the token sums above (B x T x P compares: small for DPO's
    sequence lengths, (T+1)/6 slots at most).
    """
    slot_P = jnp.arange(1, num_pairs + 1, dtype=pairs_BT.dtype)
    values_BT1 = values_BT.astype(jnp.float32)[..., None]
    chosen_BP = jnp.sum(jnp.where(pairs_BT[..., None] == slot_P, values_BT1, 0.0), axis=1)
    rejected_BP = jnp.sum(jnp.where(pairs_BT[..., None] == -slot_P, values_BT1, 0.0), axis=1)
    return jnp.stack([chosen_BP, rejected_BP], axis=-1)


def target_log_probs(logits_BTV: jnp.ndarray, targets_BT: jnp.ndarray) -> jnp.ndarray:
    """[B, T] float32 log-probability of each target: its logit minus the logsumexp."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
    target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), -1)
    return target_logit_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def chunked_pair_log_probs(x_BTD: jnp.ndarray, logits_fn: Callable[[jnp.ndarray], jnp.ndarray],
                           targets_BT: jnp.ndarray, loss_mask_BT: jnp.ndarray,
                           pairs_BT: jnp.ndarray, num_pairs: int, chunks: int = 1
                           ) -> jnp.ndarray:
    """[B, P, 2]: each DPO pair half's summed log-probability of its masked targets (the
    response and its EOS given the prompt), computed `chunks` strided token slices at a time
    like `chunked_cross_entropy_sums` (the sums are order-free)."""
    def half_sums(x_BCD, targets_BC, mask_BC, pairs_BC):
        logp_BC = target_log_probs(logits_fn(x_BCD), targets_BC) * mask_BC.astype(jnp.float32)
        return pair_sums(logp_BC, pairs_BC, num_pairs)

    if chunks == 1:
        return half_sums(x_BTD, targets_BT, loss_mask_BT, pairs_BT)
    B, T = targets_BT.shape
    if T % chunks:
        raise ValueError(f"{chunks} loss chunks do not divide the {T} tokens of a sequence")

    def strided(a):  # [B, T, ...] -> [n, B, T/n, ...]: slice j = tokens j, j+n, ...
        return jnp.moveaxis(a.reshape(B, T // chunks, chunks, *a.shape[2:]), 2, 0)

    @jax.checkpoint
    def add_slice(total_BP2, xs):
        return total_BP2 + half_sums(*xs), None

    total_BP2, _ = jax.lax.scan(add_slice, jnp.zeros((B, num_pairs, 2), jnp.float32),
                                tuple(strided(a) for a in (x_BTD, targets_BT, loss_mask_BT,
                                                           pairs_BT)))
    return total_BP2
