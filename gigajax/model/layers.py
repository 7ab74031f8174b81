"""Small layers and initialisers shared by the blocks: RMSNorm, and the GPT-2 / LLaMA
initialisers (normal(init_std), and init_std / sqrt(2 L) for residual-writing projections)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.parallel.shardings import param


def weight_init(cfg: ModelConfig) -> Callable:
    """Normal(0, init_std) for input projections and embeddings."""
    return nnx.initializers.normal(cfg.init_std)


def residual_init(cfg: ModelConfig) -> Callable:
    """Normal(0, init_std / sqrt(2 L)) for projections that write into the residual stream."""
    return nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), statistics in float32."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs,
                 names: tuple[str, ...] = ("embed",)):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), names)
        self.eps = eps

    def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        """Normalise over the last dim (D, or E for per-head q/k norms)."""
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTD.dtype)
