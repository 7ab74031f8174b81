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
