"""Optimizer and learning-rate schedule from the `optim` config: clip -> adamw | adafactor | lion.

Weight decay is decoupled and scaled by the schedule (AdamW, Loshchilov & Hutter 2019):
p <- p - lr_t * (u_t + wd * p). The decay mask skips norms, biases and embeddings unless
`optim.decay_norms_and_embeddings` is set; see `decay_mask` for the rule. The fields are checked
by `config/validate.py`; a warmup longer than the run is shortened to the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.schema.MOMENT_DTYPES
NO_DECAY_KEYS = ("norm", "bias", "embed")


def make_schedule(
    lr: float, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float,
    wsd_decay_fraction: float,
) -> optax.Schedule:
    """Linear warmup 0 -> lr, then cosine/linear decay to lr*min_lr_ratio, or flat; or `wsd`
    (warmup-stable-decay, Hu et al. 2024): flat at lr, then a linear decay over the last
    `wsd_decay_fraction` of the steps (a long flat phase, and a short one that settles)."""
    end = lr * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    wsd_steps = max(round(wsd_decay_fraction * total_steps), 1)
    wsd_start = max(total_steps - wsd_steps, warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        """Learning rate at optimizer step `step` (0-based; step warmup_steps is the peak)."""
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if kind == "cosine":  # end + (lr - end) * (1 + cos(pi * frac)) / 2
            after = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        elif kind == "linear":
            after = lr + (end - lr) * frac
        elif kind == "wsd":
            settle = jnp.clip((step - wsd_start) / max(total_steps - wsd_start, 1), 0.0, 1.0)
            after = lr + (end - lr) * settle
        else:
            after = jnp.full_like(frac, lr)
        return jnp.where(step < warmup_steps, warm, after)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight-decay mask (True = decay); norms, biases and embeddings are skipped.

    A leaf gets no decay when its path (`keystr`, lower-cased) contains 'norm', 'bias' or 'embed',
    or when it has ndim <= 1. The path test matters because blocks stacked for `nnx.scan` hold norm
    scales as [n_layers, D] and biases as [n_layers, F]: 2-D, yet still norms and biases.
    Works on plain dicts and on an `nnx.State` of Params (Variables are pytree nodes).
    """

    def decay(path: tuple, leaf: Any) -> bool:
        name = jax.tree_util.keystr(path).lower()
        ndim = len(getattr(leaf, "shape", ()))
        return ndim > 1 and not any(key in name for key in NO_DECAY_KEYS)

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(
    optim_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build clip -> optimizer (with schedule and masked decoupled weight decay) from `optim`.

    adafactor: `lr` is an absolute step size (multiply_by_parameter_scale=False), like adamw's; it
    keeps no first moment (momentum=None, the memory-saving default), so `moment_dtype` is ignored;
    its factored second moments are float32. `b1`, `b2`, `eps` are not used by adafactor (its eps is
    the RMS floor 1e-30). Its decay goes through `weight_decay_rate=wd * schedule`, which optax adds
    after the lr scaling, so the update is -lr_t * (u_t + wd * p) as in adamw.
    """
    cfg = optim_cfg  # field-checked by config.validate
    warmup = min(cfg.warmup_steps, total_steps)  # a short try of a long config still warms up
    schedule = make_schedule(cfg.lr, warmup, total_steps, cfg.schedule, cfg.min_lr_ratio,
                             cfg.get("wsd_decay_fraction", 0.2))
    mask: Callable[[Any], Any] | None = (
        None if cfg.get("decay_norms_and_embeddings", False) else decay_mask
    )
    mu_dtype = MOMENT_DTYPES[cfg.moment_dtype]
    wd = float(cfg.weight_decay)

    if cfg.name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            mu_dtype=mu_dtype,
            weight_decay=wd,
            mask=mask,
        )
    elif cfg.name == "lion":
        opt = optax.lion(
            schedule, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype, weight_decay=wd, mask=mask
        )
    else:
        opt = optax.adafactor(
            learning_rate=schedule,
            multiply_by_parameter_scale=False,
            weight_decay_rate=(lambda count: wd * schedule(count)) if wd > 0 else None,
            weight_decay_mask=mask,
        )
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    return optax.chain(clip, opt), schedule
