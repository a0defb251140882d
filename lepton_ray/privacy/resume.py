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
  local DP-SGD run over the rounds it took part in (each ``PartyHost`` counts its own parties;
  the counts never leave it). A round executed after the checkpoint and then re-run after the
  resume is *two* executions of the party's mechanism on its records: a party sampled both
  times has spent twice. Counting only the checkpoint's rounds counts it once (the bug this
  module fixes); :func:`prior_executions` is what a resumed job's hosts start from.

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

from lepton_ray.errors import ResumeError

__all__ = ["ROUND_START", "executions_after", "prior_executions"]

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


def prior_executions(checkpoint_executions: int, executions: int) -> int:
    """Round executions a resumed job's hosts count every party in (record-level DP-SGD
    accounting): the ``checkpoint_executions`` the checkpoint records (its rounds, and any
    re-run of them in an earlier resume) plus the ``executions`` after it that may have
    released something. Who was sampled is secret and never written, so each
    party is counted in every one of them: over-count, never under-count."""
    for name, value in (("checkpoint executions", checkpoint_executions),
                        ("lost executions", executions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ResumeError(f"{name} must be an integer >= 0, got {value!r}")
    return checkpoint_executions + executions
