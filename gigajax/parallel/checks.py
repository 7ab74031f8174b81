"""Every "does not split" check of a layout, each a ConfigError naming the field and the fix.

`check_layout` is what a config must satisfy on a mesh of given sizes (heads, KV heads, MLP,
vocabulary over `tensor`; d_model over `fsdp`; the experts over `expert`; the batch over
data x fsdp x expert; the sequence over the
ring's layout and Ulysses' heads; Megatron-SP's sequence over `tensor`); GSPMD would pad uneven
shards silently, so all of them are refused up front. `check_intent` guards the rule tables
themselves: no weight matrix left unsplit on an axis the layout means to use.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.errors import ConfigError, GigajaxError
from gigajax.ops.layouts import chunks_per_device
from gigajax.parallel.mesh import sequence_size, sequence_split
from gigajax.parallel.rules import LORA_RANK, axes_size, kv_heads_on_tensor


def check_sequence_split(seq_len: int, n: int, layout: str, field: str = "data.seq_len") -> None:
    """`seq_len` splits evenly into the ring layout's chunks over `n` devices."""
    parts = n * chunks_per_device(layout)
    if seq_len % parts:
        raise ConfigError(
            f"config.{field}={seq_len} does not split over {n} sequence-parallel devices with "
            f"attention.layout={layout!r}: it must be a multiple of {parts}"
            + (" (2 chunks per device)" if layout == "zigzag" else "") + ".")


def check_ulysses_heads(n_heads: int, n_kv_heads: int, degree: int, tensor: int = 1) -> None:
    """The heads (of one tensor shard) split over `degree` Ulysses devices."""
    per = f" per tensor shard (mesh.tensor={tensor})" if tensor > 1 else ""
    if n_heads % degree:
        raise ConfigError(
            f"config.model.n_heads: {n_heads} query heads{per} do not split over a Ulysses "
            f"degree of {degree}: the all-to-all gives each device 1/{degree} of the heads. "
            "Use ring or hybrid attention (attention.sp_impl, attention.ulysses_degree).")
    if n_kv_heads % degree and degree % n_kv_heads:
        raise ConfigError(
            f"config.model.n_kv_heads: {n_kv_heads} KV heads{per} and a Ulysses degree of "
            f"{degree}: KV heads are split when their count is a multiple of the degree and "
            "repeated when it divides the degree; choose a degree among the divisors or "
            f"multiples of {n_kv_heads}.")


def check_layout(cfg: ml_collections.ConfigDict, mesh_sizes: Mapping[str, int]) -> None:
    """ConfigError, naming the field, when the model or batch does not split over the mesh
    (`mesh_sizes`: the config's axes, or a Mesh's shape with `sequence` split in two)."""
    m, a = cfg.model, cfg.attention
    seq_len, megatron_sp = cfg.data.seq_len, cfg.sharding.megatron_sp
    tp, fsdp, ep = mesh_sizes["tensor"], mesh_sizes["fsdp"], mesh_sizes.get("expert", 1)
    dp = mesh_sizes["data"] * fsdp * ep
    for field in ("n_heads", "mlp_dim", "vocab_size"):
        if m[field] % tp:
            raise ConfigError(f"config.model.{field}={m[field]} does not split over "
                              f"mesh.tensor={tp}: tensor parallelism needs it to be a multiple "
                              f"of {tp}.")
    kv = kv_heads_on_tensor(m.n_kv_heads, tp)
    check_experts(m.moe, m.mlp_dim, ep, tp)
    if m.d_model % fsdp:
        raise ConfigError(f"config.model.d_model={m.d_model} does not split over "
                          f"mesh.fsdp={fsdp}: FSDP shards the embed dim, so it must be a "
                          f"multiple of {fsdp}.")
    n_seq = sequence_size(mesh_sizes)
    if n_seq > 1:
        ring, ulysses = sequence_split(n_seq, a.sp_impl, a.ulysses_degree)
        if ring > 1:  # the layout permutes the tokens for the ring's devices
            check_sequence_split(seq_len, ring, a.layout)
            if a.impl != "blockwise":
                raise ConfigError(
                    f"config.attention.impl={a.impl!r} with a ring over {ring} devices: ring "
                    "attention runs the blockwise kernel on every K/V block (it needs each "
                    "block's fp32 logsumexp); set attention.impl='blockwise', or use "
                    "attention.sp_impl='ulysses'.")
        if seq_len % n_seq:  # each ring shard splits again over the Ulysses devices
            raise ConfigError(f"config.data.seq_len={seq_len} does not split over "
                              f"mesh.sequence={n_seq}: use a multiple of {n_seq}.")
        if ulysses > 1:  # each tensor shard's heads are what the all-to-all splits
            check_ulysses_heads(m.n_heads // tp, kv.per_shard, ulysses, tensor=tp)
    if megatron_sp and seq_len % (tp * n_seq):
        raise ConfigError(f"config.data.seq_len={seq_len} does not split over mesh.tensor={tp} "
                          f"x mesh.sequence={n_seq}: Megatron sequence parallelism "
                          "(sharding.megatron_sp) shards the residual stream's sequence over "
                          f"`tensor` too; use a multiple of {tp * n_seq}.")
    per_micro = cfg.data.batch_size // cfg.train.microbatches
    if per_micro % dp:
        raise ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {per_micro} rows per microbatch do not split over the "
            f"{dp} data-parallel devices (mesh.data x mesh.fsdp x mesh.expert): make it a "
            f"multiple of {dp}.")


def check_experts(moe: ml_collections.ConfigDict, mlp_dim: int, expert: int, tensor: int) -> None:
    """A MoE layer's experts split over `expert` devices, and each expert's MLP over `tensor`."""
    if expert > 1 and not moe.n_routed_experts:
        raise ConfigError(f"mesh.expert={expert} splits a mixture-of-experts model's experts, "
                          "but config.model.moe.n_routed_experts=0 (a dense model): use "
                          "mesh.data or mesh.fsdp for data parallelism, or give the model experts.")
    if moe.n_routed_experts % expert:
        raise ConfigError(f"config.model.moe.n_routed_experts={moe.n_routed_experts} does not "
                          f"split over mesh.expert={expert}: each expert-parallel device holds "
                          f"the same number of experts, so make it a multiple of {expert}.")
    width = moe.expert_mlp_dim or mlp_dim
    if moe.n_routed_experts and width % tensor:
        field = "model.moe.expert_mlp_dim" if moe.expert_mlp_dim else "model.mlp_dim"
        raise ConfigError(f"config.{field}={width} (each expert's hidden width) does not split "
                          f"over mesh.tensor={tensor}: make it a multiple of {tensor}.")


def check_backend(cfg: ml_collections.ConfigDict) -> None:
    """Kernels that need a device kind: `attention.impl='cudnn'` runs on GPUs only."""
    if cfg.attention.impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"config.attention.impl='cudnn' needs a GPU (the backend is "
                          f"{jax.default_backend()!r}); use blockwise, xla or reference.")


def path_name(path: tuple) -> str:
    """A pytree path as 'blocks/attn/wq' (for messages)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def check_param_split(path: tuple, shape: tuple[int, ...], names: PartitionSpec,
                      spec: PartitionSpec, mesh_sizes: Mapping[str, int]) -> None:
    """Every dim of a parameter splits evenly over the mesh axes `spec` gives it."""
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=False)):
        if size % axes_size(mesh_sizes, axes):
            raise ConfigError(
                f"parameter {path_name(path)} {tuple(shape)} (logical {tuple(names)}): dim "
                f"{dim} of size {size} does not split over mesh axes {axes} of size "
                f"{axes_size(mesh_sizes, axes)}; change the mesh or the model size.")


def check_intent(logical_specs, shardings, mesh: Mesh, *, zero_stage: int,
                 n_kv_heads: int) -> None:
    """Fail loudly when a weight matrix is left unsharded on an axis the mesh means to use.

    Matrices (the `embed` dim and another besides `layers`) must be split over `fsdp` when it is
    > 1 under ZeRO-3, over `expert` when it is > 1 and they hold experts, and over `tensor`
    when it is > 1, except KV projections whose heads
    `kv_heads_on_tensor` replicates and LoRA adapters whose base weight splits over `tensor`
    only on the dims the adapter does not have (A of q [D, R], B of o [R, D]: rank-wide).
    `logical_specs`: the parameters' logical names (`shardings.logical_specs`), `shardings`
    their NamedShardings.
    """
    wanted = [axis for axis in ("fsdp", "tensor") if mesh.shape[axis] > 1
              and (axis != "fsdp" or zero_stage == 3)]
    expert_parallel = mesh.shape.get("expert", 1) > 1
    kv_replicated = not kv_heads_on_tensor(n_kv_heads, mesh.shape["tensor"]).split
    missing = []

    def check(path, names: PartitionSpec, sharding: NamedSharding) -> None:
        if "embed" not in names or sum(n not in (None, "layers") for n in names) < 2:
            return  # norms and biases: vectors per layer (the planner counts them replicated)
        used = set(jax.tree.leaves(tuple(sharding.spec)))
        for axis in wanted:
            exempt = axis == "tensor" and (("kv_heads" in names and kv_replicated)
                                           or LORA_RANK in names)
            if axis not in used and not exempt:
                missing.append(f"{path_name(path)} {tuple(names)} is not split over `{axis}`")
        if expert_parallel and "expert" in names and "expert" not in used:
            missing.append(f"{path_name(path)} {tuple(names)} is not split over `expert`")

    jax.tree.map_with_path(check, logical_specs, shardings,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
    if missing:
        raise GigajaxError("the sharding rules leave large parameters unsharded against the "
                           "layout: " + "; ".join(missing) + ". Fix the rule table in "
                           "gigajax/parallel/rules.py.")
