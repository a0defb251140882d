"""Shamir t-of-n secret sharing of 32-byte secrets over GF(p), p = 2**256 + 297 (prime).

Shamir 1979 ("How to Share a Secret", CACM 22(11)): the dealer picks a uniformly random
polynomial f of degree t-1 with f(0) = secret and gives holder h the point (x_h, f(x_h)).
Any t points determine f (Lagrange interpolation); any t-1 points are consistent with
*every* candidate secret, each through exactly one polynomial, so they reveal nothing.
The field must hold every 32-byte secret, hence a prime just above 2**256.

Coefficients are drawn as 64 random bytes reduced mod p (statistical distance from uniform
< 2**-250); randomness comes from the OS unless the caller passes its own source.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from lepton_ray.errors import ProtocolError, ThresholdError

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33  # a field element < p < 2**257
_COEFF_BYTES = 64


def split_secret(secret: bytes, *, threshold: int, xs: Sequence[int],
                 entropy: Callable[[int], bytes] = os.urandom) -> tuple[int, ...]:
    """Shares ``f(x)`` for each x in ``xs`` (distinct, 1 <= x < p) of a random degree
    ``threshold - 1`` polynomial with ``f(0) = secret``."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ProtocolError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ThresholdError(
            f"threshold {threshold} needs between 1 and len(xs) = {len(xs)} holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ProtocolError(f"share x-coordinates must be distinct and in [1, p): {list(xs)}")
    pool = entropy(_COEFF_BYTES * (threshold - 1))
    coeffs = [int.from_bytes(secret, "big")] + [
        int.from_bytes(pool[i * _COEFF_BYTES:(i + 1) * _COEFF_BYTES], "big") % PRIME
        for i in range(threshold - 1)
    ]
    top = coeffs[::-1]
    shares = []
    for x in xs:
        acc = 0
        for c in top:  # Horner
            acc = (acc * x + c) % PRIME
        shares.append(acc)
    return tuple(shares)


def interpolate_at(points: Sequence[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``."""
    xs = [px for px, _ in points]
    if len(set(xs)) != len(xs):
        raise ProtocolError(f"interpolation points must have distinct x: {xs}")
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine_shares(points: Sequence[tuple[int, int]], *, threshold: int) -> bytes:
    """Reconstruct the secret from at least ``threshold`` points (the first t are used).

    :class:`ThresholdError` with fewer than t points; :class:`ProtocolError` if a share is
    not a field element or the result is not a 32-byte secret (a holder sent garbage).
    """
    if len(points) < threshold:
        raise ThresholdError(f"need {threshold} shares to reconstruct, have {len(points)}")
    chosen = list(points[:threshold])
    for x, y in chosen:
        if not (isinstance(y, int) and 0 <= y < PRIME):
            raise ProtocolError(f"share at x={x} is not an element of GF(p)")
    secret = _interpolate_at_zero(chosen)
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ProtocolError("reconstructed value is not a 32-byte secret: a share was corrupt")
    return secret.to_bytes(SECRET_BYTES, "big")


def _interpolate_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """Lagrange at 0 with one modular inversion for all t denominators (Montgomery's trick)."""
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ProtocolError(f"share x-coordinates must be distinct and non-zero: {xs}")
    nums, dens = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        nums.append(num)
        dens.append(den)
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    total = 0
    for i in range(len(xs) - 1, -1, -1):
        inv_den = inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
        total = (total + points[i][1] * nums[i] % PRIME * inv_den) % PRIME
    return total


def share_to_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise ProtocolError("share is not a 33-byte element of GF(p)")
    return value
