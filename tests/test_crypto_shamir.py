"""Shamir t-of-n, limb by limb over GF(2**31 - 1): every t-subset reconstructs; t-1 shares are
consistent with every candidate secret; the numpy arithmetic agrees with Python integers."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ray.crypto.shamir import (
    LIMB_BITS,
    LIMBS,
    PRIME,
    SHARE_BYTES,
    combine_secrets,
    combine_shares,
    lagrange_at_zero,
    random_field_elements,
    secret_limbs,
    split_secret,
    split_secrets,
)
from lepton_ray.errors import ProtocolError, ThresholdError


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
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


def _limbs(share: bytes) -> list[int]:
    return [int.from_bytes(share[4 * i:4 * i + 4], "little") for i in range(LIMBS)]


def _lagrange(points: list[tuple[int, int]], x: int) -> int:
    """Brute-force Lagrange interpolation in Python integers (the oracle)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if j != i:
                term = term * (x - xj) * pow(xi - xj, -1, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


def test_field_is_the_mersenne_prime_and_limbs_hold_256_bits():
    assert PRIME == 2**31 - 1 and _is_probable_prime(PRIME)
    assert LIMBS * LIMB_BITS >= 256 and (1 << LIMB_BITS) < PRIME and SHARE_BYTES == 4 * LIMBS


def test_limbs_are_the_base_2_30_digits_of_the_secret():
    secrets = np.frombuffer(os.urandom(5 * 32), np.uint8).reshape(5, 32)
    for row, limbs in zip(secrets, secret_limbs(secrets)):
        value = int.from_bytes(row.tobytes(), "big")
        digits = [(value >> (LIMB_BITS * (LIMBS - 1 - i))) & ((1 << LIMB_BITS) - 1)
                  for i in range(LIMBS)]
        assert limbs.tolist() == digits


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), data=st.data())
def test_every_t_subset_reconstructs(n, data):
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.binary(min_size=32, max_size=32))
    xs = data.draw(st.lists(st.integers(1, PRIME - 1), min_size=n, max_size=n, unique=True))
    shares = split_secret(secret, threshold=t, xs=xs)
    points = list(zip(xs, shares))
    for subset in itertools.combinations(points, t):
        assert combine_shares(list(subset), threshold=t) == secret
    if t > 1:
        with pytest.raises(ThresholdError):
            combine_shares(points[:t - 1], threshold=t)


def test_shares_lie_on_one_polynomial_per_limb_with_the_secret_at_zero():
    """Python-integer oracle: t shares of each limb interpolate, at 0, to that limb of the
    secret, and predict every other holder's share."""
    secret, t, xs = os.urandom(32), 4, [3, 9, 27, 81, 243, 729]
    shares = [_limbs(s) for s in split_secret(secret, threshold=t, xs=xs)]
    digits = secret_limbs(np.frombuffer(secret, np.uint8)[None])[0].tolist()
    for limb in range(LIMBS):
        points = [(x, s[limb]) for x, s in zip(xs, shares)]
        assert _lagrange(points[:t], 0) == digits[limb]
        for x, y in points[t:]:
            assert _lagrange(points[:t], x) == y


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), data=st.data())
def test_t_minus_1_shares_are_consistent_with_any_secret(n, data):
    """For any candidate limb value s', the t-1 shares plus (0, s') define a polynomial of
    degree <= t-1 through every held share: t-1 shares cannot rule any secret out."""
    t = data.draw(st.integers(2, n))
    xs = list(range(1, n + 1))
    shares = [_limbs(s) for s in split_secret(os.urandom(32), threshold=t, xs=xs)]
    limb = data.draw(st.integers(0, LIMBS - 1))
    held = [(x, s[limb]) for x, s in zip(xs, shares)][: t - 1]
    candidate = data.draw(st.integers(0, (1 << LIMB_BITS) - 1))
    points = [(0, candidate)] + held
    for x, y in held:
        assert _lagrange(points, x) == y
    assert _lagrange(points, 0) == candidate


def test_batch_split_and_combine_match_one_by_one_with_ragged_holders():
    m, t = 40, 5
    secrets = np.frombuffer(os.urandom(32 * m), np.uint8).reshape(m, 32)
    rng = np.random.default_rng(0)  # public x-coordinates only
    xs = np.stack([rng.choice(np.arange(1, 10_000), size=8, replace=False) for _ in range(m)])
    shares = split_secrets(secrets, threshold=t, xs=xs)
    assert shares.shape == (m, 8, LIMBS) and shares.dtype == np.uint32
    pick = np.stack([rng.choice(8, size=t, replace=False) for _ in range(m)])
    rows = np.arange(m)[:, None]
    rebuilt = combine_secrets(xs[rows, pick], shares[rows, pick])
    assert (rebuilt == secrets).all()
    i = 7
    points = [(int(x), shares[i, j].astype("<u4").tobytes()) for j, x in enumerate(xs[i])]
    assert combine_shares(points[3:], threshold=t) == secrets[i].tobytes()


def test_lagrange_coefficients_match_python_integers():
    xs = np.array([[1, 2, 3, 4], [5, 17, 2**30, PRIME - 1]])
    got = lagrange_at_zero(xs)
    for row, coeffs in zip(xs.tolist(), got.tolist()):
        for i, xi in enumerate(row):
            want = 1
            for j, xj in enumerate(row):
                if j != i:
                    want = want * xj * pow(xj - xi, -1, PRIME) % PRIME
            assert coeffs[i] == want


def test_coefficients_are_field_elements_drawn_by_rejection():
    words = iter([b"\xff\xff\xff\x7f" * 2, b"\x05\x00\x00\x00"])  # p, p, then 5
    draws = random_field_elements((2,), lambda n: next(words) if n == 8 else
                                  next(words) * (n // 4))
    assert draws.tolist() == [5, 5]
    assert (random_field_elements((10_000,)) < PRIME).all()


def test_bad_inputs_and_corrupt_shares():
    secret = os.urandom(32)
    with pytest.raises(ThresholdError):
        split_secret(secret, threshold=4, xs=[1, 2, 3])
    with pytest.raises(ProtocolError):
        split_secret(secret, threshold=2, xs=[1, 1, 2])
    with pytest.raises(ProtocolError):
        split_secret(secret, threshold=2, xs=[0, 1])
    with pytest.raises(ProtocolError):
        split_secret(secret, threshold=2, xs=[1, PRIME])
    with pytest.raises(ProtocolError):
        split_secret(b"short", threshold=1, xs=[1])
    shares = split_secret(secret, threshold=3, xs=[1, 2, 3, 4])
    points = list(zip([1, 2, 3, 4], shares))
    with pytest.raises(ProtocolError, match="36 bytes"):
        combine_shares([(1, shares[0][:-1])] + points[1:], threshold=3)
    with pytest.raises(ProtocolError, match="not an element"):
        combine_shares([(1, b"\xff" * SHARE_BYTES)] + points[1:], threshold=3)
    for limb in range(LIMBS):  # one limb off by one: never the right secret
        bad = bytearray(shares[0])
        bad[4 * limb] ^= 1
        try:
            assert combine_shares([(1, bytes(bad))] + points[1:3], threshold=3) != secret
        except ProtocolError as err:
            assert "corrupt" in str(err)
    top = np.frombuffer(shares[0], "<u4").copy()
    top[0] = (int(top[0]) + PRIME // 2) % PRIME  # moves the 16-bit top limb far out of range
    with pytest.raises(ProtocolError, match="corrupt"):
        combine_shares([(1, top.tobytes())] + points[1:3], threshold=3)
