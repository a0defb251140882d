"""Shamir t-of-n secret sharing of 32-byte secrets, limb by limb over GF(p), p = 2**31 - 1.

Shamir 1979 ("How to Share a Secret", CACM 22(11)): the dealer picks a uniformly random
polynomial f of degree t-1 with f(0) = secret and gives holder h the point (x_h, f(x_h)).
Any t points determine f (Lagrange interpolation); any t-1 points are consistent with
*every* candidate secret, each through exactly one polynomial, so they reveal nothing.

A 256-bit secret does not fit the Mersenne prime field GF(2**31 - 1), so it is cut into
:data:`LIMBS` = 9 limbs of 30 bits (the first limb holds the top 16 bits) and each limb is
shared with its own independent random polynomial. Each limb's t-1 shares are independent of
that limb and the polynomials are independent, so t-1 shares reveal nothing about the whole
secret either. A share is the 9 limb values as little-endian uint32 (36 bytes). The small
field is what makes sharing vectorisable: Horner's rule and Lagrange's formula run in int64
numpy arithmetic (products < 2**62) over every party of a host, or every secret the server
rebuilds, at once.

Coefficients are uniform in [0, p): 31 random bits from the OS, redrawn in the 2**-31 case
that they equal p (rejection sampling, no modulo bias).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from lepton_ray.errors import ProtocolError, ThresholdError

PRIME = 2**31 - 1
SECRET_BYTES = 32
LIMB_BITS = 30
LIMBS = 9  # ceil(256 / 30)
SHARE_BYTES = 4 * LIMBS
_PAD_BITS = LIMBS * LIMB_BITS - 8 * SECRET_BYTES  # 14 zero bits on top of the first limb
_TOP_LIMB = 1 << (LIMB_BITS - _PAD_BITS)
_BIT_WEIGHTS = (1 << np.arange(LIMB_BITS - 1, -1, -1)).astype(np.int64)


# ---------------------------------------------------------------------------- batch form
def split_secrets(secrets: np.ndarray, *, threshold: int, xs: np.ndarray,
                  entropy: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """Share ``m`` secrets at once: ``secrets`` is an (m, 32) uint8 array, ``xs`` an (m, h)
    array of x-coordinates (row i: the holders of secret i, distinct, in [1, p)). Returns the
    (m, h, LIMBS) uint32 shares: ``out[i, j]`` is holder ``xs[i, j]``'s share of secret i."""
    secrets = np.asarray(secrets)
    xs = np.asarray(xs)
    if secrets.ndim != 2 or secrets.shape[1] != SECRET_BYTES or secrets.dtype != np.uint8:
        raise ProtocolError(f"secrets must be an (m, {SECRET_BYTES}) uint8 array, got "
                            f"{secrets.dtype} {secrets.shape}")
    if xs.ndim != 2 or xs.shape[0] != secrets.shape[0] or xs.dtype.kind not in "iu":
        raise ProtocolError(f"xs must be an ({secrets.shape[0]}, h) integer array, got "
                            f"{xs.dtype} {xs.shape}")
    if not 1 <= threshold <= xs.shape[1]:
        raise ThresholdError(
            f"threshold {threshold} needs between 1 and h = {xs.shape[1]} holders")
    _check_xs(xs)
    m = secrets.shape[0]
    coeffs = random_field_elements((m, threshold - 1, LIMBS), entropy)
    x = xs.astype(np.int64)[:, :, None]                       # (m, h, 1)
    acc = np.zeros((m, xs.shape[1], LIMBS), dtype=np.int64)
    for c in range(threshold - 2, -1, -1):                    # Horner, top coefficient first
        acc += coeffs[:, None, c, :]
        acc *= x
        acc %= PRIME
    acc += secret_limbs(secrets)[:, None, :]
    acc %= PRIME
    return acc.astype(np.uint32)


def combine_secrets(xs: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Rebuild ``m`` secrets at once from t points each: ``xs`` (m, t) x-coordinates and
    ``shares`` (m, t, LIMBS) their shares. Returns (m, 32) uint8. :class:`ProtocolError` if a
    share is not in the field or a rebuilt value is not a 32-byte secret (a corrupt share)."""
    xs = np.asarray(xs)
    shares = np.asarray(shares)
    if xs.ndim != 2 or shares.shape != (*xs.shape, LIMBS):
        raise ProtocolError(f"shares must have shape (m, t, {LIMBS}) matching xs {xs.shape}, "
                            f"got {shares.shape}")
    _check_xs(xs)
    ys = shares.astype(np.int64)
    if ys.size and (ys.min() < 0 or ys.max() >= PRIME):
        raise ProtocolError("a share is not an element of GF(2**31 - 1)")
    coeff = lagrange_at_zero(xs)                              # (m, t)
    limbs = (coeff[:, :, None] * ys % PRIME).sum(axis=1) % PRIME
    bad = np.flatnonzero((limbs[:, 0] >= _TOP_LIMB) | (limbs >= 1 << LIMB_BITS).any(axis=1))
    if bad.size:
        raise ProtocolError(f"rebuilt value {int(bad[0])} is not a 32-byte secret: a share was "
                            "corrupt")
    return limbs_to_secrets(limbs)


def combine_checked(xs: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`combine_secrets` that never raises on a corrupt share: returns the (m, 32)
    secrets and an (m,) bool array, False where a share is outside the field or the rebuilt
    value is not a 32-byte secret (that row's secret is then meaningless). The caller checks
    the good rows against commitments (:mod:`lepton_ray.secagg.server`)."""
    xs = np.asarray(xs)
    ys = np.asarray(shares).astype(np.int64)
    if xs.ndim != 2 or ys.shape != (*xs.shape, LIMBS):
        raise ProtocolError(f"shares must have shape (m, t, {LIMBS}) matching xs {xs.shape}, "
                            f"got {ys.shape}")
    _check_xs(xs)
    in_field = ((ys >= 0) & (ys < PRIME)).all(axis=(1, 2))
    ys = np.where(in_field[:, None, None], ys, 0)
    coeff = lagrange_at_zero(xs)
    limbs = (coeff[:, :, None] * ys % PRIME).sum(axis=1) % PRIME
    ok = in_field & (limbs[:, 0] < _TOP_LIMB) & (limbs < 1 << LIMB_BITS).all(axis=1)
    limbs = np.where(ok[:, None], limbs, 0)
    return limbs_to_secrets(limbs), ok


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """Row-wise Lagrange coefficients at 0 over GF(p): for each row of distinct non-zero
    ``xs``, c_i = prod_{j != i} x_j / (x_j - x_i) mod p, so f(0) = sum_i c_i f(x_i)."""
    x = np.asarray(xs).astype(np.int64) % PRIME
    m, t = x.shape
    num = np.ones((m, t), dtype=np.int64)
    den = np.ones((m, t), dtype=np.int64)
    for j in range(t):
        others = np.arange(t) != j
        num[:, others] = num[:, others] * x[:, j:j + 1] % PRIME
        den[:, others] = den[:, others] * ((x[:, j:j + 1] - x[:, others]) % PRIME) % PRIME
    return num * _inverse(den) % PRIME


def lagrange_at(xs: Sequence[int], at: int) -> np.ndarray:
    """Lagrange coefficients of the points ``xs`` at ``at`` over GF(p): for distinct ``xs``,
    c_i = prod_{j != i} (at - x_j) / (x_i - x_j) mod p, so f(at) = sum_i c_i f(x_i) for every
    f of degree < len(xs). Used to check a share against the polynomial other shares fix
    (cheater identification in :mod:`lepton_ray.secagg.server`)."""
    x = np.asarray(xs, dtype=np.int64) % PRIME
    t = len(x)
    num = np.ones(t, dtype=np.int64)
    den = np.ones(t, dtype=np.int64)
    for j in range(t):
        others = np.arange(t) != j
        num[others] = num[others] * ((at - x[j]) % PRIME) % PRIME
        den[others] = den[others] * ((x[others] - x[j]) % PRIME) % PRIME
    return num * _inverse(den) % PRIME


def evaluate_shares(xs: Sequence[int], shares: np.ndarray, at: int) -> np.ndarray:
    """f(at), limb by limb, for the degree < t polynomial through the t points (xs, shares)
    (``shares``: (t, LIMBS)); returns (LIMBS,) uint32."""
    coeff = lagrange_at(xs, at)
    ys = np.asarray(shares).astype(np.int64)
    return ((coeff[:, None] * ys % PRIME).sum(axis=0) % PRIME).astype(np.uint32)


def random_field_elements(shape: tuple[int, ...],
                          entropy: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """Uniform elements of [0, p) as int64, by rejection: 31 bits from ``entropy``, redrawn
    when they equal p."""
    count = int(np.prod(shape))
    out = np.frombuffer(entropy(4 * count), dtype="<u4").astype(np.int64) & PRIME
    while True:
        again = np.flatnonzero(out == PRIME)
        if not again.size:
            return out.reshape(shape)
        out[again] = np.frombuffer(entropy(4 * again.size), dtype="<u4").astype(np.int64) & PRIME


def secret_limbs(secrets: np.ndarray) -> np.ndarray:
    """(m, 32) uint8 secrets -> (m, LIMBS) int64 limbs, big-endian, 30 bits each."""
    bits = np.unpackbits(secrets, axis=1)
    padded = np.concatenate([np.zeros((len(bits), _PAD_BITS), np.uint8), bits], axis=1)
    return padded.reshape(len(bits), LIMBS, LIMB_BITS).astype(np.int64) @ _BIT_WEIGHTS


def limbs_to_secrets(limbs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`secret_limbs` (limbs already checked to be in range)."""
    bits = (limbs[:, :, None] >> np.arange(LIMB_BITS - 1, -1, -1)) & 1
    return np.packbits(bits.reshape(len(limbs), -1)[:, _PAD_BITS:].astype(np.uint8), axis=1)


def _inverse(values: np.ndarray) -> np.ndarray:
    """values ** (p - 2) mod p (Fermat), elementwise; values are non-zero mod p."""
    result = np.ones_like(values)
    base = values % PRIME
    e = PRIME - 2
    while e:
        if e & 1:
            result = result * base % PRIME
        base = base * base % PRIME
        e >>= 1
    return result


def _check_xs(xs: np.ndarray) -> None:
    if xs.size == 0:
        return
    if xs.min() < 1 or xs.max() >= PRIME:
        raise ProtocolError(f"share x-coordinates must be in [1, {PRIME})")
    ordered = np.sort(xs, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ProtocolError("share x-coordinates of one secret must be distinct")


# ------------------------------------------------------------------------- one secret
def split_secret(secret: bytes, *, threshold: int, xs: Sequence[int],
                 entropy: Callable[[int], bytes] = os.urandom) -> tuple[bytes, ...]:
    """The shares (``SHARE_BYTES`` each) of one 32-byte secret for holders ``xs``."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ProtocolError(f"secret must be {SECRET_BYTES} bytes")
    shares = split_secrets(np.frombuffer(secret, np.uint8)[None], threshold=threshold,
                           xs=np.array([list(xs)], dtype=np.int64), entropy=entropy)
    return tuple(row.astype("<u4").tobytes() for row in shares[0])


def combine_shares(points: Sequence[tuple[int, bytes]], *, threshold: int) -> bytes:
    """Reconstruct one secret from at least ``threshold`` (x, share bytes) points (the first
    t are used). :class:`ThresholdError` with fewer than t points; :class:`ProtocolError` for
    a malformed or corrupt share."""
    if len(points) < threshold:
        raise ThresholdError(f"need {threshold} shares to reconstruct, have {len(points)}")
    chosen = list(points[:threshold])
    xs = np.array([[x for x, _ in chosen]], dtype=np.int64)
    ys = np.stack([share_limbs(y) for _, y in chosen])[None]
    return combine_secrets(xs, ys)[0].tobytes()


def share_limbs(share: bytes) -> np.ndarray:
    """A share's bytes as its LIMBS field elements; :class:`ProtocolError` if malformed."""
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise ProtocolError(f"a share must be {SHARE_BYTES} bytes")
    limbs = np.frombuffer(share, dtype="<u4")
    if (limbs >= PRIME).any():
        raise ProtocolError("a share limb is not an element of GF(2**31 - 1)")
    return limbs


def interpolate_at(points: Sequence[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``,
    in Python integers over GF(p) (a reference for tests, independent of the numpy code)."""
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
