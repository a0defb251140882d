"""The two halves of a central-DP release, pure numpy, with SecAgg between them
(pfl-research's ``constrain_sensitivity`` / ``add_noise`` split):

* :func:`clip_to_norm` runs at each party, before its update enters secure aggregation,
  bounding one party's L2 contribution (sensitivity) by C;
* :func:`add_gaussian_noise`: float noise on an aggregate, std = z * C (not used under DP
  any more: see "Status" below).

Randomness for noise comes from :class:`SecureNormalSource`, an AES-256-CTR keystream
keyed with 32 bytes from ``os.urandom``, turned into standard normals by Box-Muller.
Why not ``random`` / ``np.random``'s global state: the DP guarantee holds only if whoever
sees the noised sum cannot predict the noise. A generator seeded from the global state is
seeded from a guessable or shared value (a fixed seed for reproducibility, 32 bits of
entropy, a seed another library also set), and Mersenne Twister / PCG64 are not
cryptographic: their state can be recovered from outputs. Anyone who reproduces the noise
subtracts it and holds the exact sum. AES-CTR under a secret 256-bit key is a PRF: its
output is computationally indistinguishable from uniform and reveals nothing about the key.
(An ``np.random.Generator`` seeded with 256 bits from ``os.urandom`` would be unpredictable
in practice too, but PCG64 carries no cryptographic claim; we take the one that does.)

Status: the runtime no longer uses :func:`add_gaussian_noise` or :class:`SecureNormalSource`
under DP. Central DP-FedAvg adds *discrete* Gaussian noise to the quantised sum in the ring
(:mod:`lepton_ray.privacy.discrete_gaussian`, exact integer sampler, CSPRNG bits), and
distributed DP adds Skellam shares (:mod:`lepton_ray.privacy.skellam`), which resolves the
caveat this module used to carry: floating-point samplers leak through their low-order bits
(Mironov 2012, "On Significance of the Least Significant Bits for Differential Privacy";
Jin et al. 2022), and Box-Muller on 53-bit uniforms truncates at |x| <= 8.57. The two are kept
as a library API and for tests; do not use them for a release that DP relies on.
Record-level DP-SGD inside a party adds the same exact discrete Gaussian to conditionally
rounded integer per-sample gradients (:mod:`lepton_ray.privacy.dpsgd`).
"""

from __future__ import annotations

import math
import os
from typing import Protocol, runtime_checkable

import numpy as np

from lepton_ray.errors import PrivacyError

__all__ = [
    "NormalSource",
    "SecureNormalSource",
    "add_gaussian_noise",
    "clip_to_norm",
]

_CLIP_SAFETY = 1.0 - 2.0**-40
"""Clipped vectors are scaled by C/||v|| * (1 - 2^-40) so that float rounding can never
leave their norm above C (the sensitivity the accountant assumes)."""


@runtime_checkable
class NormalSource(Protocol):
    """Anything that draws i.i.d. N(0, 1) float64 values: ``standard_normal(size)``.
    :class:`SecureNormalSource` in production; an ``np.random.Generator`` in tests."""

    def standard_normal(self, size: int) -> np.ndarray: ...


class SecureNormalSource:
    """Standard normals from an AES-256-CTR keystream (Box-Muller), keyed from the OS.

    ``SecureNormalSource()`` draws a fresh 256-bit key from ``os.urandom``; never reuse or
    log it. :meth:`from_key` exists for reproducible tests only.
    """

    def __init__(self, *, key: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if key is None:
            key = os.urandom(32)
        if not isinstance(key, bytes) or len(key) != 32:
            raise PrivacyError("SecureNormalSource key must be 32 bytes (AES-256)")
        # One encryptor for the object's lifetime: the CTR counter never repeats a block.
        self._stream = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()

    @classmethod
    def from_key(cls, key: bytes) -> SecureNormalSource:
        """A deterministic source for tests. Production code uses ``SecureNormalSource()``."""
        return cls(key=key)

    def _uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")

    def standard_normal(self, size: int) -> np.ndarray:
        """``size`` i.i.d. N(0, 1) float64 values (Box and Muller 1958):
        z0 = sqrt(-2 ln u1) cos(2 pi u2), z1 = sqrt(-2 ln u1) sin(2 pi u2),
        u1 in (0, 1], u2 in [0, 1), each from the top 53 bits of a keystream word."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise PrivacyError(f"size must be an integer >= 0, got {size!r}")
        pairs = (int(size) + 1) // 2
        words = self._uint64(2 * pairs).reshape(pairs, 2)
        scale = 2.0**-53
        u1 = ((words[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * scale
        u2 = (words[:, 1] >> np.uint64(11)).astype(np.float64) * scale
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * math.pi * u2
        out = np.empty(2 * pairs, dtype=np.float64)
        out[0::2] = r * np.cos(theta)
        out[1::2] = r * np.sin(theta)
        return out[:size]


def _finite_array(name: str, vec: object) -> np.ndarray:
    arr = np.asarray(vec)
    if arr.dtype.kind not in "fiu":
        raise PrivacyError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise PrivacyError(f"{name} contains NaN or inf")
    return arr


def clip_to_norm(vec: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    """Scale ``vec`` (any shape, L2 norm over all entries) to norm at most ``clip_norm``.

    Returns ``(clipped, was_clipped)``: ``vec * min(1, C / ||vec||)`` as float64 and whether
    it had to shrink. Runs at the party, before quantisation and secure aggregation; it
    bounds the L2 sensitivity of the sum by C (Abadi et al. 2016, Alg. 1; McMahan et al.
    2018, DP-FedAvg).
    """
    if (
        isinstance(clip_norm, bool)
        or not isinstance(clip_norm, (int, float))
        or not math.isfinite(clip_norm)
        or clip_norm <= 0
    ):
        raise PrivacyError(f"clip_norm must be positive and finite, got {clip_norm!r}")
    arr = _finite_array("vector to clip", vec).astype(np.float64, copy=True)
    norm = float(np.linalg.norm(arr.ravel()))
    if norm <= clip_norm:
        return arr, False
    arr *= (clip_norm / norm) * _CLIP_SAFETY
    return arr, True


def add_gaussian_noise(sum_vec: np.ndarray, std: float, rng: NormalSource) -> np.ndarray:
    """``sum_vec + N(0, std^2)`` per coordinate, float64, a new array (central mode: on the
    aggregate, once per round). ``std`` = noise_multiplier * clip_norm."""
    if (
        isinstance(std, bool)
        or not isinstance(std, (int, float))
        or not math.isfinite(std)
        or std <= 0
    ):
        raise PrivacyError(f"noise std must be positive and finite, got {std!r}")
    if not isinstance(rng, NormalSource):
        raise PrivacyError(f"rng must provide standard_normal(size), got {rng!r}")
    arr = _finite_array("aggregate to noise", sum_vec).astype(np.float64, copy=True)
    noise = np.asarray(rng.standard_normal(arr.size), dtype=np.float64)
    arr += std * noise.reshape(arr.shape)
    return arr
