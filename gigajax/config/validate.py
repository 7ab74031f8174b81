"""Field checks of a config: every value a user sets, on its own and against the config's other
fields; each failure is a ConfigError naming the field and what is allowed.

What needs more than the config is checked by the layer that knows it: whether the model and
batch split over the mesh (`parallel/checks.py`), whether the data's tokenizer and ids fit the
model (`data/pipeline.check_data_config`); `train/preflight.py` runs all three before a run
touches a file or a device, and `gigajax.validate` is that.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gigajax.config.schema import (
    ATTENTION_IMPLS,
    DATA_SOURCES,
    DTYPES,
    MESH_AXES,
    MOMENT_DTYPES,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    SCHEDULES,
    SEQUENCE_LAYOUTS,
    SP_IMPLS,
    ZERO_STAGES,
    head_dim,
)
from gigajax.errors import ConfigError

POSITIVE_FIELDS = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.mlp_dim", "model.max_seq_len", "model.rope_theta", "model.norm_eps", "model.init_std",
    "attention.block_q", "attention.block_kv", "data.seq_len", "data.batch_size", "train.steps",
    "train.microbatches", "train.loss_chunks", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "checkpoint.max_to_keep", "optim.lr")


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """ConfigError `config.<field>=<value> is not allowed: <allowed>.` unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def get(cfg: ml_collections.ConfigDict, field: str) -> Any:
    """The value of `field` ('a.b'), or a ConfigError when the config lacks it."""
    node = cfg
    for name in field.split("."):
        if name not in node:
            raise ConfigError(f"config.{field} is missing; start configs from "
                              "gigajax.config.base_config().")
        node = node[name]
    return node


def _choice(cfg: ml_collections.ConfigDict, field: str, allowed: tuple, prefix: str = "") -> None:
    value = get(cfg, field)
    require(value in allowed, prefix + field, value,
            f"choose one of {', '.join(repr(a) for a in allowed)}")


def _positive(cfg: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = get(cfg, field)
        require(isinstance(value, int | float) and not isinstance(value, bool) and value > 0,
                field, value, "it must be a positive number")


def _fraction(cfg: ml_collections.ConfigDict, field: str, prefix: str = "") -> None:
    value = get(cfg, field)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
    require(ok, prefix + field, value, "use a number in [0, 1]")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check every user-settable field; raise ConfigError naming the first bad one."""
    _positive(cfg, *POSITIVE_FIELDS)
    _check_model(cfg)
    _check_attention(cfg)
    _check_data(cfg)
    _check_train(cfg)
    _check_optim(cfg)
    _check_mesh(cfg)


def _check_model(cfg: ml_collections.ConfigDict) -> None:
    m, rs = cfg.model, cfg.model.rope_scaling
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
            f"it must divide model.n_heads={m.n_heads} (grouped-query attention)")
    require(m.head_dim >= 0, "model.head_dim", m.head_dim, "use 0 (d_model // n_heads) or > 0")
    require(m.head_dim > 0 or m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
            f"with model.head_dim=0 it must be divisible by model.n_heads={m.n_heads}")
    require(head_dim(m) % 2 == 0, "model.head_dim", head_dim(m),
            "RoPE needs an even head dimension")
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.remat", REMAT_POLICIES)
    _choice(cfg, "model.rope_scaling.type", ROPE_SCALINGS)
    require(rs.factor >= 1.0, "model.rope_scaling.factor", rs.factor,
            "it must be >= 1 (1 means no scaling)")
    require(rs.beta_fast > rs.beta_slow > 0, "model.rope_scaling.beta_fast", rs.beta_fast,
            f"YaRN needs beta_fast > beta_slow={rs.beta_slow} > 0")
    require(rs.original_max_seq_len >= 0, "model.rope_scaling.original_max_seq_len",
            rs.original_max_seq_len, "use 0 (max_seq_len / factor) or the pretraining length")
    require(m.sliding_window >= 0, "model.sliding_window", m.sliding_window,
            "use 0 for full attention or a positive window length")


def _check_attention(cfg: ml_collections.ConfigDict) -> None:
    a = cfg.attention
    _choice(cfg, "attention.impl", ATTENTION_IMPLS)
    _choice(cfg, "attention.sp_impl", SP_IMPLS)
    _choice(cfg, "attention.layout", SEQUENCE_LAYOUTS)
    require(isinstance(a.ulysses_degree, int) and a.ulysses_degree >= 1,
            "attention.ulysses_degree", a.ulysses_degree,
            "use a positive integer (the all-to-all part of mesh.sequence in hybrid)")
    require(a.ulysses_degree == 1 or a.sp_impl == "hybrid", "attention.ulysses_degree",
            a.ulysses_degree, f"it only applies to attention.sp_impl='hybrid' (sp_impl is "
            f"{a.sp_impl!r}); leave it at 1")


def _check_data(cfg: ml_collections.ConfigDict) -> None:
    d = cfg.data
    validate_data(d)
    require(d.seq_len <= cfg.model.max_seq_len, "data.seq_len", d.seq_len,
            f"it must be <= model.max_seq_len={cfg.model.max_seq_len}")


def validate_data(data_cfg: ml_collections.ConfigDict) -> None:
    """The fields of the `data` section on their own (the data layer checks a section with it
    before it reads anything)."""
    d, pk = data_cfg, data_cfg.passkey
    _choice(d, "source", DATA_SOURCES, "data.")
    for field in ("seq_len", "batch_size"):
        require(isinstance(d[field], int) and not isinstance(d[field], bool) and d[field] > 0,
                f"data.{field}", d[field], "it must be a positive number")
    require(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction,
            "it must lie strictly between 0 and 1")
    require(d.max_bytes >= 0, "data.max_bytes", d.max_bytes,
            "use 0 for the whole corpus or a positive byte budget")
    _fraction(d, "fim_rate", "data.")
    digits, least = pk.key_digits, pk.min_key_digits
    require(isinstance(digits, int) and not isinstance(digits, bool) and 1 <= digits <= 32,
            "data.passkey.key_digits", digits,
            "use an integer from 1 to 32 (the PassKey benchmark uses 5)")
    require(isinstance(least, int) and not isinstance(least, bool) and 0 <= least <= digits,
            "data.passkey.min_key_digits", least,
            f"use 0 (every key has data.passkey.key_digits={digits} digits) or 1 to {digits}")
    _fraction(d, "passkey.text_weight", "data.")
    _fraction(d, "passkey.short_rate", "data.")


def _check_train(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    require(isinstance(t.steps, int) and not isinstance(t.steps, bool), "train.steps", t.steps,
            "use an integer > 0")
    require(t.z_loss >= 0, "train.z_loss", t.z_loss, "it must be >= 0")
    require(cfg.data.seq_len % t.loss_chunks == 0, "train.loss_chunks", t.loss_chunks,
            f"it must divide data.seq_len={cfg.data.seq_len}")
    require(cfg.data.batch_size % t.microbatches == 0, "train.microbatches", t.microbatches,
            f"it must divide data.batch_size={cfg.data.batch_size}")
    _choice(cfg, "train.nonfinite", NONFINITE_POLICIES)
    keep = cfg.checkpoint.keep_every
    require(isinstance(keep, int) and keep >= 0, "checkpoint.keep_every", keep,
            "use 0 (keep only the last checkpoint.max_to_keep) or a positive step interval")


def _check_optim(cfg: ml_collections.ConfigDict) -> None:
    o = cfg.optim
    _choice(cfg, "optim.name", OPTIMIZERS)
    _choice(cfg, "optim.schedule", SCHEDULES)
    _choice(cfg, "optim.moment_dtype", MOMENT_DTYPES)
    require(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, "optim.warmup_steps",
            o.warmup_steps, "use an integer >= 0 (longer than train.steps warms up over the "
            "whole run)")
    require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio,
            "use a value in [0, 1]")
    require(0.0 < o.wsd_decay_fraction <= 1.0, "optim.wsd_decay_fraction",
            o.wsd_decay_fraction, "use a value in (0, 1]: the share of train.steps that "
            "schedule=wsd decays over")
    require(o.clip_norm is None or o.clip_norm >= 0, "optim.clip_norm", o.clip_norm,
            "use a value >= 0 (0 or None turns clipping off)")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "use a value >= 0")


def _check_mesh(cfg: ml_collections.ConfigDict) -> None:
    for axis in MESH_AXES:
        size = get(cfg, f"mesh.{axis}")
        require(isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1),
                f"mesh.{axis}", size, "use a positive size, or -1 for the rest of the devices")
    require(sum(cfg.mesh[a] == -1 for a in MESH_AXES) <= 1, "mesh", dict(cfg.mesh),
            "at most one axis may be -1")
    require(cfg.sharding.zero_stage in ZERO_STAGES, "sharding.zero_stage",
            cfg.sharding.zero_stage, "use 3 (FSDP: parameters and optimizer state sharded) or "
            "1 (optimizer state only)")
    require(isinstance(cfg.sharding.megatron_sp, bool), "sharding.megatron_sp",
            cfg.sharding.megatron_sp, "use true or false")
