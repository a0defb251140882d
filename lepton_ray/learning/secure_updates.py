"""A party's model delta as a SecAgg input, and the secure sum back as a weighted mean.

Example-weighted FedAvg needs sum_i w_i delta_i and sum_i w_i, and secure aggregation only
reveals sums, so each party contributes one vector ``[w~_i * clip(delta_i), w~_i]`` of
length d + 1, where ``clip`` bounds the L2 norm by C and ``w~_i = min(n_i, W) / W`` is its
example count capped at the public ``W`` (default: the largest party's count, which makes
the weighting exact). The combined vector has norm at most sqrt(C^2 + 1), which is what the
quantiser's overflow bound uses. Clipping is never silent: the caller counts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lepton_ray.secagg.quantize import (
    QuantizationSpec,
    clip_l2,
    dequantize,
    quantize,
    require_no_overflow,
)


def combined_norm(clip_norm: float) -> float:
    """Largest L2 norm of an encoded update: sqrt(C^2 + 1) (the weight coordinate is <= 1)."""
    return math.sqrt(clip_norm**2 + 1.0)


def quantization_for(*, n_parties: int, clip_norm: float, modulus_bits: int, dim: int,
                     scale: float | None = None) -> QuantizationSpec:
    """The round's quantisation: the automatic scale for ``n_parties``, or ``scale`` checked
    against overflow (``ConfigError`` naming the limit if n parties could overflow)."""
    norm = combined_norm(clip_norm)
    if scale is None:
        return QuantizationSpec.automatic(n_parties=n_parties, clip_norm=norm, modulus_bits=modulus_bits)
    require_no_overflow(n_parties, norm, scale, modulus_bits, dim + 1)
    return QuantizationSpec(clip_norm=norm, scale=scale, modulus_bits=modulus_bits)


@dataclass(frozen=True, eq=False)
class EncodedUpdate:
    ring: np.ndarray  # (d + 1,) uint32/uint64
    norm: float  # the delta's L2 norm before clipping
    clipped: bool


def encode_update(delta: np.ndarray, examples: int, *, clip_norm: float, weight_cap: float,
                  quant: QuantizationSpec, key: bytes | None = None) -> EncodedUpdate:
    clipped = clip_l2(delta, clip_norm)
    w = min(float(examples), weight_cap) / weight_cap
    combined = np.empty(len(clipped.vector) + 1, dtype=np.float64)
    np.multiply(clipped.vector, w, out=combined[:-1])
    combined[-1] = w
    q = quantize(combined, quant, key=key)
    return EncodedUpdate(ring=q.values, norm=clipped.norm, clipped=clipped.clipped)


def decode_sum(total: np.ndarray, quant: QuantizationSpec) -> tuple[np.ndarray, float]:
    """(sum of w~_i * clip(delta_i), sum of w~_i) from the ring sum."""
    flat = dequantize(total, quant)
    return flat[:-1], float(flat[-1])


@dataclass(frozen=True)
class SecureRoundPlan:
    """What every host and the coordinator share about one secure round: the SecAgg+
    round config (roster, graph, threshold, ring), the quantisation and the weight cap."""

    config: object  # lepton_ray.secagg.RoundConfig
    quantization: QuantizationSpec
    weight_cap: float
