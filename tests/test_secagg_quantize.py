"""Quantisation: clip, stochastic rounding (unbiased), ring wrap, centred lift, overflow."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ray.errors import ConfigError, DataError
from lepton_ray.secagg import secure_sum
from lepton_ray.secagg.quantize import (
    QuantizationSpec,
    auto_scale,
    centred_lift,
    check_no_overflow,
    clip_l2,
    dequantize,
    quantize,
    require_no_overflow,
    stochastic_round,
    to_ring,
)


def test_clip_reports_and_bounds_the_norm():
    long = clip_l2(np.array([3.0, 4.0]), 1.0)
    assert long.clipped and long.norm == pytest.approx(5.0)
    assert np.linalg.norm(long.vector) == pytest.approx(1.0)
    short = clip_l2(np.array([0.3, 0.4]), 1.0)
    assert not short.clipped and np.array_equal(short.vector, [0.3, 0.4])
    with pytest.raises(DataError, match="non-finite value nan at index 1"):
        clip_l2(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(DataError, match="1-D"):
        clip_l2(np.zeros((2, 2)), 1.0)
    with pytest.raises(ConfigError, match="clip_norm"):
        clip_l2(np.zeros(2), -1.0)


def test_stochastic_rounding_is_unbiased_and_off_by_less_than_one():
    for value in (0.3, -2.75, 1e6 + 0.5):
        x = np.full(20_000, value)
        r = stochastic_round(x)
        assert set(np.unique(r)) <= {np.floor(value), np.floor(value) + 1}
        sigma = np.sqrt(0.25 / x.size)
        assert abs(r.mean() - value) < 5 * sigma
    key = os.urandom(32)
    x = np.linspace(-3, 3, 101)
    assert np.array_equal(stochastic_round(x, key), stochastic_round(x, key))  # keyed stream
    with pytest.raises(DataError):
        stochastic_round(np.array([np.inf]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=20))
def test_ring_wrap_and_centred_lift_round_trip(values):
    for bits in (32, 64):
        ring = to_ring(np.array(values), bits)
        assert ring.dtype == np.dtype(f"<u{bits // 8}")
        assert np.array_equal(centred_lift(ring, bits), values)
        assert [int(v) for v in ring] == [v % 2**bits for v in values]


def test_round_trip_through_secure_sum():
    n, d, clip = 12, 300, 1.0
    spec = QuantizationSpec.automatic(n_parties=n, clip_norm=clip)
    updates = np.random.default_rng(0).normal(scale=0.02, size=(n, d))
    updates[0] *= 500  # this one gets clipped
    quantised = [quantize(u, spec) for u in updates]
    assert quantised[0].clipped and not quantised[1].clipped
    result = secure_sum(np.stack([q.values for q in quantised]), seed=0)
    expected = np.sum([clip_l2(u, clip).vector for u in updates], axis=0)
    assert np.max(np.abs(dequantize(result.total, spec) - expected)) <= n / spec.scale


def test_mean_of_quantised_sums_is_unbiased():
    spec = QuantizationSpec(clip_norm=1000.0, scale=1.0)  # coarse: rounding error is visible
    value = np.full(4000, 0.37)
    sums = np.array([dequantize(quantize(value, spec).values, spec) for _ in range(5)])
    assert abs(sums.mean() - 0.37) < 5 * np.sqrt(0.25 / sums.size)


def test_overflow_check():
    for n, bits in ((10, 32), (1000, 32), (10_000, 64)):
        scale = auto_scale(n, 2.5, bits)
        check = check_no_overflow(n, 2.5, scale, bits, 1000)
        assert check.ok and check.worst_case * 2 <= check.limit + 1e-6 * check.limit
        assert "no overflow" in check.message
        # at twice the maximal safe scale it must refuse
        bad = check_no_overflow(n, 2.5, 2.2 * check.max_safe_scale, bits, 1000)
        assert not bad.ok and "overflow possible" in bad.message and "64" in bad.message
    with pytest.raises(ConfigError, match="overflow possible"):
        require_no_overflow(100, 1.0, 1e8, 32, 10)
    assert require_no_overflow(100, 1.0, 1e6, 32, 10).ok
    with pytest.raises(ConfigError, match="no room"):
        auto_scale(2**31, 1.0, 32)
    with pytest.raises(ConfigError, match="modulus_bits"):
        check_no_overflow(10, 1.0, 1.0, 16, 10)


def test_worst_case_vector_does_not_wrap():
    """n parties each putting the whole clip norm on one coordinate, rounded up: exact."""
    n, clip = 50, 1.0
    spec = QuantizationSpec.automatic(n_parties=n, clip_norm=clip, headroom=1.0)
    worst = np.zeros((n, 3))
    worst[:, 0] = -clip
    total = np.sum([quantize(w, spec).values for w in worst], axis=0, dtype=np.uint32)
    assert dequantize(total, spec)[0] == pytest.approx(-n * clip, rel=1e-6)
