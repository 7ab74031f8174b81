"""Logical axis names -> mesh axes; the only module that touches Flax's sharding metadata.

Every parameter is created with logical names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`) and every activation constraint uses (`batch`, `seq`, `inner_seq`, `embed`,
`heads`, `kv_heads`, `mlp`, `vocab`). A `Layout` holds one rule table each for parameters,
optimizer state and activations; data parallel, FSDP (ZeRO-3), ZeRO-1, Megatron tensor and
sequence parallelism and their combinations are all rule tables built by `make_layout`, so a
layout is a config change, never a model change.

Two sequence names: `seq` is the sequence dim of the residual stream and norm inputs, which
Megatron-SP (Korthikanti et al. 2022) splits over `tensor`; `inner_seq` is the sequence dim inside
the tensor-parallel regions (q/k/v, attention output, MLP hidden, logits), never split over
`tensor`. GSPMD turns the switch between the two into the all-gather / reduce-scatter pair.

Flax's eager sharding is switched off while creating parameters: the names stay metadata and are
turned into `NamedSharding`s here, so a model is initialised abstractly and each shard is built
directly on its device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.errors import ConfigError, GigajaxError
from gigajax.mesh import SEQUENCE_AXES, sequence_size, sequence_split
from gigajax.ops.layouts import check_sequence_split
from gigajax.ops.ulysses import check_ulysses_heads

Rules = Mapping[str, str | tuple[str, ...] | None]
ZERO_STAGES = (1, 3)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model uses a mesh: a logical-name -> mesh-axes table per kind of array."""

    params: Rules
    optimizer: Rules
    activations: Rules


DATA_PARALLEL = Layout(params={}, optimizer={}, activations={"batch": ("data", "fsdp")})


def make_layout(n_kv_heads: int, mesh_sizes: Mapping[str, int], zero_stage: int = 3,
                megatron_sp: bool = False) -> Layout:
    """The rule tables for a mesh: every axis of size > 1 is used, none needs a model change.

    - batch over (`data`, `fsdp`): FSDP is data parallel with sharded state.
    - `fsdp` > 1: the `embed` dim of every parameter over `fsdp` (ZeRO-3; XLA gathers each
      layer's weights inside the layer scan), or of the optimizer state only (`zero_stage=1`).
    - `tensor` > 1: Megatron column/row split (q/k/v and gate/up by heads or mlp, o and down by
      their input dim), vocab-parallel embedding and LM head. KV heads fewer than `tensor` are
      replicated (each device then uses the one KV head its query heads share).
    - `megatron_sp`: the residual stream's `seq` over `tensor` between the parallel regions.
    """
    tp = mesh_sizes.get("tensor", 1)
    kv_axis = "tensor" if n_kv_heads % tp == 0 else None
    tensor_rules = {"heads": "tensor", "kv_heads": kv_axis, "mlp": "tensor", "vocab": "tensor"}
    sharded_state = {"embed": "fsdp", **tensor_rules}
    return Layout(
        params=sharded_state if zero_stage == 3 else tensor_rules,
        optimizer=sharded_state,
        activations={"batch": ("data", "fsdp"),
                     "seq": (*SEQUENCE_AXES, "tensor") if megatron_sp else SEQUENCE_AXES,
                     "inner_seq": SEQUENCE_AXES, **tensor_rules})


def check_layout(cfg: ml_collections.ConfigDict, mesh_sizes: Mapping[str, int]) -> None:
    """ConfigError, naming the field, when the model or batch does not split over the mesh."""
    m = cfg.model
    n_heads, n_kv_heads, d_model, mlp_dim, vocab_size = (
        m.n_heads, m.n_kv_heads, m.d_model, m.mlp_dim, m.vocab_size)
    batch_size, seq_len = cfg.data.batch_size, cfg.data.seq_len
    microbatches, megatron_sp = cfg.train.microbatches, cfg.sharding.megatron_sp
    tp, fsdp = mesh_sizes["tensor"], mesh_sizes["fsdp"]
    dp = mesh_sizes["data"] * fsdp
    for field, value in (("model.n_heads", n_heads), ("model.mlp_dim", mlp_dim),
                         ("model.vocab_size", vocab_size)):
        if value % tp:
            raise ConfigError(f"config.{field}={value} does not split over mesh.tensor={tp}: "
                              f"tensor parallelism needs it to be a multiple of {tp}.")
    if n_kv_heads % tp and tp % n_kv_heads:
        raise ConfigError(
            f"config.model.n_kv_heads={n_kv_heads} and mesh.tensor={tp}: KV heads are split over "
            "`tensor` when their count is a multiple of it, and replicated when it divides "
            f"mesh.tensor; {n_kv_heads} is neither. Choose mesh.tensor among the divisors or "
            f"multiples of {n_kv_heads}.")
    if d_model % fsdp:
        raise ConfigError(f"config.model.d_model={d_model} does not split over mesh.fsdp={fsdp}: "
                          f"FSDP shards the embed dim, so it must be a multiple of {fsdp}.")
    n_seq = sequence_size(mesh_sizes)
    if n_seq > 1:
        ring, ulysses = sequence_split(n_seq, cfg.attention.sp_impl,
                                       cfg.attention.ulysses_degree)
        if ring > 1:  # the layout permutes the tokens for the ring's devices
            check_sequence_split(seq_len, ring, cfg.attention.layout)
            if cfg.attention.impl != "blockwise":
                raise ConfigError(
                    f"config.attention.impl={cfg.attention.impl!r} with a ring over "
                    f"{ring} devices: ring attention runs the blockwise kernel on every K/V "
                    "block (it needs each block's fp32 logsumexp); set attention.impl="
                    "'blockwise', or use attention.sp_impl='ulysses'.")
        if seq_len % n_seq:  # each ring shard splits again over the Ulysses devices
            raise ConfigError(f"config.data.seq_len={seq_len} does not split over "
                              f"mesh.sequence={n_seq}: use a multiple of {n_seq}.")
        if ulysses > 1:  # each tensor shard's heads are what the all-to-all splits
            local_kv = n_kv_heads // tp if n_kv_heads % tp == 0 else 1
            check_ulysses_heads(n_heads // tp, local_kv, ulysses, tensor=tp)
    if megatron_sp and seq_len % (tp * n_seq):
        raise ConfigError(f"config.data.seq_len={seq_len} does not split over mesh.tensor={tp} "
                          f"x mesh.sequence={n_seq}: Megatron sequence parallelism "
                          "(sharding.megatron_sp) shards the residual stream's sequence over "
                          f"`tensor` too; use a multiple of {tp * n_seq}.")
    per_micro = batch_size // microbatches
    if per_micro % dp:
        raise ConfigError(
            f"config.data.batch_size={batch_size} / train.microbatches={microbatches} = "
            f"{per_micro} rows per microbatch do not split over the {dp} data-parallel devices "
            f"(mesh.data x mesh.fsdp): make it a multiple of {dp}.")


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], names: tuple[str, ...],
          dtype: Any = jnp.float32) -> nnx.Param:
    """A float32 parameter carrying its logical axis names."""
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def stacked(create: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of a module, stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create_stack(rngs: nnx.Rngs) -> nnx.Module:
        return create(rngs)

    return create_stack(rngs)


def logical_to_mesh(names: tuple[str | None, ...] | PartitionSpec, rules: Rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec over mesh axes (unknown names: replicated)."""
    return PartitionSpec(*(rules.get(name) if name is not None else None for name in names))


def axes_size(sizes: Mapping[str, int], axes: str | tuple[str, ...] | None) -> int:
    """How many devices mesh axes `axes` (a name, names, or None) span; `sizes` = mesh.shape."""
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(sizes[a] for a in axes)


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding per parameter from its logical names; every split must be even."""
    logical = nnx.get_partition_spec(abstract_params)

    def sharding(path, names: PartitionSpec, leaf) -> NamedSharding:
        spec = logical_to_mesh(names, rules)
        for dim, (size, axes) in enumerate(zip(leaf.shape, spec, strict=False)):
            if size % axes_size(mesh.shape, axes):
                raise ConfigError(
                    f"parameter {_path_name(path)} {tuple(leaf.shape)} (logical {tuple(names)}): "
                    f"dim {dim} of size {size} does not split over mesh axes {axes} of size "
                    f"{axes_size(mesh.shape, axes)}; change the mesh or the model size.")
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(sharding, logical, abstract_params,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def optimizer_shardings(tx, abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for the optimizer state: each moment like its parameter (under `rules`).

    Moments shaped like their parameter follow it; reduced statistics (Adafactor's factored
    rows/columns) and counters are small and replicated.
    """
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    shardings = param_shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda moment, p, s: s if moment.shape == p.shape else replicated,
        abstract_opt, abstract_params, shardings, transform_non_params=lambda _: replicated)


def check_intent(abstract_params: nnx.State, shardings: Any, mesh: Mesh, *, zero_stage: int,
                 n_kv_heads: int) -> None:
    """Fail loudly when a weight matrix is left unsharded on an axis the mesh means to use.

    Matrices (two or more dims besides `layers`) must be split over `fsdp` when it is > 1 under
    ZeRO-3, and over `tensor` when it is > 1, except KV projections with fewer heads than
    `tensor`, which are replicated on purpose.
    """
    wanted = [axis for axis in ("fsdp", "tensor") if mesh.shape[axis] > 1
              and (axis != "fsdp" or zero_stage == 3)]
    kv_replicated = n_kv_heads % mesh.shape["tensor"] != 0
    logical = nnx.get_partition_spec(abstract_params)
    missing = []

    def check(path, names: PartitionSpec, sharding: NamedSharding) -> None:
        if sum(n not in (None, "layers") for n in names) < 2:
            return
        used = set(jax.tree.leaves(tuple(sharding.spec)))
        for axis in wanted:
            exempt = axis == "tensor" and "kv_heads" in names and kv_replicated
            if axis not in used and not exempt:
                missing.append(f"{_path_name(path)} {tuple(names)} is not split over `{axis}`")

    jax.tree.map_with_path(check, logical, shardings,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
    if missing:
        raise GigajaxError("the sharding rules leave large parameters unsharded against the "
                           "layout: " + "; ".join(missing) + ". Fix the rule table in "
                           "gigajax/sharding.py.")


def abstract_model(create: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (shape-only) parameter state, without allocating."""
    graphdefs = []

    def init() -> nnx.State:
        graphdef, state = nnx.split(create())
        graphdefs.append(graphdef)
        return state

    with nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(init)
    return graphdefs[-1], abstract


def init_sharded(create: Callable[[], nnx.Module], shardings: Any) -> nnx.State:
    """Create a model's parameters with each one built directly in its sharding."""

    def init() -> nnx.State:
        return nnx.split(create())[1]

    with nnx.use_eager_sharding(False):
        return jax.jit(init, out_shardings=shardings)()


_ACTIVATION_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "activation_rules", default=DATA_PARALLEL.activations)


@contextlib.contextmanager
def activation_rules(rules: Rules) -> Iterator[None]:
    """Use `rules` for `constrain` while tracing (enter it inside the jitted function)."""
    token = _ACTIVATION_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def current_activation_rules() -> Rules:
    return _ACTIVATION_RULES.get()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op outside a mesh context)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, _ACTIVATION_RULES.get()))
