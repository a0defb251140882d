"""Shamir t-of-n over GF(2**256 + 297): every t-subset reconstructs; t-1 shares are consistent
with every candidate secret."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ray.crypto.shamir import (
    PRIME,
    combine_shares,
    interpolate_at,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)
from lepton_ray.errors import ProtocolError, ThresholdError


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_above_2_256():
    assert PRIME > 2**256 and _is_probable_prime(PRIME)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), data=st.data())
def test_every_t_subset_reconstructs(n, data):
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = split_secret(secret, threshold=t, xs=xs)
    points = list(zip(xs, shares))
    for subset in itertools.combinations(points, t):
        assert combine_shares(list(subset), threshold=t) == secret
    if t > 1:
        with pytest.raises(ThresholdError):
            combine_shares(points[:t - 1], threshold=t)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), data=st.data())
def test_t_minus_1_shares_are_consistent_with_any_secret(n, data):
    """For any candidate secret s', the t-1 shares plus (0, s') define a polynomial of degree
    <= t-1 that passes through every one of the t-1 shares: they cannot rule s' out."""
    t = data.draw(st.integers(2, n))
    secret = os.urandom(32)
    xs = list(range(1, n + 1))
    shares = split_secret(secret, threshold=t, xs=xs)
    held = list(zip(xs, shares))[: t - 1]
    candidate = data.draw(st.integers(0, 2**256 - 1))
    points = [(0, candidate)] + held
    for x, y in held:  # consistent with the held shares ...
        assert interpolate_at(points, x) == y
    assert interpolate_at(points, 0) == candidate  # ... and with the candidate secret
    # the share it predicts for an unheld holder is a proper field element
    assert 0 <= interpolate_at(points, n + 1) < PRIME


def test_bad_inputs_and_corrupt_shares():
    secret = os.urandom(32)
    with pytest.raises(ThresholdError):
        split_secret(secret, threshold=4, xs=[1, 2, 3])
    with pytest.raises(ProtocolError):
        split_secret(secret, threshold=2, xs=[1, 1, 2])
    with pytest.raises(ProtocolError):
        split_secret(secret, threshold=2, xs=[0, 1])
    with pytest.raises(ProtocolError):
        split_secret(b"short", threshold=1, xs=[1])
    shares = split_secret(secret, threshold=3, xs=[1, 2, 3, 4])
    points = list(zip([1, 2, 3, 4], shares))
    with pytest.raises(ProtocolError):
        combine_shares([(1, PRIME)] + points[1:], threshold=3)
    bad = [(points[0][0], (points[0][1] + 1) % PRIME)] + points[1:3]
    try:
        assert combine_shares(bad, threshold=3) != secret
    except ProtocolError:
        pass  # the corrupt result did not even fit in 32 bytes
    assert share_from_bytes(share_to_bytes(shares[0])) == shares[0]
    with pytest.raises(ProtocolError):
        share_from_bytes(b"\xff" * 33)
