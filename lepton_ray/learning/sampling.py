"""Which parties take part in a round.

* ``all``: every party, every round.
* ``fixed``: a uniform sample of ``max(min_parties, round(fraction * n))`` parties without
  replacement.
* ``poisson``: each party independently with probability ``fraction`` (the sampling that
  privacy amplification by subsampling assumes; the round's size is random and may be 0).
"""

from __future__ import annotations

import numpy as np

from lepton_ray.config import SamplingKind, SamplingSpec


def sample_parties(spec: SamplingSpec, n_parties: int, rng: np.random.Generator) -> np.ndarray:
    if spec.kind is SamplingKind.ALL:
        return np.arange(n_parties)
    if spec.kind is SamplingKind.FIXED:
        m = min(n_parties, max(spec.min_parties, int(round(spec.fraction * n_parties))))
        return np.sort(rng.choice(n_parties, size=m, replace=False))
    return np.flatnonzero(rng.random(n_parties) < spec.fraction)


def round_rng(seed: int, round_: int) -> np.random.Generator:
    """Public per-round randomness (sampling), reproducible from the job seed."""
    return np.random.default_rng([seed, round_, 0x5A])
