"""SecAgg+ secure aggregation as pure state machines (no Ray, no I/O).

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS) on the sparse random neighbour graph of Bell et al. 2020 ("Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS); the complete graph gives
classic SecAgg. Modules:

* :mod:`.stages`   - :class:`Stage`, :class:`RejectionReason`, :class:`Rejection`
* :mod:`.messages` - one frozen message type per stage
* :mod:`.graph`    - neighbour graph, automatic k, default threshold
* :mod:`.plan`     - :class:`RoundConfig` (public round description and its transcript),
  :func:`plan_round`, :class:`JobPins` (what parties check every plan against)
* :mod:`.signing`  - what parties sign and commit to
* :mod:`.party`    - :class:`SecAggParty` (party side)
* :mod:`.cohort`   - :class:`PartyCohort` (a host's parties in batch, one masked sum)
* :mod:`.server`   - :class:`SecAggServer` (server side)
* :mod:`.local`    - :func:`secure_sum` and :func:`run_local_round` (all in one process)
* :mod:`.quantize` - clipping, scaling, stochastic rounding into Z_{2^b} and back
"""

from lepton_ray.secagg.cohort import PartyCohort
from lepton_ray.secagg.graph import (
    COMPLETE_GRAPH,
    GraphTopology,
    NeighbourGraph,
    NeighbourPolicy,
    build_graph,
    choose_neighbours,
    default_threshold,
)
from lepton_ray.secagg.local import StageTimings, run_local_round, secure_sum
from lepton_ray.secagg.messages import (
    AdvertiseKeys,
    AggregateResult,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedInput,
    MaskedSum,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from lepton_ray.secagg.party import SecAggParty
from lepton_ray.secagg.plan import JobPins, RoundConfig, plan_round, required_threshold
from lepton_ray.secagg.server import SecAggServer
from lepton_ray.secagg.stages import Rejection, RejectionReason, Stage

__all__ = [
    "COMPLETE_GRAPH",
    "AdvertiseKeys",
    "AggregateResult",
    "ConsistencyRequest",
    "ConsistencySignature",
    "GraphTopology",
    "JobPins",
    "KeyBroadcast",
    "MaskedInput",
    "MaskedSum",
    "NeighbourGraph",
    "NeighbourPolicy",
    "PartyCohort",
    "Rejection",
    "RejectionReason",
    "RoundConfig",
    "SecAggParty",
    "SecAggServer",
    "ShareInbox",
    "ShareKeys",
    "Stage",
    "StageTimings",
    "UnmaskRequest",
    "UnmaskResponse",
    "build_graph",
    "choose_neighbours",
    "default_threshold",
    "plan_round",
    "required_threshold",
    "run_local_round",
    "secure_sum",
]
