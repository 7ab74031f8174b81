"""Config schema: defaults, loading with command-line overrides, and validation with clear errors.

A config is an `ml_collections.ConfigDict` with sections model, attention, data, train, optim,
mesh, sharding, checkpoint. `configs/*.py` start from `base_config()` and override what differs.
Every check that can fail on a user's value lives in `validate()` and raises `ConfigError` naming
the field.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from gigajax.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on GPU/TPU, float32 on CPU
ROPE_SCALINGS = ("none", "linear", "yarn")
NONFINITE_POLICIES = ("skip", "stop")


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every config; each config file overrides what differs."""
    c = ml_collections.ConfigDict()
    c.model = dict(
        vocab_size=384,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        head_dim=0,  # 0: d_model // n_heads
        mlp_dim=768,
        max_seq_len=1024,
        rope_theta=10_000.0,
        # type: none | linear (position interpolation, Chen et al. 2023) | yarn (Peng et al. 2023)
        # original_max_seq_len: the context the model was (pre)trained at; 0 = max_seq_len / factor
        rope_scaling=dict(type="none", factor=1.0, original_max_seq_len=0,
                          beta_fast=32.0, beta_slow=1.0),
        sliding_window=0,  # 0: full causal attention
        tie_embeddings=False,
        norm_eps=1e-5,
        init_std=0.02,
        dtype="auto",  # compute dtype (auto: bf16 on accelerators, fp32 on CPU); params fp32
        scan_layers=True,
        remat="none",  # none | full | dots | minimal
    )
    # sequence parallelism over mesh.sequence (see gigajax/ops/ring.py, ulysses.py, layouts.py):
    # sp_impl ring | ulysses | hybrid (Ulysses degree `ulysses_degree` inside a ring);
    # layout contiguous | striped | zigzag: which tokens each ring device holds
    c.attention = dict(impl="blockwise", block_q=512, block_kv=512, sp_impl="ring",
                       layout="zigzag", ulysses_degree=1)
    # source stdlib | prepared (`gigajax data prepare` output: data.path, or data.mixture
    # 'DIR=WEIGHT,DIR=WEIGHT'); tokenizer auto: byte for stdlib, the manifest's for prepared.
    # val_fraction, max_bytes: stdlib only. fim_rate: share of documents rewritten for FIM.
    # source passkey: generated PassKey documents (data/synthetic.py) with keys of
    # min_key_digits (0: key_digits) to key_digits digits; the answer's tokens have loss weight 1,
    # the rest text_weight (0: answer only); short_rate: share without the instruction
    c.data = dict(source="stdlib", tokenizer="auto", path="", mixture="", seq_len=1024,
                  batch_size=8, val_fraction=0.05, max_bytes=0, fim_rate=0.0,
                  passkey=dict(key_digits=5, min_key_digits=0, text_weight=0.0,
                               short_rate=0.0))
    c.train = dict(steps=1000, microbatches=1, log_every=10, eval_every=200, eval_batches=8,
                   checkpoint_every=200, seed=0, z_loss=0.0, peak_flops_per_device=0.0,
                   nonfinite="skip",  # NaN/Inf loss or grad norm: skip (drop the update) | stop
                   loss_chunks=1,  # > 1: head + loss over that many token slices (long context)
                   # a checkpoint (workdir, step dir, or `ckpt export` output) whose params start
                   # the run, with a fresh optimizer and step 0; unused once the run has its own
                   init_from="")
    c.optim = dict(name="adamw", lr=3e-4, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1,
                   b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                   moment_dtype="float32", decay_norms_and_embeddings=False)
    c.mesh = dict(data=1, fsdp=1, sequence=1, tensor=1)  # -1: the rest of the devices
    # zero_stage 3: parameters and optimizer state over `fsdp` (FSDP); 1: optimizer state only.
    # megatron_sp: split norm/residual activations over `tensor` too (Megatron sequence parallel).
    c.sharding = dict(zero_stage=3, megatron_sp=False)
    # keep the last max_to_keep checkpoints, plus every one whose step is a multiple of keep_every
    c.checkpoint = dict(max_to_keep=3, keep_every=0, async_save=True)
    return ml_collections.ConfigDict(c)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Typed, frozen view of `config.model` (+ attention) that the model code reads."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_theta: float
    rope_scaling: str
    rope_factor: float
    rope_original_max_seq_len: int
    rope_beta_fast: float
    rope_beta_slow: float
    sliding_window: int
    tie_embeddings: bool
    norm_eps: float
    init_std: float
    dtype: str
    scan_layers: bool
    remat: str
    attention_impl: str
    block_q: int
    block_kv: int

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> ModelConfig:
        """Resolve defaults (head_dim 0, dtype auto, YaRN original length 0) into values."""
        m, rs = cfg.model, cfg.model.rope_scaling
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, head_dim=head_dim(m), mlp_dim=m.mlp_dim,
            max_seq_len=m.max_seq_len, rope_theta=float(m.rope_theta),
            rope_scaling=rs.type, rope_factor=float(rs.factor),
            rope_original_max_seq_len=(rs.original_max_seq_len
                                       or int(m.max_seq_len / rs.factor)),
            rope_beta_fast=float(rs.beta_fast), rope_beta_slow=float(rs.beta_slow),
            sliding_window=m.sliding_window, tie_embeddings=m.tie_embeddings,
            norm_eps=float(m.norm_eps), init_std=float(m.init_std), dtype=compute_dtype(m.dtype),
            scan_layers=m.scan_layers, remat=m.remat, attention_impl=cfg.attention.impl,
            block_q=cfg.attention.block_q, block_kv=cfg.attention.block_kv)


def head_dim(model_cfg: ml_collections.ConfigDict) -> int:
    """`model.head_dim`, or d_model // n_heads when it is 0."""
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def compute_dtype(name: str) -> str:
    """`model.dtype` with 'auto' resolved: bfloat16 on GPU/TPU, float32 on CPU."""
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_config(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Run `get_config()` from a config file, apply `--config.a.b=v` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Pass a file such as "
                          "configs/tiny.py with --config.")
    spec = importlib.util.spec_from_file_location(f"gigajax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {str(path)!r} has no get_config() function.")
    cfg = module.get_config()
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `a.b=value` override; the value is parsed as a Python literal, else a string."""
    key, sep, raw = item.removeprefix("--config.").removeprefix("config.").partition("=")
    if not sep:
        raise ConfigError(f"Override {item!r} needs the form --config.section.field=value.")
    *parents, leaf = key.split(".")
    node = cfg
    for depth, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"Unknown config section {'.'.join(parents[:depth + 1])!r} in "
                              f"override {item!r}; sections here: {_keys(node)}.")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"Unknown config field {key!r} in override {item!r}; fields of "
                          f"{'.'.join(parents) or 'config'}: {_keys(node)}.")
    value = _parse_value(raw, node[leaf])
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{key}={raw!r} has the wrong type: expected "
                          f"{type(node[leaf]).__name__} ({e}).") from None


def _keys(node: Any) -> str:
    return ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "-"


def _parse_value(raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return raw
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw.replace("_", "") if raw.replace("_", "").isdigit() else raw)
    except (ValueError, SyntaxError):
        return raw
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def _choice(cfg: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
    value = _get(cfg, field)
    _require(value in allowed, field, value, f"choose one of {', '.join(allowed)}")


def _positive(cfg: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = _get(cfg, field)
        _require(isinstance(value, int | float) and value > 0, field, value,
                 "it must be a positive number")


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
    node = cfg
    for name in field.split("."):
        if name not in node:
            raise ConfigError(f"config.{field} is missing; start configs from "
                              "gigajax.config.base_config().")
        node = node[name]
    return node


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check every user-settable field; raise ConfigError naming the first bad one."""
    from gigajax.data.pipeline import check_data_config
    from gigajax.mesh import AXES, SP_IMPLS, fixed_device_count
    from gigajax.model.decoder import REMAT_POLICIES
    from gigajax.ops.attention import ATTENTION_IMPLS
    from gigajax.ops.layouts import SEQUENCE_LAYOUTS
    from gigajax.sharding import ZERO_STAGES, check_layout
    from gigajax.train.optim import make_optimizer

    m = cfg.model
    _positive(cfg, "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
              "model.n_kv_heads", "model.mlp_dim", "model.max_seq_len", "model.rope_theta",
              "model.norm_eps", "model.init_std", "attention.block_q", "attention.block_kv",
              "data.seq_len", "data.batch_size", "train.steps", "train.microbatches",
              "train.loss_chunks", "train.log_every", "train.eval_every", "train.eval_batches",
              "train.checkpoint_every", "checkpoint.max_to_keep")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
             f"it must divide model.n_heads={m.n_heads} (grouped-query attention)")
    _require(m.head_dim >= 0, "model.head_dim", m.head_dim, "use 0 (d_model // n_heads) or > 0")
    _require(m.head_dim > 0 or m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
             f"with model.head_dim=0 it must be divisible by model.n_heads={m.n_heads}")
    _require(head_dim(m) % 2 == 0, "model.head_dim", head_dim(m),
             "RoPE needs an even head dimension")
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.remat", tuple(REMAT_POLICIES))
    _choice(cfg, "model.rope_scaling.type", ROPE_SCALINGS)
    _require(m.rope_scaling.factor >= 1.0, "model.rope_scaling.factor", m.rope_scaling.factor,
             "it must be >= 1 (1 means no scaling)")
    _require(m.rope_scaling.beta_fast > m.rope_scaling.beta_slow > 0,
             "model.rope_scaling.beta_fast", m.rope_scaling.beta_fast,
             f"YaRN needs beta_fast > beta_slow={m.rope_scaling.beta_slow} > 0")
    _require(m.rope_scaling.original_max_seq_len >= 0, "model.rope_scaling.original_max_seq_len",
             m.rope_scaling.original_max_seq_len,
             "use 0 (max_seq_len / factor) or the pretraining context length")
    _require(m.sliding_window >= 0, "model.sliding_window", m.sliding_window,
             "use 0 for full attention or a positive window length")
    _choice(cfg, "attention.impl", ATTENTION_IMPLS)
    _require(cfg.data.seq_len <= m.max_seq_len, "data.seq_len", cfg.data.seq_len,
             f"it must be <= model.max_seq_len={m.max_seq_len}")
    _require(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", cfg.data.val_fraction,
             "it must lie strictly between 0 and 1")
    _require(cfg.data.max_bytes >= 0, "data.max_bytes", cfg.data.max_bytes,
             "use 0 for the whole corpus or a positive byte budget")
    _require(cfg.train.z_loss >= 0, "train.z_loss", cfg.train.z_loss, "it must be >= 0")
    _require(cfg.data.seq_len % cfg.train.loss_chunks == 0, "train.loss_chunks",
             cfg.train.loss_chunks, f"it must divide data.seq_len={cfg.data.seq_len}")
    _require(cfg.data.batch_size % cfg.train.microbatches == 0, "train.microbatches",
             cfg.train.microbatches, f"it must divide data.batch_size={cfg.data.batch_size}")
    for axis in AXES:
        size = cfg.mesh[axis]
        _require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{axis}", size,
                 "use a positive size, or -1 for the rest of the devices")
    _require(sum(cfg.mesh[a] == -1 for a in AXES) <= 1, "mesh", dict(cfg.mesh),
             "at most one axis may be -1")
    _choice(cfg, "attention.sp_impl", SP_IMPLS)
    _choice(cfg, "attention.layout", SEQUENCE_LAYOUTS)
    _require(isinstance(cfg.attention.ulysses_degree, int) and cfg.attention.ulysses_degree >= 1,
             "attention.ulysses_degree", cfg.attention.ulysses_degree,
             "use a positive integer (the all-to-all part of mesh.sequence in hybrid)")
    _require(cfg.attention.ulysses_degree == 1 or cfg.attention.sp_impl == "hybrid",
             "attention.ulysses_degree", cfg.attention.ulysses_degree,
             f"it only applies to attention.sp_impl='hybrid' (sp_impl is "
             f"{cfg.attention.sp_impl!r}); leave it at 1")
    _require(cfg.sharding.zero_stage in ZERO_STAGES, "sharding.zero_stage",
             cfg.sharding.zero_stage, "use 3 (FSDP: parameters and optimizer state sharded) or "
             "1 (optimizer state only)")
    _require(isinstance(cfg.sharding.megatron_sp, bool), "sharding.megatron_sp",
             cfg.sharding.megatron_sp, "use true or false")
    if fixed_device_count(cfg.mesh) is not None:  # otherwise checked once the mesh exists
        check_layout(cfg, dict(cfg.mesh))
    make_optimizer(cfg.optim, cfg.train.steps)  # raises ConfigError naming the optim.* field
    _choice(cfg, "train.nonfinite", NONFINITE_POLICIES)
    _require(isinstance(cfg.checkpoint.keep_every, int) and cfg.checkpoint.keep_every >= 0,
             "checkpoint.keep_every", cfg.checkpoint.keep_every,
             "use 0 (keep only the last checkpoint.max_to_keep) or a positive step interval")
    ids = check_data_config(cfg.data)
    _require(m.vocab_size >= ids.vocab_size, "model.vocab_size", m.vocab_size,
             f"the data's tokenizer has {ids.vocab_size} ids")
    _require(m.vocab_size > ids.max_token_id, "model.vocab_size", m.vocab_size,
             f"the prepared data holds token id {ids.max_token_id}")
