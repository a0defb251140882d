"""The public, frozen description of one SecAgg+ round that every party and the server share,
its transcript hash, and the job's pinned parameters parties check it against.

**Transcript binding.** :attr:`RoundConfig.transcript` hashes (job, round, round nonce, roster
hash, graph hash, t, dim, ring). Every envelope's associated data, every pairwise and self
mask seed and every signature of the round covers it, so nothing of one execution of a round
(an envelope, a share, a signature) is accepted in another, and a party that was shown another
roster, graph or threshold than its neighbours cannot talk to them at all.

**Parties verify everything public** (:class:`JobPins`). A malicious server could otherwise
hand a party a graph where the victim has no honest neighbour, t = 1, or a roster with its own
keys. Each host holds the job's pins (job id, roster hash, graph seed, neighbour policy,
corrupt fraction) fixed when the job starts; before a round it rebuilds the graph from the
seed and the round's participants, recomputes k and the malicious-secure t
(:func:`~lepton_ray.secagg.graph.secure_threshold`) and refuses the round unless the server's
plan is exactly that.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lepton_ray.crypto.encoding import encode_fields
from lepton_ray.crypto.identity import Roster
from lepton_ray.crypto.prg import ring_dtype
from lepton_ray.errors import ConfigError, ProtocolError
from lepton_ray.secagg.graph import (
    COMPLETE_GRAPH,
    DEFAULT_POLICY,
    GraphTopology,
    NeighbourGraph,
    NeighbourPolicy,
    build_graph,
    choose_neighbours,
    corrupt_neighbour_bound,
    secure_threshold,
)
from lepton_ray.secagg.keys import NONCE_BYTES

MODULUS_BITS = (32, 64)


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """Everything public about a round: job, round number, roster, the neighbour graph over
    the round's participants (party ids = roster indices), threshold t, ring Z_{2^b} and the
    vector length. Build it with :func:`plan_round`; hosts build it once and hand the same
    object to all their parties (it pickles)."""

    def __getstate__(self) -> dict:
        """Only the fields travel: cached hashes are always recomputed by the receiver."""
        return {f: self.__dict__[f] for f in self.__dataclass_fields__}

    job_id: str
    round: int
    roster: Roster
    graph: NeighbourGraph
    threshold: int
    dim: int
    modulus_bits: int = 32
    nonce: bytes = b"\x00" * NONCE_BYTES  # public, fresh per execution (plan_round draws it)
    graph_seed: bytes = b""  # public; parties rebuild the graph from it (JobPins.check)

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

    @cached_property
    def transcript(self) -> bytes:
        """SHA-256 of everything public about this execution of the round (see the module
        docstring); 32 bytes, computed once per config object."""
        return hashlib.sha256(encode_fields(
            _TRANSCRIPT_LABEL, self.job_id, self.round, self.nonce, self.roster.digest,
            self.graph.digest, self.threshold, self.dim, self.modulus_bits)).digest()

    @cached_property
    def transcript_id(self) -> str:
        """:attr:`transcript` as hex: what envelope headers carry in place of the job id."""
        return self.transcript.hex()

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.modulus_bits)

    @property
    def participants(self) -> tuple[int, ...]:
        return self.graph.participants

    @property
    def neighbours(self) -> int:
        return self.graph.degree


_TRANSCRIPT_LABEL = b"lepton-ray/v2/secagg/transcript"


def job_graph_seed(job_id: str) -> bytes:
    """The public seed of a job's neighbour graph: a fixed function of the job id, so a
    party (or a federation site) derives it and the coordinator cannot pick another per
    round. (The coordinator still picks the job id; see the README's threat model.)"""
    return hashlib.sha256(encode_fields(b"lepton-ray/v2/graph-seed", job_id)).digest()


def required_threshold(graph: NeighbourGraph, policy: NeighbourPolicy = DEFAULT_POLICY) -> int:
    """The smallest t secure against a malicious server on ``graph`` (2t > k + 1 + c, c the
    corrupt-neighbour bound of ``policy``; :mod:`lepton_ray.secagg.graph`). Near-regular
    graphs use the nominal degree k, the largest neighbourhood."""
    k = graph.degree
    return secure_threshold(k, corrupt_neighbour_bound(graph.n, k, policy.corrupt_rate,
                                                       policy.security_bits))


def plan_round(*, job_id: str, round_: int, roster: Roster, dim: int, graph_seed: bytes,
               participants: Sequence[int] | None = None, modulus_bits: int = 32,
               neighbours: int | GraphTopology | None = None, threshold: int | None = None,
               policy: NeighbourPolicy = DEFAULT_POLICY, nonce: bytes | None = None) -> RoundConfig:
    """Plan a round: pick k (``neighbours=None``: :func:`choose_neighbours` for ``policy``),
    build the graph from the public ``graph_seed`` and set t (default: the smallest secure t,
    :func:`required_threshold`). The graph depends only on the seed and the participants, so
    a job that keeps its seed keeps its graph (and its parties' pair secrets) while the
    participants stay the same. ``nonce``: the round's public nonce, fresh OS bytes by default
    (one plan = one execution)."""
    ids = tuple(range(len(roster))) if participants is None else tuple(participants)
    if neighbours is None:
        neighbours = choose_neighbours(len(ids), policy)
    graph = build_graph(ids, neighbours, graph_seed)
    t = required_threshold(graph, policy) if threshold is None else threshold
    return RoundConfig(job_id=job_id, round=round_, roster=roster, graph=graph, threshold=t,
                       dim=dim, modulus_bits=modulus_bits, graph_seed=graph_seed,
                       nonce=os.urandom(NONCE_BYTES) if nonce is None else nonce)


@dataclass(frozen=True, kw_only=True)
class JobPins:
    """What a party fixes when it joins a job and checks every round's plan against (see the
    module docstring). ``neighbours``/``threshold``: the job's explicit k and t, if any (an
    explicit t must still be secure); ``min_participants``: the smallest round a party takes
    part in (a sum over very few parties tells the server little less than the inputs)."""

    job_id: str
    roster_digest: bytes
    graph_seed: bytes
    policy: NeighbourPolicy = DEFAULT_POLICY
    neighbours: int | GraphTopology | None = None
    threshold: int | None = None
    min_participants: int = 2

    @classmethod
    def for_job(cls, job_id: str, roster: Roster, secure_aggregation=None) -> JobPins:
        """A job's pins from its roster and its spec's ``secure_aggregation`` section
        (:class:`lepton_ray.config.SecureAggregationSpec`; ``None``: the defaults): the graph
        seed the job id gives, the corrupt fraction as the policy, the complete graph for
        ``secagg``, and the spec's explicit k and t. The driver, a federation coordinator and
        every site build them the same way, and plan with :meth:`plan`."""
        base = dict(job_id=job_id, roster_digest=roster.digest, graph_seed=job_graph_seed(job_id))
        sa = secure_aggregation
        if sa is None:
            return cls(**base)
        from lepton_ray.config import SecureAggregation

        return cls(**base, policy=NeighbourPolicy(corrupt_rate=sa.corrupt_fraction),
                   neighbours=(COMPLETE_GRAPH if sa.mode is SecureAggregation.SECAGG
                               else sa.neighbours),
                   threshold=sa.threshold)

    def plan(self, *, roster: Roster, round_: int, dim: int, participants: Sequence[int],
             modulus_bits: int = 32, nonce: bytes | None = None) -> RoundConfig:
        """:func:`plan_round` with these pins' graph seed, k/t policy and explicit k and t:
        the plan an honest coordinator sends, which :meth:`check` accepts (the roster must
        be the pinned one)."""
        return plan_round(job_id=self.job_id, round_=round_, roster=roster, dim=dim,
                          graph_seed=self.graph_seed, participants=participants,
                          modulus_bits=modulus_bits, neighbours=self.neighbours,
                          threshold=self.threshold, policy=self.policy, nonce=nonce)

    @classmethod
    def of(cls, config: RoundConfig, **kw) -> JobPins:
        """Pins taken from ``config`` itself: its job, roster, graph seed and degree. What is
        left to check is that the graph is the one the seed gives and t is secure; a party
        with no job pins of its own (a test, a one-off :func:`secure_sum`) checks that much."""
        kw.setdefault("neighbours", config.graph.degree)
        return cls(job_id=config.job_id, roster_digest=config.roster.digest,
                   graph_seed=config.graph_seed, **kw)

    def check(self, config: RoundConfig) -> None:
        """:class:`ProtocolError` naming every way ``config`` differs from what these pins
        and the round's participants determine."""
        problems = []
        if config.job_id != self.job_id:
            problems.append(f"job {config.job_id!r}, this party joined job {self.job_id!r}")
        if config.roster.digest != self.roster_digest:
            problems.append("roster is not the job's pinned roster (hash "
                            f"{config.roster.digest.hex()[:16]} != {self.roster_digest.hex()[:16]})")
        if config.graph_seed != self.graph_seed:
            problems.append("graph seed is not the job's")
        n = config.graph.n
        if n < self.min_participants:
            problems.append(f"{n} participants, this party needs at least "
                            f"{self.min_participants}")
        if not problems:
            k = self.neighbours
            if k is None:
                k = choose_neighbours(n, self.policy) if n >= 2 else 1
            try:
                expected = build_graph(config.participants, k, self.graph_seed)
            except ConfigError as exc:
                problems.append(f"no graph for these participants: {exc.problems[0]}")
            else:
                if config.graph is not expected and config.graph != expected:
                    problems.append("neighbour graph is not the one the job's graph seed gives "
                                    f"for these {n} participants (k = {expected.degree})")
                else:
                    t_min = required_threshold(expected, self.policy)
                    if self.threshold is not None:
                        t_min = max(t_min, self.threshold)
                    if config.threshold < t_min:
                        problems.append(f"threshold t = {config.threshold} is below {t_min}, "
                                        "the smallest secure against a malicious server "
                                        f"(2t > k + 1 + c, k = {expected.degree})")
        if problems:
            raise ProtocolError("round plan refused: " + "; ".join(problems))
