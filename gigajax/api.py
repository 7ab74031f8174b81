"""The public Python API: everything the command line does, as calls that return data.

    import gigajax
    gigajax.simulate_cpu_devices(2)                  # first, in a fresh process or kernel
    cfg = gigajax.load_config("configs/tiny.py", **{"train.steps": 20})
    run = gigajax.train(cfg, "runs/api")             # Run: .metrics, .state, .workdir
    lm = gigajax.load("runs/api")                    # LM: .logits, .loss, .generate
    lm.generate("def ", 16)
    gigajax.plan(cfg, devices=8)                     # predicted memory and traffic (a dict)
    gigajax.check_layouts(cfg, "data=2;fsdp=2")      # rows against one device

Every function validates its config first (`validate`) and raises `GigajaxError` with a message
that names the field; nothing here prints unless asked (`progress`, `console`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console

from gigajax.checkpoint import convert
from gigajax.checkpoint import params as _params
from gigajax.checkpoint.params import saved_config
from gigajax.config import apply_overrides, fixed_device_count
from gigajax.config import load_config as _load_config
from gigajax.data.chat import chat_prompt_ids
from gigajax.data.pipeline import data_tokenizer
from gigajax.data.tokenizer import Tokenizer
from gigajax.errors import ConfigError, GigajaxError
from gigajax.eval import benchmark
from gigajax.infer.generate import Generation, options_for
from gigajax.infer.generate import generate as _generate
from gigajax.infer.loading import build_model as _model_around
from gigajax.infer.loading import generation_mesh, load_trained, shard_model
from gigajax.model import Decoder
from gigajax.ops.loss import cross_entropy_sums
from gigajax.parallel import multihost
from gigajax.parallel.devices import ensure_devices, simulate_cpu_devices
from gigajax.parallel.shardings import (
    abstract_model,
    activation_rules,
    init_sharded,
    param_shardings,
)
from gigajax.plan import advise as _advise
from gigajax.plan import equivalence, planner
from gigajax.plan.layouts import Layout, devices_needed, parse_layouts
from gigajax.train.loop import train as _train_loop
from gigajax.train.preflight import preflight
from gigajax.train.state import layout_for
from gigajax.train.workdir import check_workdir

__all__ = ["LM", "Run", "advise", "build_model", "check_layouts", "eval_passkey", "from_hf",
           "load", "load_config", "merge_lora", "plan", "simulate_cpu_devices", "to_hf", "train",
           "validate"]

ConfigLike = str | Path | Mapping[str, Any] | ml_collections.ConfigDict


def load_config(source: ConfigLike, *overrides: str, **named: Any) -> ml_collections.ConfigDict:
    """A validated config from a file (`get_config()`), a dict or a ConfigDict, or a directory
    that holds one (a workdir, a params checkpoint, a Hugging Face model), with overrides as
    `"a.b=v"` strings and/or `**{"a.b": value}` (missing fields keep their defaults)."""
    if isinstance(source, str | Path) and Path(source).is_dir():
        source = saved_config(source)
    cfg = _load_config(source, list(overrides))
    apply_overrides(cfg, named)
    validate(cfg)
    return cfg


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check a run's config can get before it touches a file or a device: its fields, its
    layout's splits (when the mesh has no -1 axis) and its data against the model."""
    preflight(config)


def _config(config: ConfigLike) -> ml_collections.ConfigDict:
    if isinstance(config, ml_collections.ConfigDict):
        validate(config)
        return config
    return load_config(config)


def build_model(config: ConfigLike, *, seed: int = 0, mesh: Mesh | None = None) -> Decoder:
    """A freshly initialised Decoder of `config`: on the default device, or with a `mesh`, each
    parameter built directly in the layout's sharding (the train step's)."""
    cfg = _config(config)
    if mesh is None:
        return Decoder.from_config(cfg, seed)
    with jax.set_mesh(mesh):
        def create() -> Decoder:
            return Decoder.from_config(cfg, seed)

        graphdef, abstract = abstract_model(create)
        shardings = param_shardings(abstract, mesh, layout_for(cfg, mesh).params)
        return nnx.merge(graphdef, init_sharded(create, shardings))


@dataclasses.dataclass
class Run:
    """A finished (or resumed-to-the-end) training run."""

    workdir: Path
    config: ml_collections.ConfigDict
    state: dict  # the final train state {step, skipped, params, opt_state}, on the mesh
    summary: dict[str, Any]  # the last logged metrics (only `step` if there was nothing to do)
    start_step: int  # the step this call started (or resumed) at

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Every logged step of the run so far (`metrics.jsonl`), oldest first."""
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def step(self) -> int:
        return int(self.summary["step"])


def train(config: ConfigLike, workdir: str | Path, *, progress: bool = True,
          coordinator: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> Run:
    """Train (or resume) `config` in `workdir` and return the Run; rerun to resume.

    Validates first; gives the CPU backend the devices a fixed mesh asks for when JAX has not
    started yet (else says what to do); joins a multi-process run when the coordinator flags
    are given or a SLURM / Open MPI launcher is detected. Safe to call again in the same
    process or notebook kernel.
    """
    cfg = _config(config)
    check_workdir(workdir)
    processes = multihost.expected_process_count(num_processes)
    wanted = fixed_device_count(cfg.mesh)
    if wanted and wanted % processes:
        raise ConfigError(f"the mesh asks for {wanted} devices, which do not split over "
                          f"{processes} processes.")
    ensure_devices(wanted // processes if wanted else None)  # per process, before JAX starts
    multihost.initialize(coordinator, num_processes, process_id)
    result = _train_loop(cfg, workdir, progress=progress)
    return Run(Path(workdir), cfg, result.state, result.summary, result.start_step)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array,
            rules: tuple | None = None) -> jax.Array:
    """The logits of a batch; `rules`: activation rules (items) of a model on a mesh."""
    with activation_rules(dict(rules)) if rules else contextlib.nullcontext():
        return nnx.merge(graphdef, state)(tokens_BT)


class LM:
    """A trained language model with its config and tokenizer: on one device, or on a mesh of
    `tensor` x `fsdp` devices with its weights sharded (`load(..., mesh=...)`)."""

    def __init__(self, model: Decoder, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 step: int | None = None, path: Path | None = None, mesh: Mesh | None = None,
                 rules: tuple | None = None):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.step, self.path, self.mesh, self._rules = step, path, mesh, rules
        self._graphdef, self._state = nnx.split(model)

    def __repr__(self) -> str:
        m = self.config.model
        where = f", mesh {dict(self.mesh.shape)}" if self.mesh is not None else ""
        return (f"LM({self.path}, step {self.step}: {m.n_layers} layers, d_model {m.d_model}, "
                f"vocab {m.vocab_size}{where})")

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def encode(self, text_or_ids: str | Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids [T] (or [B, T]) of a text, or the ids as given."""
        if isinstance(text_or_ids, str):
            return np.asarray(self.tokenizer.encode(text_or_ids), np.int32)
        ids = np.asarray(text_or_ids, np.int32)
        if ids.ndim not in (1, 2) or ids.size == 0:
            raise GigajaxError(f"token ids of shape {ids.shape}: give [T] or [B, T] ids, T >= 1.")
        if ids.min() < 0 or ids.max() >= self.config.model.vocab_size:
            raise GigajaxError(f"token ids must lie in [0, {self.config.model.vocab_size}); got "
                               f"[{ids.min()}, {ids.max()}].")
        return ids

    def chat_ids(self, messages: str | Sequence[Mapping[str, str]]) -> np.ndarray:
        """The prompt ids of a conversation (a text is one user message) rendered by the
        tokenizer's chat template with the assistant's turn opened (`data/chat.py`)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return chat_prompt_ids(self.tokenizer, list(messages))

    def logits(self, text_or_ids: str | Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits (float32) at every position: [T, V] for one sequence, [B, T, V]
        for a batch of ids [B, T]."""
        ids = self.encode(text_or_ids)
        with self._on_mesh():
            out = np.asarray(_logits(self._graphdef, self._state,
                                     jnp.asarray(np.atleast_2d(ids)), self._rules))
        return out[0] if ids.ndim == 1 else out

    def loss(self, text_or_ids: str | Sequence[int] | np.ndarray) -> float:
        """Mean next-token cross entropy (nats per token) of the text, each token predicted from
        the ones before it."""
        ids = np.atleast_2d(self.encode(text_or_ids))
        if ids.shape[1] < 2:
            raise GigajaxError("the loss needs at least 2 tokens (one to predict from).")
        logits = self.logits(ids[:, :-1])
        nll, _, count = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(ids[:, 1:]),
                                           jnp.ones(ids[:, 1:].shape, jnp.float32))
        return float(nll / count)

    def generate(self, prompt: str | Sequence[int] | np.ndarray, max_new_tokens: int = 32, *,
                 strategy: str = "greedy", stop_at_eos: bool = True, chat: bool = False,
                 stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
                 **options: Any) -> str | np.ndarray:
        """The continuation of `prompt`: text for a text prompt (or `chat`: the reply to it,
        a user message or a list of messages), ids [N] for ids [T]. `strategy`: one of
        STRATEGIES; `options`: temperature, top_k, top_p, min_p, repetition_penalty, seed,
        num_beams, length_penalty, early_stopping, penalty_alpha, token_healing,
        prefill_chunk (`infer/generate.py`: options_for). `stop`: stop strings; `on_text`
        receives the new text as it is generated."""
        stream = None if on_text is None else (lambda _row, text: on_text(text))
        out = self.complete([prompt], max_new_tokens, strategy=strategy, chat=chat,
                            stop_at_eos=stop_at_eos, stop=stop, on_text=stream, **options)[0]
        return out.tokens if not chat and not isinstance(prompt, str) else out.text

    def complete(self, prompts: Sequence[str | Sequence[int] | np.ndarray | Sequence[Mapping]],
                 max_new_tokens: int = 32, *, strategy: str = "greedy", chat: bool = False,
                 stop_at_eos: bool = True, stop: Sequence[str] = (),
                 on_text: Callable[[int, str], None] | None = None, **options: Any
                 ) -> list[Generation]:
        """The continuations of several prompts, run as one left-padded batch: a Generation
        (tokens, text, why it stopped) per prompt; `on_text(row, text)` streams. The other
        arguments as for `generate`."""
        opts = options_for(strategy, max_new_tokens=max_new_tokens, **options)
        ids = [self.chat_ids(p) if chat else self.encode(p) for p in prompts]
        if any(i.ndim != 1 for i in ids):
            raise GigajaxError("each prompt is one text or [T] ids (for a batch, a list).")
        longest = self.config.model.max_seq_len
        if (worst := max(len(i) for i in ids)) + max_new_tokens > longest:
            raise GigajaxError(f"the prompt ({worst} tokens) and max_new_tokens="
                               f"{max_new_tokens} exceed model.max_seq_len={longest}.")
        stops = [self.tokenizer.eos_id] if stop_at_eos else []
        with self._on_mesh():
            return _generate(self.model, ids, opts, tokenizer=self.tokenizer, stop_ids=stops,
                             stop_strings=stop, on_text=on_text, rules=self._rules)


def from_hf(hf_dir: str | Path, out: str | Path, *, dtype: str = "float32",
            overwrite: bool = False, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Convert a Hugging Face model directory (LLaMA, Mistral, Qwen2, Qwen3; config.json,
    safetensors, tokenizer) into a gigajax params checkpoint at `out`, what `gigajax convert
    from-hf` does; `load`, `--config` and `train.init_from` take the result (or `hf_dir`
    itself). `ignore`: config.json fields to accept that gigajax does not know. Returns what
    was written."""
    return convert.from_hf(hf_dir, out, dtype, overwrite, ignore)


def to_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "bfloat16",
          max_shard_size: str | int = "5GB", overwrite: bool = False,
          step: int | None = None) -> dict[str, Any]:
    """Write a checkpoint (workdir, step or params directory) as a Hugging Face model directory
    that `transformers` loads with no gigajax code, what `gigajax convert to-hf` does."""
    return convert.to_hf(checkpoint, out, dtype, max_shard_size, overwrite, step)


def merge_lora(checkpoint: str | Path, out: str | Path, *, step: int | None = None,
               dtype: str = "float32") -> dict[str, Any]:
    """Merge a LoRA run's adapters into its weights (W + alpha/R A B) and write a params
    checkpoint of the plain model at `out` (LoRA off in its config), what `gigajax ckpt
    merge-lora` does; `load`, `train.init_from` and `to_hf` take it. Returns what was written."""
    return _params.merge_lora(checkpoint, out, step, dtype)


def load(checkpoint: str | Path, *overrides: str, step: int | None = None,
         mesh: str | Mapping[str, int] | None = None, **named: Any) -> LM:
    """The model of a checkpoint: a training workdir (its latest step, or `step`), a step
    directory, a params checkpoint (`gigajax ckpt export`, `convert from-hf`) or a Hugging Face
    model directory. Overrides (`"a.b=v"` or `**{"a.b": v}`) change how the model runs (RoPE
    scaling, dtype), never its shapes. `mesh` ("tensor=2,fsdp=2" or a dict) places the weights
    sharded over that many devices (simulated on CPU when JAX has not started yet); a LoRA
    run's adapters load unmerged."""
    sizes = _mesh_sizes(mesh)
    if sizes:
        ensure_devices(int(np.prod(list(sizes.values()))))
    trained = load_trained(checkpoint, list(overrides), step, named, on_host=bool(sizes))
    model = _model_around(trained.params, trained.config)
    on_mesh, rules = None, None
    if sizes:
        on_mesh = generation_mesh(sizes)
        model, rules = shard_model(model, on_mesh)
    return LM(model, trained.config, data_tokenizer(trained.config.data), trained.step,
              trained.path, on_mesh, rules)


def _mesh_sizes(mesh: str | Mapping[str, int] | None) -> dict[str, int]:
    """{axis: size} of a `load(mesh=...)` argument; {} for one device."""
    if mesh is None or mesh == "":
        return {}
    if isinstance(mesh, str):
        found = parse_layouts(mesh)
        if len(found) != 1:
            raise GigajaxError(f"--mesh {mesh!r}: give one mesh, e.g. tensor=2,fsdp=2.")
        mesh = found[0]
    sizes = {str(k): v for k, v in dict(mesh).items()}
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise GigajaxError(f"--mesh {sizes}: each axis size is an integer >= 1.")
    return {k: v for k, v in sizes.items() if v > 1}


def eval_passkey(checkpoint: str | Path, lengths: str | Sequence[int], *,
                 depths: str | Sequence[float] = "0,0.25,0.5,0.75,1", rope: str | None = None,
                 rope_factor: str | float | None = None, samples: int = 5, seed: int = 0,
                 key_digits: int = 5, batch_size: int = 8, step: int | None = None,
                 overrides: Sequence[str] = (), output: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """PassKey retrieval of a checkpoint over `lengths` x `depths` (what `gigajax eval passkey`
    runs): `rope` 'none,linear,yarn' applies RoPE scalings at evaluation time (factor
    `rope_factor`, or 'auto' = length / trained context). Returns the result (scores per
    scaling, length and depth); with `output`, also writes passkey.json and the heatmap
    passkey.png there (their paths under `files`)."""
    start = time.perf_counter()
    lengths = (benchmark.parse_lengths(lengths) if isinstance(lengths, str)
               else [int(n) for n in lengths])
    depths = (benchmark.parse_depths(depths) if isinstance(depths, str)
              else benchmark.parse_depths(",".join(str(d) for d in depths)))
    trained = load_trained(checkpoint, list(overrides), step)
    rs = trained.config.model.rope_scaling
    ropes = benchmark.parse_ropes(rope, None if rope_factor is None else str(rope_factor),
                                  rs.type, rs.factor)
    result = benchmark.run_passkey(trained, lengths, depths, ropes, samples=samples, seed=seed,
                                   key_digits=key_digits, batch_size=batch_size,
                                   progress=progress)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if output is not None:
        result["files"] = [str(p) for p in benchmark.write_outputs(result, output)]
    return result


def plan(config: ConfigLike, devices: int | None = None, *, compile: bool = False,
         backend: str | None = None) -> dict[str, Any]:
    """Predicted per-device memory (bytes) and per-step communication of `config` on `devices`
    (default: the mesh's own count) of `backend` (default gpu; with `compile`, this machine's,
    so that XLA's figure, which is beside it, is compiled for the same backend; nothing
    runs)."""
    cfg = _config(config)
    devices = _device_count(cfg, devices)
    if compile:
        ensure_devices(devices)
    if backend is None:
        backend = jax.default_backend() if compile else "gpu"
    result = planner.plan(cfg, devices, backend)
    if compile:
        result["compiled"] = planner.compiled_memory(cfg, devices)
        result["compiled_bytes_per_device"] = result["compiled"]["total"]
    return result


def advise(config: ConfigLike, devices: int | None = None, max_memory: str | float = "80GB",
           backend: str = "gpu") -> dict[str, Any]:
    """Every layout of `devices` planned for `backend` and ranked by estimated step time among
    those that fit `max_memory` per device ('80GB', '24GiB' or bytes); the config's own
    layout marked."""
    cfg = _config(config)
    budget = _advise.parse_bytes(max_memory) if isinstance(max_memory, str) else max_memory
    return _advise.advise(cfg, _device_count(cfg, devices), float(budget),
                          backend=backend)


def _device_count(cfg: ml_collections.ConfigDict, devices: int | None) -> int:
    if devices is not None:
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ConfigError(f"devices={devices!r}: give a device count >= 1.")
        return devices
    fixed = fixed_device_count(cfg.mesh)
    if not fixed:
        raise ConfigError("the mesh has a -1 axis: say how many devices (devices=N).")
    return fixed


def check_layouts(config: ConfigLike, layouts: str | Sequence[str | Layout], steps: int = 3, *,
                  console: Console | None = None) -> list[dict[str, Any]]:
    """Train `steps` fp32 steps under each layout and one device on the same batches; a row per
    layout (one device first) with its losses, its largest relative differences of loss,
    first-step gradients and final parameters, and `ok`. A layout that cannot run gets
    `ok` False and its `error`. Layouts: "data=8;fsdp=4,tensor=2" or a list of such."""
    cfg = _config(config)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: give a number of steps >= 1.")
    if isinstance(layouts, str):
        parsed = parse_layouts(layouts)
    else:
        parsed = [item if isinstance(item, dict) else parse_layouts(item)[0] for item in layouts]
    ensure_devices(devices_needed(parsed))
    return equivalence.check_layouts(cfg, parsed, steps, console=console)
