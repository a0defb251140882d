"""Float updates <-> ring elements of Z_{2^b}: clip, scale, stochastic rounding, wrap, lift.

The pipeline of Kairouz, Liu & Steinke 2021 ("The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation", ICML, §4) without the noise step (noise is
:mod:`lepton_ray.privacy`'s business):

1. clip the update to L2 norm C (:func:`clip_l2`, reports whether it clipped);
2. multiply by a scale s and round *stochastically*: x -> floor(x) + Bernoulli(x - floor(x)),
   which is unbiased (E[round(x)] = x) and off by less than 1 per coordinate; the Bernoulli
   draws come from AES-256-CTR under a fresh OS key (or a key passed in), never np.random;
3. map to Z_{2^b} by two's complement wrap (:func:`to_ring`); SecAgg sums in the ring;
4. lift the ring sum to the centred range [-2^(b-1), 2^(b-1)) and divide by s
   (:func:`dequantize`).

The lift is exact as long as the true integer sum of every coordinate stays in the centred
range. Worst case (:func:`check_no_overflow`): one coordinate can carry a party's whole norm
C, so |coordinate| <= C s + 1 after rounding and the sum of n parties is at most
n (C s + 1), which must stay <= 2^(b-1) - 1. :func:`auto_scale` picks the largest s meeting
this with a safety factor ``headroom`` (default 2, i.e. one spare bit for noise or slack).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from lepton_ray.crypto.kdf import KeyPurpose, derive_key
from lepton_ray.crypto.prg import keystream, ring_dtype
from lepton_ray.errors import ConfigError, DataError

_SIGNED = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


def _check_bits(modulus_bits: int) -> None:
    if modulus_bits not in _SIGNED:
        raise ConfigError([f"secagg.modulus_bits: must be 32 or 64, got {modulus_bits!r}"])


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError([f"secagg.{name}: must be a positive finite number, got {value!r}"])


def auto_scale(n_parties: int, clip_norm: float, modulus_bits: int = 32, *,
               headroom: float = 2.0) -> float:
    """The largest scale s with headroom * n * (C s + 1) <= 2^(b-1) - 1."""
    _check_bits(modulus_bits)
    _check_positive("clip_norm", clip_norm)
    _check_positive("headroom", headroom)
    if not isinstance(n_parties, int) or n_parties < 1:
        raise ConfigError([f"secagg.parties: must be a positive int, got {n_parties!r}"])
    limit = 2 ** (modulus_bits - 1) - 1
    scale = (limit / (headroom * n_parties) - 1.0) / clip_norm
    if scale <= 0:
        raise ConfigError([
            (f"secagg.modulus_bits: Z_2^{modulus_bits} has no room for {n_parties} parties with "
            f"headroom {headroom}: even scale 0 overflows through rounding; use 64 bits")])
    return scale


@dataclass(frozen=True)
class OverflowCheck:
    """Result of :func:`check_no_overflow`; ``message`` says why in one sentence."""

    ok: bool
    worst_case: float
    limit: int
    max_safe_scale: float
    message: str


def check_no_overflow(n_parties: int, clip_norm: float, scale: float, modulus_bits: int,
                      dim: int) -> OverflowCheck:
    """Can ``n_parties`` clipped to ``clip_norm``, scaled by ``scale`` (precision
    log2(scale) bits), overflow the centred range of Z_{2^b} in some coordinate?

    Worst case n (C s + 1) against 2^(b-1) - 1; ``dim`` only enters the message (the bound
    holds for any dimension because one coordinate may carry the whole norm).
    """
    _check_bits(modulus_bits)
    _check_positive("clip_norm", clip_norm)
    _check_positive("scale", scale)
    if not isinstance(n_parties, int) or n_parties < 1:
        raise ConfigError([f"secagg.parties: must be a positive int, got {n_parties!r}"])
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError([f"secagg.dim: must be a positive int, got {dim!r}"])
    limit = 2 ** (modulus_bits - 1) - 1
    worst = n_parties * (clip_norm * scale + 1.0)
    max_safe = (limit / n_parties - 1.0) / clip_norm
    where = (f"{n_parties} parties x (clip norm {clip_norm:g} x scale {scale:.6g} + 1 for "
             f"rounding) = {worst:.6g} in one of {dim} coordinates")
    if worst <= limit:
        msg = (f"no overflow: {where} <= 2^{modulus_bits - 1} - 1 = {limit} "
               f"(x{limit / worst:.3g} headroom)")
    else:
        msg = (f"overflow possible: {where} > 2^{modulus_bits - 1} - 1 = {limit}; use "
               f"scale <= {max(max_safe, 0.0):.6g}, a smaller clip norm, fewer parties per "
               f"round or modulus_bits=64")
    return OverflowCheck(worst <= limit, worst, limit, max_safe, msg)


def require_no_overflow(n_parties: int, clip_norm: float, scale: float, modulus_bits: int,
                        dim: int) -> OverflowCheck:
    """:func:`check_no_overflow`, raising :class:`ConfigError` with its message if not ok."""
    check = check_no_overflow(n_parties, clip_norm, scale, modulus_bits, dim)
    if not check.ok:
        raise ConfigError([f"secagg.scale: {check.message}"])
    return check


@dataclass(frozen=True, kw_only=True)
class QuantizationSpec:
    """Clip norm C, scale s and ring size b shared by all parties of a round."""

    clip_norm: float
    scale: float
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        _check_positive("clip_norm", self.clip_norm)
        _check_positive("scale", self.scale)
        _check_bits(self.modulus_bits)

    @classmethod
    def automatic(cls, *, n_parties: int, clip_norm: float, modulus_bits: int = 32,
                  headroom: float = 2.0) -> QuantizationSpec:
        """The spec with :func:`auto_scale`'s scale for ``n_parties``."""
        return cls(clip_norm=clip_norm, modulus_bits=modulus_bits,
                   scale=auto_scale(n_parties, clip_norm, modulus_bits, headroom=headroom))


@dataclass(frozen=True, eq=False)
class ClipResult:
    vector: np.ndarray
    norm: float
    clipped: bool


def clip_l2(vector: np.ndarray, clip_norm: float) -> ClipResult:
    """Scale ``vector`` down to L2 norm ``clip_norm`` if it is longer (float64 copy)."""
    _check_positive("clip_norm", clip_norm)
    v = np.asarray(vector, dtype=np.float64)
    if v.ndim != 1:
        raise DataError(f"update must be a 1-D vector, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise DataError(f"update has a non-finite value {v[bad]} at index {bad}")
    norm = float(np.linalg.norm(v))
    if norm > clip_norm:
        return ClipResult(v * (clip_norm / norm), norm, True)
    return ClipResult(v.copy(), norm, False)


def stochastic_round(values: np.ndarray, key: bytes | None = None) -> np.ndarray:
    """Unbiased randomised rounding to int64: floor(x) + [r < (x - floor(x)) 2^32], r a
    uniform 32-bit integer from AES-256-CTR keyed by HKDF(key) (``key=None``: 32 fresh bytes
    from the OS). P(round up) = ceil(frac 2^32) / 2^32, within 2^-32 of frac, so the bias is
    below 2^-32 per coordinate: far under the quantisation step. One 4-byte keystream word
    per coordinate and an integer-valued comparison keep this a few passes over the vector."""
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)) or (x.size and np.max(np.abs(x)) >= 2.0**62):
        raise DataError("stochastic_round: values must be finite and below 2**62 in magnitude")
    secret = os.urandom(32) if key is None else key
    r = np.frombuffer(keystream(derive_key(secret, KeyPurpose.STOCHASTIC_ROUNDING), 4 * x.size),
                      dtype="<u4").reshape(x.shape)
    low = np.floor(x)
    frac = x - low
    frac *= 4294967296.0
    return low.astype(np.int64) + (r < frac)


def to_ring(values: np.ndarray, modulus_bits: int = 32) -> np.ndarray:
    """Signed integers -> Z_{2^b} by two's complement wrap (x mod 2^b)."""
    _check_bits(modulus_bits)
    return np.asarray(values, dtype=np.int64).astype(_SIGNED[modulus_bits]).view(
        ring_dtype(modulus_bits))


def centred_lift(ring: np.ndarray, modulus_bits: int = 32) -> np.ndarray:
    """Z_{2^b} -> the representative in [-2^(b-1), 2^(b-1)) (int64)."""
    _check_bits(modulus_bits)
    arr = np.ascontiguousarray(ring, dtype=ring_dtype(modulus_bits))
    return arr.view(_SIGNED[modulus_bits]).astype(np.int64)


@dataclass(frozen=True, eq=False)
class QuantizedUpdate:
    """A party's update as ring elements, with its pre-clipping norm and whether it clipped."""

    values: np.ndarray
    norm: float
    clipped: bool


def quantize(update: np.ndarray, spec: QuantizationSpec, *,
             key: bytes | None = None) -> QuantizedUpdate:
    """Clip to ``spec.clip_norm``, scale, round stochastically, wrap into Z_{2^b}."""
    clipped = clip_l2(update, spec.clip_norm)
    rounded = stochastic_round(clipped.vector * spec.scale, key)
    return QuantizedUpdate(to_ring(rounded, spec.modulus_bits), clipped.norm, clipped.clipped)


def dequantize(total: np.ndarray, spec: QuantizationSpec) -> np.ndarray:
    """The float sum from a ring sum: centred lift, then divide by the scale."""
    return centred_lift(total, spec.modulus_bits).astype(np.float64) / spec.scale
