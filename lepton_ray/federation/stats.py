"""What the simulation computes over pooled data, computed across sites without pooling.

**Standardisation.** ``data.standardize`` needs the mean and standard deviation of every
feature over all training rows. Each site encodes its row count, per-feature sums and sums of
squares as fixed-point elements of Z_{2^64} (:func:`encode_moments`); SecAgg+ sums them; the
coordinator decodes the totals (:func:`decode_moments`) into mean = S1/n and population variance
S2/n - mean^2 (the same statistics as ``numpy.std``, which the simulation uses), and sends them
back. The coordinator learns only the pooled moments, never a site's own (the secure sum's
promise). Fixed point: each value is rounded to a multiple of 2^-``frac_bits``; the site refuses
values whose sums could wrap the ring (:func:`encode_moments` checks the bound), so the decoded
totals are exact up to that rounding.

**Agreement.** Every site must have the same feature columns, in the same order, as the
coordinator's test file, and only labels from its class set (a site may lack some classes:
non-IID data). :func:`schema_problems` names every difference, so a site that disagrees is
refused with a message rather than training a model on misaligned columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lepton_ray.errors import DataError

FRAC_BITS = 20
_LIMIT = 2.0**62  # |any sum| in fixed point stays below this: no wrap in Z_{2^64}


def moments_width(features: int) -> int:
    return 1 + 2 * features


def encode_moments(X: np.ndarray, *, frac_bits: int = FRAC_BITS, max_sites: int = 1024) -> np.ndarray:
    """``[n, sum x_j, sum x_j^2]`` of this site's rows in Z_{2^64} (two's complement fixed
    point). :class:`DataError` if the values are not finite or so large that ``max_sites``
    such sums could wrap the ring."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"moments: expected a (rows, features) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise DataError("moments: the site's features hold NaN or inf")
    scale = float(2**frac_bits)
    s1 = np.round(X * scale).sum(axis=0)
    s2 = np.round(X * X * scale).sum(axis=0)
    if max(np.abs(s1).max(initial=0), s2.max(initial=0), len(X) * scale) * max_sites >= _LIMIT:
        raise DataError(f"moments: feature values too large for {frac_bits}-bit fixed point in "
                        "Z_{2^64}; lower frac_bits")
    out = np.concatenate([[len(X) * scale], s1, s2])
    return out.astype(np.int64).view(np.uint64)


def decode_moments(total: np.ndarray, features: int, *, frac_bits: int = FRAC_BITS
                   ) -> tuple[int, np.ndarray, np.ndarray]:
    """``(rows, mean, scale)`` from the secure sum of every site's :func:`encode_moments`;
    ``scale`` is the population standard deviation, 1 where it is 0 (as in the simulation)."""
    total = np.asarray(total)
    if total.shape != (moments_width(features),):
        raise DataError(f"moments: expected {moments_width(features)} sums, got {total.shape}")
    values = total.astype(np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits
    n = int(round(values[0]))
    if n < 1:
        raise DataError("moments: no rows across the sites")
    mean = values[1:1 + features] / n
    var = np.maximum(values[1 + features:] / n - mean**2, 0.0)
    scale = np.sqrt(var)
    scale[scale == 0] = 1.0
    return n, mean, scale


def schema_problems(columns: Sequence[str], labels: Sequence, *, features: Sequence[str],
                    classes: Sequence) -> list[str]:
    """Every way a site's columns and labels disagree with the federation's; empty: agrees."""
    out = []
    columns, features = list(columns), list(features)
    if columns != features:
        missing = [c for c in features if c not in columns]
        extra = [c for c in columns if c not in features]
        if missing or extra:
            out.append(f"feature columns differ: missing {missing[:10]}, unexpected {extra[:10]}")
        else:
            out.append("feature columns are in a different order than the federation's")
    unknown = sorted({str(v) for v in labels} - {str(c) for c in classes})
    if unknown:
        out.append(f"labels outside the federation's class set {list(map(str, classes))[:20]}: "
                   f"{unknown[:10]}")
    return out
