"""The MLP of a block: SwiGLU (Shazeer 2020), down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.layers import residual_init, weight_init
from gigajax.model.lora import project
from gigajax.parallel.shardings import constrain, param


class SwiGLU(nnx.Module):
    """Gated MLP: gate and up [D, F] (column-parallel over `mlp`), down [F, D] (row-parallel)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_dim
        init, out_init = weight_init(cfg), residual_init(cfg)
        self.w_gate = param(rngs, init, (D, F), ("embed", "mlp"))
        self.w_up = param(rngs, init, (D, F), ("embed", "mlp"))
        self.w_down = param(rngs, out_init, (F, D), ("mlp", "embed"))

    def __call__(self, x_BTD: jnp.ndarray, dropout_key: jax.Array | None = None) -> jnp.ndarray:
        """The MLP; each projection with its LoRA adapter if it has one (`model/lora.py`)."""
        gate_BTF = project(self, "w_gate", "BTD,DF->BTF", x_BTD, dropout_key)
        up_BTF = project(self, "w_up", "BTD,DF->BTF", x_BTD, dropout_key)
        hidden_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "inner_seq", "mlp"))
        return project(self, "w_down", "BTF,FD->BTD", hidden_BTF, dropout_key)
