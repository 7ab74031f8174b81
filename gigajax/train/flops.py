"""Model FLOPs per token and accelerator peaks, for MFU (convention in docs/mfu.md)."""

from __future__ import annotations

import jax

from gigajax.config import ModelConfig
from gigajax.model.inventory import adapter_params, matmul_params

# Dense bf16 peak FLOP/s per device from vendor datasheets (no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM convention: 6 N + 12 L H E T (no causal discount). Under
    LoRA the frozen weights cost 4 N (forward, and the input gradient; no weight gradient) and
    the adapters 6 N_lora."""
    context = min(seq_len, cfg.sliding_window) if cfg.sliding_window else seq_len
    weights = (4.0 * matmul_params(cfg) + 6.0 * adapter_params(cfg) if cfg.lora.rank
               else 6.0 * matmul_params(cfg))
    return weights + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def peak_flops_per_device(configured: float = 0.0) -> float:
    """`train.peak_flops_per_device` if set, else the datasheet peak of a known device, else 0."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), 0.0)
