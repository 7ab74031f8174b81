"""The config's schema: `base_config()` (the ConfigDict users edit, override and save), the
values each choice field accepts, and the typed frozen sections the code reads.

A config is an `ml_collections.ConfigDict` with sections model, attention, data, train, optim,
mesh, sharding, checkpoint; `configs/*.py` start from `base_config()` and override what differs.
The choice tuples here are the single list of what a field accepts: `validate.py` checks against
them and the layers that implement each choice (ops, parallel, model, train) are tested to
implement exactly these.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from gigajax.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on GPU/TPU, float32 on CPU
# as `transformers` defines each (modeling_rope_utils.py); model/rope.py says the formulas
ROPE_SCALINGS = ("none", "linear", "yarn", "llama3", "dynamic")
REMAT_POLICIES = ("none", "dots", "minimal", "full")  # model/remat.py says what each keeps
ATTENTION_IMPLS = ("reference", "blockwise", "xla", "cudnn")  # ops/attention.py
SP_IMPLS = ("ring", "ulysses", "hybrid")  # sequence parallelism over mesh.sequence
SEQUENCE_LAYOUTS = ("contiguous", "striped", "zigzag")  # ops/layouts.py
# the config's mesh.* fields, outer to inner
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
ZERO_STAGES = (1, 3)
DATA_SOURCES = ("stdlib", "prepared", "passkey")
# auto: whole for data with a loss mask (SFT, DPO pairs), stream for text (data/packing.py)
PACKINGS = ("auto", "stream", "whole")
OVERLONG_POLICIES = ("error", "skip")  # an example longer than a whole-packed window
OBJECTIVES = ("lm", "dpo")  # train/objectives.py
NONFINITE_POLICIES = ("skip", "stop")
OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
MOMENT_DTYPES = ("float32", "bfloat16")
# LoRA targets (model/lora.py): the projections, and shorthands for groups of them
LORA_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
               "all": LORA_PROJECTIONS}


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every config; each config file overrides what differs."""
    c = ml_collections.ConfigDict()
    c.model = dict(
        vocab_size=384,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        head_dim=0,  # 0: d_model // n_heads
        mlp_dim=768,
        max_seq_len=1024,
        rope_theta=10_000.0,
        # type: none | linear (position interpolation, Chen et al. 2023) | yarn (Peng et al. 2023)
        # | llama3 (Llama 3.1) | dynamic (dynamic NTK), each as `transformers` computes it.
        # original_max_seq_len: the context the model was (pre)trained at; 0 = max_seq_len / factor
        # yarn: beta_fast, beta_slow, truncate (round the correction range), attention_factor
        # (0: from factor, mscale and mscale_all_dim); llama3: low/high_freq_factor
        rope_scaling=dict(type="none", factor=1.0, original_max_seq_len=0,
                          beta_fast=32.0, beta_slow=1.0, truncate=True, attention_factor=0.0,
                          mscale=0.0, mscale_all_dim=0.0, low_freq_factor=1.0,
                          high_freq_factor=4.0),
        sliding_window=0,  # 0: full causal attention
        qkv_bias=False,  # biases on the q, k and v projections (Qwen2)
        qk_norm=False,  # RMSNorm over each head of q and k before RoPE (Qwen3)
        tie_embeddings=False,
        norm_eps=1e-5,
        init_std=0.02,
        dtype="auto",  # compute dtype (auto: bf16 on accelerators, fp32 on CPU); params fp32
        scan_layers=True,
        remat="none",  # none | full | dots | minimal
        # LoRA (Hu et al. 2021, model/lora.py): rank 0 = off; > 0 adds x A B * alpha / rank to
        # each projection named in `targets` (q,k,v,o,gate,up,down, or attention | mlp | all,
        # comma-separated) and trains only the adapters; dropout on the adapters' input
        lora=dict(rank=0, alpha=16.0, dropout=0.0, targets="all"),
        # mixture of experts (model/moe.py; DeepSeekMoE): n_routed_experts 0 = dense MLPs.
        # Each token goes to top_k routed experts of width expert_mlp_dim (0: mlp_dim), and
        # through n_shared_experts more; the first first_dense_layers blocks stay dense.
        # score softmax | sigmoid; renormalize: top-k weights over their sum; dispatch ragged
        # (dropless) | capacity (GShard, capacity_factor x T*K/X slots per expert). The loss
        # adds aux_loss_weight x the Switch balance loss and z_loss_weight x the router z-loss.
        # bias_update_rate > 0: DeepSeek-V3's auxiliary-loss-free balancing, each step every
        # expert's routing bias moves by the rate towards balance (0.001 in DeepSeek-V3).
        moe=dict(n_routed_experts=0, n_shared_experts=0, top_k=2, expert_mlp_dim=0,
                 first_dense_layers=0, score="softmax", renormalize=True, dispatch="ragged",
                 capacity_factor=1.25, aux_loss_weight=0.01, z_loss_weight=0.0,
                 bias_update_rate=0.0),
    )
    # sequence parallelism over mesh.sequence (see gigajax/ops/ring.py, ulysses.py, layouts.py):
    # sp_impl ring | ulysses | hybrid (Ulysses degree `ulysses_degree` inside a ring);
    # layout contiguous | striped | zigzag: which tokens each ring device holds
    c.attention = dict(impl="blockwise", block_q=512, block_kv=512, sp_impl="ring",
                       layout="zigzag", ulysses_degree=1)
    # source stdlib | prepared (`gigajax data prepare` output: data.path, or data.mixture
    # 'DIR=WEIGHT,DIR=WEIGHT'); tokenizer auto: byte for stdlib, the manifest's for prepared.
    # val_fraction, max_bytes: stdlib only. fim_rate: share of documents rewritten for FIM.
    # source passkey: generated PassKey documents (data/synthetic.py) with keys of
    # min_key_digits (0: key_digits) to key_digits digits; the answer's tokens have loss weight 1,
    # the rest text_weight (0: answer only); short_rate: share without the instruction
    # packing stream: documents cut into windows regardless of their ends; whole: each window
    # holds whole examples (padded), one longer than a window refused or skipped (overlong)
    c.data = dict(source="stdlib", tokenizer="auto", path="", mixture="", seq_len=1024,
                  batch_size=8, val_fraction=0.05, max_bytes=0, fim_rate=0.0,
                  packing="auto", overlong="error",
                  passkey=dict(key_digits=5, min_key_digits=0, text_weight=0.0,
                               short_rate=0.0))
    c.train = dict(steps=1000, microbatches=1, log_every=10, eval_every=200, eval_batches=8,
                   checkpoint_every=200, seed=0, z_loss=0.0, peak_flops_per_device=0.0,
                   nonfinite="skip",  # NaN/Inf loss or grad norm: skip (drop the update) | stop
                   loss_chunks=1,  # > 1: head + loss over that many token slices (long context)
                   # a checkpoint (workdir, step dir, or `ckpt export` output) whose params start
                   # the run, with a fresh optimizer and step 0; unused once the run has its own
                   init_from="",
                   objective="lm")  # lm: next-token loss | dpo: preference pairs (c.dpo)
    # DPO (Rafailov et al. 2023) on `data prepare --dpo` pairs: beta scales the implicit reward;
    # label_smoothing eps: the share of pairs taken as mislabelled (conservative DPO)
    c.dpo = dict(beta=0.1, label_smoothing=0.0)
    # warmup_steps longer than train.steps is shortened to train.steps (with a note)
    # schedule wsd: flat after warmup, then linear to min_lr_ratio over the last
    # wsd_decay_fraction of the steps
    c.optim = dict(name="adamw", lr=3e-4, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1,
                   wsd_decay_fraction=0.2,
                   b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                   moment_dtype="float32", decay_norms_and_embeddings=False)
    # expert: each MoE layer's experts split over it (expert parallelism, model.moe), data
    # parallel for the rest of the model
    c.mesh = dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1)  # -1: the rest of the devices
    # zero_stage 3: parameters and optimizer state over `fsdp` (FSDP); 1: optimizer state only.
    # megatron_sp: split norm/residual activations over `tensor` too (Megatron sequence parallel).
    c.sharding = dict(zero_stage=3, megatron_sp=False)
    # keep the last max_to_keep checkpoints, plus every one whose step is a multiple of keep_every;
    # require_checksums: refuse to restore a checkpoint without checksums.json (else a warning)
    c.checkpoint = dict(max_to_keep=3, keep_every=0, async_save=True, require_checksums=True)
    return ml_collections.ConfigDict(c)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Typed view of `config.model.rope_scaling`, `original_max_seq_len` resolved."""

    type: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 0.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> RopeScaling:
        rs = model_cfg.rope_scaling
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {name: rs[name] for name in fields}
        values["original_max_seq_len"] = (rs.original_max_seq_len
                                          or int(model_cfg.max_seq_len / rs.factor))
        return cls(**{name: (float(v) if fields[name] == "float" else v)
                      for name, v in values.items()})


def lora_targets(text: str) -> tuple[str, ...]:
    """`model.lora.targets` ('q,v', 'attention,up', 'all') as projection names in model order;
    ConfigError naming the field when it names none or an unknown one."""
    allowed = (f"name projections among {', '.join(LORA_PROJECTIONS)} or the shorthands "
               f"{', '.join(LORA_GROUPS)}, comma-separated (e.g. 'q,v' or 'all')")
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in LORA_PROJECTIONS and n not in LORA_GROUPS]
    if not names or unknown:
        raise ConfigError(f"config.model.lora.targets={text!r} is not allowed: {allowed}.")
    chosen = {p for n in names for p in LORA_GROUPS.get(n, (n,))}
    return tuple(p for p in LORA_PROJECTIONS if p in chosen)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Typed view of `config.model.lora`; `targets` resolved to projection names."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the low-rank update (Hu et al. 2021, section 4.1)."""
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> LoRAConfig:
        lora = model_cfg.lora
        if not lora.rank:
            return cls()
        return cls(rank=lora.rank, alpha=float(lora.alpha), dropout=float(lora.dropout),
                   targets=lora_targets(lora.targets))


MOE_ROUTER_SCORES = ("softmax", "sigmoid")  # ops/moe_dispatch.route
MOE_DISPATCHES = ("ragged", "capacity")  # dropless grouped matmul, or GShard's fixed capacity


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts blocks (`model/moe.py`; DeepSeekMoE, Dai et al. 2024): X routed
    experts of width `expert_mlp_dim` of which each token uses `top_k`, plus shared experts
    every token uses. `n_routed_experts` 0: dense MLPs everywhere."""

    n_routed_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 2
    expert_mlp_dim: int = 0  # 0: model.mlp_dim
    first_dense_layers: int = 0  # the first layers keep a dense MLP
    score: str = "softmax"  # MOE_ROUTER_SCORES
    renormalize: bool = True  # the top-k weights divided by their sum
    dispatch: str = "ragged"  # MOE_DISPATCHES
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert over T*K/X
    aux_loss_weight: float = 0.01  # on the load-balancing loss, in the objective
    z_loss_weight: float = 0.0  # on the router z-loss, in the objective
    bias_update_rate: float = 0.0  # the routing bias's step towards balance (train step)

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> MoEConfig:
        m = model_cfg.moe
        if not m.n_routed_experts:
            return cls()
        return cls(n_routed_experts=m.n_routed_experts, n_shared_experts=m.n_shared_experts,
                   top_k=m.top_k, expert_mlp_dim=m.expert_mlp_dim,
                   first_dense_layers=m.first_dense_layers, score=m.score,
                   renormalize=m.renormalize, dispatch=m.dispatch,
                   capacity_factor=float(m.capacity_factor),
                   aux_loss_weight=float(m.aux_loss_weight),
                   z_loss_weight=float(m.z_loss_weight),
                   bias_update_rate=float(m.bias_update_rate))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Typed, frozen view of `config.model` (+ attention) that the model code reads."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_theta: float
    rope: RopeScaling
    sliding_window: int
    qkv_bias: bool
    qk_norm: bool
    tie_embeddings: bool
    norm_eps: float
    init_std: float
    dtype: str
    scan_layers: bool
    remat: str
    attention_impl: str
    block_q: int
    block_kv: int
    lora: LoRAConfig = LoRAConfig()  # rank 0: no adapters
    moe: MoEConfig = MoEConfig()  # no routed experts: dense

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> ModelConfig:
        """Resolve defaults (head_dim 0, dtype auto, YaRN original length 0) into values."""
        m = cfg.model
        return cls(
            vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, head_dim=head_dim(m), mlp_dim=m.mlp_dim,
            max_seq_len=m.max_seq_len, rope_theta=float(m.rope_theta),
            rope=RopeScaling.from_config(m), sliding_window=m.sliding_window,
            qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings,
            norm_eps=float(m.norm_eps), init_std=float(m.init_std), dtype=compute_dtype(m.dtype),
            scan_layers=m.scan_layers, remat=m.remat, attention_impl=cfg.attention.impl,
            block_q=cfg.attention.block_q, block_kv=cfg.attention.block_kv,
            lora=LoRAConfig.from_config(m), moe=MoEConfig.from_config(m))


def head_dim(model_cfg: ml_collections.ConfigDict) -> int:
    """`model.head_dim`, or d_model // n_heads when it is 0."""
    return model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads


def compute_dtype(name: str) -> str:
    """`model.dtype` with 'auto' resolved: bfloat16 on GPU/TPU, float32 on CPU (this asks JAX
    for its backend, which starts it: call it after the devices are set up)."""
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def warmup_steps(cfg: ml_collections.ConfigDict) -> int:
    """The warmup the run uses: `optim.warmup_steps`, at most `train.steps` (a short try of a
    long config warms up over its whole length rather than being refused)."""
    return min(int(cfg.optim.warmup_steps), int(cfg.train.steps))


def fixed_device_count(mesh_cfg: ml_collections.ConfigDict) -> int | None:
    """The device count a mesh config asks for, or None when an axis is -1 (any count)."""
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    return None if -1 in sizes else math.prod(sizes)
