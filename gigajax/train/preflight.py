"""Everything a run's config can be checked for before it touches a file or a device.

`preflight(cfg)` runs, in order: the config's own field checks (`config/validate.py`), the
layout's splits when the mesh has no -1 axis (`parallel/checks.py`; otherwise they run once the
device count is known), and the data against the model (`data/pipeline.check_data`). It is
`gigajax.validate`, and `train()`, `load_config` of the API, the CLI, `check_layouts` and the
evaluation's config loading all call it. `notes(cfg)` lists what a run adjusts (with a line
each for the log) rather than refuses.
"""

from __future__ import annotations

import ml_collections

from gigajax.config import fixed_device_count, validate, warmup_steps
from gigajax.config.validate import unused_fields
from gigajax.data.pipeline import check_data
from gigajax.parallel.checks import check_layout


def preflight(cfg: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (naming the field) for anything wrong with `cfg`; see module doc."""
    validate(cfg)
    if fixed_device_count(cfg.mesh) is not None:
        check_layout(cfg, dict(cfg.mesh))
    check_data(cfg)


def notes(cfg: ml_collections.ConfigDict) -> list[str]:
    """What the run changes from the config as written, one line each."""
    out = []
    if warmup_steps(cfg) < cfg.optim.warmup_steps:
        out.append(f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than train.steps="
                   f"{cfg.train.steps}: warming up over all {cfg.train.steps} steps")
    return out + unused_fields(cfg)
