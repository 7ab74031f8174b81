"""Logical axis names -> mesh axes: one rule table per kind of array, per layout.

Every parameter is created with logical names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`, `expert`; LoRA adapters add `lora_rank`, which no table maps: their rank dim is
replicated and their other dims shard like their base weight's) and every activation
constraint uses (`batch`, `seq`, `inner_seq`, `embed`, `heads`, `kv_heads`, `mlp`, `vocab`).
A `Layout` holds one rule table each for parameters, optimizer state and activations; data
parallel, FSDP (ZeRO-3), ZeRO-1, Megatron tensor and sequence parallelism, expert parallelism
and their combinations are all rule tables built by `make_layout`, so a layout is a config
change, never a model change.

Two sequence names: `seq` is the sequence dim of the residual stream and norm inputs, which
Megatron-SP (Korthikanti et al. 2022) splits over `tensor`; `inner_seq` is the sequence dim inside
the tensor-parallel regions (q/k/v, attention output, MLP hidden, logits), never split over
`tensor`. GSPMD turns the switch between the two into the all-gather / reduce-scatter pair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jax.sharding import PartitionSpec

from gigajax.errors import ConfigError
from gigajax.parallel.mesh import BATCH_AXES, SEQUENCE_AXES

Rules = Mapping[str, str | tuple[str, ...] | None]
LORA_RANK = "lora_rank"  # the rank dim of a LoRA adapter: in no rule table, so replicated


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model uses a mesh: a logical-name -> mesh-axes table per kind of array."""

    params: Rules
    optimizer: Rules
    activations: Rules


DATA_PARALLEL = Layout(params={}, optimizer={}, activations={"batch": BATCH_AXES})


@dataclasses.dataclass(frozen=True)
class KVHeads:
    """How the KV heads sit on `tensor`: split (each shard holds K / tensor of them) or
    replicated (K divides tensor: each shard uses the one KV head its query heads share)."""

    split: bool
    per_shard: int  # KV heads each tensor shard attends with


def kv_heads_on_tensor(n_kv_heads: int, tensor: int) -> KVHeads:
    """The one rule for KV heads under tensor parallelism: split over `tensor` when their count
    is a multiple of it, replicated when it divides it; anything else is a ConfigError."""
    if n_kv_heads % tensor == 0:
        return KVHeads(split=True, per_shard=n_kv_heads // tensor)
    if tensor % n_kv_heads == 0:
        return KVHeads(split=False, per_shard=1)
    raise ConfigError(
        f"config.model.n_kv_heads={n_kv_heads} and mesh.tensor={tensor}: KV heads are split over "
        "`tensor` when their count is a multiple of it, and replicated when it divides "
        f"mesh.tensor; {n_kv_heads} is neither. Choose mesh.tensor among the divisors or "
        f"multiples of {n_kv_heads}.")


def make_layout(n_kv_heads: int, mesh_sizes: Mapping[str, int], zero_stage: int = 3,
                megatron_sp: bool = False) -> Layout:
    """The rule tables for a mesh: every axis of size > 1 is used, none needs a model change.

    - batch over (`data`, `fsdp`, `expert`): FSDP is data parallel with sharded state, and
      `expert` is data parallel for everything but the experts.
    - `expert`: a MoE layer's experts (their weights and optimizer state) over `expert`; the
      tokens reach them by all-to-all (`parallel/moe.py`).
    - `fsdp` > 1: the `embed` dim of every parameter over `fsdp` (ZeRO-3; XLA gathers each
      layer's weights inside the layer scan), or of the optimizer state only (`zero_stage=1`).
    - `tensor` > 1: Megatron column/row split (q/k/v and gate/up by heads or mlp, o and down by
      their input dim), vocab-parallel embedding and LM head; KV heads by `kv_heads_on_tensor`.
    - `megatron_sp`: the residual stream's `seq` over `tensor` between the parallel regions.
    """
    kv = kv_heads_on_tensor(n_kv_heads, mesh_sizes.get("tensor", 1))
    split_weights = {"heads": "tensor", "kv_heads": "tensor" if kv.split else None,
                     "mlp": "tensor", "vocab": "tensor", "expert": "expert"}
    sharded_state = {"embed": "fsdp", **split_weights}
    return Layout(
        params=sharded_state if zero_stage == 3 else split_weights,
        optimizer=sharded_state,
        activations={"batch": BATCH_AXES,
                     "seq": (*SEQUENCE_AXES, "tensor") if megatron_sp else SEQUENCE_AXES,
                     "inner_seq": SEQUENCE_AXES, **split_weights})


def logical_to_mesh(names: tuple[str | None, ...] | PartitionSpec, rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec over mesh axes (unknown names: replicated)."""
    return PartitionSpec(*(rules.get(name) if name is not None else None for name in names))


def axes_size(sizes: Mapping[str, int], axes: str | tuple[str, ...] | None) -> int:
    """How many devices mesh axes `axes` (a name, names, or None) span; `sizes` = mesh.shape."""
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(sizes[a] for a in axes)


def shard_shape(shape: tuple[int, ...], names: tuple[str | None, ...], rules: Rules,
                sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block of an array whose dims carry logical `names` under `rules`."""
    return tuple(-(-d // axes_size(sizes, rules.get(n) if n else None))
                 for d, n in zip(shape, names, strict=True))
