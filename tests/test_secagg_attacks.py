"""Attacks: every bad message is rejected with a clear reason, its sender is treated as
dropped, and the result stays exact over the honest survivors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.crypto.shamir import SHARE_BYTES
from lepton_ray.errors import ProtocolError, ThresholdError
from lepton_ray.secagg import (
    COMPLETE_GRAPH,
    AdvertiseKeys,
    KeyBroadcast,
    MaskedInput,
    RejectionReason,
    SecAggParty,
    SecAggServer,
    ShareKeys,
    Stage,
    UnmaskRequest,
    plan_round,
    run_local_round,
)
from lepton_ray.secagg.keys import advert_transcript
from lepton_ray.secagg.local import make_local_round
from lepton_ray.secagg.messages import ENVELOPE_BYTES


def make_round(n=6, d=16, *, round_=0, identities=None, neighbours=COMPLETE_GRAPH):
    identities = identities or [IdentityKey.generate() for _ in range(n)]
    config = plan_round(job_id="job", round_=round_, roster=Roster.of(identities), dim=d,
                        graph_seed=b"g" * 32, neighbours=neighbours)
    rng = np.random.default_rng(round_)
    inputs = {p: rng.integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32)
              for p in range(n)}
    return config, identities, inputs


def run(config, identities, inputs, **kwargs):
    return run_local_round(config, dict(enumerate(identities)), inputs, **kwargs)


def assert_exact(result, inputs, survivors):
    assert list(result.survivors) == sorted(survivors)
    expected = np.sum([inputs[p] for p in survivors], axis=0, dtype=np.uint32)
    assert np.array_equal(result.total, expected)


def reasons(result):
    return {(r.party, r.stage, r.reason) for r in result.rejections}


def test_tampered_ciphertext_drops_its_sender():
    config, ids, inputs = make_round(7)

    def tamper(messages):
        out = []
        for m in messages:
            if m.party == 2:
                bad = bytearray(m.envelopes)
                bad[ENVELOPE_BYTES - 1] ^= 0x01  # flip one bit of the first envelope's tag
                m = dataclasses.replace(m, envelopes=bytes(bad))
            out.append(m)
        return out

    result = run(config, ids, inputs, filters={Stage.SHARE_KEYS: tamper})
    assert (2, Stage.SHARE_KEYS, RejectionReason.TAMPERED) in reasons(result)
    assert 2 in result.dropped
    assert_exact(result, inputs, set(range(7)) - {2})
    assert any("failed" in r.detail for r in result.rejections)


def test_replayed_messages_from_an_earlier_round():
    config0, ids, inputs0 = make_round(6, round_=0)
    captured = {}
    keep = lambda stage: (lambda ms: captured.setdefault(stage, list(ms)))
    run(config0, ids, inputs0, filters={s: keep(s) for s in (Stage.ADVERTISE_KEYS,
                                                             Stage.MASKED_INPUT)})
    old_advert = next(m for m in captured[Stage.ADVERTISE_KEYS] if m.party == 3)
    old_masked = next(m for m in captured[Stage.MASKED_INPUT] if m.party == 4)

    config1, _, inputs1 = make_round(6, round_=1, identities=ids)
    swap = lambda old: (lambda ms: [old if m.party == old.party else m for m in ms])
    result = run(config1, ids, inputs1, filters={Stage.ADVERTISE_KEYS: swap(old_advert),
                                                 Stage.MASKED_INPUT: swap(old_masked)})
    assert (3, Stage.ADVERTISE_KEYS, RejectionReason.REPLAYED) in reasons(result)
    assert (4, Stage.MASKED_INPUT, RejectionReason.REPLAYED) in reasons(result)
    assert_exact(result, inputs1, {0, 1, 2, 5})

    # Adverts are per job, not per round (the key is long-term), so an old advert relabelled
    # for this round still verifies. Here it carries a stale key (this run's host made new
    # ones): party 3 sees its own advert replaced and refuses to go on; nobody can open the
    # shares sealed to the stale key, and the sum is exact over the others.
    relabelled = dataclasses.replace(old_advert, round=1)
    config1b = make_round(6, round_=1, identities=ids)[0]
    local = make_local_round(config1b, dict(enumerate(ids)))
    result = run_local_round(config1b, dict(enumerate(ids)), inputs1, local=local,
                             filters={Stage.ADVERTISE_KEYS: swap(relabelled)})
    assert [(f.party, f.stage) for f in local.failures] == [(3, Stage.SHARE_KEYS)]
    assert "own advert" in local.failures[0].error
    assert_exact(result, inputs1, {0, 1, 2, 4, 5})


def test_advert_signed_by_a_key_outside_the_roster():
    config, ids, inputs = make_round(6)
    outsider = IdentityKey.generate()

    def forge(party):
        key = b"\x09" * 32
        sig = outsider.sign(advert_transcript(job_id="job", party=party, public_key=key))
        return AdvertiseKeys("job", 0, party, key, sig)

    unsigned = dataclasses.replace(forge(5), party=5, signature=b"")
    result = run(config, ids, inputs, filters={
        Stage.ADVERTISE_KEYS: lambda ms: [forge(1), forge(99)] + ms + [unsigned]})
    got = reasons(result)
    assert (1, Stage.ADVERTISE_KEYS, RejectionReason.BAD_SIGNATURE) in got
    assert (99, Stage.ADVERTISE_KEYS, RejectionReason.NOT_IN_ROSTER) in got
    assert (5, Stage.ADVERTISE_KEYS, RejectionReason.BAD_SIGNATURE) in got
    # the forgeries were filtered before the duplicate check: the genuine parties stay in
    assert (1, Stage.ADVERTISE_KEYS, RejectionReason.DUPLICATE_PARTY) not in got
    assert_exact(result, inputs, set(range(6)))


def test_duplicated_party_id_drops_that_party():
    config, ids, inputs = make_round(6)

    def duplicate(messages):
        twin = next(m for m in messages if m.party == 2)
        fake = dataclasses.replace(twin, vector=np.zeros_like(twin.vector))
        return messages + [fake]

    result = run(config, ids, inputs, filters={Stage.MASKED_INPUT: duplicate})
    assert (2, Stage.MASKED_INPUT, RejectionReason.DUPLICATE_PARTY) in reasons(result)
    assert_exact(result, inputs, {0, 1, 3, 4, 5})

    # an equivocating party: two different adverts, both validly signed by its identity
    config, ids, inputs = make_round(6, round_=1)
    twin = SecAggParty(party=4, identity=ids[4], config=config)
    result = run(config, ids, inputs,
                 filters={Stage.ADVERTISE_KEYS: lambda ms: ms + [twin.advertise()]})
    assert (4, Stage.ADVERTISE_KEYS, RejectionReason.DUPLICATE_PARTY) in reasons(result)
    assert_exact(result, inputs, {0, 1, 2, 3, 5})


def test_wrong_stage_late_wrong_job_and_malformed_messages():
    config, ids, inputs = make_round(6)
    adverts = {}

    def stash(ms):
        adverts.update({m.party: m for m in ms})
        return ms

    def inject(ms):
        wrong_job = dataclasses.replace(ms[0], job_id="other-job")
        bad_shape = dataclasses.replace(ms[1], vector=ms[1].vector[:-1])
        rest = [m for m in ms if m.party not in (ms[0].party, ms[1].party)]
        return rest + [wrong_job, bad_shape, adverts[3], "not a message"]

    result = run(config, ids, inputs, silent={Stage.MASKED_INPUT: [5]},
                 filters={Stage.ADVERTISE_KEYS: stash, Stage.MASKED_INPUT: inject})
    got = reasons(result)
    assert (0, Stage.MASKED_INPUT, RejectionReason.WRONG_JOB) in got
    assert (1, Stage.MASKED_INPUT, RejectionReason.MALFORMED) in got
    assert (3, Stage.MASKED_INPUT, RejectionReason.LATE) in got  # an advert, long after
    assert (-1, Stage.MASKED_INPUT, RejectionReason.WRONG_STAGE) in got
    assert_exact(result, inputs, {2, 3, 4})


def test_message_from_a_party_that_already_dropped_is_late():
    config, ids, inputs = make_round(6)
    parties = {p: SecAggParty(party=p, identity=ids[p], config=config) for p in range(6)}
    server = SecAggServer(config)
    broadcast = server.collect_adverts([p.advertise() for p in parties.values()])
    shares = [parties[p].share_keys(broadcast) for p in range(6)]
    inboxes = server.route_shares(shares[1:])  # party 0 dropped at share_keys
    masked = [parties[p].masked_input(inboxes[p], inputs[p]) for p in range(1, 6)]
    late = MaskedInput("job", 0, 0, inputs[0].copy())
    request = server.collect_masked(masked + [late])
    assert server.rejections[-1].reason is RejectionReason.LATE
    assert 0 not in request.survivors + request.dropped
    result = server.finish([parties[p].unmask(request) for p in range(1, 6)])
    assert_exact(result, inputs, {1, 2, 3, 4, 5})


def test_party_rejects_bad_server_messages():
    config, ids, inputs = make_round(5, round_=1)
    parties = {p: SecAggParty(party=p, identity=ids[p], config=config) for p in range(5)}
    with pytest.raises(ProtocolError, match="cannot run share_keys"):
        SecAggParty(party=0, identity=ids[0], config=config).share_keys(None)
    adverts = tuple(p.advertise() for p in parties.values())
    # a substituted key in a neighbour's advert breaks its signature
    forged = dataclasses.replace(adverts[1], public_key=b"\x01" * 32)
    with pytest.raises(ProtocolError, match="BAD_SIGNATURE"):
        parties[0].share_keys(KeyBroadcast("job", 1, (adverts[0], forged) + adverts[2:]))
    assert parties[0].stage is None  # aborted: it now behaves as a dropout
    with pytest.raises(ProtocolError, match="REPLAYED"):
        parties[2].share_keys(KeyBroadcast("job", 0, adverts))
    broadcast = KeyBroadcast("job", 1, adverts)
    shares = [parties[p].share_keys(broadcast) for p in (1, 3, 4)]
    assert all(isinstance(s, ShareKeys) for s in shares)
    server = SecAggServer(config)
    server.collect_adverts(adverts)
    inboxes = server.route_shares(shares)
    with pytest.raises(ProtocolError, match="addressed to party"):
        parties[3].masked_input(inboxes[1], inputs[3])
    for p in (1, 4):
        parties[p].masked_input(inboxes[p], inputs[p])
    with pytest.raises(ProtocolError, match="both survivor and dropped"):
        parties[1].unmask(UnmaskRequest("job", 1, (1, 4), (1,)))
    with pytest.raises(ProtocolError, match="cannot run unmask"):
        parties[1].unmask(UnmaskRequest("job", 1, (1, 4), ()))  # one answer, even after an error
    with pytest.raises(ProtocolError, match="cannot run"):
        server.finish([])  # the server is still waiting for masked inputs


def test_corrupt_recovery_share_or_blob_is_caught():
    """A dropped party's pairwise seeds come from its sealed recovery blob: a corrupt share
    rebuilds a wrong key, whose GCM tag check fails (or is no 32-byte key at all) (nothing is released); a blob of the
    wrong size is rejected at share_keys and its sender dropped."""
    config, ids, inputs = make_round(6)

    def corrupt(responses):
        out = []
        for m in responses:
            if m.party == 1 and m.recovery_owners:
                value = bytearray(m.recovery_shares)
                value[SHARE_BYTES - 4] ^= 1  # the lowest limb of its first share
                m = dataclasses.replace(m, recovery_shares=bytes(value))
            out.append(m)
        return out

    # a wrong key fails the blob's tag, or (if a limb leaves its range) fails to rebuild
    with pytest.raises(ProtocolError, match="does not open its sealed pair seeds|corrupt"):
        run(config, ids, inputs, silent={Stage.MASKED_INPUT: [4]},
            filters={Stage.UNMASK: corrupt})

    def short_blob(messages):
        return [dataclasses.replace(m, recovery=m.recovery[:-1]) if m.party == 2 else m
                for m in messages]

    result = run(config, ids, inputs, filters={Stage.SHARE_KEYS: short_blob})
    assert (2, Stage.SHARE_KEYS, RejectionReason.MALFORMED) in reasons(result)
    assert_exact(result, inputs, {0, 1, 3, 4, 5})


def _without_owner(m, owner):
    """``m`` with its share of ``owner``'s self-mask seed left out."""
    i = m.seed_owners.index(owner)
    shares = m.seed_shares[:i * SHARE_BYTES] + m.seed_shares[(i + 1) * SHARE_BYTES:]
    return dataclasses.replace(m, seed_owners=m.seed_owners[:i] + m.seed_owners[i + 1:],
                               seed_shares=shares)


def test_too_few_shares_of_one_secret_abort_the_round():
    config, ids, inputs = make_round(6)

    def withhold(responses):  # only parties 0 and 1 still send their share of party 0's seed
        return [_without_owner(m, 0) if m.party > 1 else m for m in responses]

    with pytest.raises(ThresholdError, match="only 2 shares of survivor 0's self-mask seed"):
        run(config, ids, inputs, filters={Stage.UNMASK: withhold})


def test_malformed_unmask_responses_are_rejected():
    config, ids, inputs = make_round(9)

    def mangle(responses):
        out = []
        for m in responses:
            if m.party == 1:  # shares that do not match the owners listed
                m = dataclasses.replace(m, seed_shares=m.seed_shares[:-1])
            elif m.party == 2:  # one owner twice
                m = dataclasses.replace(m, seed_owners=(m.seed_owners[0],) * len(m.seed_owners))
            elif m.party == 3:  # a share of a party it holds no share of (not a neighbour)
                m = dataclasses.replace(m, recovery_owners=(99,),
                                        recovery_shares=bytes(SHARE_BYTES))
            elif m.party == 4:  # limbs outside GF(2**31 - 1)
                m = dataclasses.replace(m, seed_shares=b"\xff" * len(m.seed_shares))
            out.append(m)
        return out

    result = run(config, ids, inputs, filters={Stage.UNMASK: mangle})
    why = reasons(result)
    for party in (1, 2, 3, 4):
        assert (party, Stage.UNMASK, RejectionReason.MALFORMED) in why
    assert_exact(result, inputs, range(9))  # the other holders' shares still suffice
