"""Attacks: every bad message is rejected with a clear reason naming its sender, only the
sender can lose its place in the round, and the result stays exact over the honest
survivors. (The active-coordinator red-team suite is tests/test_secagg_adversary.py.)"""

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
    ConsistencyRequest,
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


def test_tampered_envelope_is_reported_and_drops_nobody():
    """An envelope that fails its tag (tampered in transit, or garbled by its sender) makes
    its receiver complain; the receiver just holds none of the sender's shares. Nobody is
    dropped for a complaint (a false one must not hurt the accused), and the sum is exact."""
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
    assert result.dropped == ()
    assert_exact(result, inputs, set(range(7)))
    assert any("does not count as a holder" in r.detail for r in result.rejections)


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


def test_forged_copy_keeps_the_genuine_message_equivocation_drops_its_author():
    """A second masked input under party 2's id that party 2 did not sign is ignored (the
    genuine one stays in); two different inputs both signed by party 2 are its own
    equivocation, and only party 2 is dropped."""
    config, ids, inputs = make_round(6)

    def duplicate(messages):
        twin = next(m for m in messages if m.party == 2)
        fake = dataclasses.replace(twin, vector=np.zeros_like(twin.vector))
        return messages + [fake]

    result = run(config, ids, inputs, filters={Stage.MASKED_INPUT: duplicate})
    assert (2, Stage.MASKED_INPUT, RejectionReason.DUPLICATE_PARTY) not in reasons(result)
    assert_exact(result, inputs, set(range(6)))

    config, ids, inputs = make_round(6, round_=1)

    def equivocate(messages):
        twin = next(m for m in messages if m.party == 2)
        from lepton_ray.secagg import signing

        vector = np.zeros_like(twin.vector)
        sig = ids[2].sign(signing.masked_statement(config.transcript, (2,), vector, ()))
        return messages + [dataclasses.replace(twin, vector=vector, signature=sig)]

    result = run(config, ids, inputs, filters={Stage.MASKED_INPUT: equivocate})
    assert (2, Stage.MASKED_INPUT, RejectionReason.DUPLICATE_PARTY) in reasons(result)
    assert_exact(result, inputs, {0, 1, 3, 4, 5})

    # an older advert of party 4 (a keyring made earlier, e.g. before a host restart),
    # validly signed: the later keyring wins, party 4 stays in
    config, ids, inputs = make_round(6, round_=1)
    older = SecAggParty(party=4, identity=ids[4], config=config).advertise()
    result = run(config, ids, inputs, filters={Stage.ADVERTISE_KEYS: lambda ms: ms + [older]})
    assert_exact(result, inputs, set(range(6)))

    # an equivocating party: two different keys, same keyring time, both signed by it
    config, ids, inputs = make_round(6, round_=2)

    def equivocate(ms):
        own = next(m for m in ms if m.party == 4)
        key = b"\x07" * 32
        sig = ids[4].sign(advert_transcript(job_id="job", party=4, public_key=key,
                                            issued=own.issued))
        return ms + [dataclasses.replace(own, public_key=key, signature=sig)]

    result = run(config, ids, inputs, filters={Stage.ADVERTISE_KEYS: equivocate})
    assert (4, Stage.ADVERTISE_KEYS, RejectionReason.DUPLICATE_PARTY) in reasons(result)
    assert_exact(result, inputs, {0, 1, 2, 3, 5})


def test_wrong_stage_late_wrong_job_and_malformed_messages():
    config, ids, inputs = make_round(7)
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
    assert_exact(result, inputs, {2, 3, 4, 6})


def test_message_from_a_party_that_already_dropped_is_late():
    config, ids, inputs = make_round(6)
    parties = {p: SecAggParty(party=p, identity=ids[p], config=config) for p in range(6)}
    server = SecAggServer(config)
    broadcast = server.collect_adverts([p.advertise() for p in parties.values()])
    shares = [parties[p].share_keys(broadcast) for p in range(6)]
    inboxes = server.route_shares(shares[1:])  # party 0 dropped at share_keys
    masked = [parties[p].masked_input(inboxes[p], inputs[p]) for p in range(1, 6)]
    late = MaskedInput("job", 0, 0, inputs[0].copy())
    check = server.collect_masked(masked + [late])
    assert server.rejections[-1].reason is RejectionReason.LATE
    assert 0 not in check.survivors
    request = server.collect_consistency([parties[p].consistency(check) for p in range(1, 6)])
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
    with pytest.raises(ProtocolError, match="sorted tuple of distinct"):
        parties[1].consistency(ConsistencyRequest("job", 1, (4, 1)))
    with pytest.raises(ProtocolError, match="cannot run unmask"):
        parties[1].unmask(UnmaskRequest("job", 1, (1, 4), ()))  # one answer, even after an error
    with pytest.raises(ThresholdError, match="only 2 of its neighbourhood survived"):
        parties[4].consistency(ConsistencyRequest("job", 1, (1, 4)))
    with pytest.raises(ProtocolError, match="cannot run"):
        server.finish([])  # the server is still waiting for masked inputs


def test_corrupt_recovery_share_is_attributed_and_the_round_completes():
    """A dropped party's pairwise seeds come from its sealed recovery blob. A holder's corrupt
    share of its recovery key rebuilds a key that misses the owner's commitment: the server
    finds t shares that match, names the holder with its signed response as evidence, and
    the round completes exactly. A blob of the wrong size is rejected at share_keys; a blob
    that does not open under the key its owner committed to is the owner's fault: named,
    and (its masks cannot be removed) the round aborts, releasing nothing."""
    config, ids, inputs = make_round(6)

    def corrupt(responses):  # party 1 sends (and signs) a wrong share
        from lepton_ray.secagg import signing

        out = []
        for m in responses:
            if m.party == 1 and m.recovery_owners:
                value = bytearray(m.recovery_shares)
                value[SHARE_BYTES - 4] ^= 1  # the lowest limb of its first share
                m = dataclasses.replace(m, recovery_shares=bytes(value))
                m = dataclasses.replace(m, signature=ids[1].sign(signing.unmask_statement(
                    config.transcript, 1, m.seed_owners, m.seed_shares, m.recovery_owners,
                    m.recovery_shares)))
            out.append(m)
        return out

    result = run(config, ids, inputs, silent={Stage.MASKED_INPUT: [4]},
                 filters={Stage.UNMASK: corrupt})
    assert (1, Stage.UNMASK, RejectionReason.BAD_SHARE) in reasons(result)
    assert any("signed response" in r.detail for r in result.rejections
               if r.reason is RejectionReason.BAD_SHARE)
    assert_exact(result, inputs, {0, 1, 2, 3, 5})

    config, ids, inputs = make_round(6, round_=1)

    def resealed_blob(messages):  # party 4 seals garbage, signs it, then drops
        from lepton_ray.secagg import signing

        out = []
        for m in messages:
            if m.party == 4:
                blob = bytes(len(m.recovery))
                sig = ids[4].sign(signing.share_statement(config.transcript, 4, m.receivers,
                                                          m.envelopes, blob, m.commitments))
                m = dataclasses.replace(m, recovery=blob, signature=sig)
            out.append(m)
        return out

    local = make_local_round(config, dict(enumerate(ids)))
    with pytest.raises(ThresholdError, match="recovery blob does not open"):
        run_local_round(config, dict(enumerate(ids)), inputs, local=local,
                        silent={Stage.MASKED_INPUT: [4]},
                        filters={Stage.SHARE_KEYS: resealed_blob})
    assert (4, Stage.SHARE_KEYS, RejectionReason.BAD_SHARE) in {
        (r.party, r.stage, r.reason) for r in local.server.rejections}

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
