"""SmpcCoordinator: the server side of aggregation, as one Ray actor per job.

Modes (``secure_aggregation.mode``):

* ``none`` — plain sum of the hosts' partial sums. The coordinator sees every host's update
  in the clear (with one party per host, every party's update), so this mode says so loudly.
* ``secagg+`` / ``secagg`` — SecAgg+ over the parties' masked, quantised deltas: the
  coordinator learns only the sum (drops into this same seam).
"""

from __future__ import annotations

import logging
import sys

from lepton_ray.config import SecureAggregation
from lepton_ray.learning.aggregation import PartialSum, reduce

PLAINTEXT_WARNING = (
    "WARNING secure_aggregation is 'none': the coordinator sees each host's update in the "
    "clear (with one party per host, each party's own update). Use 'secagg+' unless every "
    "party trusts the coordinator."
)

log = logging.getLogger("lepton_ray.coordinator")


class SmpcCoordinator:
    def __init__(self, mode: SecureAggregation):
        self.mode = mode
        if mode is SecureAggregation.NONE:
            print(PLAINTEXT_WARNING, file=sys.stderr, flush=True)

    def ready(self) -> str:
        return self.mode.value

    def aggregate(self, round_: int, *partials: PartialSum) -> PartialSum:
        """Plaintext path: reduce the hosts' partial sums (Ray resolves them from the store)."""
        return reduce(list(partials))
