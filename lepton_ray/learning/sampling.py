"""Which parties take part in a round, drawn from the OS CSPRNG.

* ``all``: every party, every round.
* ``fixed``: a uniform sample of ``max(min_parties, round(fraction * n))`` parties without
  replacement (a partial Fisher-Yates shuffle driven by unbiased uniform integers).
* ``poisson``: each party independently with probability ``fraction`` (the sampling that
  privacy amplification by subsampling assumes; the round's size is random and may be 0).

Why secret: amplification by subsampling holds only if whoever sees the output cannot tell
who was sampled. The sample used to come from a generator seeded with ``spec.seed`` and the
round; the seed is in the spec, ``model.pt`` and the checkpoint, so anyone holding the model
reproduced the sample, and a party's real epsilon was the unsampled one (issue 13: 14.5
instead of 3 for the most-sampled party). Now every draw reads ``randbytes`` -
``os.urandom`` in production, never stored, never derived from the spec. ``spec.seed``
still governs what is public by design (data split, initial model, neighbour graph).

Poisson with rate q: party i is in iff u_i < floor(q 2^64), u_i a uniform 64-bit integer,
so its probability is floor(q 2^64) / 2^64, in (q - 2^-64, q] - never above q. The
accountant charges rate q; subsampled RDP bounds are non-decreasing in q, so charging the
slightly larger q over-counts, never under-counts (and a rate of exactly 0 or 1 is exact).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from lepton_ray.config import SamplingKind, SamplingSpec

RandBytes = Callable[[int], bytes]


def bernoulli_mask(n: int, q: float, randbytes: RandBytes = os.urandom) -> np.ndarray:
    """``n`` independent Bernoulli(q') flags, q' = floor(q 2^64) / 2^64 (exact integer
    comparison; see the module docstring)."""
    if q >= 1:
        return np.ones(n, dtype=bool)
    threshold = int(Fraction(q) * (1 << 64))  # floor: Fraction is exact for a float q
    if threshold <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    words = np.frombuffer(randbytes(8 * n), dtype="<u8")
    return words < np.uint64(threshold)


def uniform_int(m: int, randbytes: RandBytes = os.urandom) -> int:
    """A uniform integer in [0, m): rejection on ceil(log2 m) random bits (no modulo bias)."""
    if m <= 1:
        return 0
    bits = (m - 1).bit_length()
    nbytes = (bits + 7) // 8
    while True:
        r = int.from_bytes(randbytes(nbytes), "little") & ((1 << bits) - 1)
        if r < m:
            return r


def sample_parties(spec: SamplingSpec, n_parties: int,
                   randbytes: RandBytes = os.urandom) -> np.ndarray:
    """The round's sorted party ids; every random choice reads ``randbytes``."""
    if spec.kind is SamplingKind.ALL:
        return np.arange(n_parties)
    if spec.kind is SamplingKind.FIXED:
        m = min(n_parties, max(spec.min_parties, int(round(spec.fraction * n_parties))))
        ids = list(range(n_parties))
        for i in range(m):  # partial Fisher-Yates: the first m slots are a uniform m-subset
            j = i + uniform_int(n_parties - i, randbytes)
            ids[i], ids[j] = ids[j], ids[i]
        return np.sort(np.asarray(ids[:m], dtype=np.int64))
    return np.flatnonzero(bernoulli_mask(n_parties, spec.fraction, randbytes))
