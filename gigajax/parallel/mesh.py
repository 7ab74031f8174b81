"""The device mesh: named axes data, fsdp, expert, sequence, ulysses, tensor (outermost to
innermost).

The config names five axes (`mesh.data`, `mesh.fsdp`, `mesh.expert`, `mesh.sequence`,
`mesh.tensor`). The batch's rows split over data x fsdp x expert (`BATCH_AXES`): `expert`
holds 1/expert of a MoE layer's experts and is data parallel for everything else. The mesh
splits `sequence` in two: a ring part (`sequence`, ppermute) outside an all-to-all part
(`ulysses`, next to `tensor` on the fast links), sized by `attention.sp_impl`. `tensor` is
innermost so that it lands on the fastest links (NVLink within a node). Axis types are *Auto* on
purpose: the model is written as single-device code with sharding constraints and GSPMD
propagates the rest; collectives are spelled out only inside `shard_map` (ring, all-to-all).
JAX's default since 0.9, Explicit axes, would require every op's output sharding to be
decidable from its inputs and rejects gathers such as the embedding lookup.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

from gigajax.config.schema import MESH_AXES as AXES
from gigajax.errors import ConfigError
from gigajax.ops.layouts import layout_permutation

MESH_AXES = ("data", "fsdp", "expert", "sequence", "ulysses", "tensor")  # the Mesh's axes
BATCH_AXES = ("data", "fsdp", "expert")  # the batch's rows are split over all three
SEQUENCE_AXES = ("sequence", "ulysses")  # tokens are split over both


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved to the remaining devices; product must equal num_devices.
    An axis `mesh_cfg` does not name is 1 (a mesh written before `expert` existed)."""
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in AXES}
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
                          "mesh.fsdp, mesh.expert, mesh.sequence and mesh.tensor equal the "
                          "device count, or set one axis to -1.")
    return sizes


def sequence_split(n: int, sp_impl: str, ulysses_degree: int) -> tuple[int, int]:
    """(ring, ulysses) sizes of a `sequence` axis of size n: all ring, all Ulysses, or hybrid."""
    if sp_impl == "ring":
        return n, 1
    if sp_impl == "ulysses":
        return 1, n
    if n % ulysses_degree:
        raise ConfigError(f"attention.ulysses_degree={ulysses_degree} does not divide "
                          f"mesh.sequence={n}: hybrid attention runs Ulysses over groups of "
                          "ulysses_degree devices and a ring over the groups.")
    return n // ulysses_degree, ulysses_degree


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None,
              attention_cfg: ml_collections.ConfigDict | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with Auto axis types and axes MESH_AXES.

    `attention_cfg` (sp_impl, ulysses_degree) says how `sequence` splits into ring x Ulysses;
    without it the sequence axis is all ring.
    """
    devices = devices if devices is not None else jax.devices()
    sizes = mesh_axis_sizes(mesh_cfg, len(devices), attention_cfg)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_axis_sizes(mesh_cfg: ml_collections.ConfigDict, num_devices: int,
                    attention_cfg: ml_collections.ConfigDict | None = None) -> dict[str, int]:
    """The size of each of MESH_AXES (in order) for `num_devices`: -1 resolved, and `sequence`
    split into its ring and Ulysses parts per `attention_cfg` (all ring without it)."""
    sizes = mesh_shape(mesh_cfg, num_devices)
    sp_impl, degree = ("ring", 1) if attention_cfg is None else (
        attention_cfg.sp_impl, attention_cfg.ulysses_degree)
    ring, ulysses = sequence_split(sizes["sequence"], sp_impl, degree)
    return {"data": sizes["data"], "fsdp": sizes["fsdp"], "expert": sizes["expert"],
            "sequence": ring, "ulysses": ulysses, "tensor": sizes["tensor"]}


def sequence_size(mesh_sizes: dict[str, int]) -> int:
    """Devices along the sequence: the config's `sequence`, or ring x Ulysses of a mesh."""
    return mesh_sizes["sequence"] * mesh_sizes.get("ulysses", 1)


def sequence_permutation(mesh: Mesh, seq_len: int, layout: str) -> np.ndarray | None:
    """The tokens' order for the mesh's ring (`ops/layouts.py`); None when there is no ring."""
    ring = mesh.shape["sequence"]
    return None if ring == 1 else layout_permutation(seq_len, ring, layout)
