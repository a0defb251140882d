"""Local accumulation (on a host) kept apart from reduction (across hosts), as in
pfl-research: a host folds its parties' weighted deltas into one :class:`PartialSum`; the
coordinator reduces the hosts' partial sums. Used by the plaintext (``secure_aggregation:
none``) path; the secure path sums masked ring vectors instead."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PartialSum:
    weighted: np.ndarray  # (d,) float64: sum of w_i * delta_i
    weight: float  # sum of w_i
    parties: int  # number of parties folded in

    @property
    def mean(self) -> np.ndarray:
        if self.weight <= 0:
            raise ValueError("mean of an empty aggregate")
        return self.weighted / self.weight


def accumulate(deltas: np.ndarray, weights: np.ndarray) -> PartialSum:
    """Fold ``k`` deltas ``(k, d)`` with weights ``(k,)`` into one partial sum."""
    if deltas.ndim != 2 or len(weights) != len(deltas):
        raise ValueError(f"deltas {deltas.shape} and weights {np.shape(weights)} do not match")
    w = np.asarray(weights, dtype=np.float64)
    # float64 accumulation in row blocks: exact enough for many parties, no (k, d) float64 copy
    total = np.zeros(deltas.shape[1], dtype=np.float64)
    for b in range(0, len(w), 256):
        total += w[b : b + 256] @ deltas[b : b + 256].astype(np.float64)
    return PartialSum(weighted=total, weight=float(w.sum()), parties=len(w))


def reduce(partials: list[PartialSum]) -> PartialSum:
    if not partials:
        raise ValueError("nothing to reduce")
    d = {p.weighted.shape for p in partials}
    if len(d) != 1:
        raise ValueError(f"partial sums of different shapes: {sorted(d)}")
    total = np.zeros_like(partials[0].weighted)
    for p in partials:
        total += p.weighted
    return PartialSum(
        weighted=total,
        weight=float(sum(p.weight for p in partials)),
        parties=sum(p.parties for p in partials),
    )
