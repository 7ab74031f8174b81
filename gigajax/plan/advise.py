"""Layout advice: every mesh layout of a config on N devices, ranked by the planner's numbers.

`advise` enumerates data x fsdp x expert x tensor x sequence (ring or Ulysses) factorisations of
the device count (`expert` for a mixture of experts only, in degrees that divide its experts),
with tensor parallelism kept inside a node and Megatron-SP on with it, under each remat policy;
plans each (`plan.plan`), drops those that do not split or do not fit in `max_memory`, and
ranks the rest by an estimated step time: the step's FLOPs (with remat's recomputation) at the
peak rate, plus each axis's bytes at its link's bandwidth (tensor inside a node, the rest
across nodes), with no overlap assumed. It is a model for ranking, not a prediction of wall
time.

`tp_sp_crossover` finds the context length at which sequence parallelism starts to send fewer
bytes than tensor parallelism over the same devices, for the attention block and the MLP block
of one layer, from the planner's own per-block traffic (`plan.layer_comm_bytes`): tensor
parallelism moves activations (grows with T), sequence parallelism moves the block's weight
gradients (fixed) plus, for attention, K/V or all-to-all traffic that shrinks with the degree.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import ml_collections

from gigajax.config import ModelConfig
from gigajax.errors import ConfigError
from gigajax.parallel.mesh import mesh_shape
from gigajax.plan.comm import layer_comm_bytes
from gigajax.plan.planner import GiB, plan
from gigajax.train.flops import flops_per_token

REMATS = ("none", "dots", "minimal", "full")
# what sequence parallelism is charged in `tp_sp_crossover`: its weight-gradient sync alone
# (any token split pays it), or that plus the ring's K/V or Ulysses' all-to-all traffic
CROSSOVER_VARIANTS = {"weights": "weight gradients only", "ring": "ring (+ K/V round the ring)",
                      "ulysses": "Ulysses (+ all-to-alls)"}
# (share of the weight matmuls' FLOPs, share of attention's) the backward pass recomputes:
# full re-runs each layer's forward (a third of each); minimal keeps the attention output and
# re-runs the matmuls; dots keeps the matmuls' outputs and re-runs the attention kernel
RECOMPUTE = {"none": (0.0, 0.0), "dots": (0.0, 1 / 3), "minimal": (1 / 3, 0.0),
             "full": (1 / 3, 1 / 3)}
# the mesh axes each traffic key of `plan.comm_bytes` crosses
TRAFFIC_AXES = {"fsdp": ("fsdp",), "data+sequence": ("data", "sequence", "ulysses"),
                "tensor": ("tensor",), "sequence": ("sequence",), "ulysses": ("ulysses",),
                "expert": ("expert",)}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the ranking assumes of a device and its links (H100 SXM defaults)."""

    peak_flops: float = 989e12  # dense bf16 FLOP/s per device
    mfu: float = 0.4  # share of the peak a step reaches
    node_size: int = 8  # devices per node: tensor parallelism stays inside
    intra_node_bytes_per_s: float = 300e9  # NVLink, per device, achieved
    inter_node_bytes_per_s: float = 40e9  # InfiniBand 400 Gb/s per device, achieved


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(cfg: ml_collections.ConfigDict, devices: int, hardware: Hardware):
    """(name, config) for every layout and remat policy of `cfg` on `devices` devices."""
    for tensor in (t for t in divisors(devices) if t <= hardware.node_size):
        for expert in expert_degrees(cfg.model.moe.n_routed_experts, devices // tensor):
            yield from _split_tokens(cfg, devices // tensor // expert, tensor, expert)


def expert_degrees(n_experts: int, devices: int) -> list[int]:
    """The `expert` sizes to try: divisors of `devices` that divide the experts (1 alone for a
    dense model)."""
    return [e for e in divisors(devices) if n_experts % e == 0] if n_experts else [1]


def _split_tokens(cfg: ml_collections.ConfigDict, rest: int, tensor: int, expert: int):
    """The candidates splitting the other `rest` devices over sequence x fsdp x data."""
    for sequence in divisors(rest):
        for fsdp in divisors(rest // sequence):
            data = rest // sequence // fsdp
            sp_impls = ("ring", "ulysses") if sequence > 1 else (cfg.attention.sp_impl,)
            for sp_impl, remat in itertools.product(sp_impls, REMATS):
                c = ml_collections.ConfigDict(cfg.to_dict())
                c.mesh.update(data=data, fsdp=fsdp, expert=expert, sequence=sequence,
                              tensor=tensor)
                c.attention.update(sp_impl=sp_impl, ulysses_degree=1)
                c.sharding.megatron_sp = tensor > 1
                c.model.remat = remat
                parts = [f"{a}={n}" for a, n in c.mesh.items() if n > 1]
                if sequence > 1:
                    parts.append(sp_impl)
                yield ",".join(parts or ["1 device"]) + f" remat={remat}", c


def inside_a_node(axes: tuple[str, ...], sizes: dict[str, int], node_size: int) -> bool:
    """Whether a collective over `axes` stays inside a node: the mesh puts its axes in the order
    of `sizes` (data outermost, tensor innermost), so an axis spans its size times every inner
    axis's size in consecutive devices."""
    names = list(sizes)
    used = [names.index(a) for a in axes if sizes.get(a, 1) > 1]
    if not used:
        return True
    return math.prod(sizes[a] for a in names[min(used):]) <= node_size


def step_seconds(cfg: ml_collections.ConfigDict, devices: int, result: dict[str, Any],
                 hardware: Hardware) -> dict[str, float]:
    """The ranking's time model: compute at mfu x peak, each axis's bytes at its link's
    bandwidth (NVLink when the collective stays inside a node, else InfiniBand)."""
    m = ModelConfig.from_config(cfg)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    per_token = flops_per_token(m, cfg.data.seq_len)
    context = min(cfg.data.seq_len, m.sliding_window) if m.sliding_window else cfg.data.seq_len
    attention = 12 * m.n_layers * m.n_heads * m.head_dim * context  # of per_token
    matmuls_again, attention_again = RECOMPUTE[m.remat]
    flops = ((per_token - attention) * (1 + matmuls_again)
             + attention * (1 + attention_again)) * tokens / devices
    seconds = {"compute": flops / (hardware.peak_flops * hardware.mfu)}
    for axis, sent in result["comm_bytes_per_step"].items():
        inside = inside_a_node(TRAFFIC_AXES[axis], result["mesh"], hardware.node_size)
        rate = hardware.intra_node_bytes_per_s if inside else hardware.inter_node_bytes_per_s
        seconds[axis] = sent / rate
    return seconds


def layout_key(cfg: ml_collections.ConfigDict, devices: int) -> tuple:
    """What tells two candidates apart: mesh sizes, sequence method, Megatron-SP, remat."""
    sizes = mesh_shape(cfg.mesh, devices)
    sp = (cfg.attention.sp_impl, cfg.attention.ulysses_degree) if sizes["sequence"] > 1 else ()
    return (tuple(sizes.values()), sp, bool(cfg.sharding.megatron_sp), cfg.model.remat)


def config_flags(cfg: ml_collections.ConfigDict, devices: int) -> str:
    """The command-line overrides that select this candidate's layout and remat."""
    sizes = mesh_shape(cfg.mesh, devices)
    flags = [f"--config.mesh.{axis}={n}" for axis, n in sizes.items()]
    if sizes["sequence"] > 1:
        flags.append(f"--config.attention.sp_impl={cfg.attention.sp_impl}")
        if cfg.attention.sp_impl == "hybrid":
            flags.append(f"--config.attention.ulysses_degree={cfg.attention.ulysses_degree}")
    flags.append(f"--config.sharding.megatron_sp={str(bool(cfg.sharding.megatron_sp)).lower()}")
    flags.append(f"--config.model.remat={cfg.model.remat}")
    return " ".join(flags)


def _row(name: str, c: ml_collections.ConfigDict, devices: int, max_memory: float,
         hardware: Hardware, backend: str) -> dict[str, Any]:
    result = plan(c, devices, backend)  # ConfigError when the layout does not split
    seconds = step_seconds(c, devices, result, hardware)
    return {"layout": name, "mesh": dict(c.mesh), "sp_impl": c.attention.sp_impl,
            "remat": c.model.remat, "flags": config_flags(c, devices),
            "predicted_bytes_per_device": result["predicted_bytes_per_device"],
            "bytes": result["bytes"], "comm_bytes_per_step": result["comm_bytes_per_step"],
            "seconds": seconds, "step_seconds": sum(seconds.values()),
            "fits": result["predicted_bytes_per_device"] <= max_memory, "current": False}


def advise(cfg: ml_collections.ConfigDict, devices: int, max_memory: float,
           hardware: Hardware = Hardware(), backend: str = "gpu") -> dict[str, Any]:
    """Every candidate layout planned for `backend`; fitting ones ranked by estimated step
    time. The config's own layout is marked `current` (and planned too when it is not a
    candidate), and `current_rank` says where it ranks (None, with `current_error`, when it
    does not split)."""
    rows, rejected = [], {}
    own = layout_key(cfg, devices) if _splits(cfg, devices) else None
    for name, c in candidate_configs(cfg, devices, hardware):
        try:
            rows.append(_row(name, c, devices, max_memory, hardware, backend))
        except ConfigError as error:
            rejected[name] = str(error)
            continue
        rows[-1]["current"] = layout_key(c, devices) == own
    current_error = None if own is not None else (
        f"its mesh {dict(cfg.mesh)} does not fit {devices} devices")
    if own is not None and not any(r["current"] for r in rows):
        try:
            rows.append({**_row("the config's own layout", cfg, devices, max_memory, hardware,
                                backend),
                         "current": True})
        except ConfigError as error:
            current_error = str(error)
    rows.sort(key=lambda r: (not r["fits"], r["step_seconds"] if r["fits"]
                             else r["predicted_bytes_per_device"]))
    for row in rows:
        row["why"] = explain(row, max_memory)
    current_rank = next((i for i, r in enumerate(rows, 1) if r["current"]), None)
    return {"devices": devices, "seq_len": cfg.data.seq_len, "max_memory_bytes": int(max_memory),
            "hardware": dataclasses.asdict(hardware), "layouts": rows,
            "fitting": sum(r["fits"] for r in rows), "rejected": rejected,
            "current_rank": current_rank, "current_error": current_error,
            "crossover": tp_sp_crossover(cfg, crossover_degree(cfg, devices, hardware))}


def _splits(cfg: ml_collections.ConfigDict, devices: int) -> bool:
    """Whether the config's own mesh fits `devices` at all (its -1 axis resolved)."""
    try:
        mesh_shape(cfg.mesh, devices)
    except ConfigError:
        return False
    return True


def crossover_degree(cfg: ml_collections.ConfigDict, devices: int, hardware: Hardware) -> int:
    """The largest tensor degree inside a node that divides the devices, heads and MLP."""
    m = ModelConfig.from_config(cfg)
    return max(t for t in divisors(min(devices, hardware.node_size))
               if devices % t == 0 and m.n_heads % t == 0 and m.mlp_dim % t == 0)


def explain(row: dict[str, Any], max_memory: float) -> str:
    """One line: memory against the budget and where it goes, and what dominates the time."""
    b, total = row["bytes"], row["predicted_bytes_per_device"]
    state = b["params"] + b["grads"] + b["optimizer"]
    memory = (f"{total / GiB:.1f} GiB {'fits' if row['fits'] else 'exceeds'} "
              f"{max_memory / GiB:.1f} (state {state / GiB:.1f}, activations "
              f"{b['activations'] / GiB:.1f})")
    seconds = row["seconds"]
    slowest = max((a for a in seconds if a != "compute"), key=seconds.get, default=None)
    time = f"compute {seconds['compute']:.2f} s"
    if slowest:
        time += f", slowest link {slowest} ({seconds[slowest]:.2f} s)"
    return f"{memory}; {time}"


def tp_sp_crossover(cfg: ml_collections.ConfigDict, degree: int) -> dict[str, Any]:
    """Per block, the context length T (and T / d_model) above which splitting one sequence
    over `degree` devices by tokens sends fewer bytes per device than tensor parallelism over
    them, from `layer_comm_bytes` (one sequence per device group, no remat). Tensor
    parallelism's all-reduces grow with T; the weight-gradient sync does not, so T* is about
    (block weights x 4 bytes) / (d_model x 2 bytes x 2): with multi-head attention (4 D^2
    weights) and a SwiGLU MLP of F = 8D/3 (8 D^2), the MLP crosses over at twice attention's
    length."""
    m = ModelConfig.from_config(cfg)

    def sent(seq_len: int, sequence: int, tensor: int, sp_impl: str) -> dict[str, float]:
        c = ml_collections.ConfigDict(cfg.to_dict())
        c.mesh.update(data=1, fsdp=1, sequence=sequence, tensor=tensor)
        c.attention.update(sp_impl=sp_impl, ulysses_degree=1)
        c.sharding.megatron_sp = tensor > 1
        c.model.update(remat="none", max_seq_len=max(c.model.max_seq_len, seq_len))
        c.data.update(seq_len=seq_len, batch_size=1)
        c.train.microbatches = 1
        sizes = {"data": 1, "fsdp": 1, "tensor": tensor,
                 "sequence": sequence if sp_impl == "ring" else 1,
                 "ulysses": sequence if sp_impl == "ulysses" else 1}
        return layer_comm_bytes(c, sizes)

    def block_bytes(seq_len: int, variant: str, block: str, tensor_parallel: bool) -> float:
        sp_impl = "ulysses" if variant == "ulysses" else "ring"
        axes = (sent(seq_len, 1, degree, sp_impl) if tensor_parallel
                else sent(seq_len, degree, 1, sp_impl))[block]
        if variant == "weights" and not tensor_parallel:  # the gradient sync alone
            return axes.get("data+sequence", 0.0)
        return sum(axes.values())

    result: dict[str, Any] = {"degree": degree, "d_model": m.d_model}
    for variant in CROSSOVER_VARIANTS:
        for block in ("attention", "mlp"):
            def sp_minus_tp(seq_len: int, variant: str = variant, block: str = block) -> float:
                return (block_bytes(seq_len, variant, block, False)
                        - block_bytes(seq_len, variant, block, True))

            low, high = degree, degree * 2**30
            if sp_minus_tp(high) > 0:  # SP sends more at any length: no crossover
                result[f"{variant}_{block}"] = None
                continue
            if sp_minus_tp(low) <= 0:  # SP already sends less at the shortest length
                result[f"{variant}_{block}"] = {"seq_len": low, "over_d_model": low / m.d_model}
                continue
            while high - low > degree:  # bisect on multiples of the degree
                mid = (low + high) // 2 // degree * degree
                low, high = (mid, high) if sp_minus_tp(mid) > 0 else (low, mid)
            result[f"{variant}_{block}"] = {"seq_len": high, "over_d_model": high / m.d_model}
    return result


def format_advice(result: dict[str, Any], top: int = 10) -> str:
    """The ranked table (fitting layouts first), the crossover, and a count of the rest."""
    shown = result["layouts"][:top]
    width = max((len(row["layout"]) for row in shown), default=6) + 2
    lines = [f"{result['devices']} devices, T = {result['seq_len']:,} tokens, budget "
             f"{result['max_memory_bytes'] / GiB:.1f} GiB per device: {result['fitting']} of "
             f"{len(result['layouts'])} layouts fit ({len(result['rejected'])} do not split)",
             f"{'rank':<6}{'layout':<{width}}{'GiB/dev':>9}{'est. s/step':>13}  why"]
    for i, row in enumerate(shown, 1):
        rank = f"{i}{'*' if row['current'] else ''}"
        lines.append(f"{rank:<6}{row['layout']:<{width}}"
                     f"{row['predicted_bytes_per_device'] / GiB:>9.1f}"
                     f"{row['step_seconds']:>13.2f}  {row['why']}")
        lines.append(f"{'':<6}{row['flags']}")
    rank = result["current_rank"]
    if rank is None:
        lines.append(f"* the config's own layout is not ranked: {result['current_error']}")
    else:
        own = result["layouts"][rank - 1]
        lines.append(f"* the config's own layout ({own['layout']}) ranks {rank} of "
                     f"{len(result['layouts'])}"
                     + ("" if own["fits"] else " (it does not fit the budget)"))
    cross = result["crossover"]
    lines.append(f"TP vs SP over {cross['degree']} devices (bytes sent per layer; SP sends "
                 f"less above T*, d_model = {cross['d_model']}):")
    for variant, label in CROSSOVER_VARIANTS.items():
        parts = []
        for block in ("attention", "mlp"):
            found = cross[f"{variant}_{block}"]
            parts.append(f"{block} T* = {found['seq_len']:,} = {found['over_d_model']:.1f} D"
                         if found else f"{block}: never (SP sends more at every T)")
        lines.append(f"  {label:<34}" + "; ".join(parts))
    return "\n".join(lines)


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 x 2^30, '8.5e10' -> 8.5e10 bytes."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 1e12, "gb": 1e9, "mb": 1e6, "b": 1}
    lowered = text.strip().lower()
    unit = next((u for u in units if lowered.endswith(u)), "")
    try:
        value = float(lowered[: len(lowered) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        raise ConfigError(f"--max-memory {text!r}: write a size like 80GB, 80GiB or 8e10.") \
            from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--max-memory {text!r} must be a positive size.")
    return value
