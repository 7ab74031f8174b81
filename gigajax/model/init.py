"""Weight initialisers shared by the blocks (GPT-2 / LLaMA practice)."""

from collections.abc import Callable

from flax import nnx

from gigajax.config import ModelConfig


def weight_init(cfg: ModelConfig) -> Callable:
    """Normal(0, init_std) for input projections and embeddings."""
    return nnx.initializers.normal(cfg.init_std)


def residual_init(cfg: ModelConfig) -> Callable:
    """Normal(0, init_std / sqrt(2 L)) for projections that write into the residual stream."""
    return nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)
