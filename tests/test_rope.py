"""RoPE: scores depend on relative position only; PI and YaRN scale the frequencies as published."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gigajax.config import RopeScaling
from gigajax.model.rope import apply_rope, rope_cos_sin, rope_frequencies

E, THETA = 16, 10_000.0


def scaled(kind: str, factor: float, original: int) -> RopeScaling:
    return RopeScaling(type=kind, factor=factor, original_max_seq_len=original)


def rotated_scores(scaling, factor, q_pos, k_pos, original=64):
    """q . k after rotating one fixed q and k to positions q_pos and k_pos (lists)."""
    inv_freq, mscale = rope_frequencies(E, THETA, scaled(scaling, factor, original))
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, E))

    def at(x, positions):
        cos, sin = rope_cos_sin(jnp.asarray(positions)[None], inv_freq, mscale)
        return apply_rope(jnp.broadcast_to(x, (1, len(positions), 1, E)), cos, sin)[0, :, 0]

    return jnp.sum(at(q, q_pos) * at(k, k_pos), axis=-1)


@pytest.mark.parametrize("scaling,factor", [("none", 1.0), ("linear", 4.0), ("yarn", 4.0),
                                            ("llama3", 8.0), ("dynamic", 2.0)])
def test_scores_depend_only_on_relative_position(scaling, factor):
    q_pos, k_pos = [5, 105, 1005, 3], [2, 102, 1002, 9]  # offsets 3, 3, 3 and -6
    scores = np.asarray(rotated_scores(scaling, factor, q_pos, k_pos))
    np.testing.assert_allclose(scores[1:3], scores[0], rtol=1e-4)
    assert abs(scores[3] - scores[0]) > 1e-3  # a different offset gives a different score


def test_rope_rotates_pairs_of_halves_like_hf_llama():
    """x * cos + rotate_half(x) * sin with rotate_half(x) = concat(-x2, x1) (HF convention)."""
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, E))
    positions = jnp.array([[0, 1, 7]])
    inv_freq, _ = rope_frequencies(E, THETA)
    cos, sin = rope_cos_sin(positions, inv_freq)
    angles = np.asarray(positions)[0, :, None] * (THETA ** (-np.arange(0, E, 2) / E))
    x1, x2 = np.asarray(x)[..., : E // 2], np.asarray(x)[..., E // 2:]
    c, s = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    expected = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    np.testing.assert_allclose(apply_rope(x, cos, sin), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_rope(x, cos, sin)[:, 0], x[:, 0])  # position 0: identity


@pytest.mark.parametrize("scaling", ["linear", "yarn", "llama3"])  # dynamic grows theta anyway
def test_scalings_reduce_to_plain_rope_at_factor_one(scaling):
    plain = rope_frequencies(E, THETA)
    at_one = rope_frequencies(E, THETA, scaled(scaling, 1.0, 64), seq_len=4096)
    np.testing.assert_allclose(at_one[0], plain[0], rtol=1e-6)  # through the formula
    assert at_one[1] == plain[1] == 1.0


def test_position_interpolation_divides_every_frequency():
    plain, _ = rope_frequencies(E, THETA)
    divided, mscale = rope_frequencies(E, THETA, scaled("linear", 8.0, 64))
    np.testing.assert_allclose(divided, plain / 8.0, rtol=1e-7)
    assert mscale == 1.0


def test_yarn_keeps_high_frequencies_interpolates_low_ones_and_scales_attention():
    """Peng et al. 2023: r = L / wavelength; r > beta_fast kept, r < beta_slow divided by s (the
    ramp between runs over the dimension index, rounded outwards)."""
    factor, original = 8.0, 4096
    plain, _ = rope_frequencies(E, THETA)
    yarn, mscale = rope_frequencies(E, THETA, scaled("yarn", factor, original))
    rotations = np.asarray(original * plain / (2 * np.pi))
    high, low = rotations > 32.0, rotations < 1.0
    assert high.any() and low.any()
    np.testing.assert_allclose(np.asarray(yarn)[high], np.asarray(plain)[high], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(yarn)[low], np.asarray(plain)[low] / factor, rtol=1e-6)
    middle = ~high & ~low
    assert np.all(np.asarray(yarn)[middle] < np.asarray(plain)[middle])
    assert np.all(np.asarray(yarn)[middle] > np.asarray(plain)[middle] / factor)
    assert mscale == pytest.approx(0.1 * math.log(factor) + 1.0)


def test_llama3_keeps_short_wavelengths_divides_long_ones_and_blends_between():
    factor, original = 8.0, 512
    plain, _ = rope_frequencies(E, THETA)
    llama3, attention_factor = rope_frequencies(E, THETA, scaled("llama3", factor, original))
    wavelen = 2 * np.pi / np.asarray(plain)
    short, long = wavelen < original / 4.0, wavelen > original / 1.0
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_allclose(np.asarray(llama3)[short], np.asarray(plain)[short], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(llama3)[long], np.asarray(plain)[long] / factor,
                               rtol=1e-6)
    middle = ~short & ~long
    assert np.all(np.asarray(llama3)[middle] < np.asarray(plain)[middle])
    assert np.all(np.asarray(llama3)[middle] > np.asarray(plain)[middle] / factor)
    assert attention_factor == 1.0


def test_dynamic_ntk_changes_nothing_within_the_original_context_and_grows_theta_beyond():
    plain, _ = rope_frequencies(E, THETA)
    rope = scaled("dynamic", 2.0, 64)
    within, _ = rope_frequencies(E, THETA, rope, seq_len=64)
    np.testing.assert_allclose(within, plain, rtol=1e-7)
    beyond, _ = rope_frequencies(E, THETA, rope, seq_len=256)
    grown_theta = THETA * (2.0 * 256 / 64 - 1.0) ** (E / (E - 2))
    expected = 1.0 / grown_theta ** (np.arange(0, E, 2) / E)
    np.testing.assert_allclose(beyond, expected, rtol=1e-5)
    assert beyond[0] == plain[0] and np.all(beyond[1:] < plain[1:])


def test_every_scaling_has_a_title_in_the_passkey_heatmaps():
    from gigajax.config.schema import ROPE_SCALINGS
    from gigajax.eval.benchmark import TITLES

    assert set(TITLES) == set(ROPE_SCALINGS)
