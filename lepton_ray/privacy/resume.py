"""What a resumed job must count again: over-count, never under-count (DESIGN.md, "Privacy
promises"). Pure: no Ray, no I/O.

A checkpoint at round r holds the model and the DP state *as of the moment it was written*;
anything executed after that moment is not in it, yet may have released something: the
coordinator saw the round's sum, a history row or an evaluation of the new model was written,
or the process died after the sum left. Two books are kept for those rounds:

* **User-level (DP-FedAvg)**: the ledger is write-ahead and never cut, so every execution of
  every round - before and after the checkpoint, in every run - is already charged; a round
  re-run after a resume is charged again (:class:`~lepton_ray.privacy.ledger.Ledger`). Nothing
  to do here; :func:`executions_after` only reads it as one more witness.
* **Record-level (DP-SGD inside each party)**: a party's record-level epsilon composes its
  local DP-SGD run over the rounds it took part in (``Federation.participation``). A round
  executed after the checkpoint and then re-run after the resume is *two* executions of the
  party's mechanism on its records: a party sampled both times has spent twice. Restoring the
  checkpoint's counts alone counts it once (the bug this module fixes).

Who was sampled in a lost execution is not known, and must not be: sampling is secret and never
persisted (so no file could let anyone reproduce it). So the bound assumes the worst: *every*
party took part in *every* lost execution. The number of lost executions comes from the
write-ahead records: the driver appends an fsynced ``round_start`` record to ``audit.jsonl``
before a round samples or trains anybody, and the ledger's charges and the ``round`` records
are further witnesses; :func:`executions_after` takes the largest count. Each execution after
the checkpoint was written has a round number > r (a run resumes from the latest checkpoint
only), so counting records with round > r never misses one; a record already reflected in the
checkpoint (possible only when ``rounds`` changed between runs) is counted again - an
over-count, which is safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lepton_ray.errors import ResumeError

__all__ = ["ROUND_START", "executions_after", "participation_bound"]

ROUND_START = "round_start"
"""The audit-log event a driver writes (fsynced) before a round samples or trains anyone."""


def executions_after(checkpoint_round: int, *, audit_events: Iterable[Mapping[str, Any]],
                     ledger_rounds: Iterable[int] = ()) -> int:
    """How many round executions with round > ``checkpoint_round`` may have released
    something: the largest of the counts of ``round_start`` records, ``round`` records and
    ledger charges for such rounds (each execution writes at most one of each kind)."""
    if isinstance(checkpoint_round, bool) or not isinstance(checkpoint_round, int) \
            or checkpoint_round < 0:
        raise ResumeError(f"checkpoint round must be an integer >= 0, got {checkpoint_round!r}")
    starts = ends = 0
    for e in audit_events:
        rnd = e.get("round")
        if not isinstance(rnd, int) or rnd <= checkpoint_round:
            continue
        if e.get("event") == ROUND_START:
            starts += 1
        elif e.get("event") == "round":
            ends += 1
    charged = sum(1 for r in ledger_rounds if r > checkpoint_round)
    return max(starts, ends, charged)


def participation_bound(saved: np.ndarray, executions: int) -> np.ndarray:
    """Per-party participation counts to resume with: the checkpoint's counts plus
    ``executions`` for every party (each may have taken part in each lost execution)."""
    saved = np.asarray(saved)
    if saved.ndim != 1 or saved.dtype.kind not in "iu" or np.any(saved < 0):
        raise ResumeError("checkpoint participation must be a 1-d array of counts >= 0")
    if isinstance(executions, bool) or not isinstance(executions, int) or executions < 0:
        raise ResumeError(f"lost executions must be an integer >= 0, got {executions!r}")
    return saved.astype(np.int64) + executions
