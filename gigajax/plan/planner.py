"""`plan`: the predicted per-device memory (`memory.py`) and communication (`comm.py`) of a
config on N devices, as data and as a table; and XLA's compiled figure to hold it against
(`compiled_memory`: the train step compiled ahead of time, nothing run).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gigajax.config import ModelConfig
from gigajax.errors import ConfigError
from gigajax.model.inventory import param_count
from gigajax.parallel.checks import check_layout
from gigajax.parallel.mesh import make_mesh, mesh_axis_sizes, mesh_shape
from gigajax.parallel.multihost import BATCH_SPEC
from gigajax.plan.comm import comm_bytes
from gigajax.plan.memory import activation_bytes, state_bytes
from gigajax.train.loop import build_training

BACKENDS = ("gpu", "tpu", "cpu")


def plan(cfg: ml_collections.ConfigDict, devices: int, backend: str = "gpu") -> dict[str, Any]:
    """The predicted per-device memory and per-step communication of `cfg` on `devices` of
    `backend` (gpu, tpu or cpu: a MoE model's grouped matmul is dense on XLA:CPU)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: plan for one of {', '.join(BACKENDS)}.")
    check_layout(cfg, mesh_shape(cfg.mesh, devices))  # a ConfigError naming what does not split
    sizes = mesh_axis_sizes(cfg.mesh, devices, cfg.attention)
    state = state_bytes(cfg, sizes)
    acts = activation_bytes(cfg, sizes, backend)
    total = (state["params"] + state["grads"] + state["optimizer"] + acts["layers"] + acts["head"]
             + acts["gathered"])
    return {"mesh": sizes, "backend": backend,
            "param_count": param_count(ModelConfig.from_config(cfg)),
            "bytes": {**state, "activations": acts["layers"] + acts["head"],
                      "activations_per_layer": acts["per_layer"],
                      "gathered_weights": acts["gathered"]},
            "predicted_bytes_per_device": int(total),
            "comm_bytes_per_step": comm_bytes(cfg, sizes)}


GiB = 2**30


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '512 B', '3.4 MiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(result: dict[str, Any]) -> str:
    """A plain-text table of `plan`'s result (bytes per device; sent per step per axis)."""
    b = result["bytes"]
    mesh = " x ".join(f"{a}={n}" for a, n in result["mesh"].items() if n > 1) or "one device"
    rows = [("parameters (fp32)", b["params"]), ("gradients (fp32)", b["grads"]),
            ("optimizer state", b["optimizer"]), ("activations", b["activations"]),
            ("  of which one layer", b["activations_per_layer"]),
            ("gathered weights (ZeRO-3)", b["gathered_weights"]),
            ("total per device", result["predicted_bytes_per_device"])]
    count = result["param_count"]
    count = f"{count / 1e9:.3f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
    lines = [f"{count} parameters on mesh {mesh} ({result['backend']})", "memory per device"]
    lines += [f"  {name:<28}{format_bytes(value):>12}" for name, value in rows]
    if "compiled" in result:
        c = result["compiled"]
        ratio = result["predicted_bytes_per_device"] / max(c["total"], 1)
        lines.append(f"  {'XLA compiled, per device':<28}{format_bytes(c['total']):>12}"
                     f"   (predicted / compiled = {ratio:.2f}; temp {format_bytes(c['temp'])}, "
                     f"arguments {format_bytes(c['arguments'])})")
        if c.get("backend", result["backend"]) != result["backend"]:
            lines.append(f"  note: compiled for {c['backend']}, planned for "
                         f"{result['backend']}: the ratio compares two backends")
    lines.append("sent per device per step")
    lines += [f"  {axis:<28}{format_bytes(value):>12}"
              for axis, value in result["comm_bytes_per_step"].items()] or ["  (none)"]
    return "\n".join(lines)


def abstract_batch(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one global training batch (for ahead-of-time lowering)."""
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    sharding = jax.sharding.NamedSharding(mesh, BATCH_SPEC)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
              "segment_ids": jnp.int32, "loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def compiled_memory(cfg: ml_collections.ConfigDict, devices: int) -> dict[str, int]:
    """XLA's per-device memory of the compiled train step on the first `devices` devices
    (simulated CPU devices work: nothing runs). `total` = arguments + outputs + temporaries -
    aliased (donated) bytes: the peak a device needs."""
    if jax.device_count() < devices:
        raise ConfigError(f"--compile needs {devices} devices and JAX sees {jax.device_count()};"
                          " on CPU run `gigajax plan` itself (it simulates them).")
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices], cfg.attention)
    with jax.set_mesh(mesh):
        training = build_training(cfg, mesh)
        compiled = training.train_step.lower(training.state.abstract,
                                             abstract_batch(cfg, mesh)).compile()
    return {**memory_of(compiled), "backend": jax.default_backend()}


def memory_of(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's per-device bytes of a compiled step; `total` = arguments + outputs + temporaries -
    aliased (donated) bytes, the peak a device needs."""
    memory = compiled.memory_analysis()
    result = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
              "temp": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    result["total"] = (result["arguments"] + result["outputs"] + result["temp"]
                       - result["aliased"])
    return result
