"""A host's parties through SecAgg+ as one cohort: batched Shamir sharing and one masked sum
per host, in which the masks between co-summed partners are skipped. The sum must be bit for
bit the sum of the masked inputs the parties would have sent one by one, and the server must
still output the exact sum of the survivors' inputs (numpy's sum is the oracle)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.errors import ProtocolError, ThresholdError
from lepton_ray.secagg import RejectionReason, SecAggParty, SecAggServer, Stage, plan_round
from lepton_ray.secagg.cohort import PartyCohort
from lepton_ray.secagg.keys import PartyKeyring
from lepton_ray.secagg.messages import ENVELOPE_BYTES, MaskedSum


def stream(tag: str):
    """A deterministic byte source for tests only (SHAKE-256 of tag and a counter)."""
    count = [0]

    def draw(n: int) -> bytes:
        count[0] += 1
        return hashlib.shake_256(f"{tag}/{count[0]}".encode()).digest(n)
    return draw


def setup(n=12, d=50, neighbours=6, seed=b"c" * 32):
    ids = [IdentityKey.generate() for _ in range(n)]
    config = plan_round(job_id="job", round_=3, roster=Roster.of(ids), dim=d, graph_seed=seed,
                        neighbours=neighbours, nonce=b"n" * 16)
    rng = np.random.default_rng(1)
    inputs = {p: rng.integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32) for p in range(n)}
    return config, ids, inputs


def host(config, ids, members, tag):
    """One host's parties with deterministic keys and secrets (same tag = same parties)."""
    keyring = PartyKeyring(stream(f"{tag}/keyring"))
    return {p: SecAggParty(party=p, identity=ids[p], config=config, keyring=keyring,
                           entropy=stream(f"{tag}/party{p}")) for p in members}


def drive(config, hosts, inputs, *, cohort_hosts=(), silent=(), filters=None):
    """One round over several hosts; hosts listed in ``cohort_hosts`` run as a cohort and
    send one MaskedSum, the others send one MaskedInput per party."""
    filters = filters or {}
    server = SecAggServer(config)
    cohorts = {h: PartyCohort(config, parties, entropy=stream(f"cohort{h}"))
               for h, parties in enumerate(hosts) if h in cohort_hosts}
    adverts = [party.advertise() for parties in hosts for party in parties.values()]
    broadcast = server.collect_adverts(adverts)
    shares = []
    for h, parties in enumerate(hosts):
        if h in cohorts:
            messages, failed = cohorts[h].share_keys(broadcast)
            assert failed == []
            shares += messages
        else:
            shares += [party.share_keys(broadcast) for party in parties.values()]
    inboxes = server.route_shares(filters.get(Stage.SHARE_KEYS, list)(shares))
    masked = []
    for h, parties in enumerate(hosts):
        live = {p: v for p, v in inputs.items() if p in parties and p not in silent}
        if h in cohorts:
            for p in silent:
                cohorts[h].drop(p)
            masked += cohorts[h].masked_sum(inboxes, live)[0]
        else:
            masked += [parties[p].masked_input(inboxes[p], v) for p, v in live.items()]
    check = server.collect_masked(masked)
    signed = []
    for h, parties in enumerate(hosts):
        if h in cohorts:
            signed += cohorts[h].consistency(check)[0]
        else:
            signed += [parties[p].consistency(check) for p in check.survivors if p in parties]
    request = server.collect_consistency(signed)
    responses = []
    for h, parties in enumerate(hosts):
        if h in cohorts:
            responses += cohorts[h].unmask(request)[0]
        else:
            responses += [parties[p].unmask(request) for p in request.survivors if p in parties]
    return server.finish(responses), masked


def exact(result, inputs, survivors):
    assert list(result.survivors) == sorted(survivors)
    want = np.sum([inputs[p] for p in survivors], axis=0, dtype=np.uint32)
    assert np.array_equal(result.total, want)


def test_masked_sum_equals_the_sum_of_one_by_one_masked_inputs():
    config, ids, inputs = setup()
    a, b = list(range(0, 12, 2)), list(range(1, 12, 2))
    one_by_one, m1 = drive(config, [host(config, ids, a, "A"), host(config, ids, b, "B")],
                           inputs)
    batched, m2 = drive(config, [host(config, ids, a, "A"), host(config, ids, b, "B")],
                        inputs, cohort_hosts={0})
    singles = np.sum([m.vector for m in m1 if m.party in a], axis=0, dtype=np.uint32)
    (summed,) = [m for m in m2 if isinstance(m, MaskedSum)]
    assert summed.parties == tuple(a)
    assert np.array_equal(summed.vector, singles)  # same masks, co-summed pairs skipped
    assert not np.array_equal(summed.vector, np.sum([inputs[p] for p in a], axis=0,
                                                     dtype=np.uint32))  # still masked
    exact(one_by_one, inputs, range(12))
    exact(batched, inputs, range(12))


def test_every_host_a_cohort_with_dropouts_after_sharing_keys():
    config, ids, inputs = setup(n=16, neighbours=8)
    members = [list(range(0, 16, 3)), list(range(1, 16, 3)), list(range(2, 16, 3))]
    hosts = [host(config, ids, m, f"H{i}") for i, m in enumerate(members)]
    result, masked = drive(config, hosts, inputs, cohort_hosts={0, 1, 2}, silent={4, 9})
    assert all(isinstance(m, MaskedSum) for m in masked) and len(masked) == 3
    exact(result, inputs, set(range(16)) - {4, 9})


def test_a_sum_holding_an_accused_party_stays_in():
    """Party 3 (single host) reports that party 0's envelope failed. Party 0 sits in host
    A's sum; a complaint drops nobody (it may be false), so host A's sum stays in: party 3
    simply holds no share of party 0, which has enough other holders. Exact over all."""
    config, ids, inputs = setup(n=12, neighbours=11)  # complete graph: every pair shares keys
    a, b = [0, 1, 2], list(range(3, 12))

    def tamper(messages):
        out = []
        for m in messages:
            if m.party == 0:
                bad = bytearray(m.envelopes)
                bad[(m.receivers.index(3) + 1) * ENVELOPE_BYTES - 1] ^= 1  # its tag to party 3
                m = dataclasses.replace(m, envelopes=bytes(bad))
            out.append(m)
        return out

    result, _ = drive(config, [host(config, ids, a, "A"), host(config, ids, b, "B")], inputs,
                      cohort_hosts={0}, filters={Stage.SHARE_KEYS: tamper})
    exact(result, inputs, a + b)
    why = {(r.party, r.reason) for r in result.rejections}
    assert (0, RejectionReason.TAMPERED) in why


def two_cohorts_at_stage_3():
    """Parties 0-5 and 6-11 as two cohorts, keys shared and routed: ready to mask."""
    config, ids, inputs = setup()
    hosts = [host(config, ids, range(6), "A"), host(config, ids, range(6, 12), "B")]
    server = SecAggServer(config)
    cohorts = [PartyCohort(config, h) for h in hosts]
    broadcast = server.collect_adverts([m for c in cohorts for m in c.advertise()[0]])
    inboxes = server.route_shares([m for c in cohorts for m in c.share_keys(broadcast)[0]])
    return config, inputs, hosts, server, cohorts, inboxes


def test_server_rejects_malformed_and_doubly_claimed_sums():
    _, inputs, _, server, cohorts, inboxes = two_cohorts_at_stage_3()
    (sum_a,), _ = cohorts[0].masked_sum(inboxes, inputs)
    (sum_b,), _ = cohorts[1].masked_sum(inboxes, inputs)
    wrong_dtype = dataclasses.replace(sum_b, vector=sum_b.vector.astype(np.uint64))
    claims_a_party = dataclasses.replace(sum_b, parties=sum_b.parties + (0,))
    with pytest.raises(ThresholdError, match="only 0 masked inputs"):
        server.collect_masked([sum_a, wrong_dtype, claims_a_party])
    why = {(r.party, r.reason) for r in server.rejections}
    assert (6, RejectionReason.MALFORMED) in why       # the uint64 vector
    assert (0, RejectionReason.DUPLICATE_PARTY) in why  # party 0 claimed by two sums


def test_cohort_parties_fail_alone():
    config, inputs, hosts, _, cohorts, inboxes = two_cohorts_at_stage_3()
    bad = dict(inputs)
    bad[2] = inputs[2].astype(np.uint64)
    (summed,), failed = cohorts[0].masked_sum(inboxes, bad)
    assert [p for p, _ in failed] == [2] and "uint32" in failed[0][1]
    assert summed.parties == (0, 1, 3, 4, 5)
    with pytest.raises(ProtocolError, match="open_inbox first"):
        hosts[0][2].mask_into(np.zeros(config.dim, np.uint32), cohorts[0]._expander)


def test_unhashable_ids_in_stage_3_messages_are_rejected_not_crashes():
    _, inputs, _, server, cohorts, inboxes = two_cohorts_at_stage_3()
    odd = dict(inboxes)
    odd[0] = dataclasses.replace(inboxes[0], senders=([1],) + inboxes[0].senders[1:])
    (sum_a,), failed = cohorts[0].masked_sum(odd, inputs)
    assert [p for p, _ in failed] == [0] and "distinct live neighbour" in failed[0][1]
    (sum_b,), _ = cohorts[1].masked_sum(inboxes, inputs)
    bad_sum = dataclasses.replace(sum_b, rejected=(([6], ()),))
    odd_ids = dataclasses.replace(sum_b, parties=([6],) + sum_b.parties[1:])
    with pytest.raises(ThresholdError):
        server.collect_masked([sum_a, bad_sum, odd_ids])
    why = [(r.party, r.reason) for r in server.rejections]
    assert (6, RejectionReason.MALFORMED) in why and (-1, RejectionReason.MALFORMED) in why


def test_a_party_claimed_by_two_inputs_and_a_sum_survives_in_none():
    config, ids, inputs = setup(n=12, neighbours=11)
    a, b = [0, 1, 2], list(range(3, 12))
    hosts = [host(config, ids, a, "A"), host(config, ids, b, "B")]
    server = SecAggServer(config)
    cohort = PartyCohort(config, hosts[0])
    adverts = cohort.advertise()[0] + [hosts[1][p].advertise() for p in b]
    broadcast = server.collect_adverts(adverts)
    shares = cohort.share_keys(broadcast)[0] + [hosts[1][p].share_keys(broadcast) for p in b]
    inboxes = server.route_shares(shares)
    (summed,), _ = cohort.masked_sum(inboxes, inputs)
    singles = [hosts[1][p].masked_input(inboxes[p], inputs[p]) for p in b]
    forged = [dataclasses.replace(singles[0], party=0), dataclasses.replace(singles[1], party=0)]
    request = server.collect_masked([summed, *singles, *forged])
    assert 0 not in request.survivors and set(request.survivors) == set(b)
    assert (0, RejectionReason.DUPLICATE_PARTY) in {(r.party, r.reason)
                                                    for r in server.rejections}


def test_unhashable_rejected_senders_of_a_single_input_are_rejected():
    config, ids, inputs = setup()
    parties = host(config, ids, range(12), "A")
    server = SecAggServer(config)
    broadcast = server.collect_adverts([p.advertise() for p in parties.values()])
    inboxes = server.route_shares([p.share_keys(broadcast) for p in parties.values()])
    masked = [p.masked_input(inboxes[i], inputs[i]) for i, p in parties.items()]
    masked[3] = dataclasses.replace(masked[3], rejected_senders=([1],))
    request = server.collect_masked(masked)
    assert 3 not in request.survivors
    assert (3, RejectionReason.MALFORMED) in {(r.party, r.reason) for r in server.rejections}


def test_coordinator_drops_a_hosts_claim_on_another_hosts_party():
    """Host B forges a masked input for party 0, which sits in host A's sum. The
    coordinator knows where parties are placed and drops the forgery, so A's sum (taken
    whole or not at all) survives; the server alone would have rejected both claims."""
    from types import SimpleNamespace

    from actors.coordinator import SmpcCoordinator
    from lepton_ray.config import SecureAggregation

    config, ids, inputs = setup(n=12, neighbours=11)
    a, b = [0, 1, 2], list(range(3, 12))
    hosts = [host(config, ids, a, "A"), host(config, ids, b, "B")]
    coordinator = SmpcCoordinator(SecureAggregation.SECAGG_PLUS)
    coordinator.begin(SimpleNamespace(config=config), None)
    cohort = PartyCohort(config, hosts[0])
    status, broadcast = coordinator.collect_adverts(
        [a, b], cohort.advertise()[0], [hosts[1][p].advertise() for p in b])
    routed = coordinator.route_shares(
        [a, b], cohort.share_keys(broadcast)[0],
        [hosts[1][p].share_keys(broadcast) for p in b])
    (summed,), _ = cohort.masked_sum(routed[1], inputs)
    singles = [hosts[1][p].masked_input(routed[2][p], inputs[p]) for p in b]
    forged = dataclasses.replace(singles[0], party=0)
    status, request = coordinator.collect_masked([a, b], [summed], singles + [forged])
    assert status.ok and set(request.survivors) == set(range(12))
    assert [(r.party, r.reason) for r in status.rejections] == [(0, RejectionReason.IMPERSONATION)]
