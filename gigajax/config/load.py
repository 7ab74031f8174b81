"""Configs from files, dicts and saved runs, with `a.b=v` overrides, validated field by field.

`load_config` takes a config file (`get_config()`), a dict (a saved run's `config.json`, or a
partial one: missing fields keep `base_config()`'s defaults) or a ConfigDict, then applies
overrides: `"a.b=v"` strings (the command line's `--config.a.b=v`, values parsed as Python
literals) or `{"a.b": value}` pairs (Python values). Unknown keys are errors naming the valid
ones; a value of the wrong type is an error naming the field.
"""

from __future__ import annotations

import ast
import importlib.util
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from gigajax.config.schema import base_config
from gigajax.config.validate import unknown_key_message, validate
from gigajax.errors import ConfigError

ConfigSource = str | Path | Mapping[str, Any] | ml_collections.ConfigDict
Overrides = Iterable[str] | Mapping[str, Any]


def load_config(source: ConfigSource, overrides: Overrides = ()) -> ml_collections.ConfigDict:
    """The config of `source` (a file path, a dict or a ConfigDict) with `overrides` applied,
    validated (`validate`)."""
    if isinstance(source, ml_collections.ConfigDict | Mapping):
        cfg = config_from_dict(source)
    else:
        cfg = _run_config_file(Path(source))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _run_config_file(path: Path) -> ml_collections.ConfigDict:
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Pass a file such as "
                          "configs/tiny.py.")
    spec = importlib.util.spec_from_file_location(f"gigajax_config_{path.stem}", path)
    if spec is None:
        raise ConfigError(f"Config file {str(path)!r} is not a Python file; pass a file such "
                          "as configs/tiny.py.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"Config file {str(path)!r} has no get_config() function.")
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as error:  # the user's own code: say where it failed, in one line
        raise ConfigError(f"Config file {str(path)!r} failed{_where(error, path)}: "
                          f"{type(error).__name__}: {error}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {str(path)!r} returned {type(cfg).__name__}; return "
                          "the ConfigDict of gigajax.config.base_config() with your changes.")
    return cfg


def _where(error: BaseException, path: Path) -> str:
    """' at line N' of the config file where `error` was raised, when it was raised there."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if Path(f.filename).resolve() == path.resolve()]
    if isinstance(error, SyntaxError) and error.lineno:
        return f" at line {error.lineno}"
    return f" at line {frames[-1].lineno}" if frames else ""


def config_from_dict(values: Mapping[str, Any] | ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
    """`base_config()` with `values` (nested sections) on top; unknown keys are errors."""
    cfg = base_config()
    _merge(cfg, values.to_dict() if isinstance(values, ml_collections.ConfigDict) else values, "")
    return cfg


def _merge(node: ml_collections.ConfigDict, values: Mapping[str, Any], where: str) -> None:
    for key, value in values.items():
        field = f"{where}{key}"
        if key not in node:
            raise ConfigError(unknown_key_message(field, list(node.keys()), where.rstrip(".")))
        if isinstance(node[key], ml_collections.ConfigDict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config.{field} is a section ({_keys(node[key])}); give it "
                                  f"a dict, not {value!r}.")
            _merge(node[key], value, f"{field}.")
        else:
            _set(node, key, value, field, value)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Overrides) -> None:
    """Apply `"a.b=v"` strings or `{"a.b": value}` pairs, in order."""
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            apply_override(cfg, key, value)
        return
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        key, sep, raw = item.removeprefix("--config.").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"Override {item!r} needs the form --config.section.field=value.")
        apply_override(cfg, key, raw, shown=item)


def apply_override(cfg: ml_collections.ConfigDict, key: str, value: Any, shown: str = ""
                   ) -> None:
    """Set the field `key` ('a.b'); a str `value` for a field that is not a str is parsed as a
    Python literal (as on the command line), any other value is set as it is."""
    shown = shown or f"{key}={value!r}"
    *parents, leaf = key.removeprefix("config.").split(".")
    node = cfg
    for depth, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"Unknown config section {'.'.join(parents[:depth + 1])!r} in "
                              f"override {shown!r}; sections here: {_keys(node)}.")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"{unknown_key_message(key, known, '.'.join(parents))} (in override "
                          f"{shown!r})")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a section ({_keys(node[leaf])}): override one of "
                          f"its fields, e.g. {key}.{sorted(node[leaf].keys())[0]}=...")
    parsed = parse_value(value, node[leaf]) if isinstance(value, str) else value
    _set(node, leaf, parsed, key, value)


def _set(node: ml_collections.ConfigDict, leaf: str, value: Any, field: str, raw: Any) -> None:
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{field}={raw!r} has the wrong type: expected "
                          f"{type(current).__name__} ({e}).") from None


def _keys(node: Any) -> str:
    return ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "-"


def parse_value(raw: str, current: Any) -> Any:
    """A command-line value for a field whose current value is `current`: booleans from
    true/false/1/0/yes/no, strings as they are, the rest as Python literals (`1_000` too)."""
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
