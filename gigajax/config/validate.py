"""Field checks of a config: its shape against `base_config()` (no unknown or missing keys), every
field against its entry in `fields.FIELDS`, fields that only apply under another field's value
(`fields.APPLIES_ONLY`), and the checks between fields; each failure is a ConfigError naming the
field and what is allowed.

What needs more than the config is checked by the layer that knows it: whether the model and
batch split over the mesh (`parallel/checks.py`), whether the data's tokenizer and ids fit the
model (`data/pipeline.check_data_config`); `train/preflight.py` runs all three before a run
touches a file or a device, and `gigajax.validate` is that.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from gigajax.config.fields import APPLIES_ONLY, FIELDS, USED_ONLY
from gigajax.config.schema import MESH_AXES, base_config, head_dim, lora_targets
from gigajax.errors import ConfigError


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """ConfigError `config.<field>=<value> is not allowed: <allowed>.` unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")


def get(cfg: ml_collections.ConfigDict, field: str) -> Any:
    """The value of `field` ('a.b'), or a ConfigError when the config lacks it."""
    node = cfg
    for name in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"config.{field} is missing; start configs from "
                              "gigajax.config.base_config().")
        node = node[name]
    return node


def unknown_key_message(field: str, known: list[str], where: str) -> str:
    """'Unknown config field X (did you mean Y?); fields of <where>: ...' for `field`."""
    leaf = field.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"Unknown config field {field!r}{hint}; fields of {where or 'config'}: "
            f"{', '.join(sorted(known))}.")


def check_keys(cfg: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
               where: str = "") -> None:
    """Every key of `cfg` exists in `reference` (the base config) and the other way round, at
    every depth: a field set by a typo in a config file is an error, not a silent no-op."""
    for key in cfg.keys():
        field = f"{where}{key}"
        if key not in reference:
            raise ConfigError(unknown_key_message(field, list(reference.keys()),
                                                  where.rstrip(".")))
        is_section = isinstance(reference[key], ml_collections.ConfigDict)
        if is_section != isinstance(cfg[key], ml_collections.ConfigDict):
            what = "a section" if is_section else "a field"
            raise ConfigError(f"config.{field} is {what} of the base config; got "
                              f"{cfg[key]!r}.")
        if is_section:
            check_keys(cfg[key], reference[key], f"{field}.")
    for key in reference.keys():
        if key not in cfg:
            raise ConfigError(f"config.{where}{key} is missing; start configs from "
                              "gigajax.config.base_config().")


def check_field(cfg: ml_collections.ConfigDict, field: str, prefix: str = "") -> None:
    """`field` of `cfg` against its spec in FIELDS (`prefix` + field names it there)."""
    value = get(cfg, field)
    spec = FIELDS[prefix + field]
    require(spec.accepts(value), prefix + field, value, spec.allowed())


def check_applies(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                  field: str, prefix: str = "") -> None:
    """A field of APPLIES_ONLY set away from its default only under the values it applies to."""
    depends_on, values = APPLIES_ONLY[prefix + field]
    value, default = get(cfg, field), get(defaults, field)
    other = get(cfg, depends_on.removeprefix(prefix))
    if value != default and other not in values:
        shown = " or ".join(repr(v) for v in values)
        raise ConfigError(f"config.{prefix}{field}={value!r} only applies with {depends_on}="
                          f"{shown} ({depends_on} is {other!r}): set {depends_on}, or leave "
                          f"{prefix}{field} at its default {default!r}.")


def unused_fields(cfg: ml_collections.ConfigDict) -> list[str]:
    """A line for each field of USED_ONLY that is set away from its default but unused."""
    defaults, out = base_config(), []
    for field, (depends_on, values) in USED_ONLY.items():
        value, other = get(cfg, field), get(cfg, depends_on)
        if value != get(defaults, field) and other not in values:
            out.append(f"{field}={value!r} is not used with {depends_on}={other!r}")
    return out


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check the whole config; raise ConfigError naming the first bad field (module doc)."""
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"a config is an ml_collections.ConfigDict (from "
                          f"gigajax.load_config or base_config()), not {type(cfg).__name__}.")
    defaults = base_config()
    check_keys(cfg, defaults)
    for field in FIELDS:
        check_field(cfg, field)
    for field in APPLIES_ONLY:
        check_applies(cfg, defaults, field)
    _check_model(cfg)
    _check_data(cfg)
    _check_train(cfg)
    _check_mesh(cfg)


def _check_model(cfg: ml_collections.ConfigDict) -> None:
    m, rs = cfg.model, cfg.model.rope_scaling
    require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
            f"it must divide model.n_heads={m.n_heads} (grouped-query attention)")
    require(m.head_dim > 0 or m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
            f"with model.head_dim=0 it must be divisible by model.n_heads={m.n_heads}")
    require(head_dim(m) % 2 == 0, "model.head_dim", head_dim(m),
            "RoPE needs an even head dimension")
    require(rs.beta_fast > rs.beta_slow, "model.rope_scaling.beta_fast", rs.beta_fast,
            f"YaRN needs beta_fast > beta_slow={rs.beta_slow}")
    require(rs.high_freq_factor > rs.low_freq_factor, "model.rope_scaling.high_freq_factor",
            rs.high_freq_factor, f"llama3 needs it > low_freq_factor={rs.low_freq_factor}")
    require(rs.type != "dynamic" or head_dim(m) > 2, "model.head_dim", head_dim(m),
            "dynamic NTK scaling needs a head dimension above 2")
    lora_targets(m.lora.targets)  # ConfigError naming model.lora.targets
    _check_moe(m)


def _check_moe(m: ml_collections.ConfigDict) -> None:
    moe, defaults = m.moe, base_config().model.moe
    if not moe.n_routed_experts:
        for key in defaults.keys():
            if key != "n_routed_experts" and moe[key] != defaults[key]:
                raise ConfigError(f"config.model.moe.{key}={moe[key]!r} only applies to a "
                                  "mixture-of-experts model: set model.moe.n_routed_experts "
                                  f"> 0, or leave it at its default {defaults[key]!r}.")
        return
    require(moe.top_k <= moe.n_routed_experts, "model.moe.top_k", moe.top_k,
            f"a token picks at most model.moe.n_routed_experts={moe.n_routed_experts} experts")
    require(moe.first_dense_layers < m.n_layers, "model.moe.first_dense_layers",
            moe.first_dense_layers, f"at least one of the model.n_layers={m.n_layers} blocks "
            "must have experts (use model.moe.n_routed_experts=0 for a dense model)")
    require(not m.lora.rank, "model.lora.rank", m.lora.rank,
            "LoRA adapters on a mixture-of-experts model are not supported yet: use 0")


def _check_data(cfg: ml_collections.ConfigDict) -> None:
    _check_passkey_digits(cfg.data)
    require(cfg.data.seq_len <= cfg.model.max_seq_len, "data.seq_len", cfg.data.seq_len,
            f"it must be <= model.max_seq_len={cfg.model.max_seq_len}")


def _check_passkey_digits(data_cfg: ml_collections.ConfigDict) -> None:
    digits, least = data_cfg.passkey.key_digits, data_cfg.passkey.min_key_digits
    require(least <= digits, "data.passkey.min_key_digits", least,
            f"use 0 (every key has data.passkey.key_digits={digits} digits) or 1 to {digits}")


def validate_data(data_cfg: ml_collections.ConfigDict) -> None:
    """The fields of the `data` section on their own (the data layer checks a section with it
    before it reads anything)."""
    defaults = base_config().data
    check_keys(data_cfg, defaults, "data.")
    for field in FIELDS:
        if field.startswith("data."):
            check_field(data_cfg, field.removeprefix("data."), "data.")
    for field in APPLIES_ONLY:
        if field.startswith("data."):
            check_applies(data_cfg, defaults, field.removeprefix("data."), "data.")
    _check_passkey_digits(data_cfg)


def _check_train(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    require(cfg.data.seq_len % t.loss_chunks == 0, "train.loss_chunks", t.loss_chunks,
            f"it must divide data.seq_len={cfg.data.seq_len}")
    require(cfg.data.batch_size % t.microbatches == 0, "train.microbatches", t.microbatches,
            f"it must divide data.batch_size={cfg.data.batch_size}")
    require(t.objective != "dpo" or cfg.data.source == "prepared", "train.objective", t.objective,
            f"DPO trains on pairs from `gigajax data prepare --dpo` (data.source='prepared', "
            f"data.path=DIR); data.source is {cfg.data.source!r}")
    require(t.objective != "dpo" or not cfg.model.moe.n_routed_experts, "train.objective",
            t.objective, "DPO on a mixture-of-experts model is not supported yet: use 'lm'")


def _check_mesh(cfg: ml_collections.ConfigDict) -> None:
    require(sum(cfg.mesh[a] == -1 for a in MESH_AXES) <= 1, "mesh", dict(cfg.mesh),
            "at most one axis may be -1")
