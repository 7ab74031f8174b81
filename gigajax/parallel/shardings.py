"""Every Flax sharding call: parameters with logical names, their shardings on a mesh, sharded
init, and activation constraints by logical name.

Parameters are created with their logical names as metadata and Flax's eager sharding off
(per variable), so a model builds the same with or without a mesh: the names are turned into
`NamedSharding`s here, by a layout's rule tables (`rules.py`), and a model is initialised
abstractly and each shard built directly on its device (`init_sharded`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.parallel.checks import check_param_split
from gigajax.parallel.rules import DATA_PARALLEL, Rules, logical_to_mesh


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], names: tuple[str, ...],
          dtype: Any = jnp.float32, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A float32 parameter carrying its logical axis names (placed by the caller's layout, not
    at creation: `eager_sharding=False`); `kind` nnx.LoRAParam marks a LoRA adapter."""
    return kind(nnx.with_partitioning(init, names, eager_sharding=False)(
        rngs.params(), shape, dtype))


def stacked(create: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` independently initialised copies of a module, stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create_stack(rngs: nnx.Rngs) -> nnx.Module:
        return create(rngs)

    return create_stack(rngs)


def logical_specs(abstract_params: nnx.State) -> Any:
    """Each parameter's logical axis names, as a PartitionSpec of names."""
    return nnx.get_partition_spec(abstract_params)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding per parameter from its logical names; every split must be even."""

    def sharding(path, names: PartitionSpec, leaf) -> NamedSharding:
        spec = logical_to_mesh(names, rules)
        check_param_split(path, tuple(leaf.shape), names, spec, mesh.shape)
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(sharding, logical_specs(abstract_params), abstract_params,
                                  is_leaf=_is_spec)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params: nnx.State,
                        mesh: Mesh, rules: Rules) -> Any:
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


def abstract_model(create: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (shape-only) parameter state, without allocating."""
    graphdefs = []

    def init() -> nnx.State:
        graphdef, state = nnx.split(create())
        graphdefs.append(graphdef)
        return state

    abstract = jax.eval_shape(init)
    return graphdefs[-1], abstract


def init_sharded(create: Callable[[], nnx.Module], shardings: Any) -> nnx.State:
    """Create a model's parameters with each one built directly in its sharding."""
    return jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()


def place_shards(value: Any, want: jax.ShapeDtypeStruct) -> jax.Array:
    """`value` (a host array, or anything sliced by `value[index]`, like a lazy HF tensor) as an
    array of `want`'s shape, dtype and sharding, one local slice at a time: each distinct slice
    is read once, cast, put on its devices and waited for before the next is read, so the host
    holds one slice, not this process's whole part of the array (which
    `make_array_from_callback` builds before it transfers any)."""
    devices_by_slice: dict[tuple, tuple[tuple, list]] = {}
    for device, index in want.sharding.addressable_devices_indices_map(want.shape).items():
        key = tuple((s.start, s.stop, s.step) for s in index)  # slices hash from Python 3.12
        devices_by_slice.setdefault(key, (index, []))[1].append(device)
    shards = []
    for index, devices in devices_by_slice.values():
        host = np.asarray(value[index], want.dtype)
        shards += [jax.block_until_ready(jax.device_put(host, d)) for d in devices]
        del host
    return jax.make_array_from_single_device_arrays(want.shape, want.sharding, shards)


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
