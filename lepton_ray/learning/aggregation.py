"""Local accumulation (on a host) kept apart from reduction (across hosts), as in
pfl-research: a host folds its parties' vectors (:func:`lepton_ray.learning.party_update.fold`)
into one :class:`PartialSum`; the coordinator reduces the hosts' partial sums. This is the
plaintext (``secure_aggregation: none``) path; the secure path sums masked ring vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PartialSum:
    total: np.ndarray  # (d + 1 + e,) float64: sum of the parties' update vectors
    parties: int  # number of parties folded in


def reduce(partials: list[PartialSum]) -> PartialSum:
    if not partials:
        raise ValueError("nothing to reduce")
    shapes = {p.total.shape for p in partials}
    if len(shapes) != 1:
        raise ValueError(f"partial sums of different shapes: {sorted(shapes)}")
    total = np.zeros_like(partials[0].total)
    for p in partials:
        total += p.total
    return PartialSum(total=total, parties=sum(p.parties for p in partials))
