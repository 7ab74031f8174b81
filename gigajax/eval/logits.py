"""Logits of a checkpoint under a mesh layout: its params streamed into the layout's shardings
(as `train.init_from` places them, each device reading its own slices), the tokens permuted into
the ring's order and the logits back. For parity checks of imported models on every layout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gigajax.checkpoint.params import read_params
from gigajax.config import apply_overrides, config_from_dict
from gigajax.config.schema import MESH_AXES
from gigajax.ops.layouts import inverse_permutation, permute_sequence
from gigajax.parallel.mesh import make_mesh, sequence_permutation
from gigajax.parallel.shardings import activation_rules
from gigajax.train.preflight import preflight
from gigajax.train.state import StateBuilder, layout_for


def logits_under_layout(checkpoint: str | Path, tokens_BT: np.ndarray,
                        overrides: Mapping[str, Any] | None = None) -> np.ndarray:
    """Float32 logits [B, T, V] of `checkpoint` (anything `read_params` reads, an HF directory
    included) on the mesh of its config with `overrides` ({"mesh.sequence": 4, ...}), over the
    first devices the mesh needs; positions are 0..T-1."""
    found = read_params(checkpoint)
    cfg = config_from_dict(found.config)
    apply_overrides(cfg, dict(overrides or {}))
    preflight(cfg)
    sizes = [int(cfg.mesh[axis]) for axis in MESH_AXES]
    mesh = make_mesh(cfg.mesh, jax.devices()[:int(np.prod(sizes))], cfg.attention)
    layout = layout_for(cfg, mesh)
    builder = StateBuilder(cfg, mesh, layout, optax.identity())
    params = builder.from_params(found.params, str(checkpoint))["params"]
    T = tokens_BT.shape[1]
    positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), tokens_BT.shape)
    perm = sequence_permutation(mesh, T, cfg.attention.layout)
    if perm is not None:
        tokens_BT, positions_BT = (permute_sequence(x, perm) for x in (tokens_BT, positions_BT))

    @jax.jit
    def forward(params: nnx.State, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        with activation_rules(layout.activations):
            return nnx.merge(builder.graphdef, params)(tokens_BT, positions_BT)

    with jax.set_mesh(mesh):
        logits = np.asarray(forward(params, jnp.asarray(tokens_BT, jnp.int32),
                                    jnp.asarray(positions_BT)))
    return logits if perm is None else permute_sequence(logits, inverse_permutation(perm))
