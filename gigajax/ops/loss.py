"""Next-token cross entropy with a loss mask and optional z-loss, as sums ready for any sharding.

The step divides the summed loss by the *global* number of unmasked tokens, so microbatching,
data parallelism and (later) sequence sharding all normalise the same way as one big batch.
"""

from __future__ import annotations

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
