"""Per-device memory of a train step under a layout, from formulas: nothing is built or run.

The train state is counted from the model's own weight list (`model/inventory.py`) sharded by
the layout's own rule tables (`parallel/rules.make_layout`), so parameter, gradient and
optimizer bytes are exact. Activations follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), adapted to this model (SwiGLU, GQA, RMSNorm, no
dropout, flash attention; see docs/planning.md).
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
from gigajax.model.inventory import Weight, weights
from gigajax.parallel.rules import kv_heads_on_tensor, make_layout, shard_shape
from gigajax.train.optim import make_optimizer


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


def layout_of(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]):
    """The layout's rule tables for `cfg` on a mesh of `sizes`."""
    return make_layout(cfg.model.n_kv_heads, sizes, cfg.sharding.zero_stage,
                       cfg.sharding.megatron_sp)


def state_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> dict[str, int]:
    """Per-device bytes of parameters (fp32), gradients (fp32, laid out like the parameters)
    and optimizer state (moments laid out like their parameter under the optimizer rules;
    Adafactor's factored statistics and all counters replicated, as `parallel/shardings.py`
    places them). Under LoRA gradients and optimizer state are the adapters' only: the frozen
    weights count as parameters alone."""
    layout, model_weights = layout_of(cfg, sizes), weights(ModelConfig.from_config(cfg))

    def param_bytes(w: Weight) -> int:
        return nbytes(shard_shape(w.shape, w.names, layout.params, sizes), jnp.float32)

    params = sum(param_bytes(w) for w in model_weights)
    if cfg.model.lora.rank:
        model_weights = tuple(w for w in model_weights if w.is_adapter)
    grads = sum(param_bytes(w) for w in model_weights)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = {w.path: jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in model_weights}
    by_path = {w.path: w for w in model_weights}

    def moment_bytes(moment: jax.ShapeDtypeStruct, weight: Weight) -> int:
        if moment.shape == weight.shape:  # a moment: laid out like its parameter
            return nbytes(shard_shape(moment.shape, weight.names, layout.optimizer, sizes),
                          moment.dtype)
        return nbytes(moment.shape, moment.dtype)  # factored statistics: replicated

    sized = optax.tree_map_params(
        tx, moment_bytes, jax.eval_shape(tx.init, abstract), by_path,
        transform_non_params=lambda leaf: nbytes(leaf.shape, leaf.dtype),  # counters
        is_leaf=lambda x: isinstance(x, Weight))
    optimizer = sum(jax.tree.leaves(sized))
    return {"params": params, "grads": grads, "optimizer": optimizer}


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
    lora_r: int = 0  # LoRA: the adapters' rank-R outputs x A of one layer, summed (elements)
    lora_dropped: int = 0  # LoRA dropout: the adapters' dropped inputs (elements per token)
    moe: MoEShape | None = None  # a MoE layer's extents (None: a dense model)


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The per-device extents of one MoE layer's routed and shared experts."""

    x: int  # routed experts (the router's scores per token)
    k: int  # experts per token
    rows_per_assignment: int  # rows the grouped matmul runs per assignment: E (`expert` size)
    f: int  # an expert's hidden width per device (after `tensor`)
    shared_f: int  # the shared experts' width per device
    local_x: int  # the experts one device holds (x / `expert`)
    dense_ragged_dot: bool  # the backend runs every row against every local expert (XLA:CPU)


# backends whose `jax.lax.ragged_dot` is a masked dense matmul over every group (jax's
# `_ragged_dot_general_impl`): XLA:CPU; GPU and TPU lower it to one grouped matmul
DENSE_RAGGED_DOT_BACKENDS = ("cpu",)


def layer_shape(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int],
                backend: str = "gpu") -> Shape:
    """Per-device activation extents of one transformer layer under `sizes`, for the backend
    the step compiles for (`backend`: gpu, tpu or cpu; only a MoE layer depends on it)."""
    m = ModelConfig.from_config(cfg)
    t, n_sp = sizes.get("tensor", 1), sizes.get("sequence", 1) * sizes.get("ulysses", 1)
    ulysses = sizes.get("ulysses", 1)
    batch = cfg.data.batch_size // cfg.train.microbatches
    kv_local = kv_heads_on_tensor(m.n_kv_heads, t).per_shard
    heads, f = max(1, m.n_heads // t // ulysses), -(-m.mlp_dim // t)
    inputs = {"o": heads * m.head_dim, "down": f}  # the others read the normed x (D)
    targets = m.lora.targets if m.lora.rank else ()
    moe = None
    if m.moe.n_routed_experts:
        width = m.moe.expert_mlp_dim or m.mlp_dim
        moe = MoEShape(x=m.moe.n_routed_experts, k=m.moe.top_k,
                       rows_per_assignment=sizes.get("expert", 1), f=-(-width // t),
                       shared_f=-(-m.moe.n_shared_experts * width // t),
                       local_x=m.moe.n_routed_experts // sizes.get("expert", 1),
                       dense_ragged_dot=(m.moe.dispatch == "ragged"
                                         and backend in DENSE_RAGGED_DOT_BACKENDS))
    rows_over = sizes.get("data", 1) * sizes.get("fsdp", 1) * sizes.get("expert", 1)
    return Shape(
        b=max(1, batch // rows_over),
        s=cfg.data.seq_len // n_sp, s_kv=cfg.data.seq_len, h=m.d_model,
        heads=heads, kv_heads=max(1, kv_local // ulysses), e=m.head_dim,
        f=f, v=-(-m.vocab_size // t),
        sp_t=t if cfg.sharding.megatron_sp else 1,
        p=jnp.dtype(compute_dtype(m.dtype)).itemsize,
        lora_r=m.lora.rank * len(targets),
        lora_dropped=sum(inputs.get(n, m.d_model) for n in targets) if m.lora.dropout else 0,
        moe=moe)


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
    probabilities and scores (2 a s_kv elements) without. LoRA adds each adapter's x A (R
    elements) and, with dropout, its dropped input; the projections' inputs are kept as in
    full training (the adapters' A needs them), so fewer targets than `all` can keep less.
    """
    per_token = ((6 * x.h) / x.sp_t + 2 * x.heads * x.e + 3 * x.kv_heads * x.e + 6 * x.f
                 + x.lora_r + x.lora_dropped) * x.p
    per_token += 4 * x.heads if flash else 2 * x.heads * x.s_kv * x.p
    return int(x.b * x.s * per_token)


def moe_layer_activation_bytes(x: Shape, flash: bool) -> int:
    """Bytes one MoE layer keeps for its backward pass (no remat), per device: the attention
    and norms as in `layer_activation_bytes`, and in place of the dense MLP (per token, p-byte
    elements unless said):
      8 X bytes  the router's float32 logits and scores
      6 F_s      the shared experts' SwiGLU (as the dense MLP's)
      k D        the weighted expert outputs per assignment, before their sum
      R k (D + 6 F)  the grouped matmul's rows: each row's input and its SwiGLU; the
                 dropless all-to-all runs R = `expert` rows per assignment (its fixed-shape
                 buffers hold every device's worst case)
    """
    moe = x.moe
    dense_mlp = 6 * x.f * x.p * x.b * x.s
    per_token = (8 * moe.x + (6 * moe.shared_f + moe.k * x.h
                              + moe.rows_per_assignment * moe.k * (x.h + 6 * moe.f)) * x.p)
    return int(layer_activation_bytes(x, flash) - dense_mlp + x.b * x.s * per_token)


def dense_ragged_dot_bytes(x: Shape) -> int:
    """The extra working set of one MoE layer's backward where `ragged_dot` is a masked dense
    matmul (XLA:CPU): each grouped matmul masks a copy of its row operand per local expert.
    Measured on one dispatch (N rows, D, F, X experts; fp32) the backward holds about
    X N (2 D + 3 F) elements at its peak: copies of the rows' input and of the output
    gradient, and of three F-wide intermediates (gate, up and their product's gradients)."""
    moe = x.moe
    rows = moe.rows_per_assignment * moe.k * x.b * x.s
    return int(moe.local_x * rows * (2 * x.h + 3 * moe.f) * x.p)


def activation_bytes(cfg: ml_collections.ConfigDict, sizes: Mapping[str, int],
                     backend: str = "gpu") -> dict[str, int]:
    """Per-device activation bytes of a train step: layers (under `model.remat`), the head,
    and the backward's working set of one layer (about one layer's activations: with remat,
    the recomputed ones; the gradients flowing through are fused away or freed at once; for a
    MoE layer on a backend with a dense `ragged_dot`, its masked copies too).

    none: every layer's activations. full: each layer's input (p s b h / sp_t, the scan carry).
    dots: the weight matmuls' outputs (q, k, v, the attention projection, gate, up, down: per
    token 2h/sp_t + a e + 2 k e + 2F) and the layer input. minimal: the attention output and
    logsumexp, and the layer input. The head keeps the final norm (2h / sp_t, p bytes) and the
    fp32 loss over the vocabulary shard: saved are exp(logits), the one-hot select and its
    mask (9 v bytes per token); at its peak XLA also holds the logits, the shifted logits and
    their gradient (12 v bytes more). With `train.loss_chunks` = n the loss keeps only its
    input and holds those 21 v bytes for one slice of tokens (1/n) at a time.
    """
    x, m = layer_shape(cfg, sizes, backend), cfg.model
    flash = cfg.attention.impl in ("blockwise", "cudnn")
    one = layer_activation_bytes(x, flash)
    tokens = x.b * x.s
    layer_input = tokens * x.h * x.p // x.sp_t
    lse = 4 * x.heads * tokens if flash else 0
    saved = {
        "none": one,
        "full": layer_input,
        "dots": layer_input + tokens * x.p * (2 * x.h / x.sp_t + x.heads * x.e
                                              + 2 * x.kv_heads * x.e + 2 * x.f + x.lora_r),
        "minimal": layer_input + tokens * x.heads * x.e * x.p + lse,
    }[m.remat]
    working = one  # the backward of one layer (with remat: its recomputed activations)
    n_moe, moe_saved = 0, 0
    if x.moe is not None:  # MoE layers keep their experts' activations instead of the MLP's
        n_moe = m.n_layers - cfg.model.moe.first_dense_layers
        moe_one = moe_layer_activation_bytes(x, flash)
        moe_saved = moe_one if m.remat == "none" else saved
        dense = dense_ragged_dot_bytes(x) if x.moe.dense_ragged_dot else 0
        working = max(one, moe_one + dense)
    head = tokens * 2 * x.h * x.p // x.sp_t + 21 * x.v * tokens // cfg.train.loss_chunks
    layers = (m.n_layers - n_moe) * saved + n_moe * moe_saved + working
    return {"layers": int(layers), "head": int(head), "per_layer": working,
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
    whole = {w: nbytes(shard_shape(w.shape, w.names, rules, unsharded), jnp.float32)
             for w in weights(m)}
    layer = sum(size for w, size in whole.items() if w.per_layer) // m.n_layers
    return max(layer, *(size for w, size in whole.items() if w.is_matrix and not w.per_layer))
