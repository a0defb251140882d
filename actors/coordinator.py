"""SmpcCoordinator: the server side of aggregation, one Ray actor per job.

Modes (``secure_aggregation.mode``):

* ``secagg+`` / ``secagg`` — the server side of SecAgg+ (:class:`lepton_ray.secagg.SecAggServer`):
  relays encrypted shares between parties, collects masked inputs, asks survivors for the
  shares that remove masks, and outputs only the sum in Z_{2^b}. It never holds a single
  party's unmasked update.
* ``none`` — plain sum of the hosts' partial sums. The coordinator sees every host's update
  in the clear (with one party per host, every party's update), so this mode says so loudly.

Secure stage methods take each host's message list (Ray resolves the refs) and return
``(StageStatus, payload...)``: a round that falls below threshold is reported as aborted,
never released.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from lepton_ray.config import SecureAggregation
from lepton_ray.errors import ThresholdError
from lepton_ray.learning.aggregation import PartialSum, reduce

PLAINTEXT_WARNING = (
    "WARNING secure_aggregation is 'none': the coordinator sees each host's update in the "
    "clear (with one party per host, each party's own update). Use 'secagg+' unless every "
    "party trusts the coordinator."
)


@dataclass(frozen=True)
class StageStatus:
    ok: bool
    reason: str = ""
    rejections: tuple = ()  # lepton_ray.secagg.Rejection values, new at this stage


class SmpcCoordinator:
    def __init__(self, mode: SecureAggregation):
        self.mode = mode
        self.server = None
        self._seen_rejections = 0
        if mode is SecureAggregation.NONE:
            print(PLAINTEXT_WARNING, file=sys.stderr, flush=True)

    def ready(self) -> str:
        return self.mode.value

    # ------------------------------------------------------------------ plaintext
    def aggregate(self, round_: int, *partials: PartialSum) -> PartialSum:
        """Reduce the hosts' partial sums (Ray resolves them from the object store)."""
        return reduce(list(partials))

    # ------------------------------------------------------------------ SecAgg+
    def begin(self, plan) -> None:
        from lepton_ray.secagg import SecAggServer

        self.server = SecAggServer(plan.config)
        self._seen_rejections = 0

    def collect_adverts(self, *host_messages):
        return self._stage(lambda msgs: self.server.collect_adverts(msgs), host_messages)

    def route_shares(self, host_parties: list[list[int]], *host_messages):
        """Returns ``(status, inbox dict for host 0, for host 1, ...)``: each host receives
        only its own parties' encrypted shares."""
        status, inboxes = self._stage(lambda msgs: self.server.route_shares(msgs), host_messages)
        if not status.ok:
            return (status, *({} for _ in host_parties))
        per_host = tuple({p: inboxes[p] for p in parties if p in inboxes} for parties in host_parties)
        return (status, *per_host)

    def collect_masked(self, *host_messages):
        return self._stage(lambda msgs: self.server.collect_masked(msgs), host_messages)

    def finish(self, *host_messages):
        return self._stage(lambda msgs: self.server.finish(msgs), host_messages)

    def _stage(self, work, host_messages):
        messages = [m for batch in host_messages for m in batch]
        try:
            out = work(messages)
        except ThresholdError as exc:
            return StageStatus(False, str(exc), self._new_rejections()), None
        return StageStatus(True, "", self._new_rejections()), out

    def _new_rejections(self) -> tuple:
        allr = self.server.rejections if self.server is not None else ()
        new = tuple(allr[self._seen_rejections :])
        self._seen_rejections = len(allr)
        return new
