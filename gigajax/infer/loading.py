"""A trained model for inference and evaluation: the params of one checkpoint on one device, and
its run's config with overrides on top.

`--checkpoint` may name a training workdir, its `checkpoints/` directory (the latest step, or
`step`), one step directory, a params checkpoint written by `gigajax ckpt export|average` or
`convert from-hf`, or a Hugging Face model directory (config.json + safetensors).
Only the `params` subtree is read (`checkpoint/params.py`: no optimizer state, no mesh). The
config is the one saved with the checkpoint (its `meta`), else the workdir's `config.json`;
overrides such as `--config.model.rope_scaling.type=yarn` change the model built around the
params, never their shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gigajax.checkpoint.manager import shape_mismatch, tree_shapes
from gigajax.checkpoint.params import read_params
from gigajax.config import ModelConfig, apply_overrides, base_config, config_from_dict
from gigajax.config.schema import MESH_AXES
from gigajax.errors import GigajaxError
from gigajax.model import Decoder
from gigajax.parallel.mesh import make_mesh
from gigajax.parallel.rules import make_layout
from gigajax.parallel.shardings import abstract_model, activation_rules, param_shardings
from gigajax.train.preflight import preflight


@dataclasses.dataclass
class Trained:
    """What a checkpoint holds for evaluation."""

    params: dict  # nnx.to_pure_dict layout, arrays on the default device
    config: ml_collections.ConfigDict  # the run's config, overrides applied, validated
    saved_config: dict  # the run's config as saved (before overrides)
    step: int | None  # the training step (None for an averaged params checkpoint)
    path: Path  # the step or params directory read
    workdir: Path | None  # the training workdir, when the checkpoint lies in one


def load_trained(checkpoint: str | Path, overrides: list[str] = (), step: int | None = None,
                 named: Mapping[str, Any] | None = None, on_host: bool = False) -> Trained:
    """Read the params and config of `checkpoint` (see the module docstring); `on_host`:
    leave them as numpy arrays (to be placed on a mesh by `shard_model`)."""
    found = read_params(checkpoint, step)
    if found.config is None:
        raise GigajaxError(f"{found.path} holds no config (meta has none and there is no "
                           "config.json beside it): cannot tell which model the params are.")
    cfg = config_with_overrides(found.config, overrides, named)
    # np.asarray: a Hugging Face directory's params are lazy HFTensors, read here
    params = jax.tree.map(np.asarray, found.params)
    if not on_host:
        params = jax.device_put(params, jax.devices()[0])
    return Trained(params, cfg, found.config, found.step, found.path, found.workdir)


def config_with_overrides(saved: dict, overrides: list[str] = (),
                          named: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The saved config over today's defaults (fields added since keep their default), with
    `"a.b=v"` overrides and then `{"a.b": v}` ones applied, checked by `preflight`."""
    cfg = config_from_dict(saved)
    for axis in MESH_AXES:  # the model runs on one device, whatever mesh it trained on
        cfg.mesh[axis] = 1
    apply_overrides(cfg, overrides)
    apply_overrides(cfg, named or {})
    preflight(cfg)
    return cfg


def build_model(params: dict, cfg: ml_collections.ConfigDict) -> Decoder:
    """The Decoder of `cfg.model` holding `params`; raises GigajaxError if the shapes differ
    (an override changed the model's size)."""
    graphdef, abstract = abstract_model(
        lambda: Decoder(ModelConfig.from_config(cfg), rngs=nnx.Rngs(0)))
    wanted = nnx.to_pure_dict(abstract)
    if problem := shape_mismatch(tree_shapes(params), tree_shapes(wanted), what="checkpoint"):
        raise GigajaxError(f"the checkpoint's params do not fit the model of the config: "
                           f"{problem}. Overrides may change how the model runs (RoPE scaling, "
                           "dtype, attention), not its sizes.")
    # as training's init_from does: a bf16 export runs with the config's fp32 params
    nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda x, w: x.astype(w.dtype), params,
                                                    wanted))
    return nnx.merge(graphdef, abstract)


def trained_context(saved: dict[str, Any]) -> int:
    """The context length a run trained at: its data.seq_len."""
    return int(saved.get("data", {}).get("seq_len") or base_config().data.seq_len)


GENERATION_AXES = ("fsdp", "tensor")  # the batch of a generation is small: no data split


def generation_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
                    ) -> Mesh:
    """The mesh a model generates on: `tensor` and `fsdp` as given (every other axis 1), over
    the first devices; a GigajaxError names an axis that generation does not split over."""
    if bad := sorted(a for a, n in sizes.items() if a not in GENERATION_AXES and int(n) != 1):
        raise GigajaxError(f"mesh {', '.join(f'{a}={sizes[a]}' for a in bad)}: generation "
                           f"splits the model over {' and '.join(GENERATION_AXES)} only.")
    cfg = ml_collections.ConfigDict({a: int(sizes.get(a, 1)) for a in MESH_AXES})
    if min(cfg.values()) < 1:
        raise GigajaxError(f"mesh {dict(sizes)}: every axis size is an integer >= 1.")
    devices = list(devices if devices is not None else jax.devices())
    need = int(np.prod(list(cfg.values())))
    if need > len(devices):
        raise GigajaxError(f"mesh {dict(sizes)} needs {need} devices; {len(devices)} are "
                           "available.")
    return make_mesh(cfg, devices[:need])


def shard_model(model: Decoder, mesh: Mesh) -> tuple[Decoder, tuple]:
    """The model with its params placed in the training layout's shardings on `mesh` (each
    device holds its shard only), and the activation rules to generate under (items; the
    batch replicated)."""
    layout = make_layout(model.cfg.n_kv_heads, dict(mesh.shape))
    graphdef, state = nnx.split(model)
    with activation_rules(layout.activations):
        shardings = param_shardings(state, mesh, layout.params)
    placed = jax.device_put(state, shardings)
    return nnx.merge(graphdef, placed), tuple({**layout.activations, "batch": None}.items())
