"""The public, frozen description of one SecAgg+ round that every party and the server share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lepton_ray.crypto.identity import Roster
from lepton_ray.crypto.prg import ring_dtype
from lepton_ray.errors import ConfigError
from lepton_ray.secagg.graph import (
    DEFAULT_POLICY,
    GraphTopology,
    NeighbourGraph,
    NeighbourPolicy,
    build_graph,
    choose_neighbours,
    default_threshold,
)
from lepton_ray.secagg.keys import NONCE_BYTES

MODULUS_BITS = (32, 64)


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """Everything public about a round: job, round number, roster, the neighbour graph over
    the round's participants (party ids = roster indices), threshold t, ring Z_{2^b} and the
    vector length. Build it with :func:`plan_round`; hosts build it once and hand the same
    object to all their parties (it pickles)."""

    job_id: str
    round: int
    roster: Roster
    graph: NeighbourGraph
    threshold: int
    dim: int
    modulus_bits: int = 32
    nonce: bytes = b"\x00" * NONCE_BYTES  # public, fresh per execution (plan_round draws it)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.job_id, str) or not self.job_id:
            problems.append(f"secagg.job_id: must be a non-empty string, got {self.job_id!r}")
        if not isinstance(self.round, int) or self.round < 0:
            problems.append(f"secagg.round: must be an int >= 0, got {self.round!r}")
        if self.modulus_bits not in MODULUS_BITS:
            problems.append(f"secagg.modulus_bits: must be 32 or 64, got {self.modulus_bits!r}")
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_BYTES:
            problems.append(f"secagg.nonce: must be {NONCE_BYTES} bytes")
        if not isinstance(self.dim, int) or self.dim < 1:
            problems.append(f"secagg.dim: must be a positive int, got {self.dim!r}")
        outside = [p for p in self.graph.participants if p not in self.roster]
        if outside:
            problems.append(f"secagg.participants: not in the roster: {outside[:10]}")
        holders = self.graph.min_degree + 1
        if not isinstance(self.threshold, int) or not 1 <= self.threshold <= holders:
            problems.append(f"secagg.threshold: must be in [1, {holders}] (smallest "
                            f"neighbourhood incl. the party), got {self.threshold!r}")
        if problems:
            raise ConfigError(problems)

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.modulus_bits)

    @property
    def participants(self) -> tuple[int, ...]:
        return self.graph.participants

    @property
    def neighbours(self) -> int:
        return self.graph.degree


def plan_round(*, job_id: str, round_: int, roster: Roster, dim: int, graph_seed: bytes,
               participants: Sequence[int] | None = None, modulus_bits: int = 32,
               neighbours: int | GraphTopology | None = None, threshold: int | None = None,
               policy: NeighbourPolicy = DEFAULT_POLICY, nonce: bytes | None = None) -> RoundConfig:
    """Plan a round: pick k (``neighbours=None``: :func:`choose_neighbours` for ``policy``),
    build the graph from the public ``graph_seed`` and set t (default k//2 + 1). The graph
    depends only on the seed and the participants, so a job that keeps its seed keeps its
    graph (and its parties' pair secrets) while the participants stay the same. ``nonce``:
    the round's public nonce, fresh OS bytes by default (one plan = one execution)."""
    ids = tuple(range(len(roster))) if participants is None else tuple(participants)
    if neighbours is None:
        neighbours = choose_neighbours(len(ids), policy)
    graph = build_graph(ids, neighbours, graph_seed)
    t = default_threshold(graph.degree) if threshold is None else threshold
    return RoundConfig(job_id=job_id, round=round_, roster=roster, graph=graph, threshold=t,
                       dim=dim, modulus_bits=modulus_bits,
                       nonce=os.urandom(NONCE_BYTES) if nonce is None else nonce)
