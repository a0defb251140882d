"""Run every party and the server of a round in one process, through the real protocol.

:func:`run_local_round` is the in-process driver used by :func:`secure_sum`, the benchmark
and the tests; the Ray runtime does the same with one batched call per host per stage. Each
stage's party -> server messages can pass through a *filter* (tests use it to tamper with,
replay or forge messages), and a :class:`StageTimings` collects party- and server-side time.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from lepton_ray.crypto.identity import IdentityKey, Roster, SignatureVerifier
from lepton_ray.crypto.prg import MaskExpander, ring_dtype
from lepton_ray.errors import ConfigError, DataError, ProtocolError, ThresholdError
from lepton_ray.secagg.graph import GraphTopology, NeighbourPolicy
from lepton_ray.secagg.keys import PartyKeyring
from lepton_ray.secagg.messages import AggregateResult
from lepton_ray.secagg.party import SecAggParty
from lepton_ray.secagg.plan import RoundConfig, plan_round
from lepton_ray.secagg.server import SecAggServer
from lepton_ray.secagg.stages import Stage

MessageFilter = Callable[[list], list]


@dataclass
class StageTimings:
    """Seconds spent per stage: summed over all parties, and by the server."""

    party: dict[Stage, float] = field(default_factory=lambda: dict.fromkeys(Stage, 0.0))
    server: dict[Stage, float] = field(default_factory=lambda: dict.fromkeys(Stage, 0.0))
    setup: float = 0.0

    @property
    def total(self) -> float:
        return self.setup + sum(self.party.values()) + sum(self.server.values())


@dataclass(frozen=True)
class PartyFailure:
    """A party that aborted on its own side (it then behaves as a dropout)."""

    party: int
    stage: Stage
    error: str


@dataclass
class LocalRound:
    """The parties and server of one in-process round (exposed for tests and benchmarks)."""

    config: RoundConfig
    parties: dict[int, SecAggParty]
    server: SecAggServer
    failures: list[PartyFailure] = field(default_factory=list)


def make_local_round(config: RoundConfig, identities: Mapping[int, IdentityKey], *,
                     entropy: Callable[[int], bytes] = os.urandom,
                     keyring: PartyKeyring | None = None,
                     server_verifier: SignatureVerifier | None = None) -> LocalRound:
    """One host holding every participant with an identity, and a server, as separate
    trust domains (separate key material, signature caches and mask buffers). Pass the
    ``keyring`` and ``server_verifier`` of an earlier round to run the next round of the same
    parties (their long-term keys and pair secrets carry over)."""
    keyring = keyring if keyring is not None else PartyKeyring(entropy)
    expander = MaskExpander(config.dim, config.dtype)
    parties = {p: SecAggParty(party=p, identity=identities[p], config=config,
                              keyring=keyring, expander=expander, entropy=entropy)
               for p in config.participants if p in identities}
    server = SecAggServer(config, verifier=server_verifier or SignatureVerifier(),
                          expander=MaskExpander(config.dim, config.dtype))
    return LocalRound(config, parties, server)


def run_local_round(config: RoundConfig, identities: Mapping[int, IdentityKey],
                    inputs: Mapping[int, np.ndarray], *,
                    silent: Mapping[Stage, Collection[int]] | None = None,
                    filters: Mapping[Stage, MessageFilter] | None = None,
                    timings: StageTimings | None = None,
                    entropy: Callable[[int], bytes] = os.urandom,
                    local: LocalRound | None = None) -> AggregateResult:
    """Drive one round: each stage, every live party not ``silent`` at that stage speaks,
    its messages pass through ``filters[stage]`` and reach the server. Raises
    :class:`ThresholdError` if the round aborts."""
    t0 = time.perf_counter()
    local = local or make_local_round(config, identities, entropy=entropy)
    timings = timings if timings is not None else StageTimings()
    timings.setup += time.perf_counter() - t0
    silent = {Stage.parse(s): frozenset(ps) for s, ps in (silent or {}).items()}
    filters = dict(filters or {})
    gone: set[int] = set()

    def speak(stage: Stage, eligible: Iterable[int], act: Callable[[SecAggParty], object]):
        messages = []
        quiet = silent.get(stage, frozenset())
        start = time.perf_counter()
        for p in eligible:
            if p in gone or p in quiet:
                gone.add(p)
                continue
            try:
                messages.append(act(local.parties[p]))
            except (ProtocolError, ThresholdError) as err:
                gone.add(p)
                local.failures.append(PartyFailure(p, stage, str(err)))
        timings.party[stage] += time.perf_counter() - start
        return filters.get(stage, lambda ms: ms)(messages)

    def serve(stage: Stage, work: Callable[[], object]):
        start = time.perf_counter()
        try:
            return work()
        finally:
            timings.server[stage] += time.perf_counter() - start

    server = local.server
    everyone = sorted(local.parties)
    adverts = speak(Stage.ADVERTISE_KEYS, everyone, lambda party: party.advertise())
    broadcast = serve(Stage.ADVERTISE_KEYS, lambda: server.collect_adverts(adverts))
    listed = {a.party for a in broadcast.adverts}
    gone.update(p for p in everyone if p not in listed)
    shares = speak(Stage.SHARE_KEYS, everyone, lambda party: party.share_keys(broadcast))
    inboxes = serve(Stage.SHARE_KEYS, lambda: server.route_shares(shares))
    gone.update(p for p in everyone if p not in inboxes)
    masked = speak(Stage.MASKED_INPUT, everyone,
                   lambda party: party.masked_input(inboxes[party.party], inputs[party.party]))
    check = serve(Stage.MASKED_INPUT, lambda: server.collect_masked(masked))
    gone.update(p for p in everyone if p not in set(check.survivors))
    signed = speak(Stage.CONSISTENCY, everyone, lambda party: party.consistency(check))
    request = serve(Stage.CONSISTENCY, lambda: server.collect_consistency(signed))
    responses = speak(Stage.UNMASK, everyone, lambda party: party.unmask(request))
    return serve(Stage.UNMASK, lambda: server.finish(responses))


def graph_seed_from(seed: int | bytes | None) -> bytes:
    """The public graph seed: SHA-256 of a user seed (reproducible), else 32 OS bytes."""
    if seed is None:
        return os.urandom(32)
    if isinstance(seed, bool) or not isinstance(seed, (int, bytes)):
        raise ConfigError([f"seed: must be an int, bytes or None, got {type(seed).__name__}"])
    data = seed if isinstance(seed, bytes) else str(seed).encode()
    return hashlib.sha256(b"lepton-ray/v1/secure-sum/graph-seed" + data).digest()


def ring_inputs(inputs: object, modulus_bits: int) -> np.ndarray:
    """Check an (n, d) array of unsigned ring elements and return it in the ring dtype."""
    dtype = ring_dtype(modulus_bits)
    if not isinstance(inputs, np.ndarray) or inputs.ndim != 2:
        shape = getattr(inputs, "shape", None)
        raise DataError(f"inputs: expected an (n, d) numpy array, got {type(inputs).__name__} "
                        f"with shape {shape}")
    if inputs.dtype.kind != "u":
        raise DataError(f"inputs: expected unsigned integer ring elements, got {inputs.dtype}")
    n, d = inputs.shape
    if n < 2 or d < 1:
        raise DataError(f"inputs: need at least 2 parties and 1 coordinate, got shape {(n, d)}")
    if inputs.dtype.itemsize * 8 > modulus_bits and inputs.size:
        largest = int(inputs.max())
        if largest >> modulus_bits:
            raise DataError(f"inputs: values must be ring elements < 2**{modulus_bits}, got "
                            f"max {largest}")
    return np.ascontiguousarray(inputs, dtype=dtype)


def secure_sum(inputs: np.ndarray, *, modulus_bits: int = 32,
               neighbours: int | GraphTopology | None = None, threshold: int | None = None,
               dropouts: Mapping[Stage | str, Iterable[int]] | None = None,
               seed: int | bytes | None = None) -> AggregateResult:
    """Sum the rows of ``inputs`` (an (n, d) array of elements of Z_{2^b}) with SecAgg+,
    running every party and the server in this process through the real protocol.

    ``neighbours``: k (>= n - 1 or ``COMPLETE_GRAPH`` for classic SecAgg; ``None`` picks k
    with :func:`~lepton_ray.secagg.graph.choose_neighbours` for a dropout rate of at least
    10% or the fraction in ``dropouts``). ``threshold``: t (default: the smallest with
    2t > k + 1, secure against a malicious server; a lower t is refused by the parties).
    ``dropouts``: stage (a :class:`Stage` or its value, e.g. ``"masked_input"``) -> party
    indices that go silent before sending that stage's message. ``seed`` fixes only the
    public randomness (the neighbour graph); every key, seed and nonce still comes from the OS.

    Returns an :class:`AggregateResult`: ``total`` = sum mod 2^b of the inputs of every
    ``survivors`` party (those whose masked input reached the server), ``dropped`` = the rest.
    Raises :class:`ThresholdError` when too few parties remain.
    """
    rows = ring_inputs(inputs, modulus_bits)
    n, d = rows.shape
    silent: dict[Stage, frozenset[int]] = {}
    for stage, parties in (dropouts or {}).items():
        ids = frozenset(int(p) for p in parties)
        bad = sorted(p for p in ids if not 0 <= p < n)
        if bad:
            raise ConfigError([(f"dropouts.{Stage.parse(stage).value}: party indices {bad[:8]} "
                               f"are outside [0, {n})")])
        silent[Stage.parse(stage)] = silent.get(Stage.parse(stage), frozenset()) | ids
    policy = NeighbourPolicy()
    if neighbours is None:
        fraction = len(frozenset().union(*silent.values())) / n if silent else 0.0
        policy = NeighbourPolicy(dropout_rate=min(0.99, max(policy.dropout_rate, fraction)))
    identities = [IdentityKey.generate() for _ in range(n)]
    config = plan_round(job_id="secure-sum", round_=0, roster=Roster.of(identities), dim=d,
                        graph_seed=graph_seed_from(seed), modulus_bits=modulus_bits,
                        neighbours=neighbours, threshold=threshold, policy=policy)
    return run_local_round(config, dict(enumerate(identities)),
                           {p: rows[p] for p in range(n)}, silent=silent)
