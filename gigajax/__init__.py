"""gigajax: long-context LLaMA-style decoder training in JAX/Flax on named mesh axes.

The public API (`gigajax/api.py`, documented in docs/api.md): `load_config`, `validate`,
`simulate_cpu_devices`, `train` -> `Run`, `load` -> `LM`, `build_model`, `plan`, `advise`,
`check_layouts`, `eval_passkey`, and the model class `Decoder`. Errors a user can fix are
`GigajaxError`s.
"""

from gigajax.api import (
    LM,
    Run,
    advise,
    build_model,
    check_layouts,
    eval_passkey,
    load,
    load_config,
    plan,
    simulate_cpu_devices,
    train,
    validate,
)
from gigajax.errors import ConfigError, DataError, GigajaxError
from gigajax.model import Decoder

__version__ = "0.1.0"

__all__ = ["LM", "ConfigError", "DataError", "Decoder", "GigajaxError", "Run", "advise",
           "build_model", "check_layouts", "eval_passkey", "load", "load_config", "plan",
           "simulate_cpu_devices", "train", "validate"]
