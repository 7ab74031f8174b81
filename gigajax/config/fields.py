"""What every config field accepts: its type and range or choices (`FIELDS`), and the fields that
only apply under another field's value (`APPLIES_ONLY`).

`FIELDS` has one entry per leaf of `base_config()` (a test holds them equal), so a new field
cannot be added without saying what it accepts. Booleans are not integers here, and a float
field refuses inf and NaN: no field of a config has a use for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gigajax.config.schema import (
    ATTENTION_IMPLS,
    DATA_SOURCES,
    DTYPES,
    MOE_DISPATCHES,
    MOE_ROUTER_SCORES,
    MOMENT_DTYPES,
    NONFINITE_POLICIES,
    OBJECTIVES,
    OPTIMIZERS,
    OVERLONG_POLICIES,
    PACKINGS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    SCHEDULES,
    SEQUENCE_LAYOUTS,
    SP_IMPLS,
    ZERO_STAGES,
)

SEED_LIMIT = 2**31 - 1  # numpy, grain and jax.random all take seeds in [0, 2**31)


@dataclasses.dataclass(frozen=True)
class Field:
    """One field's type (int, float, bool or str) and what values of that type it accepts:
    `choices`, or a range [low, high] (each end open when `*_open`), plus `extra` values outside
    it (mesh sizes: -1) and None when `none_ok`. `means` explains the number in the message."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    extra: tuple = ()
    none_ok: bool = False
    means: str = ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if not self._has_kind(value):
            return False
        if value in self.extra or (self.choices and value in self.choices):
            return True
        if self.choices:
            return False
        if self.kind in (int, float):
            if not math.isfinite(value):
                return False
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return False
            if self.high is not None and (value > self.high
                                          or (self.high_open and value == self.high)):
                return False
        return True

    def _has_kind(self, value: Any) -> bool:
        if isinstance(value, bool):
            return self.kind is bool
        if self.kind is float:
            return isinstance(value, int | float)
        return isinstance(value, self.kind)

    def allowed(self) -> str:
        """What to write instead, for the error message."""
        if self.choices:
            text = f"choose one of {', '.join(repr(c) for c in self.choices)}"
        elif self.kind is bool:
            text = "use True or False"
        elif self.kind is str:
            text = "use a string"
        else:
            text = f"use {'an integer' if self.kind is int else 'a finite number'}{self._range()}"
            if self.extra:
                text += f", or {' or '.join(repr(e) for e in self.extra)}"
        if self.none_ok:
            text += " (or None)"
        return f"{text}{': ' + self.means if self.means else ''}"

    def _range(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f" in {left}{low}, {high}{right}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {high}"
        return ""


def _number(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else repr(x))


def count(low: int = 1, **kw: Any) -> Field:
    """An integer >= low (1: a positive count)."""
    return Field(int, low=low, **kw)


def number(low: float | None = None, high: float | None = None, **kw: Any) -> Field:
    """A finite float in a range."""
    return Field(float, low=low, high=high, **kw)


def fraction(**kw: Any) -> Field:
    """A float in [0, 1] (ends open with low_open / high_open)."""
    return Field(float, low=0.0, high=1.0, **kw)


def choice(options: tuple, **kw: Any) -> Field:
    return Field(type(options[0]), choices=options, **kw)


FLAG = Field(bool)
TEXT = Field(str)
MESH_SIZE = count(extra=(-1,), means="-1 takes the rest of the devices")

FIELDS: dict[str, Field] = {
    "model.vocab_size": count(),
    "model.d_model": count(),
    "model.n_layers": count(),
    "model.n_heads": count(),
    "model.n_kv_heads": count(),
    "model.head_dim": count(0, means="0 is d_model // n_heads"),
    "model.mlp_dim": count(),
    "model.max_seq_len": count(),
    "model.rope_theta": number(0.0, low_open=True),
    "model.rope_scaling.type": choice(ROPE_SCALINGS),
    "model.rope_scaling.factor": number(1.0, means="1 means no scaling"),
    "model.rope_scaling.original_max_seq_len": count(
        0, means="0 is max_seq_len / factor, else the pretraining context"),
    "model.rope_scaling.beta_fast": number(0.0, low_open=True),
    "model.rope_scaling.beta_slow": number(0.0, low_open=True),
    "model.rope_scaling.truncate": FLAG,
    "model.rope_scaling.attention_factor": number(0.0, means="0 is derived from the factor"),
    "model.rope_scaling.mscale": number(0.0, means="0 is unset"),
    "model.rope_scaling.mscale_all_dim": number(0.0, means="0 is unset"),
    "model.rope_scaling.low_freq_factor": number(0.0, low_open=True),
    "model.rope_scaling.high_freq_factor": number(0.0, low_open=True),
    "model.sliding_window": count(0, means="0 is full causal attention"),
    "model.qkv_bias": FLAG,
    "model.qk_norm": FLAG,
    "model.tie_embeddings": FLAG,
    "model.norm_eps": number(0.0, low_open=True),
    "model.init_std": number(0.0, low_open=True),
    "model.dtype": choice(DTYPES),
    "model.scan_layers": FLAG,
    "model.remat": choice(REMAT_POLICIES),
    "model.lora.rank": count(0, means="0 turns LoRA off"),
    "model.lora.alpha": number(0.0, low_open=True, means="the update is scaled by alpha / rank"),
    "model.lora.dropout": fraction(high_open=True,
                                   means="dropout on the adapters' input while training"),
    "model.lora.targets": TEXT,
    "model.moe.n_routed_experts": count(0, means="0 keeps dense MLPs"),
    "model.moe.n_shared_experts": count(0),
    "model.moe.top_k": count(),
    "model.moe.expert_mlp_dim": count(0, means="0 is model.mlp_dim"),
    "model.moe.first_dense_layers": count(0),
    "model.moe.score": choice(MOE_ROUTER_SCORES),
    "model.moe.renormalize": FLAG,
    "model.moe.dispatch": choice(MOE_DISPATCHES, means="ragged is dropless; capacity drops "
                                 "what exceeds capacity_factor x T*K/X per expert"),
    "model.moe.capacity_factor": number(0.0, low_open=True),
    "model.moe.aux_loss_weight": number(0.0),
    "model.moe.bias_update_rate": number(0.0),
    "model.moe.z_loss_weight": number(0.0),
    "attention.impl": choice(ATTENTION_IMPLS),
    "attention.block_q": count(),
    "attention.block_kv": count(),
    "attention.sp_impl": choice(SP_IMPLS),
    "attention.layout": choice(SEQUENCE_LAYOUTS),
    "attention.ulysses_degree": count(means="the all-to-all part of mesh.sequence in hybrid"),
    "data.source": choice(DATA_SOURCES),
    "data.tokenizer": TEXT,
    "data.path": TEXT,
    "data.mixture": TEXT,
    "data.seq_len": count(),
    "data.batch_size": count(),
    "data.val_fraction": fraction(low_open=True, high_open=True),
    "data.max_bytes": count(0, means="0 reads the whole corpus"),
    "data.fim_rate": fraction(),
    "data.packing": choice(PACKINGS, means="auto is whole for SFT and DPO data, else stream"),
    "data.overlong": choice(OVERLONG_POLICIES, means="an example longer than a whole-packed "
                            "window: refuse the run, or skip it (counted in the log)"),
    "data.passkey.key_digits": count(1, high=32, means="the PassKey benchmark uses 5"),
    "data.passkey.min_key_digits": count(0, high=32, means="0 is data.passkey.key_digits"),
    "data.passkey.text_weight": fraction(means="0 puts the loss on the answer only"),
    "data.passkey.short_rate": fraction(),
    "train.steps": count(),
    "train.microbatches": count(),
    "train.log_every": count(),
    "train.eval_every": count(),
    "train.eval_batches": count(),
    "train.checkpoint_every": count(),
    "train.seed": count(0, high=SEED_LIMIT),
    "train.z_loss": number(0.0),
    "train.peak_flops_per_device": number(0.0, means="0 is the device's known peak"),
    "train.nonfinite": choice(NONFINITE_POLICIES),
    "train.loss_chunks": count(),
    "train.init_from": TEXT,
    "train.objective": choice(OBJECTIVES, means="dpo trains on `data prepare --dpo` pairs"),
    "dpo.beta": number(0.0, low_open=True, means="the DPO temperature; 0.1 is common"),
    "dpo.label_smoothing": number(0.0, 0.5, high_open=True,
                                  means="the assumed share of flipped preference labels"),
    "optim.name": choice(OPTIMIZERS),
    "optim.lr": number(0.0, 1.0, low_open=True,
                       means="the peak step size of a normalised optimizer (adamw, lion, "
                             "adafactor): above 1 every weight would move by more than 1 a "
                             "step, and the update could overflow float32"),
    "optim.warmup_steps": count(0, means="longer than train.steps warms up over the whole run"),
    "optim.schedule": choice(SCHEDULES),
    "optim.min_lr_ratio": fraction(),
    "optim.wsd_decay_fraction": fraction(low_open=True,
                                         means="the share of train.steps that wsd decays over"),
    "optim.b1": fraction(high_open=True),
    "optim.b2": fraction(high_open=True),
    "optim.eps": number(0.0, low_open=True),
    "optim.weight_decay": number(0.0),
    "optim.clip_norm": number(0.0, none_ok=True, means="0 or None turns clipping off"),
    "optim.moment_dtype": choice(MOMENT_DTYPES),
    "optim.decay_norms_and_embeddings": FLAG,
    "mesh.data": MESH_SIZE,
    "mesh.fsdp": MESH_SIZE,
    "mesh.expert": MESH_SIZE,
    "mesh.sequence": MESH_SIZE,
    "mesh.tensor": MESH_SIZE,
    "sharding.zero_stage": choice(ZERO_STAGES,
                                  means="3 is FSDP, 1 shards the optimizer state only"),
    "sharding.megatron_sp": FLAG,
    "checkpoint.max_to_keep": count(),
    "checkpoint.keep_every": count(0, means="0 keeps only the last checkpoint.max_to_keep"),
    "checkpoint.async_save": FLAG,
    "checkpoint.require_checksums": FLAG,
}

# field -> (the field it depends on, the values under which it means something). A field of
# APPLIES_ONLY set away from its default while the other field has another value is refused: it
# is chosen together with that value (a RoPE factor with a scaling, a data path with prepared
# data). A field of USED_ONLY is often set by a config file for one choice and then switched on
# the command line (`--config.optim.name=lion` on a tuned AdamW config, prepared data on
# configs/tiny.py, which caps the stdlib corpus): the run says in its log that it is unused.
SCALED = tuple(t for t in ROPE_SCALINGS if t != "none")  # the scalings with a factor
APPLIES_ONLY: dict[str, tuple[str, tuple]] = {
    "data.path": ("data.source", ("prepared",)),
    "data.mixture": ("data.source", ("prepared",)),
    "data.packing": ("data.source", ("prepared",)),
    "data.overlong": ("data.source", ("prepared",)),
    "data.passkey.key_digits": ("data.source", ("passkey",)),
    "data.passkey.min_key_digits": ("data.source", ("passkey",)),
    "data.passkey.text_weight": ("data.source", ("passkey",)),
    "data.passkey.short_rate": ("data.source", ("passkey",)),
    "model.rope_scaling.factor": ("model.rope_scaling.type", SCALED),
    "model.rope_scaling.original_max_seq_len": ("model.rope_scaling.type", SCALED),
    "model.rope_scaling.beta_fast": ("model.rope_scaling.type", ("yarn",)),
    "model.rope_scaling.beta_slow": ("model.rope_scaling.type", ("yarn",)),
    "model.rope_scaling.truncate": ("model.rope_scaling.type", ("yarn",)),
    "model.rope_scaling.attention_factor": ("model.rope_scaling.type", ("yarn",)),
    "model.rope_scaling.mscale": ("model.rope_scaling.type", ("yarn",)),
    "model.rope_scaling.mscale_all_dim": ("model.rope_scaling.type", ("yarn",)),
    "model.rope_scaling.low_freq_factor": ("model.rope_scaling.type", ("llama3",)),
    "model.rope_scaling.high_freq_factor": ("model.rope_scaling.type", ("llama3",)),
    "attention.ulysses_degree": ("attention.sp_impl", ("hybrid",)),
    "model.moe.capacity_factor": ("model.moe.dispatch", ("capacity",)),
    "optim.wsd_decay_fraction": ("optim.schedule", ("wsd",)),
    "dpo.beta": ("train.objective", ("dpo",)),
    "dpo.label_smoothing": ("train.objective", ("dpo",)),
}
USED_ONLY: dict[str, tuple[str, tuple]] = {
    "data.val_fraction": ("data.source", ("stdlib",)),
    "data.max_bytes": ("data.source", ("stdlib",)),
    "optim.min_lr_ratio": ("optim.schedule", ("cosine", "linear", "wsd")),
    "optim.b1": ("optim.name", ("adamw", "lion")),
    "optim.b2": ("optim.name", ("adamw", "lion")),
    "optim.eps": ("optim.name", ("adamw",)),
    "optim.moment_dtype": ("optim.name", ("adamw", "lion")),
}
