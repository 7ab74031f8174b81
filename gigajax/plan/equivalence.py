"""`gigajax check-layouts`: does each mesh layout train exactly like one device?

Runs a few optimizer steps of a config under every given layout and under a single device, in
float32 with full-precision matmuls, on the same batches from the config's data pipeline, and
reports per layout: the loss at each step and the largest relative difference of the loss, of
the first step's gradients and of the final parameters against one device. Run it before a big
job on a new layout; it exits 1 when a layout is off by more than the tolerances.

Layouts are written as in `layouts.py`, e.g.
`data=8;fsdp=8;fsdp=8,zero_stage=1;tensor=4,megatron_sp=1;data=2,fsdp=2,tensor=2`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from rich.console import Console
from rich.table import Table

from gigajax.data.pipeline import build_datasets, permute_batch
from gigajax.errors import GigajaxError
from gigajax.model.lora import combine, trainable_and_frozen
from gigajax.parallel.mesh import AXES, make_mesh, sequence_permutation
from gigajax.parallel.multihost import BATCH_SPEC, place_batch
from gigajax.plan.layouts import Layout, layout_config, layout_name
from gigajax.train.loop import build_training
from gigajax.train.objectives import make_objective_loss_fn

LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # fp32 tolerances of the equivalence tests


@dataclasses.dataclass
class LayoutRun:
    """What one layout produced, fetched to the host."""

    name: str
    losses: list[float]
    grad_norms: list[float]  # the train step's gradient norm (accumulated, before clipping)
    grads: Any  # gradients of the mean loss on the first batch, at the initial parameters
    params: Any  # parameters after all steps
    param_change: float  # max_relative_difference(params, initial params): did it train?
    param_specs: dict[str, tuple]  # parameter path -> mesh axes per dim (PartitionSpec)
    initial: Any = None  # parameters before the first step


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
        loss_fn = make_objective_loss_fn(c, training.state.graphdef, training.layout.activations)
        lora = training.state.lora  # gradients of what trains: the adapters under LoRA

        def mean_grads(params, batch):
            trainable, frozen = trainable_and_frozen(params, lora)
            grads, (_, count, *_) = jax.grad(lambda p: loss_fn(combine(p, frozen), batch),
                                             has_aux=True)(trainable)
            return jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)

        grad_fn = jax.jit(mean_grads, out_shardings=training.state.trainable(param_shardings),
                          in_shardings=(param_shardings, NamedSharding(mesh, BATCH_SPEC)))
        perm = sequence_permutation(mesh, c.data.seq_len, c.attention.layout)
        placed = [place_batch(permute_batch(b, perm), mesh, batch_size) for b in batches]
        initial = jax.device_get(state["params"])
        grads = jax.device_get(grad_fn(state["params"], placed[0]))
        losses, grad_norms = [], []
        for batch in placed:
            state, metrics = training.train_step(state, batch)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
        specs = {jax.tree_util.keystr(path): tuple(leaf.sharding.spec) for path, leaf in
                 jax.tree_util.tree_leaves_with_path(state["params"])}
        params = jax.device_get(state["params"])
        return LayoutRun(layout_name(layout), losses, grad_norms, grads, params,
                         max_relative_difference(params, initial), specs, initial)


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


def reference_row(reference: LayoutRun) -> dict[str, Any]:
    """The one-device row: what the other rows are compared with, not a comparison itself
    (`reference` True; its differences are 0 by definition, and `ok` is True so that `all(ok)`
    over the rows asks about the layouts alone)."""
    return {"layout": reference.name, "losses": reference.losses, "reference": True,
            "loss_rel_diff": 0.0, "grad_rel_diff": 0.0, "param_rel_diff": 0.0, "ok": True}


def check_layouts(cfg: ml_collections.ConfigDict, layouts: list[Layout], steps: int = 3,
                  output: str | Path | None = None, console: Console | None = None
                  ) -> list[dict[str, Any]]:
    """Run every layout and one device on the same `steps` batches; the rows (one device first,
    as the `reference` row, then one comparison per layout).

    A layout that cannot run (it does not split, or needs more devices than there are) gets a
    row with `ok` False and its `error`, and the others still run. With a `console`, progress
    and the table are printed on it; `output` also writes the rows as JSON.
    """
    _, train_ds, _ = build_datasets(cfg.data, cfg.train.seed)
    batches = [train_ds[s] for s in range(steps)]
    if console:
        console.print(f"{len(layouts)} layouts x {steps} steps, float32, against one device "
                      f"({jax.device_count()} {jax.default_backend()} devices)")
    reference = run_layout(cfg, {}, batches)
    rows = [reference_row(reference)]
    for layout in layouts:
        with console.status(f"layout {layout_name(layout)}") if console else nullcontext():
            try:
                rows.append(compare(run_layout(cfg, layout, batches), reference))
            except GigajaxError as error:
                rows.append({"layout": layout_name(layout), "losses": [], "ok": False,
                             "error": str(error)})
    if console:
        print_rows(rows, console)
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))
    return rows


def print_rows(rows: list[dict[str, Any]], console: Console) -> None:
    """The rows as a table, and what `ok` means; a failed layout's error under the table."""
    table = Table(title="Layouts against one device (relative differences; fp32)")
    for column in ("layout", "loss per step", "loss", "grads", "params (end)", "ok"):
        table.add_column(column, justify="left" if column in ("layout", "ok") else "right")
    for row in rows:
        if "error" in row:
            table.add_row(row["layout"], "-", "-", "-", "-", "NO (see below)")
            continue
        if row.get("reference"):
            table.add_row(row["layout"], " ".join(f"{x:.6f}" for x in row["losses"]), "-", "-",
                          "-", "reference")
            continue
        table.add_row(row["layout"], " ".join(f"{x:.6f}" for x in row["losses"]),
                      f"{row['loss_rel_diff']:.1e}", f"{row['grad_rel_diff']:.1e}",
                      f"{row['param_rel_diff']:.1e}", "yes" if row["ok"] else "NO")
    console.print(table)
    console.print(f"ok: loss within {LOSS_RTOL:.0e}, gradients and parameters within "
                  f"{GRAD_RTOL:.0e} (max |a-b| / max |b| per parameter, worst parameter).")
    for row in rows:
        if "error" in row:
            console.print(f"layout {row['layout']}: {row['error']}")
