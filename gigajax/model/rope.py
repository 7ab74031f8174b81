"""Rotary position embeddings (Su et al. 2021) and their context-extension scalings, each computed
as `transformers` computes it (`modeling_rope_utils.py`), so an imported checkpoint runs as it
ran there.

Rotate-half convention (as in HF LLaMA): the head dimension is split in two halves that rotate
together, `x * cos + rotate_half(x) * sin` with `rotate_half(x) = concat(-x2, x1)`. Positions are
*global* token positions, so sequence-parallel layouts that permute tokens keep RoPE exact.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from gigajax.config import RopeScaling

NO_SCALING = RopeScaling()


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = NO_SCALING,
                     seq_len: jnp.ndarray | int | None = None) -> tuple[jnp.ndarray, float]:
    """Inverse frequencies [E/2] and the attention factor that multiplies cos and sin.

    - none: theta^(-2i/E).
    - linear: position interpolation (Chen et al. 2023), every frequency divided by `factor`.
    - yarn: YaRN "NTK-by-parts" (Peng et al. 2023) as its reference code and `transformers`
      compute it: a linear ramp over the *dimension index* between the dimensions where the
      original context holds beta_fast and beta_slow rotations (rounded outwards when
      `truncate`); below it frequencies are kept, above it divided by `factor`. cos and sin are
      scaled by `attention_factor` (0: 0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio).
    - llama3 (Llama 3.1): wavelengths shorter than original / high_freq_factor are kept, longer
      than original / low_freq_factor divided by `factor`, a smooth blend in between.
    - dynamic (dynamic NTK): theta grows with the sequence length once it passes the original
      context, theta * (factor * n / original - (factor - 1))^(E / (E - 2)); `seq_len` is the
      longest position + 1 of the batch (transformers keeps the largest n it has seen instead:
      the same on any first call).
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = scaling.type
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "dynamic":
        original = scaling.original_max_seq_len
        n = original if seq_len is None else jnp.maximum(seq_len, original).astype(jnp.float32)
        base = theta * (scaling.factor * n / original - (scaling.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    raise ValueError(f"unknown RoPE scaling {kind!r}")


def yarn_attention_factor(scaling: RopeScaling) -> float:
    """YaRN's scale of cos and sin (so of the logits, squared): `attention_factor` when set,
    else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set (DeepSeek),
    else 0.1 ln(factor) + 1."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.attention_factor:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor,
                                                               scaling.mscale_all_dim)
    return mscale(scaling.factor)


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> tuple[jnp.ndarray, float]:
    """YaRN frequencies: interpolated / factor above the ramp, extrapolated (kept) below it."""
    def dim_of(rotations: float) -> float:  # the dimension index i at which L holds `rotations`
        return head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)  # (sic: transformers bounds by E - 1)
    if low == high:
        high += 0.001  # as transformers does, against a division by zero
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1.0 - ramp
    return interpolated * (1 - keep) + extrapolated * keep, yarn_attention_factor(s)


def _llama3(inv_freq: jnp.ndarray, s: RopeScaling) -> jnp.ndarray:
    """Llama 3.1's frequencies by wavelength against the original context."""
    original = s.original_max_seq_len
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, blended, scaled)


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
