"""Red team (issue 14): an ACTIVE malicious coordinator, and malicious parties, against the
real honest party classes.

Every test plays one attack of issue 14 and PASSES ONLY IF THE ATTACK FAILS: the victim's
input is not recovered, no honest party is dropped, or the round completes with the exact sum
and the cheater named. Against the code before issue 14 (commit 531311b) the attacks succeed
and these tests fail; /work/notes/redteam-old.md records what each attack obtained there.

The coordinator is malicious, so the "server" here is the test itself: it may use the honest
:class:`SecAggServer` for the stages it does not deviate in, and it rebuilds secrets with the
library's Shamir code and strips masks with the library's PRG (the attacker's oracle, see
:func:`recover_input`). Honest parties only ever run their real state machines
(:class:`SecAggParty`, :class:`PartyCohort`, :class:`PartyHost` logic) with their own key
material: the attacker never touches an honest party's secrets.

Everything that builds rounds, parties and servers is in the harness below
(:func:`make_round`, :class:`Hosts`, :class:`Run`, :func:`run_until`, :func:`honest_server`)
so the tests can follow a new API (pinned job parameters, round transcript, consistency stage
with signatures over the survivor set, signed messages, commitments) by adapting it there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from lepton_ray.crypto.envelope import channel_cipher, open_envelope
from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.crypto.prg import MaskExpander
from lepton_ray.crypto.shamir import LIMBS, PRIME, SHARE_BYTES, combine_shares, lagrange_at_zero
from lepton_ray.errors import ConfigError, ProtocolError, ThresholdError
from lepton_ray.secagg import (
    AggregateResult,
    KeyBroadcast,
    MaskedInput,
    NeighbourGraph,
    PartyCohort,
    RoundConfig,
    SecAggParty,
    SecAggServer,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    plan_round,
)
from lepton_ray.secagg.keys import PartyKeyring, self_mask_key
from lepton_ray.secagg.messages import ENVELOPE_BYTES
from lepton_ray.secagg.party import SEED_BYTES, recovery_header

JOB = "redteam-job"
GRAPH_SEED = b"redteam-graph-seed".ljust(32, b"\0")
REFUSALS = (ProtocolError, ThresholdError, ConfigError)  # an honest party saying no


# =========================================================================== harness
def make_round(n: int = 10, *, k=None, t: int | None = None, dim: int = 16, round_: int = 0,
               identities: list[IdentityKey] | None = None, nonce: bytes | None = None,
               roster: Roster | None = None) -> tuple[RoundConfig, list[IdentityKey]]:
    """An honestly planned round (the plan an honest coordinator would send) and the
    parties' identity keys. ``k=None``: the library's automatic k (complete graph, k = 9, at
    n = 10); ``t=None``: its default threshold."""
    identities = identities or [IdentityKey.generate() for _ in range(n)]
    config = plan_round(job_id=JOB, round_=round_, roster=roster or Roster.of(identities),
                        dim=dim, graph_seed=GRAPH_SEED, neighbours=k, threshold=t, nonce=nonce)
    return config, identities


def random_inputs(config: RoundConfig, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    high = 2**config.modulus_bits
    return {p: rng.integers(0, high, config.dim, dtype=np.uint64).astype(config.dtype)
            for p in config.participants}


def exact_sum(config: RoundConfig, inputs: Mapping[int, np.ndarray],
              parties: Iterable[int]) -> np.ndarray:
    total = np.zeros(config.dim, dtype=config.dtype)
    for p in parties:
        total += inputs[p]
    return total


def honest_server(config: RoundConfig) -> SecAggServer:
    return SecAggServer(config)


class Hosts:
    """The honest hosts of a job: ``layout`` lists each host's parties (default: one party per
    host, as in a deployment). A host keeps its key material (one :class:`PartyKeyring`, its
    parties' identity keys) for the whole job, so the rounds of a job share it."""

    def __init__(self, identities: list[IdentityKey], layout: list[list[int]] | None = None):
        self.identities = identities
        self.layout = layout or [[p] for p in range(len(identities))]
        self.keyrings = [PartyKeyring() for _ in self.layout]
        self.host_of = {p: h for h, ps in enumerate(self.layout) for p in ps}

    def keyring(self, party: int) -> PartyKeyring:
        return self.keyrings[self.host_of[party]]


class Run:
    """The honest parties' side of one execution of a round, stage by stage; the attacker acts
    between stages. A party that refuses (raises) is recorded in ``refused`` and, like a
    dropout, is not asked again. ``members``: the parties whose hosts take part (default: every
    participant). Multi-party hosts send one :class:`MaskedSum` (their :class:`PartyCohort`)."""

    def __init__(self, hosts: Hosts, config: RoundConfig, *,
                 members: Iterable[int] | None = None):
        self.hosts, self.config = hosts, config
        self.parties: dict[int, SecAggParty] = {}
        self.refused: dict[int, str] = {}
        for p in sorted(config.participants if members is None else members):
            try:
                self.parties[p] = SecAggParty(party=p, identity=hosts.identities[p],
                                              config=config, keyring=hosts.keyring(p))
            except REFUSALS as err:
                self.refused[p] = f"construct: {err}"

    def _each(self, who: Iterable[int] | None, act: Callable[[SecAggParty], object]) -> dict:
        out = {}
        for p in sorted(self.parties if who is None else who):
            if p in self.refused or p not in self.parties:
                continue
            try:
                out[p] = act(self.parties[p])
            except REFUSALS as err:
                self.refused[p] = str(err)
        return out

    def advertise(self, who=None) -> dict:
        return self._each(who, lambda party: party.advertise())

    def share_keys(self, broadcast: KeyBroadcast, who=None) -> dict:
        return self._each(who, lambda party: party.share_keys(broadcast))

    def masked_input(self, inboxes: Mapping, inputs: Mapping, who=None) -> list:
        """Single-party hosts send a :class:`MaskedInput`; a multi-party host its cohort's
        :class:`MaskedSum`."""
        who = set(self.parties if who is None else who) - set(self.refused)
        messages = []
        for ps in self.hosts.layout:
            mine = [p for p in ps if p in who and p in self.parties and p in inboxes]
            if len(ps) == 1 and mine:
                messages += self._each(mine, lambda party: party.masked_input(
                    inboxes[party.party], inputs[party.party])).values()
            elif mine:
                cohort = PartyCohort(self.config, {p: self.parties[p] for p in mine})
                sums, failed = cohort.masked_sum(inboxes, inputs)
                self.refused.update(dict(failed))
                messages += sums
        return messages

    def unmask(self, requests: UnmaskRequest | Mapping[int, UnmaskRequest], who=None) -> dict:
        """``requests``: one request for everyone, or (split view) one per party."""
        if isinstance(requests, UnmaskRequest):
            return self._each(who, lambda party: party.unmask(requests))
        return self._each(requests if who is None else who,
                          lambda party: party.unmask(requests[party.party]))


@dataclass
class Transcript:
    """What the coordinator saw and sent in one execution (messages after the filters)."""

    adverts: list = field(default_factory=list)
    broadcast: KeyBroadcast | None = None
    shares: list = field(default_factory=list)
    inboxes: dict = field(default_factory=dict)
    masked: list = field(default_factory=list)
    request: UnmaskRequest | None = None
    responses: list = field(default_factory=list)
    result: AggregateResult | None = None

    def share_keys_of(self, party: int) -> ShareKeys:
        return next(m for m in self.shares if m.party == party)

    def masked_of(self, party: int) -> np.ndarray:
        return next(m.vector for m in self.masked
                    if isinstance(m, MaskedInput) and m.party == party)


def run_until(run: Run, server: SecAggServer, inputs: Mapping[int, np.ndarray], *,
              stop: Stage | None = None, silent: Mapping[Stage, Iterable[int]] | None = None,
              filters: Mapping[Stage, Callable[[list], list]] | None = None) -> Transcript:
    """Drive ``run`` against ``server`` (honest, or any object with its four methods). A party
    in ``silent[stage]`` says nothing from that stage on; the party -> server messages of each
    stage pass through ``filters[stage]`` (a malicious party or network injects there).
    ``stop``: return just before the parties speak at that stage (the server has already made
    that stage's request, e.g. ``transcript.request`` for ``stop=Stage.UNMASK``);
    ``None``: run the round to the end (``transcript.result``)."""
    silent = {s: set(ps) for s, ps in (silent or {}).items()}
    gone: set[int] = set()
    filters = dict(filters or {})
    tr = Transcript()

    def who(stage):
        gone.update(silent.get(stage, ()))
        return [p for p in run.parties if p not in gone]

    def through(stage, messages):
        return filters.get(stage, lambda ms: ms)(list(messages))

    if stop is Stage.ADVERTISE_KEYS:
        return tr
    tr.adverts = through(Stage.ADVERTISE_KEYS, run.advertise(who(Stage.ADVERTISE_KEYS)).values())
    tr.broadcast = server.collect_adverts(tr.adverts)
    if stop is Stage.SHARE_KEYS:
        return tr
    tr.shares = through(Stage.SHARE_KEYS,
                        run.share_keys(tr.broadcast, who(Stage.SHARE_KEYS)).values())
    tr.inboxes = server.route_shares(tr.shares)
    if stop is Stage.MASKED_INPUT:
        return tr
    tr.masked = through(Stage.MASKED_INPUT,
                        run.masked_input(tr.inboxes, inputs, who(Stage.MASKED_INPUT)))
    tr.request = server.collect_masked(tr.masked)
    if stop is Stage.UNMASK:
        return tr
    alive = [p for p in who(Stage.UNMASK) if p in set(tr.request.survivors)]
    tr.responses = through(Stage.UNMASK, run.unmask(tr.request, alive).values())
    tr.result = server.finish(tr.responses)
    return tr


# ---------------------------------------------------------------- the attacker's oracle
def share_of(response: UnmaskResponse, kind: str, owner: int) -> bytes | None:
    """``response``'s share of ``owner``'s self-mask seed (``kind="seed"``) or recovery key
    (``kind="recovery"``), or ``None``."""
    owners = getattr(response, f"{kind}_owners")
    if owner not in owners:
        return None
    i = owners.index(owner)
    return getattr(response, f"{kind}_shares")[i * SHARE_BYTES:(i + 1) * SHARE_BYTES]


def collect_shares(config: RoundConfig, responses: Iterable[UnmaskResponse], kind: str,
                   owner: int) -> dict[int, bytes]:
    return {r.party: s for r in responses if (s := share_of(r, kind, owner)) is not None}


def rebuild(config: RoundConfig, shares: Mapping[int, bytes]) -> bytes | None:
    """The secret from t of ``shares`` (holder -> share), Shamir over the library's field;
    ``None`` with fewer than t shares or a value that is not a secret."""
    points = [(config.graph.x_coordinate(h), shares[h]) for h in sorted(shares)]
    if len(points) < config.threshold:
        return None
    try:
        return combine_shares(points, threshold=config.threshold)
    except REFUSALS:
        return None


def open_recovery(config: RoundConfig, party: int, key: bytes, blob: bytes,
                  live: Iterable[int]) -> dict[int, bytes] | None:
    """The pair seeds ``party`` sealed under its recovery key ``key`` (owners: its live
    neighbours in id order), or ``None`` if ``key`` does not open ``blob``."""
    try:
        plain = open_envelope(channel_cipher(key), recovery_header(config, party), blob)
    except ProtocolError:
        return None
    return {j: plain[i * SEED_BYTES:(i + 1) * SEED_BYTES] for i, j in enumerate(sorted(live))}


def recover_input(config: RoundConfig, party: int, masked: np.ndarray, self_seed: bytes,
                  pair_seeds: Mapping[int, bytes]) -> np.ndarray:
    """x = y - PRG(self mask) -/+ PRG(s_pj): the party added PRG(s_pj) for p < j and
    subtracted it for p > j (Bonawitz et al. 2017, §3)."""
    expander = MaskExpander(config.dim, config.dtype)
    x = masked.copy()
    expander.subtract(x, self_mask_key(self_seed, job_id=config.job_id, round_=config.round,
                                       party=party))
    for j, seed in pair_seeds.items():
        (expander.subtract if party < j else expander.add)(x, seed)
    return x


def unmask_from_shares(config, party, masked, seed_shares, key_shares, blob, live):
    """The attacker's full pipeline: t self-mask-seed shares and t recovery-key shares of one
    party, its masked input and its sealed blob -> its input (``None`` if anything fails)."""
    seed, key = rebuild(config, seed_shares), rebuild(config, key_shares)
    if seed is None or key is None:
        return None
    pair_seeds = open_recovery(config, party, key, blob, live)
    if pair_seeds is None:
        return None
    return recover_input(config, party, masked, seed, pair_seeds)


def attack_failed(recovered: np.ndarray | None, secret: np.ndarray) -> bool:
    return recovered is None or not np.array_equal(recovered, secret)


def cheater_named(outcome, cheater: int) -> bool:
    """Does the round's outcome (a result, or the error that ended it) name ``cheater``?"""
    if isinstance(outcome, AggregateResult):
        return any(r.party == cheater for r in outcome.rejections)
    return f"party {cheater}" in str(outcome)


def finish_or_error(server: SecAggServer, responses: list):
    try:
        return server.finish(responses)
    except REFUSALS as err:
        return err


def random_field_shares(count: int) -> bytes:
    limbs = np.frombuffer(os.urandom(4 * LIMBS * count), dtype="<u4") % PRIME
    return limbs.astype("<u4").tobytes()


# =========================================================================== attacks
@pytest.mark.parametrize("n", [10, 30])
def test_split_view_unmasks_a_single_input(n):
    """Attack 1 (split view; Bonawitz et al. 2017 §4 is the defence: consistency check).

    1. n = 10 (n = 30), the default k = 9 (15), odd, and t = k//2 + 1 = 5 (8): the victim's
       secrets have k + 1 = 2t holders (its k neighbours and itself).
    2. Stages 1-3 run honestly; the coordinator keeps the victim's single masked input
       y_v = x_v + PRG(b_v) + sum of pairwise masks.
    3. It sends the victim and t - 1 neighbours an unmask request saying "v survived" (they
       reveal shares of the self-mask seed b_v) and the other t neighbours one saying
       "v dropped" (they reveal shares of the recovery key r_v). Each holder checks only its
       own request, and each request is internally consistent.
    4. t shares of b_v give the self mask, t shares of r_v open v's sealed pair seeds, which
       give its pairwise masks: x_v = y_v minus all masks.
    Passes only if the victim's input is not recovered (e.g. the parties detect the split
    view in a consistency round over signed survivor sets and refuse to reveal shares)."""
    config, ids = make_round(n, dim=16)
    k, t, v = config.neighbours, config.threshold, 0
    assert k % 2 == 1 and 2 * t == k + 1
    inputs = random_inputs(config)
    run = Run(Hosts(ids), config)
    tr = run_until(run, honest_server(config), inputs, stop=Stage.UNMASK)
    everyone = tuple(config.participants)
    others = [j for j in config.graph.neighbours_of(v)]
    says_alive = UnmaskRequest(JOB, config.round, everyone, ())
    says_dropped = UnmaskRequest(JOB, config.round, tuple(p for p in everyone if p != v), (v,))
    requests = {p: says_alive for p in [v, *others[:t - 1]]}
    requests.update({p: says_dropped for p in others[t - 1:2 * t - 1]})
    responses = run.unmask(requests).values()
    recovered = unmask_from_shares(
        config, v, tr.masked_of(v), collect_shares(config, responses, "seed", v),
        collect_shares(config, responses, "recovery", v), tr.share_keys_of(v).recovery,
        config.graph.neighbours_of(v))
    assert attack_failed(recovered, inputs[v]), "split view recovered the victim's input"


def test_reexecution_with_replayed_envelopes_unmasks_an_input():
    """Attack 2 (round re-execution, replayed envelopes).

    1. Execution 1 of round 0 runs honestly to the end; the victim survives, so the
       coordinator holds its masked input y_v and t shares of its self-mask seed b_v.
    2. The coordinator plans round 0 again (new plan, new nonce; hosts accept any plan and
       round number). The victim's host is not asked at all.
    3. In execution 2 it replays the victim's execution-1 advert in the key broadcast and its
       execution-1 share envelopes in the neighbours' inboxes: the envelopes' associated data
       (job, round, stage, sender, receiver) has no nonce and the channel keys live for the
       whole job, so they open, and the neighbours now hold shares of the victim's
       execution-1 recovery key r_v.
    4. It declares the victim dropped; the neighbours reveal their shares of r_v, which opens
       the execution-1 sealed pair seeds: with b_v, x_v = y_v minus all masks.
    Passes only if the input is not recovered (e.g. parties refuse a second execution of a
    round, or envelopes bound to the round nonce / transcript fail to open)."""
    config1, ids = make_round(10, dim=16)
    hosts, v = Hosts(ids), 3
    inputs = random_inputs(config1, seed=1)
    tr1 = run_until(Run(hosts, config1), honest_server(config1), inputs)
    assert v in tr1.result.survivors
    seed_shares = collect_shares(config1, tr1.responses, "seed", v)

    config2, _ = make_round(10, dim=16, identities=ids)  # round 0 again, fresh nonce
    run2 = Run(hosts, config2, members=[p for p in config2.participants if p != v])
    server2 = honest_server(config2)
    key_shares = {}
    try:
        adverts = list(run2.advertise().values())
        victim_advert = next(a for a in tr1.adverts if a.party == v)
        broadcast = server2.collect_adverts([*adverts, victim_advert])
        shares = list(run2.share_keys(broadcast).values())
        inboxes = server2.route_shares([*shares, tr1.share_keys_of(v)])
        request = server2.collect_masked(run2.masked_input(inboxes, random_inputs(config2, 2)))
        assert v in request.dropped
        key_shares = collect_shares(config2, run2.unmask(request).values(), "recovery", v)
    except REFUSALS:
        pass  # the re-execution did not get through: the attack fails
    recovered = unmask_from_shares(config1, v, tr1.masked_of(v), seed_shares, key_shares,
                                   tr1.share_keys_of(v).recovery, config1.graph.neighbours_of(v))
    assert attack_failed(recovered, inputs[v]), "re-execution recovered the victim's input"


def test_nonce_replayed_after_many_rounds_reuses_masks():
    """Attack 3 (nonce replay after the "used nonce" memory forgets).

    1. Execution 1 of round 0 with nonce N runs honestly; the victim survives: the
       coordinator holds y_v and t shares of b_v.
    2. 65 further honest rounds (fresh nonces) follow: each host remembers only the last 64
       nonces (keys.py ``_REMEMBERED_ROUNDS``), so N is forgotten.
    3. The coordinator replays the plan of round 0 with nonce N. Every party accepts it, so
       the pairwise seeds s_vj = HKDF(m_vj, job, round 0, N) are the same as in execution 1.
    4. The victim "drops" before its masked input in execution 2; its neighbours reveal its
       execution-2 recovery key, which opens its execution-2 pair seeds = the execution-1
       pair seeds; with b_v from execution 1, x_v = y_v minus all masks.
    Passes only if the replayed plan is refused (a party never runs one (job, round) twice,
    remembered for the whole job) or the input is otherwise not recovered."""
    nonce = os.urandom(16)
    config0, ids = make_round(5, dim=8, nonce=nonce)
    hosts, v = Hosts(ids), 2
    inputs = random_inputs(config0, seed=3)
    tr1 = run_until(Run(hosts, config0), honest_server(config0), inputs)
    assert v in tr1.result.survivors
    seed_shares = collect_shares(config0, tr1.responses, "seed", v)
    for r in range(1, 66):
        config_r, _ = make_round(5, dim=8, round_=r, identities=ids)
        run_until(Run(hosts, config_r), honest_server(config_r), random_inputs(config_r, r))
    replay = Run(hosts, config0)  # the very same plan: round 0, nonce N
    key_shares, blob = {}, None
    if not replay.refused:
        try:
            tr2 = run_until(replay, honest_server(config0), random_inputs(config0, 99),
                            silent={Stage.MASKED_INPUT: {v}})
            assert v in tr2.result.dropped
            key_shares = collect_shares(config0, tr2.responses, "recovery", v)
            blob = tr2.share_keys_of(v).recovery
        except REFUSALS:
            pass
    recovered = (None if blob is None else unmask_from_shares(
        config0, v, tr1.masked_of(v), seed_shares, key_shares, blob,
        config0.graph.neighbours_of(v)))
    assert attack_failed(recovered, inputs[v]), (
        "a plan replayed with a nonce used 65 rounds earlier was accepted: the pairwise masks "
        "repeated and the victim's execution-1 input was recovered")
    assert replay.refused, "a nonce replayed after 65 rounds was accepted by every party"


def test_substituted_threshold_and_graph_isolate_the_victim():
    """Attack 4a (server-chosen t and graph).

    1. The coordinator sends the victim a plan whose graph gives it no neighbours and whose
       threshold is t = 1 (RoundConfig only checks 1 <= t <= min degree + 1 = 1).
    2. The victim masks with no pairwise mask: y_v = x_v + PRG(b_v); with t = 1 the Shamir
       polynomial is constant, so its own share of b_v *is* b_v.
    3. The coordinator lists the victim as the sole survivor; the victim reveals its share,
       i.e. b_v, and y_v - PRG(b_v) = x_v (the honest server's own finish() computes it).
    Passes only if the victim refuses the plan (it derives the graph from the pinned job
    graph seed and roster and checks k and t against the job's threshold policy) or the
    input is otherwise not recovered."""
    honest, ids = make_round(10, dim=16)
    v = 4
    others = tuple(p for p in honest.participants if p != v)
    adjacency = tuple(() if p == v else tuple(q for q in others if q != p)
                      for p in honest.participants)
    fake_graph = NeighbourGraph(honest.participants, adjacency, honest.neighbours)
    inputs = random_inputs(honest, seed=4)
    outcome = None
    try:
        forged = dataclasses.replace(honest, graph=fake_graph, threshold=1)
        run = Run(Hosts(ids), forged, members=[v])
        outcome = run_until(run, honest_server(forged), inputs).result.total
    except REFUSALS:
        pass
    assert attack_failed(outcome, inputs[v]), (
        "t = 1 and an isolated victim gave the coordinator the victim's input")


def test_substituted_roster_lets_the_server_play_every_neighbour():
    """Attack 4b (server-chosen roster: a swapped key).

    1. The coordinator sends the victim a plan whose roster keeps the victim's own identity
       key (the only entry a party checks) and replaces every other entry by a key the
       coordinator made. The graph is the honest one.
    2. The coordinator runs the victim's "neighbours" itself, as honest SecAggParty objects
       with its own identities and zero inputs: the victim verifies their adverts against the
       forged roster, agrees pair keys with them and seals its shares to them.
    3. The round completes; its sum is x_v + 0: the coordinator has the victim's input.
    Passes only if the victim refuses the substituted roster (fixed for the job, identified
    by its hash)."""
    honest, ids = make_round(10, dim=16)
    v = 6
    fakes = [ids[p] if p == v else IdentityKey.generate() for p in range(len(ids))]
    secret = random_inputs(honest, seed=5)[v]
    outcome = None
    try:
        forged = dataclasses.replace(honest, roster=Roster.of(fakes))
        run = Run(Hosts(fakes), forged)  # the victim's host (own key) + the coordinator's
        real = Run(Hosts(ids), forged, members=[v])  # the victim as its real host sees it
        run.parties[v] = real.parties[v]
        run.refused.update(real.refused)
        inputs = {p: np.zeros(forged.dim, forged.dtype) for p in forged.participants}
        inputs[v] = secret
        tr = run_until(run, honest_server(forged), inputs)
        outcome = tr.result.total if v in tr.result.survivors else None
    except REFUSALS:
        pass
    assert attack_failed(outcome, secret), (
        "the victim accepted a roster with swapped keys: its input was recovered")


def test_padded_survivor_list_passes_the_distributed_dp_check():
    """Attack 5 (padded survivor list vs the distributed-DP survivor check).

    1. Distributed DP (Skellam) sizes each party's noise share for min_survivors = 8 of the
       n = 10 parties; PartyHost.unmask refuses when len(request.survivors) < 8.
    2. Only 5 parties send masked inputs (5 drop), so the noise in the sum is 5/8 of what the
       accounting assumes.
    3. The coordinator pads the survivor list with 3 made-up ids (100, 101, 102). The host
       counts the list it is given; each party checks only its own neighbours, which the
       made-up ids are not. Every host answers and the sum of the 5 is unmasked.
    Runs the real PartyHost.unmask (no Ray: a host object with only the round state set).
    Passes only if no host reveals shares for the padded request."""
    from actors.party_host import PartyHost, _Round
    from lepton_ray.privacy.skellam import SkellamParams

    config, ids = make_round(10, dim=16)
    skellam = SkellamParams(bits=32, dim=16, clip_norm=1.0, parties=10, min_survivors=8,
                            noise_multiplier=1.0, gamma=1e-3)
    inputs = random_inputs(config, seed=6)
    run = Run(Hosts(ids), config)
    server = honest_server(config)
    tr = run_until(run, server, inputs, stop=Stage.UNMASK,
                   silent={Stage.MASKED_INPUT: {5, 6, 7, 8, 9}})
    assert len(tr.request.survivors) == 5 < skellam.min_survivors
    padded = dataclasses.replace(tr.request, survivors=(*tr.request.survivors, 100, 101, 102))
    released = []
    for p in tr.request.survivors:
        host = PartyHost.__new__(PartyHost)
        host.host = p
        host.round = _Round(round=config.round, plan=SimpleNamespace(config=config,
                                                                      skellam=skellam),
                            cohort=PartyCohort(config, {p: run.parties[p]}))
        _report, messages = PartyHost.unmask(host, config.round, padded)
        released += messages
    outcome = finish_or_error(server, released) if released else None
    assert not released, (
        f"{len(released)} hosts revealed shares for a padded survivor list; the coordinator "
        f"unmasked a sum of {len(tr.request.survivors)} < {skellam.min_survivors} parties"
        + (" exactly" if isinstance(outcome, AggregateResult) and np.array_equal(
            outcome.total, exact_sum(config, inputs, tr.request.survivors)) else ""))


def test_rerun_training_is_not_reproducible(small_job, monkeypatch):
    """Attack 6 (re-run differencing): if a party's local training were a deterministic
    function of public values (spec seed, round, party), the coordinator could run a round
    with and without the party, or simply re-run its training, and difference out its delta.

    1. The real PartyHost seed choice (``_launch_training``) runs twice for the same
       (round, party) with ``training.deterministic_seeds`` off (the default); the training
       task is replaced by a recorder, so no Ray.
    2. The two seeds must differ and neither may be the public seed of (spec seed, round,
       party); training one party twice with them gives different deltas.
    Already fixed before issue 14 (learning/local.py party_seed draws 256 OS bits): this test
    passes on 531311b."""
    import actors.training
    from actors.party_host import PartyHost
    from lepton_ray.config import ModelKind, ModelSpec, TrainingSpec, build_spec
    from lepton_ray.learning.local import public_party_seed, train_parties
    from lepton_ray.learning.models import build_model, flat_parameters

    seen = []

    class Recorder:
        def options(self, **_):
            return self

        def remote(self, *args, **kwargs):
            seen.append(list(args[6]))  # train_task(spec, nf, nc, params, data, picks, seeds)

    monkeypatch.setattr(actors.training, "train_task", Recorder())
    spec = build_spec(small_job)
    assert not spec.training.deterministic_seeds
    host = PartyHost.__new__(PartyHost)
    host.spec, host.index, host.participation = spec, {3: 0}, {3: 0}
    host.task_options, host.n_features, host.n_classes, host.data_ref = {}, 5, 3, None
    for _ in range(2):
        host._launch_training(7, [None], [3])
    (a,), (b,) = seen
    assert a != b
    assert public_party_seed(spec.seed, 7, 3) not in (a, b)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 3, 40)
    model = ModelSpec(kind=ModelKind.LOGISTIC)
    params = flat_parameters(build_model(model, 5, 3, seed=0))
    deltas = [train_parties(model_spec=model, training=TrainingSpec(lr=0.1, batch_size=8),
                            n_features=5, n_classes=3, global_params=params,
                            datasets=[(X, y)], seeds=[s]).deltas for s in (a, b)]
    assert not np.array_equal(*deltas)


def test_corrupt_self_mask_share_is_caught_and_its_sender_named():
    """Attack 7 (a malicious party's crafted self-mask-seed share).

    1. n = 10, t = 5, everyone survives. Party 0 is malicious but follows the protocol up to
       the unmask stage.
    2. The server rebuilds each seed from the first t responders in id order, so party 0's
       share of survivor 1's seed is used with known Lagrange coefficient c_0. Party 0 adds
       c_0^{-1} to the last limb of that share: still a field element (passes the range
       check) and the rebuilt limb is the true one + 1, so it is still a valid 32-byte seed.
    3. The server strips the wrong self mask: the sum is silently wrong and nobody is blamed.
    Passes only if the round ends with the exact sum and names party 0 (a share checked
    against the owner's commitment, excluded, and replaced by another holder's share)."""
    config, ids = make_round(10, dim=16)
    m, owner, t = 0, 1, config.threshold
    inputs = random_inputs(config, seed=7)
    coeff = int(lagrange_at_zero(np.array([[config.graph.x_coordinate(h)
                                            for h in range(t)]]))[0, 0])
    delta = pow(coeff, -1, PRIME)

    def craft(responses):
        out = []
        for r in responses:
            if r.party == m:
                i = r.seed_owners.index(owner)
                limbs = np.frombuffer(r.seed_shares, dtype="<u4").astype(np.int64).copy()
                limbs[i * LIMBS + LIMBS - 1] = (limbs[i * LIMBS + LIMBS - 1] + delta) % PRIME
                r = dataclasses.replace(r, seed_shares=limbs.astype("<u4").tobytes())
            out.append(r)
        return out

    run = Run(Hosts(ids), config)
    server = honest_server(config)
    tr = run_until(run, server, inputs, stop=Stage.UNMASK)
    responses = craft(run.unmask(tr.request).values())
    outcome = finish_or_error(server, responses)
    everyone = config.participants
    assert isinstance(outcome, AggregateResult), f"the round failed: {outcome}"
    assert np.array_equal(outcome.total, exact_sum(config, inputs, outcome.survivors)), (
        "a crafted self-mask share silently corrupted the sum")
    assert set(outcome.survivors) >= set(everyone) - {m}
    assert cheater_named(outcome, m), "the cheater was not identified"


def test_corrupt_recovery_share_does_not_end_the_round():
    """Attack 8 (a malicious party's corrupt recovery-key share).

    1. n = 10, t = 5; party 9 drops before its masked input, so the server rebuilds 9's
       recovery key from the first t holders (0..4). Party 0 is malicious.
    2. Party 0 adds 1 to one limb of its share of 9's recovery key.
    3. The rebuilt key is wrong (or not a key at all): finish() raises ProtocolError for the
       whole round ("a holder sent a corrupt share"), without saying which holder.
    Passes only if the round completes with the exact sum of the survivors and names party 0
    (checked against 9's commitment; 0 excluded; another holder's share used)."""
    config, ids = make_round(10, dim=16)
    m, dropped = 0, 9
    inputs = random_inputs(config, seed=8)

    def corrupt(responses):
        out = []
        for r in responses:
            if r.party == m:
                limbs = np.frombuffer(r.recovery_shares, dtype="<u4").copy()
                i = r.recovery_owners.index(dropped)
                limbs[i * LIMBS + 3] = (int(limbs[i * LIMBS + 3]) + 1) % PRIME
                r = dataclasses.replace(r, recovery_shares=limbs.tobytes())
            out.append(r)
        return out

    run = Run(Hosts(ids), config)
    server = honest_server(config)
    tr = run_until(run, server, inputs, stop=Stage.UNMASK,
                   silent={Stage.MASKED_INPUT: {dropped}})
    assert dropped in tr.request.dropped
    outcome = finish_or_error(server, corrupt(run.unmask(tr.request).values()))
    assert isinstance(outcome, AggregateResult), f"one corrupt share ended the round: {outcome}"
    honest = set(config.participants) - {m, dropped}
    assert set(outcome.survivors) >= honest
    assert np.array_equal(outcome.total, exact_sum(config, inputs, outcome.survivors))
    assert cheater_named(outcome, m), "the cheater was not identified"


def test_false_accusation_drops_no_honest_party():
    """Attack 9 (one false "bad envelope" accusation).

    1. n = 30, default k = 15: party 0 is malicious and alone on its host; hosts B = 1..10,
       C = 11..20, D = 21..29 are honest and send one masked sum each (PartyCohort).
    2. Party 0 reports an honest neighbour v on host B in its ``rejected_senders``, though
       v's envelope opened fine.
    3. The server believes it: v is dropped, and since B's sum cannot be split all 10
       parties of host B are dropped (or the round aborts for lack of holders).
    Passes only if the round completes with every honest party among the survivors and the
    exact sum (a false accusation drops at most the accuser)."""
    layout = [[0], list(range(1, 11)), list(range(11, 21)), list(range(21, 30))]
    config, ids = make_round(30, dim=8)
    m = 0
    v = next(j for j in config.graph.neighbours_of(m) if 1 <= j <= 10)
    inputs = random_inputs(config, seed=9)

    def accuse(messages):
        return [dataclasses.replace(msg, rejected_senders=(v,))
                if isinstance(msg, MaskedInput) and msg.party == m else msg for msg in messages]

    outcome = None
    try:
        outcome = run_until(Run(Hosts(ids, layout), config), honest_server(config), inputs,
                            filters={Stage.MASKED_INPUT: accuse}).result
    except REFUSALS as err:
        outcome = err
    assert isinstance(outcome, AggregateResult), f"one accusation ended the round: {outcome}"
    honest = set(config.participants) - {m}
    lost = sorted(honest - set(outcome.survivors))
    assert not lost, f"one false accusation dropped {len(lost)} honest parties: {lost}"
    assert np.array_equal(outcome.total, exact_sum(config, inputs, outcome.survivors))


@pytest.mark.parametrize("replay", ["earlier_round", "duplicate"])
def test_replayed_advert_drops_no_honest_party(replay):
    """Attack 10 (a replayed advert).

    1. Round 0 runs honestly; everyone (the coordinator, every party) sees party 2's signed
       advert in the key broadcast.
    2. In round 1 a malicious party (or the network) sends, next to party 2's genuine
       advert, a copy: ``earlier_round``: 2's round-0 advert with its unsigned round field set
       to 1 (the signature covers only job, party and key, and the long-term key is the same);
       ``duplicate``: a byte-identical copy of 2's round-1 advert.
    3. The server sees two valid adverts for party 2 and rejects both (DUPLICATE_PARTY):
       honest party 2 is dropped.
    Passes only if party 2 survives and the round's sum is exact."""
    config0, ids = make_round(10, dim=8)
    hosts, p = Hosts(ids), 2
    tr0 = run_until(Run(hosts, config0), honest_server(config0), random_inputs(config0))
    config1, _ = make_round(10, dim=8, round_=1, identities=ids)
    inputs = random_inputs(config1, seed=10)
    old = next(a for a in tr0.adverts if a.party == p)

    def inject(adverts):
        copy = (dataclasses.replace(old, round=config1.round) if replay == "earlier_round"
                else next(a for a in adverts if a.party == p))
        return [copy, *adverts]

    try:
        outcome = run_until(Run(hosts, config1), honest_server(config1), inputs,
                            filters={Stage.ADVERTISE_KEYS: inject}).result
    except REFUSALS as err:
        outcome = err
    assert isinstance(outcome, AggregateResult), f"a replayed advert ended the round: {outcome}"
    assert p in outcome.survivors, "a replayed advert dropped the honest party"
    assert set(outcome.survivors) == set(config1.participants)
    assert np.array_equal(outcome.total, exact_sum(config1, inputs, outcome.survivors))


@pytest.mark.parametrize("stage", [Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK],
                         ids=lambda s: s.value)
def test_impersonating_a_party_of_another_host(stage):
    """Attack 11 (a host speaks for a party of another host).

    Party 9 is malicious, on its own host; party 1 is honest, on another. Party 9's host
    sends a message claiming to come from party 1 (share, masked input and unmask messages
    carry no sender signature, and the server does not check which host may speak for which
    party):
    * ``share_keys``: a well-formed ShareKeys for party 1 (right receivers and sizes,
      random envelopes): the server sees two for party 1, rejects both: 1 is dropped;
    * ``masked_input``: a random MaskedInput for party 1: two for party 1: 1 is dropped;
    * ``unmask``: party 1 sent its masked input and then goes silent (a real dropout); the
      forged UnmaskResponse for party 1 carries random field elements as its shares and is
      used in reconstruction: the round fails (ProtocolError) or its sum is wrong.
    Passes only if the round completes with party 1 among the survivors and the exact sum
    (the forged message is rejected: signed by the wrong key, or sent by the wrong host)."""
    config, ids = make_round(10, dim=8)
    p, m = 1, 9
    inputs = random_inputs(config, seed=11)
    silent = {}

    def forge(messages):
        if stage is Stage.SHARE_KEYS:
            genuine = next(x for x in messages if x.party == p)
            n = len(genuine.receivers)
            fake = ShareKeys(JOB, config.round, p, genuine.receivers,
                             os.urandom(ENVELOPE_BYTES * n), os.urandom(len(genuine.recovery)))
        elif stage is Stage.MASKED_INPUT:
            fake = MaskedInput(JOB, config.round, p, random_inputs(config, 12)[p])
        else:
            template = next(x for x in messages if x.party == m)
            fake = UnmaskResponse(JOB, config.round, p, template.seed_owners,
                                  random_field_shares(len(template.seed_owners)), (), b"")
        return [fake, *messages]

    if stage is Stage.UNMASK:
        silent = {Stage.UNMASK: {p}}
    try:
        outcome = run_until(Run(Hosts(ids), config), honest_server(config), inputs,
                            silent=silent, filters={stage: forge}).result
    except REFUSALS as err:
        outcome = err
    assert isinstance(outcome, AggregateResult), f"an impersonation ended the round: {outcome}"
    assert p in outcome.survivors, "a forged message for an honest party dropped it"
    assert set(outcome.survivors) >= set(config.participants) - {m}
    assert np.array_equal(outcome.total, exact_sum(config, inputs, outcome.survivors))


def test_harness_honest_round_is_exact():
    """Control: the harness itself runs an honest round exactly (so a failing attack test
    means the attack, not the harness)."""
    config, ids = make_round(12, dim=8)
    inputs = random_inputs(config, seed=13)
    tr = run_until(Run(Hosts(ids, [[0, 1, 2], *[[p] for p in range(3, 12)]]), config),
                   honest_server(config), inputs, silent={Stage.MASKED_INPUT: {11}})
    assert list(tr.result.survivors) == list(range(11))
    assert np.array_equal(tr.result.total, exact_sum(config, inputs, range(11)))
