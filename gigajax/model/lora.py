"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen
projection W [I..., O...] plus a trained low-rank update, y = x W + (alpha / R) dropout(x) A B,
with A [I..., R] random (the base weight's initialiser) and B [R, O...] zero, so that step 0
computes exactly the base model. Every adapter math lives here: creating adapters on the
projections `model.lora.targets` names, applying them, and merging them into W for export.

Adapters are `nnx.LoRAParam`s (a subclass of `nnx.Param`): training differentiates and updates
only those (`train/step.py`), and their dims carry the base weight's logical names (A its input
names, B its output names; the rank `lora_rank` is in no rule table), so they shard like the
base weight in every layout. They sit beside their weight: `blocks/attn/wq_lora/{a,b}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.parallel.rules import LORA_RANK
from gigajax.parallel.shardings import param, stacked

# config name -> (block submodule, weight attribute, its input dims, its output dims)
PROJECTIONS: dict[str, tuple[str, str, str, str]] = {
    "q": ("attn", "wq", "D", "HE"), "k": ("attn", "wk", "D", "KE"), "v": ("attn", "wv", "D", "KE"),
    "o": ("attn", "wo", "HE", "D"), "gate": ("mlp", "w_gate", "D", "F"),
    "up": ("mlp", "w_up", "D", "F"), "down": ("mlp", "w_down", "F", "D")}
SUFFIX = "_lora"  # the adapter of weight `wq` is the submodule `wq_lora`
RESIDUAL = ("o", "down")  # projections that write into the residual stream (residual_init)


def _dims(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """Shape letter -> (size, logical name), as the base weights name their dims."""
    return {"D": (cfg.d_model, "embed"), "H": (cfg.n_heads, "heads"),
            "K": (cfg.n_kv_heads, "kv_heads"), "E": (cfg.head_dim, "head_dim"),
            "F": (cfg.mlp_dim, "mlp")}


class LoRA(nnx.Module):
    """The low-rank update of one projection with input dims `ins` and output dims `outs`
    (shape letters, e.g. 'D' -> 'HE' for q): A [ins, R], B [R, outs]."""

    def __init__(self, cfg: ModelConfig, ins: str, outs: str, init: Callable, salt: int, *,
                 rngs: nnx.Rngs):
        dims, R = _dims(cfg), cfg.lora.rank
        self.a = param(rngs, init, (*(dims[c][0] for c in ins), R),
                       (*(dims[c][1] for c in ins), LORA_RANK), kind=nnx.LoRAParam)
        self.b = param(rngs, nnx.initializers.zeros, (R, *(dims[c][0] for c in outs)),
                       (LORA_RANK, *(dims[c][1] for c in outs)), kind=nnx.LoRAParam)
        self.ins, self.outs, self.salt = ins, outs, salt
        self.scale, self.dropout = cfg.lora.scale, cfg.lora.dropout

    def __call__(self, x_BTI: jnp.ndarray, dropout_key: jax.Array | None = None) -> jnp.ndarray:
        """(alpha / R) dropout(x) A B [B, T, outs]; dropout only with a key (training)."""
        if dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, self.salt),
                                        1.0 - self.dropout, x_BTI.shape)
            x_BTI = jnp.where(keep, x_BTI / (1.0 - self.dropout), 0).astype(x_BTI.dtype)
        dtype = x_BTI.dtype
        return _low_rank(x_BTI, self.a[...].astype(dtype), self.b[...].astype(dtype),
                         self.ins, self.scale)


def _low_rank(x_BTI, a, b, ins: str, scale: float) -> jnp.ndarray:
    """(x A) B * scale, with (x A) B as a matmul over a batch dim of size 1. Remat policy
    `dots` saves the output of every matmul without batch dims; for this one it would keep a
    second full-width copy of each projection's output (+42% per device for configs/small.py
    under fsdp=8) that the backward never reads (the update is linear in B and in x A, and
    x A, R wide, is saved). XLA drops the unit dim when it compiles."""
    u_BTR = jnp.einsum(f"BT{ins},{ins}R->BTR", x_BTI, a)
    # [1, B, T, R] x [1, R, outs...] -> [1, B, T, outs...]: contract R, batch over the unit dim
    y_1BTO = jax.lax.dot_general(u_BTR[None], b[None], (((3,), (1,)), ((0,), (0,))))
    return y_1BTO[0] * jnp.asarray(scale, y_1BTO.dtype)


def project(module: nnx.Module, weight: str, spec: str, x: jnp.ndarray,
            dropout_key: jax.Array | None = None) -> jnp.ndarray:
    """x W by einsum `spec` for `module`'s weight `weight`, plus its adapter's update when it
    has one (in the compute dtype of `x`)."""
    y = jnp.einsum(spec, x, getattr(module, weight)[...].astype(x.dtype))
    adapter = getattr(module, weight + SUFFIX, None)
    return y if adapter is None else y + adapter(x, dropout_key)


def add_adapters(blocks: nnx.Module, cfg: ModelConfig, inits: Mapping[str, Callable],
                 rngs: nnx.Rngs) -> None:
    """Give the stacked `blocks` an adapter (stacked the same way) on each target projection.

    Called after every base weight is created, so the base weights of a seed are the same with
    LoRA on or off; `inits` maps 'input'/'residual' to the base weights' initialisers."""
    for salt, (name, (part, weight, ins, outs)) in enumerate(PROJECTIONS.items()):
        if name in cfg.lora.targets:
            init = inits["residual" if name in RESIDUAL else "input"]
            adapter = stacked(lambda r, i=ins, o=outs, s=salt, f=init: LoRA(cfg, i, o, f, s,
                                                                            rngs=r),
                              cfg.n_layers, rngs)
            setattr(getattr(blocks, part), weight + SUFFIX, adapter)


def is_adapter(path: str) -> bool:
    """Whether a parameter path ('blocks/attn/wq_lora/a') is a LoRA adapter's."""
    return any(part.endswith(SUFFIX) for part in path.split("/"))


def trainable_and_frozen(params: nnx.State, lora: bool) -> tuple[nnx.State, nnx.State | None]:
    """(what training differentiates and updates, what it leaves as is): the adapters and the
    rest under LoRA; else the `nnx.Param`s and the other variables (a MoE model's routing
    bias, which the train step updates outside the gradient), None when there are none."""
    if lora:
        return nnx.split_state(params, nnx.LoRAParam, ...)
    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    return (trainable, rest) if jax.tree.leaves(rest) else (params, None)


def combine(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
    """The whole parameter state again (inverse of `trainable_and_frozen`)."""
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def merged_delta(a: Any, b: Any, ins: str, outs: str, scale: float) -> np.ndarray:
    """(alpha / R) A B of stacked adapters A [L, ins, R], B [L, R, outs], in float32 on the
    host: what `merge` adds to W [L, ins, outs]."""
    spec = f"L{ins}R,LR{outs}->L{ins}{outs}"
    delta = np.einsum(spec, np.asarray(a, np.float32), np.asarray(b, np.float32),
                      optimize=True)
    return np.float32(scale) * delta


def merge(params: dict, cfg: ModelConfig) -> dict:
    """The `nnx.to_pure_dict` params of a LoRA model with every adapter merged into its base
    weight (W + (alpha / R) A B, float32) and removed: the params of the plain model."""
    blocks = {part: dict(tree) for part, tree in params["blocks"].items()}
    for part, weight, ins, outs in PROJECTIONS.values():
        adapter = blocks[part].pop(weight + SUFFIX, None)
        if adapter is not None:
            base = np.asarray(blocks[part][weight], np.float32)
            blocks[part][weight] = base + merged_delta(adapter["a"], adapter["b"], ins, outs,
                                                       cfg.lora.scale)
    return {**params, "blocks": blocks}


def has_adapters(params: Mapping) -> bool:
    """Whether `nnx.to_pure_dict` params hold LoRA adapters."""
    blocks = params.get("blocks", {})
    return any(key.endswith(SUFFIX) for part in blocks.values() if isinstance(part, Mapping)
               for key in part)
