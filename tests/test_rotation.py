"""Randomised Walsh-Hadamard rotation: orthogonal, exactly invertible, reproducible public
signs, and it flattens spikes. The Hadamard matrix comes from scipy.linalg (independent
oracle), not from our transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.rotation import fwht, padded_dim, rotate, rotation_signs, unrotate

SEED = bytes(range(32))


def test_padded_dim():
    assert [padded_dim(d) for d in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [
        1, 2, 4, 4, 8, 1024, 1024, 2048]
    for bad in (0, -3, 2.0, True, 2**41):
        with pytest.raises(PrivacyError, match="dimension"):
            padded_dim(bad)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 64])
def test_fwht_matches_scipy_hadamard(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n))
    expected = x @ (hadamard(n) / math.sqrt(n)).T
    np.testing.assert_allclose(fwht(x), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fwht(fwht(x)), x, rtol=0, atol=1e-12)  # involution


def test_fwht_rejects_bad_lengths():
    with pytest.raises(PrivacyError, match="power of two"):
        fwht(np.ones(6))
    with pytest.raises(PrivacyError):
        fwht(np.float64(1.0))


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), context=st.integers(0, 99))
def test_rotation_is_orthogonal_and_exactly_inverted(dim, seed, context):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim) * 10.0 ** rng.uniform(-3, 3)
    signs = rotation_signs(seed.to_bytes(4, "little") * 8, dim, context)
    y = rotate(x, signs)
    assert y.shape == (padded_dim(dim),)
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    back = unrotate(y, signs, dim)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-12 * max(1.0, np.abs(x).max()))


def test_rotation_of_a_batch_equals_row_by_row():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(5, 37))
    signs = rotation_signs(SEED, 37, 3)
    batch = rotate(xs, signs)
    for i in range(5):
        np.testing.assert_allclose(batch[i], rotate(xs[i], signs), atol=1e-14)
    np.testing.assert_allclose(unrotate(batch, signs, 37), xs, atol=1e-12)


def test_rotation_is_linear_so_the_sum_of_rotations_is_the_rotated_sum():
    rng = np.random.default_rng(2)
    xs = rng.normal(size=(7, 100))
    signs = rotation_signs(SEED, 100)
    np.testing.assert_allclose(rotate(xs, signs).sum(axis=0), rotate(xs.sum(axis=0), signs),
                               atol=1e-12)


def test_signs_are_public_reproducible_and_domain_separated():
    a = rotation_signs(SEED, 1000, 5)
    assert a.shape == (1024,) and set(np.unique(a)) == {-1.0, 1.0}
    np.testing.assert_array_equal(a, rotation_signs(SEED, 1000, 5))
    assert not np.array_equal(a, rotation_signs(SEED, 1000, 6))
    assert not np.array_equal(a, rotation_signs(bytes(32), 1000, 5))
    assert abs(a.mean()) < 0.15  # balanced: 1024 fair signs, |mean| < 4.8 sigma
    with pytest.raises(PrivacyError, match="32 bytes"):
        rotation_signs(b"short", 10)


def test_rotate_and_unrotate_check_shapes_and_signs():
    signs = rotation_signs(SEED, 8)
    with pytest.raises(PrivacyError):
        rotate(np.ones(9), signs)
    with pytest.raises(PrivacyError):
        unrotate(np.ones(7), signs, 5)
    with pytest.raises(PrivacyError):
        unrotate(np.ones(8), signs, 9)
    with pytest.raises(PrivacyError, match="-1 or \\+1"):
        rotate(np.ones(8), signs * 0.5)
    with pytest.raises(PrivacyError, match="power-of-two"):
        rotate(np.ones(3), np.ones(3))


def test_a_spike_becomes_perfectly_flat():
    d, c = 1000, 2.5
    x = np.zeros(d)
    x[123] = c
    y = rotate(x, rotation_signs(SEED, d))
    np.testing.assert_allclose(np.abs(y), c / math.sqrt(1024), rtol=1e-12)


@pytest.mark.parametrize("shape", ["two_spikes", "block", "decay"])
def test_rotation_flattens_structured_vectors(shape):
    """max_j |(Ux)_j| <= C sqrt(2 ln(2n/p) / n) with probability >= 1 - p over the signs
    (Hoeffding + union bound, rotation.py docstring); typically ~ C sqrt(2 ln n / n)."""
    d, c, p, seeds = 3000, 1.0, 0.01, 200
    n = padded_dim(d)
    x = np.zeros(d)
    if shape == "two_spikes":
        x[[0, 1]] = 1.0
    elif shape == "block":
        x[:16] = 1.0
    else:
        x[:] = 1.0 / (1.0 + np.arange(d))
    x *= c / np.linalg.norm(x)
    assert np.abs(x).max() >= 0.2 * c  # spiky before rotation
    bound = c * math.sqrt(2 * math.log(2 * n / p) / n)
    maxima = np.array([np.abs(rotate(x, rotation_signs(s.to_bytes(32, "big"), d))).max()
                       for s in range(seeds)])
    assert np.sum(maxima > bound) <= 8  # expected <= seeds * p = 2
    assert np.median(maxima) <= 1.5 * c * math.sqrt(2 * math.log(n) / n)
