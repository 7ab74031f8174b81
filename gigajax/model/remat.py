"""Remat policies (`model.remat`): what the backward pass may keep from each block's forward
pass; everything else is recomputed. The names are `config.schema.REMAT_POLICIES`."""

from __future__ import annotations

from collections.abc import Callable

import jax

POLICIES: dict[str, Callable | None] = {
    "none": None,  # no jax.checkpoint: keep everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
    # keep the blockwise kernel's out and lse: recompute projections and MLP, not attention
    "minimal": jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}


def remat_block(body: Callable, policy: str, scanned: bool) -> Callable:
    """`body` under `jax.checkpoint` with the named policy (unchanged for 'none'); unrolled
    layers keep XLA from merging the recomputation into the forward (prevent_cse)."""
    if policy == "none":
        return body
    return jax.checkpoint(body, policy=POLICIES[policy], prevent_cse=not scanned)
