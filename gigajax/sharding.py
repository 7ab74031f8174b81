"""Logical axis names -> mesh axes; the only module that touches Flax's sharding metadata.

Every parameter is created with logical names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`) and every activation constraint uses (`batch`, `seq`, `embed`, ...). One rule
table per use (parameters, activations) maps them to mesh axes, so a layout is a rule change.
Flax's eager sharding is switched off while creating parameters: the names are kept as metadata
and turned into `NamedSharding`s here, which lets us init abstractly and then build each shard
directly on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, str | tuple[str, ...] | None]

# Data parallel: parameters replicated, the batch split over every data-like axis.
PARAM_RULES: Rules = {}
ACTIVATION_RULES: Rules = {"batch": ("data", "fsdp")}


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


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules = PARAM_RULES) -> Any:
    """NamedSharding for every leaf of an abstract parameter state, from its logical names."""
    logical = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)), logical,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(create: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Rules = PARAM_RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """Create a model with every parameter built directly in its sharding (never a full replica)."""
    graphdefs = []

    def init() -> nnx.State:
        graphdef, state = nnx.split(create())
        graphdefs.append(graphdef)  # static structure, identical on every trace
        return state

    with nnx.use_eager_sharding(False):
        shardings = state_shardings(jax.eval_shape(init), mesh, rules)
        state = jax.jit(init, out_shardings=shardings)()
    graphdef = graphdefs[-1]
    return graphdef, state


def constrain(x: jax.Array, names: tuple[str | None, ...],
              rules: Rules = ACTIVATION_RULES) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op outside a mesh context)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, rules))
