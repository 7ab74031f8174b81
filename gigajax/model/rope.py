"""Rotary position embeddings (Su et al. 2021) with position interpolation and YaRN scaling.

Rotate-half convention (as in HF LLaMA): the head dimension is split in two halves that rotate
together, `x * cos + rotate_half(x) * sin` with `rotate_half(x) = concat(-x2, x1)`. Positions are
*global* token positions, so sequence-parallel layouts that permute tokens keep RoPE exact.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     original_max_seq_len: int = 0, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> tuple[jnp.ndarray, float]:
    """Inverse frequencies [E/2] and the attention scale `mscale` that multiplies cos and sin.

    - none: theta^(-2i/E).
    - linear: position interpolation (Chen et al. 2023), every frequency divided by `factor`.
    - yarn: "NTK-by-parts" (Peng et al. 2023, eq. 17-20): dimensions whose wavelength is short
      compared with the original context (r > beta_fast rotations) keep their frequency, long ones
      (r < beta_slow) are interpolated by `factor`, a linear ramp in between; and attention
      logits are scaled by mscale^2 with mscale = 0.1 ln(factor) + 1.
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling == "none":
        return inv_freq, 1.0
    if scaling == "linear":
        return inv_freq / factor, 1.0
    if scaling == "yarn":
        rotations = original_max_seq_len * inv_freq / (2 * math.pi)  # r(d) = L / wavelength
        keep = jnp.clip((rotations - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)  # gamma(r)
        scaled = (1.0 - keep) * inv_freq / factor + keep * inv_freq
        return scaled, 0.1 * math.log(factor) + 1.0
    raise ValueError(f"unknown RoPE scaling {scaling!r}")


def rope_cos_sin(positions_BT: jnp.ndarray, inv_freq: jnp.ndarray,
                 mscale: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [B, T, E] for integer positions, in float32."""
    angles_BTf = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTE = jnp.concatenate([angles_BTf, angles_BTf], axis=-1)
    return jnp.cos(angles_BTE) * mscale, jnp.sin(angles_BTE) * mscale


def apply_rope(x_BTNE: jnp.ndarray, cos_BTE: jnp.ndarray, sin_BTE: jnp.ndarray) -> jnp.ndarray:
    """Rotate queries or keys [B, T, N heads, E] by position; computed in float32."""
    x = x_BTNE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTE[:, :, None, :], sin_BTE[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BTNE.dtype)
