"""Random rotation before quantisation: the randomised Walsh-Hadamard transform.

A party's clipped update x (norm <= C) may put its whole norm into a few coordinates. In the
ring Z_{2^b} a spiky coordinate wraps around long before the others use their range. The
distributed DP pipelines (Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML; Agarwal, Kairouz and
Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS)
therefore rotate first:

    U = H D / sqrt(n),   n = 2^ceil(log2 d)  (x is zero-padded to length n),

H the n x n Sylvester Hadamard matrix (entries +-1, H H = n I) and D = diag(s) with i.i.d.
uniform signs s_i in {-1, +1}. U is orthogonal (U^T U = D H H D / n = I), so it preserves the
L2 norm (the sensitivity) exactly, and its inverse is U^T = D H / sqrt(n). For a fixed x, each
rotated coordinate (U x)_j = sum_i (H_ji x_i / sqrt(n)) s_i is a Rademacher sum with
coefficient norm ||x|| / sqrt(n), so by Hoeffding
P(|(U x)_j| >= t) <= 2 exp(-n t^2 / (2 ||x||^2)), and with a union bound over n coordinates
max_j |(U x)_j| <= ||x|| sqrt(2 ln(2 n / p) / n) with probability >= 1 - p: the spike is
spread to ~C sqrt(log d / d). :func:`lepton_ray.privacy.skellam.wraparound_bound` uses exactly
this sub-Gaussian bound (variance proxy ||x||^2 / n) for the summed signal.

The signs are PUBLIC. Every party and the server must use the same D in a round (the server
inverts it), so they are derived from a public per-round seed. Privacy does not rest on them:
U is orthogonal for every choice of signs, so the L2 sensitivity and the rounding norm bound
(and hence the RDP) hold whatever D is; the signs only make wrap-around unlikely, which needs
them to be independent of the updates (fixed before local training uses the data, or at
least not chosen by whoever crafts an update). They come from AES-256-CTR keyed by
HKDF(seed, PUBLIC_RANDOMNESS, "lepton-ray/rotation-signs", context...) and not from numpy's
PCG64: numpy promises no stream stability across versions or platforms, and every party must
reproduce the server's D bit for bit (the same reason as :class:`~lepton_ray.crypto.prg.
PublicRandom`); AES-CTR is also fast (one keystream bit per sign) and domain-separated from
every other use of the seed.

The transform is O(n log n): log2(n) butterfly passes over a contiguous float64 array, on
the last axis, so a stack of party updates (shape ``(parties, d)``) rotates in one call.
"""

from __future__ import annotations

import math

import numpy as np

from lepton_ray.errors import PrivacyError

__all__ = [
    "fwht",
    "padded_dim",
    "rotate",
    "rotation_signs",
    "unrotate",
]

_SIGNS_LABEL = "lepton-ray/rotation-signs"
_SEED_BYTES = 32
_MAX_DIM = 2**40


def padded_dim(dim: int) -> int:
    """The smallest power of two >= ``dim`` (the Hadamard transform's length)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= _MAX_DIM:
        raise PrivacyError(f"dimension must be an integer in [1, 2**40], got {dim!r}")
    return 1 << (int(dim) - 1).bit_length()


def rotation_signs(seed: bytes, dim: int, *context: str | int | bytes) -> np.ndarray:
    """The public diagonal D: ``padded_dim(dim)`` signs in {-1.0, +1.0} (float64).

    ``seed`` is a 32-byte PUBLIC per-round value (e.g. derived by the driver from the job id
    and round); ``context`` (round number, model part ...) separates several rotations drawn
    from one seed. Bit i of the AES-256-CTR keystream of HKDF(seed, PUBLIC_RANDOMNESS,
    "lepton-ray/rotation-signs", *context) (little-endian bit order) is 1 -> sign -1.
    """
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key  # cryptography: loaded on use
    from lepton_ray.crypto.prg import keystream

    if not isinstance(seed, bytes) or len(seed) != _SEED_BYTES:
        raise PrivacyError(f"rotation seed must be {_SEED_BYTES} bytes, got {seed!r:.40}")
    n = padded_dim(dim)
    key = derive_key(seed, KeyPurpose.PUBLIC_RANDOMNESS, _SIGNS_LABEL, *context)
    bits = np.unpackbits(np.frombuffer(keystream(key, (n + 7) // 8), dtype=np.uint8),
                         bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


def _check_signs(signs: np.ndarray) -> np.ndarray:
    s = np.asarray(signs)
    if s.ndim != 1 or s.size == 0 or s.size & (s.size - 1):
        raise PrivacyError(f"rotation signs must be a 1-D array of power-of-two length, got "
                           f"shape {s.shape}")
    if not np.all(np.abs(s) == 1):
        raise PrivacyError("rotation signs must all be -1 or +1")
    return s.astype(np.float64, copy=False)


def fwht(values: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform H x / sqrt(n) along the last axis (a new
    float64 array; n must be a power of two). Natural (Sylvester) order, so it is its own
    inverse: ``fwht(fwht(x)) == x`` up to rounding."""
    x = np.array(values, dtype=np.float64, copy=True, order="C")
    if x.ndim == 0:
        raise PrivacyError("fwht needs at least one axis")
    n = x.shape[-1]
    if n == 0 or n & (n - 1):
        raise PrivacyError(f"fwht length must be a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        view = x.reshape(*lead, n // (2 * h), 2, h)
        a = view[..., 0, :]
        b = view[..., 1, :]
        diff = a - b
        a += b
        b[...] = diff
        h *= 2
    x *= 1.0 / math.sqrt(n)
    return x


def rotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """U x = H D x / sqrt(n): zero-pad the last axis of ``values`` to ``len(signs)``, flip
    signs, transform. Party side, after clipping and before scaling/rounding."""
    s = _check_signs(signs)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] > s.size:
        raise PrivacyError(f"cannot rotate shape {x.shape} with {s.size} signs")
    padded = np.zeros((*x.shape[:-1], s.size), dtype=np.float64)
    padded[..., : x.shape[-1]] = x
    padded *= s
    return fwht(padded)


def unrotate(values: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """U^T y = D H y / sqrt(n), then drop the padding: the first ``dim`` entries of the last
    axis. Server side, after the centred lift and the division by the scale."""
    s = _check_signs(signs)
    y = np.asarray(values, dtype=np.float64)
    if y.ndim == 0 or y.shape[-1] != s.size:
        raise PrivacyError(f"cannot unrotate shape {y.shape} with {s.size} signs")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= s.size:
        raise PrivacyError(f"dim must be an integer in [1, {s.size}], got {dim!r}")
    out = fwht(y)
    out *= s
    return out[..., : int(dim)].copy()
