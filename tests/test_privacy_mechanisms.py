"""Clipping, Gaussian noise, the AES-CTR normal source, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import PldAccountant, RdpAccountant
from lepton_ray.privacy.adaptive_clipping import (
    AdaptiveClipping,
    adaptive_clipping_event,
    split_noise_multiplier,
)
from lepton_ray.privacy.events import Gaussian, PoissonSampled, SelfComposed
from lepton_ray.privacy.mechanisms import (
    SecureNormalSource,
    add_gaussian_noise,
    clip_to_norm,
)

# ---------------------------------------------------------------- clipping


@settings(max_examples=200, deadline=None)
@given(
    vec=hnp.arrays(
        np.float64, hnp.array_shapes(max_dims=3, max_side=6), elements=st.floats(-1e6, 1e6)
    ),
    c=st.floats(1e-3, 1e3),
)
def test_clip_to_norm_bounds_the_norm_and_keeps_the_direction(vec, c):
    clipped, was_clipped = clip_to_norm(vec, c)
    norm = np.linalg.norm(vec.ravel())
    assert clipped.shape == vec.shape and clipped.dtype == np.float64
    assert np.linalg.norm(clipped.ravel()) <= c
    assert was_clipped == (norm > c)
    if not was_clipped:
        np.testing.assert_array_equal(clipped, vec)
    else:
        np.testing.assert_allclose(clipped, vec * (c / norm), rtol=1e-9, atol=1e-300)
    assert clipped is not vec


def test_clip_to_norm_rejects_bad_input():
    with pytest.raises(PrivacyError, match="clip_norm"):
        clip_to_norm(np.ones(3), 0.0)
    with pytest.raises(PrivacyError, match="clip_norm"):
        clip_to_norm(np.ones(3), math.nan)
    with pytest.raises(PrivacyError, match="NaN or inf"):
        clip_to_norm(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(PrivacyError, match="numeric"):
        clip_to_norm(np.array(["a"]), 1.0)


# ---------------------------------------------------------------- noise


def test_secure_source_is_standard_normal():
    z = SecureNormalSource().standard_normal(200_000)
    assert z.dtype == np.float64 and z.shape == (200_000,)
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    # Kolmogorov-Smirnov against N(0, 1): a correct sampler fails this 1 time in 10^6.
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert np.all(np.isfinite(z)) and np.abs(z).max() < 8.58  # Box-Muller bound on 53 bits


def test_secure_source_keys_from_os_and_never_repeats():
    a, b = SecureNormalSource(), SecureNormalSource()
    assert not np.array_equal(a.standard_normal(16), b.standard_normal(16))
    first, second = a.standard_normal(16), a.standard_normal(16)
    assert not np.array_equal(first, second)  # the CTR stream moves on


def test_secure_source_from_key_is_reproducible_and_chunking_invariant():
    key = bytes(range(32))
    whole = SecureNormalSource.from_key(key).standard_normal(10)
    s = SecureNormalSource.from_key(key)
    parts = np.concatenate([s.standard_normal(4), s.standard_normal(6)])
    np.testing.assert_array_equal(whole, parts)
    assert SecureNormalSource.from_key(key).standard_normal(0).shape == (0,)
    with pytest.raises(PrivacyError, match="32 bytes"):
        SecureNormalSource(key=b"short")
    with pytest.raises(PrivacyError, match="size"):
        SecureNormalSource().standard_normal(-1)


def test_add_gaussian_noise_has_the_requested_std_and_leaves_input_alone():
    base = np.full((400, 500), 3.0, dtype=np.float32)
    noised = add_gaussian_noise(base, 2.5, SecureNormalSource())
    assert noised.shape == base.shape and noised.dtype == np.float64
    np.testing.assert_array_equal(base, 3.0)
    assert (noised - 3.0).std() == pytest.approx(2.5, rel=0.01)
    assert (noised - 3.0).mean() == pytest.approx(0.0, abs=0.02)
    # any NormalSource works (e.g. a numpy Generator in tests)
    out = add_gaussian_noise(np.zeros(3), 1.0, np.random.default_rng(0))
    assert out.shape == (3,)


@pytest.mark.parametrize("std", [0.0, -1.0, math.inf, math.nan])
def test_add_gaussian_noise_rejects_bad_std(std):
    with pytest.raises(PrivacyError, match="std"):
        add_gaussian_noise(np.zeros(3), std, SecureNormalSource())


def test_add_gaussian_noise_rejects_bad_rng_and_bad_vectors():
    with pytest.raises(PrivacyError, match="standard_normal"):
        add_gaussian_noise(np.zeros(3), 1.0, object())  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="NaN or inf"):
        add_gaussian_noise(np.array([np.inf]), 1.0, SecureNormalSource())


# ---------------------------------------------------------------- adaptive clipping


def clipper(**kw) -> AdaptiveClipping:
    args = {"clip_norm": 1.0, "target_quantile": 0.5, "learning_rate": 0.2, "count_noise_std": 5.0}
    args.update(kw)
    return AdaptiveClipping(**args)


def test_geometric_update_moves_c_towards_the_target_quantile():
    a = clipper()
    assert a.update(0.5).clip_norm == pytest.approx(1.0)
    assert a.update(0.9).clip_norm == pytest.approx(math.exp(-0.2 * 0.4))  # too many under C
    assert a.update(0.1).clip_norm == pytest.approx(math.exp(0.2 * 0.4))  # too few under C
    assert a.clip_norm == 1.0  # frozen: update returns a new state


def test_clip_norm_converges_to_the_quantile_of_update_norms():
    rng = np.random.default_rng(7)
    state = clipper(clip_norm=0.1, target_quantile=0.8, learning_rate=0.2, count_noise_std=2.0)
    m = 200
    for _ in range(400):
        bits = sum(state.party_bit(float(n)) for n in rng.lognormal(mean=0.0, sigma=0.5, size=m))
        b = state.noised_fraction(bit_sum=bits, expected_parties=m, rng=rng)
        state = state.update(b)
    true_quantile = math.exp(0.5 * stats.norm.ppf(0.8))
    assert state.clip_norm == pytest.approx(true_quantile, rel=0.1)


def test_noise_split_recovers_the_target_multiplier():
    z, sigma_b = 1.2, 10.0
    z_delta = split_noise_multiplier(noise_multiplier=z, count_noise_std=sigma_b)
    assert z_delta == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert z_delta > z
    with pytest.raises(PrivacyError, match="count_noise_std"):
        split_noise_multiplier(noise_multiplier=2.0, count_noise_std=1.0)


@pytest.mark.parametrize(
    "acc_cls", [RdpAccountant, lambda: PldAccountant(value_discretization_interval=1e-3)]
)
def test_adaptive_round_costs_exactly_the_target_multiplier(acc_cls):
    state = clipper(count_noise_std=10.0)
    event = state.round_event(noise_multiplier=1.2, sampling_probability=0.05)
    assert event == adaptive_clipping_event(
        delta_noise_multiplier=state.delta_noise_multiplier(1.2),
        count_noise_std=10.0,
        sampling_probability=0.05,
    )
    ours, plain = acc_cls(), acc_cls()
    ours.compose(SelfComposed(event=event, count=100))
    plain.compose(
        SelfComposed(
            event=PoissonSampled(sampling_probability=0.05, event=Gaussian(noise_multiplier=1.2)),
            count=100,
        )
    )
    assert ours.epsilon(1e-5) == pytest.approx(plain.epsilon(1e-5), rel=1e-9)


def test_adaptive_clipping_validates():
    with pytest.raises(PrivacyError, match="target_quantile"):
        clipper(target_quantile=1.0)
    with pytest.raises(PrivacyError, match="clip_norm"):
        clipper(clip_norm=0.0)
    with pytest.raises(PrivacyError, match="noised_fraction"):
        clipper().update(math.nan)
    with pytest.raises(PrivacyError, match="update_norm"):
        clipper().party_bit(-1.0)
    assert clipper().party_bit(1.0) == 0.5 and clipper().party_bit(1.01) == -0.5
