"""Configs: the ConfigDict users write (`schema.base_config`), loading with overrides (`load`),
field checks (`validate`), and the typed frozen sections the code reads (`schema.ModelConfig`)."""

from gigajax.config.load import (
    apply_override,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_value,
)
from gigajax.config.schema import (
    LoRAConfig,
    ModelConfig,
    MoEConfig,
    RopeScaling,
    base_config,
    compute_dtype,
    fixed_device_count,
    head_dim,
    warmup_steps,
)
from gigajax.config.validate import validate

__all__ = ["LoRAConfig", "ModelConfig", "MoEConfig", "RopeScaling", "apply_override",
           "apply_overrides", "base_config", "compute_dtype", "config_from_dict",
           "fixed_device_count", "head_dim", "load_config", "parse_value", "validate",
           "warmup_steps"]
