"""A site's own privacy ledger across jobs: a lifetime budget the coordinator cannot spend past.

Each job's accountant lives on the coordinator; a site in a federation does not trust it. So the
site keeps its own ledger, one JSON line per charge ``{job, round, epsilon, delta}``, where
``epsilon`` is the job's **cumulative** epsilon after that round as the site itself computes it
from the spec it accepted (:func:`job_epsilon`). Across jobs the site composes with basic
composition (epsilons and deltas add; Dwork and Roth 2014, Thm 3.16), a sound upper bound
whatever the jobs' mechanisms.

Write-ahead: :meth:`SiteLedger.charge` appends and fsyncs the line *before* the site answers the
round, so a crash can over-count (a charge for a round that never ran), never under-count. A
torn last line (crash mid-write) is ignored: the site had not answered yet, so nothing was
released. The file is exclusively locked (``flock``) for the ledger's lifetime: two site
processes cannot both spend the same budget.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

from lepton_ray.errors import BudgetExhaustedError, FederationError


def job_epsilon(spec, rounds: int) -> float:
    """The epsilon of ``rounds`` rounds of ``spec`` at its delta, computed by the site. A job
    without DP has infinite epsilon. With an explicit central noise multiplier: the Poisson-
    subsampled discrete Gaussian over ``rounds`` steps (the bound central jobs are charged);
    otherwise (noise calibrated by the coordinator) the job's whole declared budget, charged
    from round 1."""
    from lepton_ray.config import NoisePlacement, SamplingKind

    p = spec.privacy
    if not p.enabled:
        return math.inf
    if p.noise_multiplier is None or p.noise is not NoisePlacement.CENTRAL:
        return float(p.epsilon)
    # central noise is a discrete Gaussian in the ring: the bound the coordinator charges
    from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon

    q = spec.sampling.fraction if spec.sampling.kind is SamplingKind.POISSON else 1.0
    return float(discrete_gaussian_epsilon(sampling_rate=q, noise_multiplier=p.noise_multiplier,
                                           steps=rounds, delta=p.delta))


class SiteLedger:
    """``lifetime_epsilon`` / ``lifetime_delta``: the site's budget over every job."""

    def __init__(self, path: str | Path, *, lifetime_epsilon: float, lifetime_delta: float = 1e-4):
        self.path = Path(path)
        self.lifetime_epsilon = float(lifetime_epsilon)
        self.lifetime_delta = float(lifetime_delta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise FederationError(f"site ledger {self.path}: locked by another process (one "
                                  "site process per ledger)") from None
        self.jobs: dict[str, tuple[float, float]] = {}  # job -> (epsilon, delta), the largest seen
        self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                job, eps, delta = str(row["job"]), float(row["epsilon"]), float(row["delta"])
            except (ValueError, KeyError, TypeError):
                if i == len(lines) - 1:  # a torn tail: the round was never answered
                    continue
                raise FederationError(f"site ledger {self.path}: line {i + 1} is corrupt") from None
            old = self.jobs.get(job, (0.0, 0.0))
            self.jobs[job] = (max(old[0], eps), max(old[1], delta))

    def spent(self, *, excluding: str | None = None) -> tuple[float, float]:
        """(epsilon, delta) spent over every job (basic composition)."""
        rows = [v for j, v in self.jobs.items() if j != excluding]
        return sum(e for e, _ in rows), sum(d for _, d in rows)

    def charge(self, job: str, round_: int, *, epsilon: float, delta: float) -> None:
        """Record that ``job`` will have spent ``epsilon`` (cumulative) after ``round_``;
        :class:`BudgetExhaustedError` (nothing written) if that exceeds the lifetime budget."""
        other_eps, other_delta = self.spent(excluding=job)
        total, total_delta = other_eps + epsilon, other_delta + delta
        if not (total <= self.lifetime_epsilon and total_delta <= self.lifetime_delta):
            raise BudgetExhaustedError(
                f"site budget: round {round_} of job {job} would bring this site to epsilon "
                f"{total:.4g}, delta {total_delta:.3g} over its lifetime (limit epsilon "
                f"{self.lifetime_epsilon:g}, delta {self.lifetime_delta:g}; other jobs spent "
                f"{other_eps:.4g}): refused")
        line = json.dumps({"job": job, "round": int(round_), "epsilon": float(epsilon),
                           "delta": float(delta)}).encode() + b"\n"
        os.write(self._fd, line)
        os.fsync(self._fd)
        old = self.jobs.get(job, (0.0, 0.0))
        self.jobs[job] = (max(old[0], epsilon), max(old[1], delta))

    def close(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SiteLedger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
