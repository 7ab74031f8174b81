"""The model's weights as data: every parameter's path, shape and logical axis names, read off
the Decoder itself by `jax.eval_shape` (nothing is allocated). The planner and the FLOP counter
read this list, so a new parameter is counted the moment the model has it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.decoder import Decoder
from gigajax.model.lora import is_adapter
from gigajax.model.moe import ROUTING_BIAS
from gigajax.parallel.shardings import abstract_model, logical_specs


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter array: its path in the model ('blocks/attn/wq'), shape and logical names.
    Layer weights carry a leading `layers` axis (they are stacked for the layer scan)."""

    path: str
    shape: tuple[int, ...]
    names: tuple[str | None, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def per_layer(self) -> bool:
        return bool(self.names) and self.names[0] == "layers"

    @property
    def is_adapter(self) -> bool:
        """A LoRA adapter (A or B of `model/lora.py`): trained while the rest is frozen."""
        return is_adapter(self.path)

    @property
    def is_matrix(self) -> bool:
        """A projection, the embedding or the head: the `embed` dim and another one besides
        `layers` (biases [H, E] and norms are vectors per layer, not matrices; LoRA adapters
        are counted on their own)."""
        return ("embed" in self.names and sum(n != "layers" for n in self.names) >= 2
                and not self.is_adapter)


@functools.lru_cache(maxsize=64)
def weights(cfg: ModelConfig) -> tuple[Weight, ...]:
    """Every parameter of the decoder of `cfg`, in the model's own order."""
    _, abstract = abstract_model(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    specs = nnx.to_flat_state(logical_specs(abstract))
    shapes = dict(nnx.to_flat_state(abstract))
    return tuple(Weight("/".join(map(str, path)), tuple(shapes[path].shape),
                        tuple(spec.get_value())) for path, spec in specs)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the decoder (not the MoE routing bias: state the train step sets, not a
    weight; the planner counts its bytes)."""
    return sum(w.size for w in weights(cfg) if not w.path.endswith(ROUTING_BIAS))


def adapter_params(cfg: ModelConfig) -> int:
    """Parameters of the LoRA adapters (0 without LoRA): what a LoRA run trains."""
    return sum(w.size for w in weights(cfg) if w.is_adapter)


def matmul_params(cfg: ModelConfig) -> float:
    """Parameters that take part in a matmul per token: every matrix but the input embedding
    table, which is a lookup (with tied embeddings it is also the LM head, and counts). Of the
    routed experts' weights (an `expert` dim) a token uses top_k / n_routed_experts: the
    active, not the total, parameters."""
    lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    active = cfg.moe.top_k / cfg.moe.n_routed_experts if cfg.moe.n_routed_experts else 1.0
    return sum(w.size * (active if "expert" in w.names else 1.0)
               for w in weights(cfg) if w.is_matrix) - lookup
