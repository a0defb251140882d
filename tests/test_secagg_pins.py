"""What a party checks before it sends anything: the plan against the job's pins (graph from
the seed, roster hash, secure t), and the threshold rule itself against a brute-force count
of the split-view attack."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.errors import ProtocolError
from lepton_ray.secagg import JobPins, plan_round, required_threshold
from lepton_ray.secagg.graph import (
    NeighbourPolicy,
    build_graph,
    corrupt_neighbour_bound,
    secure_threshold,
)
from lepton_ray.secagg.plan import job_graph_seed


def _split_view_possible(k: int, t: int, c: int) -> bool:
    """Brute force: can a server split the k + 1 - c honest holders of a victim into two
    groups, one revealing self-mask-seed shares and one recovery-key shares, so that with the
    c corrupt holders' shares (they give both) it holds t of each?"""
    honest = k + 1 - c
    return any(h1 + c >= t and (honest - h1) + c >= t for h1 in range(honest + 1))


def test_secure_threshold_is_the_smallest_that_defeats_a_split_view():
    for k, c in itertools.product(range(2, 60), range(0, 8)):
        t = secure_threshold(k, c)
        if c >= k or t > k + 1:  # no threshold at all works: the plan is refused
            continue
        assert not _split_view_possible(k, t, c), (k, c)
        assert _split_view_possible(k, t - 1, c), (k, c)  # and no smaller t does
    assert secure_threshold(19, 0) == 11  # the old k//2 + 1 = 10 was splittable 10 + 10


def test_corrupt_neighbour_bound_against_the_union_bound():
    from scipy import stats

    n, k, gamma = 10_000, 56, 0.01
    c = corrupt_neighbour_bound(n, k, gamma, 40)
    assert n * stats.binom.sf(c, k, gamma) <= 2**-40 < n * stats.binom.sf(c - 1, k, gamma)
    assert corrupt_neighbour_bound(n, k, 0.0) == 0


def _plan(n=12, **kw):
    ids = [IdentityKey.generate() for _ in range(n)]
    roster = Roster.of(ids)
    config = plan_round(job_id="job", round_=1, roster=roster, dim=4,
                        graph_seed=job_graph_seed("job"), **kw)
    pins = JobPins(job_id="job", roster_digest=roster.digest, graph_seed=job_graph_seed("job"))
    return config, pins, ids


def test_pins_accept_the_honest_plan_and_name_each_substitution():
    config, pins, ids = _plan(n=40)
    assert not config.graph.complete
    pins.check(config)
    assert config.threshold == required_threshold(config.graph)
    # another graph (another seed), a lower t, another roster, another job
    other_graph = build_graph(config.participants, config.graph.degree, b"x" * 32)
    for changed, words in (
            (dataclasses.replace(config, graph=other_graph), "neighbour graph"),
            (dataclasses.replace(config, threshold=config.threshold - 1), "below"),
            (dataclasses.replace(config, roster=Roster.of(
                [IdentityKey.generate()] + ids[1:])), "roster"),
            (dataclasses.replace(config, job_id="other"), "job")):
        with pytest.raises(ProtocolError, match=words):
            pins.check(changed)


def test_pins_refuse_a_sparser_graph_than_the_policy_gives():
    config, pins, _ = _plan(n=40)
    sparse = plan_round(job_id="job", round_=1, roster=config.roster, dim=4,
                        graph_seed=job_graph_seed("job"), neighbours=2, threshold=2)
    with pytest.raises(ProtocolError, match="neighbour graph"):
        pins.check(sparse)
    colluders = JobPins(job_id="job", roster_digest=config.roster.digest,
                        graph_seed=job_graph_seed("job"), policy=NeighbourPolicy(corrupt_rate=0.05))
    with pytest.raises(ProtocolError):  # a job budgeting for colluders needs a larger k and t
        colluders.check(config)


def test_transcript_covers_every_public_parameter():
    config, _, _ = _plan()
    variants = [dataclasses.replace(config, nonce=b"z" * 16),
                dataclasses.replace(config, round=2),
                dataclasses.replace(config, threshold=config.threshold + 1),
                dataclasses.replace(config, dim=5),
                dataclasses.replace(config, job_id="job2")]
    seen = {config.transcript} | {v.transcript for v in variants}
    assert len(seen) == len(variants) + 1


def test_party_identities_are_stable_for_a_seed():
    from actors.party_host import party_identities

    seed = bytes(range(32))
    a, b = party_identities(seed, [0, 1, 2]), party_identities(seed, [2, 1, 0])
    assert all(a[p].public_bytes == b[p].public_bytes for p in (0, 1, 2))
    assert len({k.public_bytes for k in a.values()}) == 3
    assert party_identities(bytes(32), [0])[0].public_bytes != a[0].public_bytes
    assert list(itertools.islice(a, 1)) == [0]
