"""`gigajax check-layouts`: does each mesh layout train exactly like one device?

Runs a few optimizer steps of a config under every given layout and under a single device, in
float32 with full-precision matmuls, on the same batches from the config's data pipeline, and
reports per layout: the loss at each step and the largest relative difference of the loss, of
the first step's gradients and of the final parameters against one device. Run it before a big
job on a new layout; it exits 1 when a layout is off by more than the tolerances.

A layout is a comma-separated list of `key=value`: mesh axes (`data`, `fsdp`, `sequence`,
`tensor`; missing ones are 1, `-1` is the rest of the devices: on CPU the command simulates 8, or
as many as the largest fixed layout needs) and the `sharding` options
(`zero_stage=1|3`, `megatron_sp=0|1`) and the `attention` options of sequence parallelism
(`sp_impl=ring|ulysses|hybrid`, `layout=contiguous|striped|zigzag`, `ulysses_degree=N`).
Layouts are separated by `;`, for example
`data=8;fsdp=8;fsdp=8,zero_stage=1;tensor=4,megatron_sp=1;data=2,fsdp=2,tensor=2`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from rich.console import Console
from rich.table import Table

from gigajax.config import validate
from gigajax.data.pipeline import build_datasets, permute_batch
from gigajax.distributed import BATCH_SPEC, place_batch
from gigajax.errors import ConfigError
from gigajax.mesh import AXES, make_mesh, sequence_permutation
from gigajax.train.logger import log_console
from gigajax.train.loop import build_training
from gigajax.train.step import make_loss_fn

SHARDING_KEYS = ("zero_stage", "megatron_sp")
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # fp32 tolerances of the equivalence tests

ATTENTION_KEYS = ("sp_impl", "layout", "ulysses_degree")  # config.attention.*
TEXT_KEYS = ("sp_impl", "layout")
KEYS = (*AXES, *SHARDING_KEYS, *ATTENTION_KEYS)

Layout = dict[str, int | bool | str]


def parse_layouts(text: str) -> list[Layout]:
    """`"data=8;tensor=2,data=4"` -> [{"data": 8}, {"tensor": 2, "data": 4}]."""
    layouts = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        layout: Layout = {}
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or key not in KEYS:
                raise ConfigError(f"layout {item!r}: {pair!r} is not key=value with a key among "
                                  f"{', '.join(KEYS)}.")
            if key in TEXT_KEYS:
                layout[key] = value
                continue
            try:
                layout[key] = int(value) if key != "megatron_sp" else bool(int(value))
            except ValueError:
                raise ConfigError(f"layout {item!r}: {key}={value!r} must be an integer.") from None
        layouts.append(layout)
    if not layouts:
        raise ConfigError("--layouts is empty: give layouts like 'data=8;fsdp=8;tensor=2,data=4'.")
    return layouts


def layout_name(layout: Layout) -> str:
    return ",".join(f"{k}={v if isinstance(v, str) else int(v)}"
                    for k, v in layout.items()) or "1 device"


def devices_needed(layouts: list[Layout], default: int = 8) -> int:
    """Most devices any layout asks for; at least `default` when one says -1 (the rest)."""
    sizes = [[int(layout.get(a, 1)) for a in AXES] for layout in layouts]
    fixed = [math.prod(s) for s in sizes if -1 not in s]
    needed = max(fixed, default=1)
    return needed if len(fixed) == len(sizes) else max(needed, default)


def layout_config(cfg: ml_collections.ConfigDict, layout: Layout,
                  dtype: str | None = "float32") -> ml_collections.ConfigDict:
    """`cfg` on the layout's mesh (unnamed axes 1), sharding and attention options; in float32
    for comparisons (`dtype=None` keeps the config's compute dtype)."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    if dtype is not None:
        c.model.dtype = dtype
    c.mesh.update({axis: int(layout.get(axis, 1)) for axis in AXES})
    c.sharding.update({k: v for k, v in layout.items() if k in SHARDING_KEYS})
    c.attention.update({k: v for k, v in layout.items() if k in ATTENTION_KEYS})
    try:
        validate(c)
    except ConfigError as error:
        raise ConfigError(f"layout {layout_name(layout)!r}: {error}") from None
    return c


@dataclasses.dataclass
class LayoutRun:
    """What one layout produced, fetched to the host."""

    name: str
    losses: list[float]
    grads: Any  # gradients of the mean loss on the first batch, at the initial parameters
    params: Any  # parameters after all steps
    param_change: float  # max_relative_difference(params, initial params): did it train?
    param_specs: dict[str, tuple]  # parameter path -> mesh axes per dim (PartitionSpec)


def run_layout(cfg: ml_collections.ConfigDict, layout: Layout, batches: list[dict[str, np.ndarray]],
               devices: list | None = None) -> LayoutRun:
    """Train `len(batches)` steps of `cfg` under `layout`, recording losses, grads, params."""
    c = layout_config(cfg, layout)
    devices = devices if devices is not None else jax.devices()
    n = math.prod(c.mesh[a] for a in AXES if c.mesh[a] != -1)
    mesh = make_mesh(c.mesh, devices if -1 in c.mesh.values() else devices[:n], c.attention)
    batch_size = c.data.batch_size
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        training = build_training(c, mesh)
        state = training.state.init()
        param_shardings = training.state.shardings["params"]
        loss_fn = make_loss_fn(training.state.graphdef, c.train.z_loss,
                               training.layout.activations, c.train.loss_chunks)

        def mean_grads(params, batch):
            grads, (_, count) = jax.grad(loss_fn, has_aux=True)(params, batch)
            return jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)

        grad_fn = jax.jit(mean_grads, out_shardings=param_shardings,
                          in_shardings=(param_shardings, NamedSharding(mesh, BATCH_SPEC)))
        perm = sequence_permutation(mesh, c.data.seq_len, c.attention.layout)
        placed = [place_batch(permute_batch(b, perm), mesh, batch_size) for b in batches]
        initial = jax.device_get(state["params"])
        grads = jax.device_get(grad_fn(state["params"], placed[0]))
        losses = []
        for batch in placed:
            state, metrics = training.train_step(state, batch)
            losses.append(float(metrics["loss"]))
        specs = {jax.tree_util.keystr(path): tuple(leaf.sharding.spec) for path, leaf in
                 jax.tree_util.tree_leaves_with_path(state["params"])}
        params = jax.device_get(state["params"])
        return LayoutRun(layout_name(layout), losses, grads, params,
                         max_relative_difference(params, initial), specs)


def max_relative_difference(tree: Any, reference: Any) -> float:
    """max over leaves of max|a - b| / max|b|: error relative to each leaf's scale."""
    return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True))


def compare(run: LayoutRun, reference: LayoutRun) -> dict[str, Any]:
    """One table row: the layout's losses and its differences from the single device."""
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(run.losses, reference.losses, strict=True))
    grad_diff = max_relative_difference(run.grads, reference.grads)
    param_diff = max_relative_difference(run.params, reference.params)
    return {"layout": run.name, "losses": run.losses, "loss_rel_diff": loss_diff,
            "grad_rel_diff": grad_diff, "param_rel_diff": param_diff,
            "ok": loss_diff <= LOSS_RTOL and max(grad_diff, param_diff) <= GRAD_RTOL}


def check_layouts(cfg: ml_collections.ConfigDict, layouts: list[Layout], steps: int = 3,
                  output: str | Path | None = None, console: Console | None = None
                  ) -> list[dict[str, Any]]:
    """Run every layout and one device on the same `steps` batches; print and return the rows."""
    console = console or log_console()
    for layout in layouts:  # all config errors before any compiling
        layout_config(cfg, layout)
    _, train_ds, _ = build_datasets(cfg.data, cfg.train.seed)
    batches = [train_ds[s] for s in range(steps)]
    console.print(f"{len(layouts)} layouts x {steps} steps, float32, against one device "
                  f"({jax.device_count()} {jax.default_backend()} devices)")
    reference = run_layout(cfg, {}, batches)
    rows = [compare(reference, reference)]
    for layout in layouts:
        with console.status(f"layout {layout_name(layout)}"):
            rows.append(compare(run_layout(cfg, layout, batches), reference))
    table = Table(title="Layouts against one device (relative differences; fp32)")
    for column in ("layout", "loss per step", "loss", "grads", "params (end)", "ok"):
        table.add_column(column, justify="left" if column in ("layout", "ok") else "right")
    for row in rows:
        table.add_row(row["layout"], " ".join(f"{x:.6f}" for x in row["losses"]),
                      f"{row['loss_rel_diff']:.1e}", f"{row['grad_rel_diff']:.1e}",
                      f"{row['param_rel_diff']:.1e}", "yes" if row["ok"] else "NO")
    console.print(table)
    console.print(f"ok: loss within {LOSS_RTOL:.0e}, gradients and parameters within "
                  f"{GRAD_RTOL:.0e} (max |a-b| / max |b| per parameter, worst parameter).")
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))
    return rows
