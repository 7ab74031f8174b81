"""Bytes each device sends per optimizer step, per mesh axis, from formulas (ring-algorithm
volumes): an all-reduce of X bytes over n devices sends 2(n-1)/n X, an all-gather or
reduce-scatter (n-1)/n X, an all-to-all (n-1)/n X, and a ring step of attention one K/V block
per neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

from gigajax.config import ModelConfig
from gigajax.model.inventory import Weight, weights
from gigajax.parallel.rules import shard_shape
from gigajax.plan.memory import layer_shape, layout_of, nbytes, state_bytes


def block_of(weight: Weight) -> str | None:
    """Which block of a layer a weight belongs to: attention (and its norm), mlp, or None."""
    if weight.path.startswith("blocks/attn"):
        return "attention"
    return "mlp" if weight.path.startswith("blocks/mlp") else None


def layer_comm_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]
                     ) -> dict[str, dict[str, float]]:
    """Bytes one device sends per optimizer step for one layer, per block and mesh axis.

    Activation traffic grows with the tokens a device holds: tensor sends one all-reduce (or
    all-gather + reduce-scatter with Megatron-SP) of the block's b s h output forward and one
    backward, the ring sends K and V round once forward and K, V, dK, dV backward, Ulysses
    all-to-alls q, k, v and the output forward and their gradients backward (full remat repeats
    the forward's). Weight traffic is fixed per layer: the block's gradients, all-reduced over
    the devices holding the same shard (data, sequence), and ZeRO-3's gathers over `fsdp`.
    """
    m = ModelConfig.from_config(cfg)
    x = layer_shape(cfg, sizes)
    layout = layout_of(cfg, sizes)
    tokens = cfg.train.microbatches * x.b * x.s
    forward_passes = 2 if m.remat == "full" else 1
    f, t, ring, u = (sizes.get(a, 1) for a in ("fsdp", "tensor", "sequence", "ulysses"))
    dp_like = sizes.get("data", 1) * ring * u
    out: dict[str, dict[str, float]] = {}
    for block in ("attention", "mlp"):
        sizes_of = {w: nbytes(shard_shape(w.shape[1:], w.names[1:], layout.params, sizes),
                              jnp.float32) for w in weights(m) if block_of(w) == block}
        params = sum(sizes_of.values())  # under LoRA only the adapters have gradients
        grads = sum(n for w, n in sizes_of.items() if w.is_adapter or not m.lora.rank)
        sent: dict[str, float] = {}
        if f > 1:
            zero3 = cfg.sharding.zero_stage == 3
            gathers = 2 * cfg.train.microbatches if zero3 else 1
            gathered = params * f * gathers if zero3 else grads  # ZeRO-1: updated params
            sent["fsdp"] = (f - 1) / f * (gathered + grads * (f if zero3 else 1))
        if dp_like > 1:
            sent["data+sequence"] = 2 * (dp_like - 1) / dp_like * grads
        if t > 1:
            sent["tensor"] = 2 * 2 * (t - 1) / t * tokens * x.h * x.p * (forward_passes + 1) / 2
        if block == "attention" and ring > 1:
            kv_block = tokens * x.kv_heads * x.e * x.p * 2  # K and V of one device's tokens
            sent["sequence"] = (ring - 1) * kv_block * (forward_passes + 2)
        if block == "attention" and u > 1:
            qkvo = tokens * (2 * x.heads + 2 * x.kv_heads) * u * x.e * x.p
            sent["ulysses"] = (u - 1) / u * qkvo * (forward_passes + 1)
        out[block] = sent
    return out


def comm_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> dict[str, int]:
    """Bytes one device sends per optimizer step, per mesh axis (ring-algorithm volumes).

    data (+ sequence): gradient all-reduce. fsdp: ZeRO-3 all-gathers the parameters for the
    forward and again for the backward and reduce-scatters the gradients (ZeRO-1: reduce-scatter
    gradients, all-gather updated parameters); under LoRA the gradients and updates are the
    adapters' only. tensor, sequence (ring) and ulysses: the
    activation traffic of `layer_comm_bytes`, times the layers; expert: the gradient
    all-reduce of all but the routed experts (replicated over it) and the MoE layers'
    all-to-all (`expert_all_to_all_bytes`).
    """
    m = ModelConfig.from_config(cfg)
    state = state_bytes(cfg, sizes)
    f = sizes.get("fsdp", 1)
    zero3 = cfg.sharding.zero_stage == 3
    grads_unsharded_over_fsdp = state["grads"] * (f if zero3 else 1)
    out: dict[str, int] = {}
    if f > 1:  # gathered: the parameters under ZeRO-3 (frozen ones too), else the updated ones
        gathers = 2 * cfg.train.microbatches if zero3 else 1
        gathered = state["params"] * f if zero3 else grads_unsharded_over_fsdp
        out["fsdp"] = int((f - 1) / f * (gathered * gathers + grads_unsharded_over_fsdp))
    dp_like = sizes.get("data", 1) * sizes.get("sequence", 1) * sizes.get("ulysses", 1)
    if dp_like > 1:  # replicas of the same parameter shard: all-reduce their gradients
        out["data+sequence"] = int(2 * (dp_like - 1) / dp_like * state["grads"])
    per_layer = layer_comm_bytes(cfg, sizes)
    for axis in ("tensor", "sequence", "ulysses"):
        sent = sum(block.get(axis, 0.0) for block in per_layer.values())
        if sent:
            out[axis] = int(m.n_layers * sent)
    e = sizes.get("expert", 1)
    if e > 1:  # all but the routed experts are replicated over `expert`: one all-reduce more
        replicated_grads = state["grads"] - expert_grad_bytes(cfg, sizes)
        n_moe = m.n_layers - m.moe.first_dense_layers
        out["expert"] = (int(2 * (e - 1) / e * replicated_grads)
                         + int(n_moe * expert_all_to_all_bytes(cfg, sizes)))
    return out


def expert_grad_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> int:
    """Per-device gradient bytes of the routed experts' weights (split over `expert`)."""
    layout = layout_of(cfg, sizes)
    return sum(nbytes(shard_shape(w.shape, w.names, layout.params, sizes), jnp.float32)
               for w in weights(ModelConfig.from_config(cfg)) if "expert" in w.names)


def expert_all_to_all_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> float:
    """Bytes one device sends over `expert` per MoE layer per step: the dropless dispatch's
    buffers [E, N, D] (N = the device's tokens x top_k) go out and come back forward, and their
    gradients backward ((E - 1) / E of each leaves the device), plus the local expert ids
    [E, N] int32 once per forward; full remat repeats the forward's."""
    m = ModelConfig.from_config(cfg)
    x, e = layer_shape(cfg, sizes), sizes["expert"]
    forward_passes = 2 if m.remat == "full" else 1
    assignments = cfg.train.microbatches * x.b * x.s * m.moe.top_k
    buffer = e * assignments * x.h * x.p
    ids = e * assignments * 4
    return (e - 1) / e * (2 * buffer * (forward_passes + 1) + ids * forward_passes)
