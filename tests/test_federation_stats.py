"""Federated standardisation by secure sum, checked against the pooled statistics computed by
numpy and scikit-learn's StandardScaler (independent oracles), and the schema check."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray.errors import DataError
from lepton_ray.federation.stats import (
    decode_moments,
    encode_moments,
    moments_width,
    schema_problems,
)


def _split():
    from sklearn.datasets import load_digits

    X = load_digits().data
    return X, np.array_split(X, [500, 1100])  # three sites of different sizes


def test_ring_sum_of_site_moments_equals_pooled_statistics():
    from sklearn.preprocessing import StandardScaler

    X, parts = _split()
    total = sum(encode_moments(p) for p in parts)  # uint64 addition wraps: the ring Z_{2^64}
    n, mean, scale = decode_moments(total, X.shape[1])
    oracle = StandardScaler().fit(X)
    assert n == len(X)
    np.testing.assert_allclose(mean, oracle.mean_, atol=1e-6)
    np.testing.assert_allclose(scale, oracle.scale_, atol=1e-5)


def test_negative_values_and_secure_sum_over_sites():
    from lepton_ray.secagg.local import secure_sum

    rng = np.random.default_rng(0)
    parts = [rng.normal(-3, 2, size=(n, 4)) for n in (40, 70, 25)]
    rows = np.stack([encode_moments(p) for p in parts])
    result = secure_sum(rows, modulus_bits=64)
    n, mean, scale = decode_moments(result.total, 4)
    pooled = np.concatenate(parts)
    assert n == 135
    np.testing.assert_allclose(mean, pooled.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(scale, pooled.std(axis=0), atol=1e-4)
    assert moments_width(4) == rows.shape[1]


def test_bad_values_are_refused():
    with pytest.raises(DataError, match="NaN or inf"):
        encode_moments(np.array([[np.nan]]))
    with pytest.raises(DataError, match="too large"):
        encode_moments(np.array([[1e12]]))
    with pytest.raises(DataError, match="expected 9 sums"):
        decode_moments(np.zeros(3, np.uint64), 4)


def test_schema_agreement():
    assert schema_problems(["a", "b"], [0, 1], features=["a", "b"], classes=[0, 1, 2]) == []
    problems = schema_problems(["a", "c"], [0, 7], features=["a", "b"], classes=[0, 1, 2])
    assert "missing ['b'], unexpected ['c']" in problems[0]
    assert "labels outside" in problems[1] and "['7']" in problems[1]
    assert "different order" in schema_problems(["b", "a"], [], features=["a", "b"], classes=[0])[0]
