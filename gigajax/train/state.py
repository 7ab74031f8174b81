"""The train state `{step, skipped, params, opt_state}`: its layout on the mesh, built or restored
in place. `skipped` counts the steps whose update was dropped for a non-finite loss or gradient.

Shapes come from `jax.eval_shape` and shardings from the layout's rule tables, so the state is
created (jit with `out_shardings`) or restored (Orbax into `ShapeDtypeStruct`s with shardings)
directly in its final layout: no device ever holds a full replica it is not meant to hold.
`from_params` starts from given parameters instead (`train.init_from`), each process placing
only the shards its devices hold. Under LoRA the optimizer state covers the adapters only
(`model/lora.trainable_and_frozen`), and `from_params` takes base params without adapters
(a plain checkpoint or a Hugging Face model) and starts the adapters fresh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.checkpoint.manager import shape_mismatch, tree_shapes
from gigajax.config import ModelConfig
from gigajax.errors import GigajaxError
from gigajax.model import Decoder
from gigajax.model.lora import combine, has_adapters, trainable_and_frozen
from gigajax.parallel.checks import check_backend, check_intent, check_layout
from gigajax.parallel.rules import Layout, make_layout
from gigajax.parallel.shardings import (
    abstract_model,
    init_sharded,
    logical_specs,
    optimizer_shardings,
    param_shardings,
    place_shards,
)

TrainState = dict[str, Any]


def layout_for(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Layout:
    """Check that the model and batch split over `mesh`, and return the layout's rule tables."""
    m, sizes = cfg.model, dict(mesh.shape)
    check_layout(cfg, sizes)
    check_backend(cfg)
    return make_layout(m.n_kv_heads, sizes, cfg.sharding.zero_stage, cfg.sharding.megatron_sp)


class StateBuilder:
    """Abstract shapes, shardings, and a jitted init for one (config, mesh, layout, optimizer)."""

    def __init__(self, cfg: ml_collections.ConfigDict, mesh: Mesh, layout: Layout,
                 tx: optax.GradientTransformation):
        model_cfg = ModelConfig.from_config(cfg)
        self.lora = bool(model_cfg.lora.rank)
        seed = cfg.train.seed
        self.create = lambda: Decoder(model_cfg, rngs=nnx.Rngs(seed))
        self.graphdef, abstract_params = abstract_model(self.create)
        self.tx, self.mesh = tx, mesh
        params = param_shardings(abstract_params, mesh, layout.params)
        check_intent(logical_specs(abstract_params), params, mesh,
                     zero_stage=cfg.sharding.zero_stage,
                     n_kv_heads=cfg.model.n_kv_heads)
        replicated = NamedSharding(mesh, PartitionSpec())
        trainable = self.trainable(abstract_params)  # the optimizer's: adapters under LoRA
        self.shardings: TrainState = {
            "step": replicated, "skipped": replicated, "params": params,
            "opt_state": optimizer_shardings(tx, trainable, mesh, layout.optimizer)}
        counter = jax.ShapeDtypeStruct((), jnp.int32)
        abstract_state = {"step": counter, "skipped": counter, "params": abstract_params,
                          "opt_state": jax.eval_shape(tx.init, trainable)}
        self.abstract: TrainState = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
            self.shardings)

    def trainable(self, params: nnx.State) -> nnx.State:
        """The part of `params` that trains: the adapters under LoRA, else all."""
        return trainable_and_frozen(params, self.lora)[0]

    def init(self) -> TrainState:
        """A fresh state, each parameter and optimizer moment built in its own sharding."""
        return self._start(init_sharded(self.create, self.shardings["params"]))

    def from_params(self, pure: dict, source: str) -> TrainState:
        """A fresh state (step 0, new optimizer moments) around `pure` (`nnx.to_pure_dict`
        layout, host arrays of any float dtype, cast to the model's), which must have the
        model's shapes; `source` names them in errors."""
        abstract = self.abstract["params"]
        fresh_adapters = self.lora and not has_adapters(pure)  # LoRA on a plain model
        if fresh_adapters:
            abstract = trainable_and_frozen(abstract, True)[1]
        wanted = nnx.to_pure_dict(abstract)
        if problem := shape_mismatch(tree_shapes(pure), tree_shapes(wanted), what=source):
            hint = (" A LoRA run's params hold adapters: `gigajax ckpt merge-lora` makes a plain "
                    "model of them." if has_adapters(pure) and not self.lora else "")
            raise GigajaxError(f"the params of {source} do not fit this config's model: "
                               f"{problem}. train.init_from may change how the model runs (RoPE "
                               f"scaling, max_seq_len, dtype, attention, LoRA), not its sizes."
                               + hint)

        # each process reads, casts and puts only its own shards, one slice at a time
        params = jax.tree.map(lambda x: x, abstract)  # a copy of the State to fill
        nnx.replace_by_pure_dict(params, jax.tree.map(place_shards, pure, wanted))
        if fresh_adapters:  # the adapters' initial values, each built in its sharding
            adapters = jax.jit(lambda: self.trainable(nnx.split(self.create())[1]),
                               out_shardings=self.trainable(self.shardings["params"]))()
            params = combine(adapters, params)
        return self._start(params)

    def _start(self, params: nnx.State) -> TrainState:
        """Step 0 around `params`: fresh optimizer moments, counters at zero."""
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(
            self.trainable(params))
        def counter() -> jax.Array:  # one buffer each: the train step donates both
            return jax.device_put(jnp.zeros((), jnp.int32), self.shardings["step"])

        return {"step": counter(), "skipped": counter(), "params": params, "opt_state": opt_state}
