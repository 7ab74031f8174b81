"""The device mesh: named axes data, fsdp, sequence, tensor (outermost to innermost).

`tensor` is innermost so that it lands on the fastest links (NVLink within a node). Axis types are
*Auto* on purpose: the model is written as single-device code with sharding constraints and GSPMD
propagates the rest; collectives are spelled out only inside `shard_map` (ring, all-to-all). JAX's
default since 0.9, Explicit axes, would require every op's output sharding to be decidable from
its inputs and rejects gathers such as the embedding lookup (see shared/JAX_NOTES.md).
"""

from __future__ import annotations

import math

import jax
import ml_collections
from jax.sharding import AxisType, Mesh

from gigajax.errors import ConfigError

AXES = ("data", "fsdp", "sequence", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved to the remaining devices; product must equal num_devices."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    factors = " x ".join(f"{a}={s}" for a, s in sizes.items())
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % fixed:
                raise ConfigError(f"mesh {factors}: the fixed axes multiply to {fixed}, which does "
                                  f"not divide the {num_devices} devices, so mesh.{axis}=-1 has "
                                  "no integer size.")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {factors} has {math.prod(sizes.values())} devices but "
                          f"{num_devices} are available: make the product of mesh.data, "
                          "mesh.fsdp, mesh.sequence and mesh.tensor equal the device count, or "
                          "set one axis to -1.")
    return sizes


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with Auto axis types."""
    devices = devices if devices is not None else jax.devices()
    sizes = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def fixed_device_count(mesh_cfg: ml_collections.ConfigDict) -> int | None:
    """The device count a mesh config asks for, or None when an axis is -1 (any count)."""
    sizes = [int(mesh_cfg[axis]) for axis in AXES]
    return None if -1 in sizes else math.prod(sizes)
