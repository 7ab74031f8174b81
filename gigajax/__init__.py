"""gigajax: long-context LLaMA-style decoder training in JAX/Flax on named mesh axes.

The public API (`gigajax/api.py`, documented in docs/api.md): `load_config`, `validate`,
`simulate_cpu_devices`, `train` -> `Run`, `load` -> `LM`, `from_hf`, `to_hf`, `merge_lora`,
`build_model`,
`plan`, `advise`, `check_layouts`, `eval_passkey`, and the model class `Decoder`. Errors a
user can fix are `GigajaxError`s.

The names are imported on first use (PEP 562), so `import gigajax.cli` can install its SIGTERM
handler before JAX is imported, and `simulate_cpu_devices` still runs before JAX starts.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from gigajax.errors import ConfigError, DataError, GigajaxError

__version__ = "0.1.0"

_FROM = {"Decoder": "gigajax.model",
         **{name: "gigajax.api" for name in (
             "LM", "Run", "advise", "build_model", "check_layouts", "eval_passkey", "from_hf",
             "load", "load_config", "merge_lora", "plan", "simulate_cpu_devices", "to_hf", "train",
             "validate")}}

__all__ = ["ConfigError", "DataError", "GigajaxError", *sorted(_FROM)]


class _Package(types.ModuleType):
    """Keeps the API's `train` and `plan` from being replaced by the subpackages of the same
    names, which the import system sets as attributes of this module when they load."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FROM and isinstance(value, types.ModuleType):
            return  # `import gigajax.train.loop` still finds the subpackage in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _FROM:
        raise AttributeError(f"module 'gigajax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_FROM[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM))
