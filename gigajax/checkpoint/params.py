"""Offline checkpoint tools: average the parameters of several steps, export params for inference,
merge a LoRA run's adapters into its base weights.

Both read only the `params` subtree of `<workdir>/checkpoints/<step>/state` (Orbax partial restore
into host numpy arrays, structure from the checkpoint's own metadata): no model config, no mesh,
no optimizer state in memory. Both write a *params checkpoint*: a directory with an Orbax item
`params` (a plain nested dict of arrays, the `nnx.to_pure_dict` layout, so
`nnx.replace_by_pure_dict(abstract_state, params)` loads it into a model), an item `meta` (JSON:
run config, source steps, dtype, parameter count) and `checksums.json`. `load_params` reads one;
`read_params` reads the params of any of them (workdir, step directory or params checkpoint), for
evaluation and for `train.init_from`.

Every read verifies the files against `checksums.json` first (CorruptCheckpoint if one differs).
A checkpoint without one is refused (UnverifiedCheckpoint) unless `require_checksums=False`,
which reads it with a warning through `log`; `allow_hint` tells the user how to say so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from gigajax.checkpoint.hf import hf_model_config, hf_params
from gigajax.checkpoint.manager import (
    ALLOW_UNVERIFIED,
    CorruptCheckpoint,
    UnverifiedCheckpoint,
    check_files,
    shape_mismatch,
    to_stderr,
    tree_metadata,
    tree_shapes,
    write_checksums,
)
from gigajax.config import ModelConfig, config_from_dict
from gigajax.config.hf import is_hf_dir
from gigajax.errors import GigajaxError
from gigajax.model import lora
from gigajax.model.moe import ROUTING_BIAS

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FORMAT = "gigajax-params-v1"


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The steps saved under `<workdir>/checkpoints/`, oldest first."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise GigajaxError(f"{directory} does not exist: is {workdir} a training workdir?")
    return sorted(ocp.utils.checkpoint_steps(directory))


def step_directory(workdir: str | Path, step: int | None = None, require_checksums: bool = True,
                   log: Callable[[str], None] = to_stderr, allow_hint: str = ALLOW_UNVERIFIED
                   ) -> Path:
    """`<workdir>/checkpoints/<step>` (default: the latest), checked against its checksums
    (`check_files`: without them refused, or with `require_checksums=False` a warning)."""
    steps = checkpoint_steps(workdir)
    if step is None:
        if not steps:
            raise GigajaxError(f"{workdir}/checkpoints holds no checkpoint.")
        step = steps[-1]
    if step not in steps:
        raise GigajaxError(f"no checkpoint of step {step} in {workdir}/checkpoints; available: "
                           + (", ".join(map(str, steps)) or "none"))
    directory = Path(workdir).absolute() / "checkpoints" / str(step)
    check_files(directory, f"checkpoint {step} in {workdir}", require_checksums, log, allow_hint)
    return directory


def _restore_numpy(item: Path, key: str | None = None) -> Any:
    """An Orbax pytree item (or its subtree `key` only) as host numpy arrays."""
    tree = tree_metadata(item)
    if key is not None:
        if key not in tree:
            raise GigajaxError(f"{item} has no {key!r} subtree (it holds {sorted(tree)})")
        tree = {key: tree[key]}
    restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=jax.tree.map(lambda _: 0, tree), partial_restore=key is not None,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
    return restored[key] if key is not None else restored


def pure_dict(tree: Any) -> Any:
    """nnx Variables come out of Orbax as `{'value': array}`: keep the array (nnx.to_pure_dict)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: pure_dict(v) for k, v in tree.items()}
    return tree


def _read_json(item: Path) -> dict:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)


def train_params(directory: Path) -> tuple[dict, dict]:
    """(params as a pure dict of numpy arrays, meta) of a training checkpoint's step directory."""
    return pure_dict(_restore_numpy(directory / "state", "params")), _read_json(directory / "meta")


def count(params: Any) -> int:
    """The number of parameters (a MoE's routing bias is state, not a parameter)."""
    return sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if getattr(path[-1], "key", None) != ROUTING_BIAS)


def save_params(out: str | Path, params: Any, meta: dict) -> dict:
    """Write a params checkpoint to the new directory `out`; returns what was written."""
    out = Path(out).absolute()
    if out.exists():
        raise GigajaxError(f"--out {out} already exists: choose a new directory.")
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(out, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    write_checksums(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"path": str(out), "num_params": count(params), "dtype": meta.get("dtype"),
            "megabytes": size / 2**20}


def load_params(directory: str | Path, require_checksums: bool = True,
                log: Callable[[str], None] = to_stderr, allow_hint: str = ALLOW_UNVERIFIED
                ) -> tuple[dict, dict]:
    """(params, meta) of a params checkpoint written by `export` or `average`, as numpy,
    checked against its checksums (`check_files`)."""
    directory = Path(directory).absolute()
    check_files(directory, f"params checkpoint {directory}", require_checksums, log, allow_hint)
    return _restore_numpy(directory / "params"), _read_json(directory / "meta")


@dataclasses.dataclass
class Params:
    """The params of one checkpoint, wherever it was named from (`read_params`)."""

    params: dict  # nnx.to_pure_dict layout, host numpy arrays
    config: dict | None  # the run's config as saved (meta, else the workdir's config.json)
    step: int | None  # the training step (None for an averaged params checkpoint)
    path: Path  # the step or params directory read
    workdir: Path | None  # the training workdir, when the checkpoint lies in one


def _is_step_dir(path: Path) -> bool:
    return (path / "state").is_dir() and (path / "meta").is_dir()


def _is_params_dir(path: Path) -> bool:
    return (path / "params").is_dir() and (path / "meta").is_dir()


def workdir_of(checkpoint: str | Path) -> Path | None:
    """The training workdir a checkpoint path lies in: the path itself, the parent of its
    `checkpoints/`, or of a step directory's; None for a params checkpoint elsewhere."""
    path = Path(checkpoint).absolute()
    if (path / "checkpoints").is_dir():
        return path
    if path.name == "checkpoints":
        return path.parent
    if _is_step_dir(path) and path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def read_params(checkpoint: str | Path, step: int | None = None, flag: str = "--checkpoint",
                require_checksums: bool = True, log: Callable[[str], None] = to_stderr,
                allow_hint: str = ALLOW_UNVERIFIED) -> Params:
    """The params of `checkpoint`: a training workdir (its latest step, or `step`), its
    `checkpoints/` directory, one step directory, or a params checkpoint (`export`, `average`,
    `convert from-hf`), checked against its checksums (`check_files`); or a Hugging Face model
    directory (config.json + safetensors), whose params are lazy `HFTensor`s that read only
    the slices asked for. `flag` names the setting in error messages."""
    integrity = {"require_checksums": require_checksums, "log": log, "allow_hint": allow_hint}
    path = Path(checkpoint).absolute()
    if not path.exists():
        raise GigajaxError(f"{flag} {checkpoint} does not exist: pass a training workdir (the "
                           "--workdir of `gigajax train`) or a checkpoint directory in it.")
    if is_hf_dir(path):  # read lazily, slice by slice, from its safetensors
        if step is not None:
            raise GigajaxError(f"--step {step}: {path} is a Hugging Face model directory, which "
                               "holds one set of params; leave --step out.")
        cfg = hf_model_config(path)
        return Params(hf_params(path, ModelConfig.from_config(cfg)), cfg.to_dict(), None, path,
                      None)
    workdir = workdir_of(path)
    verified = (path / "checkpoints").is_dir() or path.name == "checkpoints"
    if verified:  # a workdir or its checkpoints/: step_directory picks and checks the step
        try:
            directory = step_directory(workdir, step, **integrity)
        except (CorruptCheckpoint, UnverifiedCheckpoint) as error:  # say which flag
            raise type(error)(f"{flag} {checkpoint}: {error}") from None
        except GigajaxError as error:  # no checkpoint yet, no such step: say which flag
            raise type(error)(f"{flag} {checkpoint}: {error} Pass a run that has saved a "
                              "checkpoint (or its step or params directory).") from None
    elif _is_step_dir(path) or _is_params_dir(path):
        if step is not None and _is_step_dir(path) and int(path.name) != step:
            raise GigajaxError(f"--step {step} but {path} is the checkpoint of step {path.name}")
        if step is not None and _is_params_dir(path):
            raise GigajaxError(f"--step {step}: {path} is a params checkpoint, which holds one "
                               "set of params; leave --step out.")
        directory = path
    else:
        raise GigajaxError(
            f"{flag} {checkpoint} is not a training workdir (no checkpoints/ inside), a "
            "checkpoints/ directory, a step directory (state/ and meta/) or a params checkpoint "
            "(params/ and meta/, from `gigajax ckpt export`).")
    if _is_step_dir(directory):
        if not verified:
            check_files(directory, f"checkpoint {directory.name} ({directory})", **integrity)
        params, meta = train_params(directory)
        at_step = int(meta.get("step", directory.name))
    else:
        params, meta = load_params(directory, **integrity)
        steps = meta.get("source_steps") or []
        at_step = steps[0] if len(steps) == 1 else None
    config = _tokenizer_beside(meta.get("config"), directory)
    if config is None and workdir is not None and (workdir / "config.json").is_file():
        config = json.loads((workdir / "config.json").read_text())
    return Params(params, config, at_step, directory, workdir)


def _meta(source: dict, steps: list[int], dtype: str, params: Any, how: str) -> dict:
    return {"format": FORMAT, "config": source.get("config"), "source_steps": steps,
            "made_by": how, "dtype": dtype, "num_params": count(params)}


def export(workdir: str | Path, out: str | Path, step: int | None = None,
           dtype: str = "float32", require_checksums: bool = True,
           log: Callable[[str], None] = to_stderr, allow_hint: str = ALLOW_UNVERIFIED) -> dict:
    """The params of `step` (default: the latest) cast to `dtype`, as a params checkpoint (its
    source checked against its checksums: `step_directory`)."""
    start = time.perf_counter()
    directory = step_directory(workdir, step, require_checksums, log, allow_hint)
    params, meta = train_params(directory)
    params = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)
    steps = [int(directory.name)]
    return _report(save_params(out, params, _meta(meta, steps, dtype, params, "export")), start)


def average(workdir: str | Path, steps: list[int], out: str | Path,
            dtype: str = "float32", require_checksums: bool = True,
            log: Callable[[str], None] = to_stderr, allow_hint: str = ALLOW_UNVERIFIED) -> dict:
    """The element-wise mean of the params of `steps` (fp32 sum, one checkpoint in memory at a
    time besides the sum), cast to `dtype`, as a params checkpoint (every source checked
    against its checksums first: `step_directory`)."""
    start = time.perf_counter()
    if len(steps) < 2:
        raise GigajaxError(f"averaging needs at least 2 steps, got {steps}.")
    if len(set(steps)) != len(steps):
        raise GigajaxError(f"--steps {steps} names a step twice.")
    # every step exists and passes its checksums before any work
    directories = [step_directory(workdir, step, require_checksums, log, allow_hint)
                   for step in steps]
    total, first_meta = None, None
    for step, directory in zip(steps, directories, strict=True):
        params, meta = train_params(directory)
        if total is None:
            total, first_meta = jax.tree.map(lambda x: x.astype(np.float32), params), meta
            continue
        if problem := shape_mismatch(tree_shapes(params), tree_shapes(total),
                                     what=f"checkpoint {step}"):
            raise GigajaxError(f"checkpoint {step} does not match checkpoint {steps[0]}: "
                               f"{problem}.")
        total = jax.tree.map(lambda s, x: np.add(s, x, out=s, dtype=np.float32), total, params)
        del params
    mean = jax.tree.map(lambda s: (s / np.float32(len(steps))).astype(DTYPES[dtype]), total)
    return _report(save_params(out, mean, _meta(first_meta, steps, dtype, mean, "average")),
                   start)


def merged_lora(params: dict, config: dict | None, source: str | Path) -> tuple[dict, dict]:
    """(params with every LoRA adapter merged into its weight, the config with LoRA off) of a
    LoRA run's params and saved config; a GigajaxError when there is nothing to merge."""
    cfg = config_from_dict(config or {})
    if config is None or not cfg.model.lora.rank or not lora.has_adapters(params):
        raise GigajaxError(f"{source} holds no LoRA adapters (its config has model.lora.rank="
                           f"{cfg.model.lora.rank}): there is nothing to merge; `gigajax ckpt "
                           "export` writes its params as they are.")
    merged = lora.merge(params, ModelConfig.from_config(cfg))
    cfg.model.lora.rank = 0
    return merged, cfg.to_dict()


def merge_lora(checkpoint: str | Path, out: str | Path, step: int | None = None,
               dtype: str = "float32", require_checksums: bool = True,
               log: Callable[[str], None] = to_stderr, allow_hint: str = ALLOW_UNVERIFIED
               ) -> dict:
    """The params of a LoRA run's checkpoint (workdir, step or params directory) with the
    adapters merged, W + (alpha / R) A B in float32, then cast to `dtype`, as a params
    checkpoint whose config has LoRA off: a plain model for `load`, `train.init_from` and
    `convert to-hf`."""
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise GigajaxError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}.")
    if Path(out).exists():
        raise GigajaxError(f"--out {Path(out).absolute()} already exists: choose a new "
                           "directory.")
    found = read_params(checkpoint, step, require_checksums=require_checksums, log=log,
                        allow_hint=allow_hint)
    merged, config = merged_lora(found.params, found.config, found.path)
    merged = jax.tree.map(lambda x: np.asarray(x).astype(DTYPES[dtype]), merged)
    steps = [found.step] if found.step is not None else []
    meta = _meta({"config": config}, steps, dtype, merged, "merge-lora")
    return _report(save_params(out, merged, meta), start)


def _report(written: dict, start: float) -> dict:
    written["seconds"] = time.perf_counter() - start
    print(f"wrote {written['path']}: {written['num_params'] / 1e6:.2f}M parameters "
          f"({written['dtype']}), {written['megabytes']:.1f} MB, {written['seconds']:.1f} s")
    return written


def _tokenizer_beside(config: dict | None, directory: Path) -> dict | None:
    """A params checkpoint made by `convert from-hf` carries its tokenizer in `tokenizer/`;
    when the checkpoint has been moved, its config's data.tokenizer (the absolute path at
    conversion time) is pointed at the copy beside it."""
    spec = (config or {}).get("data", {}).get("tokenizer", "")
    if spec in ("", "auto", "byte") or Path(spec).exists():
        return config
    beside = directory / "tokenizer" / Path(spec).name
    if beside.is_file():
        config = {**config, "data": {**config["data"], "tokenizer": str(beside)}}
    return config


def saved_config(directory: str | Path) -> dict:
    """The config a directory holds, without reading its params: a Hugging Face model's
    (config.json mapped), a params checkpoint's or step directory's (its meta), a workdir's
    (config.json). For `--config DIR`."""
    path = Path(directory).absolute()
    if is_hf_dir(path):
        return hf_model_config(path).to_dict()
    if _is_params_dir(path) or _is_step_dir(path):
        config = _tokenizer_beside(_read_json(path / "meta").get("config"), path)
        if config is not None:
            return config
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    raise GigajaxError(f"{directory} holds no config: pass a config file, a training workdir, a "
                       "params checkpoint (gigajax convert from-hf, ckpt export) or a Hugging "
                       "Face model directory.")

