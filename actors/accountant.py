"""DpAccountant: the object that keeps a job's privacy books, in the driver's process.

It runs beside the driver (not as a separate Ray actor, which Ray may place on another node,
with its own disk): the ledger must sit with the job's other outputs and under the job's
ledger lock, which the driver holds for the job's lifetime (``lock``). A thin shell around
:class:`lepton_ray.privacy.ledger.Ledger`: the driver charges each round's event *before*
anything noised is released; the charge is appended to ``ledger.jsonl`` and fsynced first, so
a crash can over-count, never under-count. A charge past the budget raises
``BudgetExhaustedError`` and writes nothing. Opening an existing ledger (a resumed job)
replays it: the spent budget never decreases.
"""

from __future__ import annotations

from pathlib import Path

from lepton_ray.privacy.accountants import AccountantKind
from lepton_ray.privacy.budget import PrivacyBudget
from lepton_ray.privacy.events import Event
from lepton_ray.privacy.ledger import Ledger, LedgerLock


class DpAccountant:
    def __init__(self, path: str, epsilon: float, delta: float, kind: AccountantKind,
                 lock: LedgerLock | None = None):
        self.ledger = Ledger.open(Path(path), budget=PrivacyBudget(epsilon=epsilon, delta=delta),
                                  accountant=kind, lock=lock)

    def spent(self) -> float:
        return self.ledger.spent_epsilon

    def epsilon_if_charged(self, event: Event) -> float:
        return self.ledger.epsilon_if_charged(event)

    def charge(self, round_: int, event: Event, note: str = "") -> float:
        return self.ledger.charge(round=round_, event=event, note=note)

    def close(self) -> None:
        self.ledger.close()
