"""Memory and communication planner: per-device bytes of a config under a layout, from formulas.

Nothing is built or compiled. The train state is counted from the model's weight matrices (the
table in `weight_matrices` mirrors `gigajax/model/`, with the same logical axis names) sharded by
the layout's own rule tables (`sharding.make_layout`), so parameter, gradient and optimizer bytes
are exact. Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models"), adapted to this model (SwiGLU, GQA, RMSNorm, no dropout, flash
attention; see docs/design.md, "Planner"). Communication is the bytes each device sends per
optimizer step on each mesh axis, for ring algorithms: an all-reduce of X bytes over n devices
sends 2(n-1)/n X, an all-gather or reduce-scatter (n-1)/n X, an all-to-all (n-1)/n X, and a
ring step of attention one K/V block per neighbour.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gigajax.config import ModelConfig, compute_dtype
from gigajax.errors import ConfigError
from gigajax.mesh import mesh_axis_sizes, mesh_shape
from gigajax.sharding import Rules, axes_size, check_layout, make_layout
from gigajax.train.optim import make_optimizer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter array: shape and logical axis names, as the model creates it."""

    name: str
    shape: tuple[int, ...]
    names: tuple[str | None, ...]


def weight_matrices(m: ModelConfig) -> list[Weight]:
    """Every parameter of the decoder; layer weights carry a leading `layers` axis (scan)."""
    D, H, K, E, F, L, V = (m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim,
                           m.n_layers, m.vocab_size)
    layer = [
        Weight("attention_norm", (D,), ("embed",)),
        Weight("wq", (D, H, E), ("embed", "heads", "head_dim")),
        Weight("wk", (D, K, E), ("embed", "kv_heads", "head_dim")),
        Weight("wv", (D, K, E), ("embed", "kv_heads", "head_dim")),
        Weight("wo", (H, E, D), ("heads", "head_dim", "embed")),
        Weight("mlp_norm", (D,), ("embed",)),
        Weight("w_gate", (D, F), ("embed", "mlp")),
        Weight("w_up", (D, F), ("embed", "mlp")),
        Weight("w_down", (F, D), ("mlp", "embed")),
    ]
    weights = [Weight("embed", (V, D), ("vocab", "embed"))]
    weights += [Weight(w.name, (L, *w.shape), ("layers", *w.names)) for w in layer]
    weights.append(Weight("final_norm", (D,), ("embed",)))
    if not m.tie_embeddings:
        weights.append(Weight("lm_head", (D, V), ("embed", "vocab")))
    return weights


def param_count(m: ModelConfig) -> int:
    """Parameters of the decoder: V D (+ D V untied) + L (D (H+2K) E + H E D + 3 D F + 2 D) + D."""
    return sum(math.prod(w.shape) for w in weight_matrices(m))


def shard_shape(shape: tuple[int, ...], names: tuple[str | None, ...], rules: Rules,
                sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block of an array whose dims carry logical `names` under `rules`."""
    return tuple(-(-d // axes_size(sizes, rules.get(n) if n else None))
                 for d, n in zip(shape, names, strict=True))


def _bytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def state_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> dict[str, int]:
    """Per-device bytes of parameters (fp32), gradients (fp32, laid out like the parameters)
    and optimizer state (moments laid out like their parameter under the optimizer rules;
    Adafactor's factored statistics and all counters replicated, as `sharding` places them)."""
    m = ModelConfig.from_config(cfg)
    layout = make_layout(m.n_kv_heads, sizes, cfg.sharding.zero_stage, cfg.sharding.megatron_sp)
    weights = weight_matrices(m)
    params = sum(_bytes(shard_shape(w.shape, w.names, layout.params, sizes), jnp.float32)
                 for w in weights)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = {w.name: jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in weights}
    by_name = {w.name: w for w in weights}

    def moment_bytes(moment: jax.ShapeDtypeStruct, weight: Weight) -> int:
        if moment.shape == weight.shape:  # a moment: laid out like its parameter
            return _bytes(shard_shape(moment.shape, weight.names, layout.optimizer, sizes),
                          moment.dtype)
        return _bytes(moment.shape, moment.dtype)  # factored statistics: replicated

    sized = optax.tree_map_params(
        tx, moment_bytes, jax.eval_shape(tx.init, abstract), by_name,
        transform_non_params=lambda leaf: _bytes(leaf.shape, leaf.dtype),  # counters
        is_leaf=lambda x: isinstance(x, Weight))
    optimizer = sum(jax.tree.leaves(sized))
    return {"params": params, "grads": params, "optimizer": optimizer}


@dataclasses.dataclass(frozen=True)
class Shape:
    """The per-device extents one layer's activations have under a layout."""

    b: int  # sequences per device per microbatch
    s: int  # tokens per sequence held by a device (seq_len / sequence)
    s_kv: int  # keys each query block sees at once: the whole sequence
    h: int  # d_model
    heads: int  # query heads per device (after tensor and Ulysses splits)
    kv_heads: int  # KV heads per device
    e: int  # head dim
    f: int  # mlp width per device
    v: int  # vocabulary per device
    sp_t: int  # Megatron-SP divisor of the residual stream (tensor, else 1)
    p: int  # bytes per activation element (compute dtype)


def layer_shape(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> Shape:
    """Per-device activation extents of one transformer layer under `sizes`."""
    m = ModelConfig.from_config(cfg)
    t, n_sp = sizes.get("tensor", 1), sizes.get("sequence", 1) * sizes.get("ulysses", 1)
    ulysses = sizes.get("ulysses", 1)
    batch = cfg.data.batch_size // cfg.train.microbatches
    kv_local = m.n_kv_heads // t if m.n_kv_heads % t == 0 else 1  # fewer KV heads: replicated
    return Shape(
        b=max(1, batch // (sizes.get("data", 1) * sizes.get("fsdp", 1))),
        s=cfg.data.seq_len // n_sp, s_kv=cfg.data.seq_len, h=m.d_model,
        heads=max(1, m.n_heads // t // ulysses), kv_heads=max(1, kv_local // ulysses), e=m.head_dim,
        f=-(-m.mlp_dim // t), v=-(-m.vocab_size // t),
        sp_t=t if cfg.sharding.megatron_sp else 1,
        p=jnp.dtype(compute_dtype(m.dtype)).itemsize)


def layer_activation_bytes(x: Shape, flash: bool) -> int:
    """Bytes one layer keeps for its backward pass (no remat), per device.

    Korthikanti et al. count, for a GPT layer in 2-byte activations, sbh(34 + 5as/h): per
    token, 11h in attention (+ 5as for scores, softmax and its dropout mask), 19h in the MLP
    (4h wide, GeLU, dropout) and 4h in two LayerNorms. This layer has no dropout, RMSNorm,
    RoPE, GQA and SwiGLU of width F; per token, in p-byte elements, JAX's autodiff keeps
    (`jax.ad_checkpoint.print_saved_residuals` on one block):
      6h     two norms x (normalised input, scaled output), the residual after attention and
             the MLP output (split by Megatron-SP with the residual stream)
      2 a e  q after RoPE and the attention output
      3 k e  k before and after RoPE, and v
      6F     gate, up, the three intermediates of silu(gate) and the product
    plus the attention's fp32 logsumexp (4 bytes per head) with flash attention, or the
    probabilities and scores (2 a s_kv elements) without.
    """
    per_token = ((6 * x.h) / x.sp_t + 2 * x.heads * x.e + 3 * x.kv_heads * x.e + 6 * x.f) * x.p
    per_token += 4 * x.heads if flash else 2 * x.heads * x.s_kv * x.p
    return int(x.b * x.s * per_token)


def activation_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> dict[str, int]:
    """Per-device activation bytes of a train step: layers (under `model.remat`), the head,
    and the backward's working set of one layer (about one layer's activations: with remat,
    the recomputed ones; the gradients flowing through are fused away or freed at once).

    none: every layer's activations. full: each layer's input (p s b h / sp_t, the scan carry).
    dots: the weight matmuls' outputs (q, k, v, the attention projection, gate, up, down: per
    token 2h/sp_t + a e + 2 k e + 2F) and the layer input. minimal: the attention output and
    logsumexp, and the layer input. The head keeps the final norm (2h / sp_t, p bytes) and the
    fp32 loss over the vocabulary shard: saved are exp(logits), the one-hot select and its
    mask (9 v bytes per token); at its peak XLA also holds the logits, the shifted logits and
    their gradient (12 v bytes more). With `train.loss_chunks` = n the loss keeps only its
    input and holds those 21 v bytes for one slice of tokens (1/n) at a time.
    """
    x, m = layer_shape(cfg, sizes), cfg.model
    flash = cfg.attention.impl in ("blockwise", "cudnn")
    one = layer_activation_bytes(x, flash)
    tokens = x.b * x.s
    layer_input = tokens * x.h * x.p // x.sp_t
    lse = 4 * x.heads * tokens if flash else 0
    saved = {
        "none": one,
        "full": layer_input,
        "dots": layer_input + tokens * x.p * (2 * x.h / x.sp_t + x.heads * x.e
                                              + 2 * x.kv_heads * x.e + 2 * x.f),
        "minimal": layer_input + tokens * x.heads * x.e * x.p + lse,
    }[m.remat]
    working = one  # the backward of one layer (with remat: its recomputed activations)
    head = tokens * 2 * x.h * x.p // x.sp_t + 21 * x.v * tokens // cfg.train.loss_chunks
    return {"layers": int(m.n_layers * saved + working), "head": int(head), "per_layer": one,
            "gathered": gathered_weight_bytes(cfg, sizes)}


def gathered_weight_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> int:
    """ZeRO-3 gathers each weight whole over `fsdp` where it is used: at the peak, the largest
    gathered set (one layer's weights, or the embedding / LM head) is held in fp32 besides the
    shards."""
    if sizes.get("fsdp", 1) == 1 or cfg.sharding.zero_stage != 3:
        return 0
    m = ModelConfig.from_config(cfg)
    unsharded = {**sizes, "fsdp": 1}  # still split over `tensor`
    rules = make_layout(m.n_kv_heads, unsharded, 3, cfg.sharding.megatron_sp).params
    whole = {w.name: _bytes(shard_shape(w.shape, w.names, rules, unsharded), jnp.float32)
             for w in weight_matrices(m)}
    layer = sum(v for k, v in whole.items() if k not in ("embed", "lm_head", "final_norm"))
    return max(layer // m.n_layers, whole["embed"], whole.get("lm_head", 0))


BLOCK_WEIGHTS = {"attention": ("attention_norm", "wq", "wk", "wv", "wo"),
                 "mlp": ("mlp_norm", "w_gate", "w_up", "w_down")}


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
    layout = make_layout(m.n_kv_heads, sizes, cfg.sharding.zero_stage, cfg.sharding.megatron_sp)
    tokens = cfg.train.microbatches * x.b * x.s
    forward_passes = 2 if m.remat == "full" else 1
    f, t, ring, u = (sizes.get(a, 1) for a in ("fsdp", "tensor", "sequence", "ulysses"))
    dp_like = sizes.get("data", 1) * ring * u
    weights = {w.name: w for w in weight_matrices(m)}
    out: dict[str, dict[str, float]] = {}
    for block, names in BLOCK_WEIGHTS.items():
        grads = sum(_bytes(shard_shape(weights[n].shape[1:], weights[n].names[1:],
                                       layout.params, sizes), jnp.float32) for n in names)
        sent: dict[str, float] = {}
        if f > 1:
            zero3 = cfg.sharding.zero_stage == 3
            gathers = 2 * cfg.train.microbatches if zero3 else 1
            sent["fsdp"] = (f - 1) / f * grads * (f if zero3 else 1) * (gathers + 1)
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
    gradients, all-gather updated parameters). tensor, sequence (ring) and ulysses: the
    activation traffic of `layer_comm_bytes`, times the layers.
    """
    m = ModelConfig.from_config(cfg)
    state = state_bytes(cfg, sizes)
    grads_unsharded_over_fsdp = state["grads"] * (sizes.get("fsdp", 1)
                                                  if cfg.sharding.zero_stage == 3 else 1)
    out: dict[str, int] = {}
    f = sizes.get("fsdp", 1)
    if f > 1:
        gathers = 2 * cfg.train.microbatches if cfg.sharding.zero_stage == 3 else 1
        out["fsdp"] = int((f - 1) / f * grads_unsharded_over_fsdp * (gathers + 1))
    dp_like = sizes.get("data", 1) * sizes.get("sequence", 1) * sizes.get("ulysses", 1)
    if dp_like > 1:  # replicas of the same parameter shard: all-reduce their gradients
        out["data+sequence"] = int(2 * (dp_like - 1) / dp_like * state["grads"])
    per_layer = layer_comm_bytes(cfg, sizes)
    for axis in ("tensor", "sequence", "ulysses"):
        sent = sum(block.get(axis, 0.0) for block in per_layer.values())
        if sent:
            out[axis] = int(m.n_layers * sent)
    return out


def plan(cfg: ml_collections.ConfigDict, devices: int) -> dict[str, Any]:
    """The predicted per-device memory and per-step communication of `cfg` on `devices`."""
    check_layout(cfg, mesh_shape(cfg.mesh, devices))  # a ConfigError naming what does not split
    sizes = mesh_axis_sizes(cfg.mesh, devices, cfg.attention)
    state = state_bytes(cfg, sizes)
    acts = activation_bytes(cfg, sizes)
    total = (state["params"] + state["grads"] + state["optimizer"] + acts["layers"] + acts["head"]
             + acts["gathered"])
    return {"mesh": sizes, "param_count": param_count(ModelConfig.from_config(cfg)),
            "bytes": {**state, "activations": acts["layers"] + acts["head"],
                      "activations_per_layer": acts["per_layer"],
                      "gathered_weights": acts["gathered"]},
            "predicted_bytes_per_device": int(total),
            "comm_bytes_per_step": comm_bytes(cfg, sizes)}


def format_plan(result: dict[str, Any]) -> str:
    """A plain-text table of `plan`'s result (GiB per device; GiB sent per step per axis)."""
    b = result["bytes"]
    mesh = " x ".join(f"{a}={n}" for a, n in result["mesh"].items() if n > 1) or "one device"
    rows = [("parameters (fp32)", b["params"]), ("gradients (fp32)", b["grads"]),
            ("optimizer state", b["optimizer"]), ("activations", b["activations"]),
            ("  of which one layer", b["activations_per_layer"]),
            ("gathered weights (ZeRO-3)", b["gathered_weights"]),
            ("total per device", result["predicted_bytes_per_device"])]
    lines = [f"{result['param_count'] / 1e9:.3f}B parameters on mesh {mesh}",
             f"{'memory per device':<28}{'GiB':>10}"]
    lines += [f"{name:<28}{value / GiB:>10.2f}" for name, value in rows]
    if "compiled" in result:
        c = result["compiled"]
        ratio = result["predicted_bytes_per_device"] / max(c["total"], 1)
        lines.append(f"{'XLA compiled, per device':<28}{c['total'] / GiB:>10.2f}"
                     f"   (predicted / compiled = {ratio:.2f}; temp {c['temp'] / GiB:.2f}, "
                     f"arguments {c['arguments'] / GiB:.2f})")
    lines.append(f"{'sent per device per step':<28}{'GiB':>10}")
    lines += [f"{axis:<28}{value / GiB:>10.2f}"
              for axis, value in result["comm_bytes_per_step"].items()] or ["  (none)"]
    return "\n".join(lines)


def abstract_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one global training batch (for ahead-of-time lowering)."""
    from gigajax.distributed import BATCH_SPEC

    shape = (cfg.data.batch_size, cfg.data.seq_len)
    sharding = jax.sharding.NamedSharding(mesh, BATCH_SPEC)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
              "segment_ids": jnp.int32, "loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def compiled_memory(cfg: ml_collections.ConfigDict, devices: int) -> dict[str, int]:
    """XLA's per-device memory of the compiled train step on the first `devices` devices
    (simulated CPU devices work: nothing runs). `total` = arguments + outputs + temporaries -
    aliased (donated) bytes: the peak a device needs."""
    from gigajax.mesh import make_mesh
    from gigajax.train.loop import build_training

    if jax.device_count() < devices:
        raise ConfigError(f"--compile needs {devices} devices and JAX sees {jax.device_count()};"
                          " on CPU run `gigajax plan` itself (it simulates them).")
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices], cfg.attention)
    with jax.set_mesh(mesh):
        training = build_training(cfg, mesh)
        compiled = training.train_step.lower(training.state.abstract,
                                             abstract_batch(cfg, mesh)).compile()
    return memory_of(compiled)


def memory_of(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's per-device bytes of a compiled step; `total` = arguments + outputs + temporaries -
    aliased (donated) bytes, the peak a device needs."""
    memory = compiled.memory_analysis()
    result = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
              "temp": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    result["total"] = (result["arguments"] + result["outputs"] + result["temp"]
                       - result["aliased"])
    return result
