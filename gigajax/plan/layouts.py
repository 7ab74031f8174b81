"""Layout specs: a mesh layout written as one line, `"fsdp=4,tensor=2,megatron_sp=1"`.

A layout is a comma-separated list of `key=value`: mesh axes (`data`, `fsdp`, `sequence`,
`tensor`; missing ones are 1, `-1` is the rest of the devices: on CPU the command simulates 8, or
as many as the largest fixed layout needs) and the `sharding` options
(`zero_stage=1|3`, `megatron_sp=0|1`) and the `attention` options of sequence parallelism
(`sp_impl=ring|ulysses|hybrid`, `layout=contiguous|striped|zigzag`, `ulysses_degree=N`).
Layouts are separated by `;`, for example
`data=8;fsdp=8;fsdp=8,zero_stage=1;tensor=4,megatron_sp=1;data=2,fsdp=2,tensor=2`.
"""

from __future__ import annotations

import math

import ml_collections

from gigajax.config.schema import MESH_AXES as AXES
from gigajax.errors import ConfigError
from gigajax.train.preflight import preflight

SHARDING_KEYS = ("zero_stage", "megatron_sp")
ATTENTION_KEYS = ("sp_impl", "layout", "ulysses_degree")  # config.attention.*
TEXT_KEYS = ("sp_impl", "layout")
KEYS = (*AXES, *SHARDING_KEYS, *ATTENTION_KEYS)

Layout = dict[str, int | bool | str]


def parse_layouts(text: str) -> list[Layout]:
    """`"data=8;tensor=2,data=4"` -> [{"data": 8}, {"tensor": 2, "data": 4}]."""
    layouts = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        layout: Layout = {}
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or key not in KEYS:
                raise ConfigError(f"layout {item!r}: {pair!r} is not key=value with a key among "
                                  f"{', '.join(KEYS)}.")
            if key in TEXT_KEYS:
                layout[key] = value
                continue
            try:
                layout[key] = int(value) if key != "megatron_sp" else bool(int(value))
            except ValueError:
                raise ConfigError(f"layout {item!r}: {key}={value!r} must be an integer.") from None
        layouts.append(layout)
    if not layouts:
        raise ConfigError("--layouts is empty: give layouts like 'data=8;fsdp=8;tensor=2,data=4'.")
    return layouts


def layout_name(layout: Layout) -> str:
    return ",".join(f"{k}={v if isinstance(v, str) else int(v)}"
                    for k, v in layout.items()) or "1 device"


def devices_needed(layouts: list[Layout], default: int = 8) -> int:
    """Most devices any layout asks for; at least `default` when one says -1 (the rest)."""
    sizes = [[int(layout.get(a, 1)) for a in AXES] for layout in layouts]
    fixed = [math.prod(s) for s in sizes if -1 not in s]
    needed = max(fixed, default=1)
    return needed if len(fixed) == len(sizes) else max(needed, default)


def layout_config(cfg: ml_collections.ConfigDict, layout: Layout,
                  dtype: str | None = "float32") -> ml_collections.ConfigDict:
    """`cfg` on the layout's mesh (unnamed axes 1), sharding and attention options; in float32
    for comparisons (`dtype=None` keeps the config's compute dtype)."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    if dtype is not None:
        c.model.dtype = dtype
    c.mesh.update({axis: int(layout.get(axis, 1)) for axis in AXES})
    c.sharding.update({k: v for k, v in layout.items() if k in SHARDING_KEYS})
    c.attention.update({k: v for k, v in layout.items() if k in ATTENTION_KEYS})
    try:
        preflight(c)
    except ConfigError as error:
        raise ConfigError(f"layout {layout_name(layout)!r}: {error}") from None
    return c
