"""SecAgg+ end to end: masks cancel, exact sums under dropouts, threshold aborts, uniformity."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from lepton_ray.crypto.identity import IdentityKey, Roster, SignatureVerifier
from lepton_ray.crypto.prg import MaskExpander
from lepton_ray.errors import ConfigError, DataError, ProtocolError, ThresholdError
from lepton_ray.secagg import (
    COMPLETE_GRAPH,
    MaskedInput,
    SecAggParty,
    SecAggServer,
    Stage,
    build_graph,
    default_threshold,
    plan_round,
    run_local_round,
    secure_sum,
)
from lepton_ray.secagg.keys import ParticipationLog, PartyKeyring, pairwise_mask_seed
from lepton_ray.secagg.local import graph_seed_from, make_local_round

STAGES = ("share_keys", "masked_input", "consistency", "unmask")


def make_round(n=6, d=16, *, neighbours=None, round_=0, modulus_bits=32, threshold=None):
    identities = [IdentityKey.generate() for _ in range(n)]
    config = plan_round(job_id="job", round_=round_, roster=Roster.of(identities), dim=d,
                        graph_seed=b"g" * 32, neighbours=neighbours, threshold=threshold,
                        modulus_bits=modulus_bits)
    rng = np.random.default_rng(round_)
    inputs = {p: rng.integers(0, np.iinfo(config.dtype).max, d, dtype=config.dtype,
                              endpoint=True) for p in range(n)}
    return config, dict(enumerate(identities)), inputs


def test_pairwise_masks_cancel():
    graph = build_graph(range(12), 4, b"m" * 32)
    # every party on its own host: each end derives the pair secrets from its own private key
    rings = {p: PartyKeyring() for p in graph.participants}
    public = {p: rings[p].public_key(p) for p in graph.participants}
    nonce = b"n" * 16
    expander = MaskExpander(257, np.uint32)
    total = np.zeros(257, dtype=np.uint32)
    for i in graph.participants:
        for j in graph.neighbours_of(i):
            mine, theirs = rings[i].pair("j", i, j, public[j]), rings[j].pair("j", j, i, public[i])
            seed = pairwise_mask_seed(mine.mask_key, nonce)
            assert seed == pairwise_mask_seed(theirs.mask_key, nonce)
            # other transcripts (another round, nonce, roster, graph, t) give independent seeds
            assert seed != pairwise_mask_seed(mine.mask_key, b"m" * 16)
            for transcript in (nonce, b"t" * 32, nonce):  # remembered = derived
                assert mine.round_seed(transcript) == pairwise_mask_seed(mine.mask_key,
                                                                         transcript)
                assert mine.round_seed(transcript) == theirs.round_seed(transcript)
            (expander.add if i < j else expander.subtract)(total, seed)
    assert not total.any()
    # one key agreement per pair end, not one per use
    edges = sum(len(graph.neighbours_of(p)) for p in graph.participants) // 2
    assert sum(r.agreements for r in rings.values()) == 2 * edges


def test_shared_keyring_agrees_once_per_pair_and_rounds_reuse_it():
    """A host's parties share one keyring: a co-hosted pair agrees once, and later rounds of
    the same participants (same graph) do no key agreement at all."""
    n, d = 12, 40
    identities = [IdentityKey.generate() for _ in range(n)]
    roster = Roster.of(identities)
    keyring, verifier = PartyKeyring(), SignatureVerifier()
    rng = np.random.default_rng(7)
    inputs = {p: rng.integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32) for p in range(n)}
    for r in range(3):
        config = plan_round(job_id="j", round_=r, roster=roster, dim=d, graph_seed=b"g" * 32,
                            neighbours=4)
        local = make_local_round(config, dict(enumerate(identities)), keyring=keyring,
                                 server_verifier=verifier)
        result = run_local_round(config, dict(enumerate(identities)), inputs, local=local,
                                 silent={Stage.MASKED_INPUT: [r]})
        expected = np.sum([inputs[p] for p in result.survivors], axis=0, dtype=np.uint32)
        assert np.array_equal(result.total, expected) and r not in result.survivors
        edges = sum(len(config.graph.neighbours_of(p)) for p in range(n)) // 2
        assert keyring.agreements == edges  # all in round 0, none since
    with pytest.raises(ProtocolError, match="never runs a round twice"):
        make_local_round(config, dict(enumerate(identities)), keyring=keyring)


def test_secure_sum_no_dropouts_both_rings():
    rng = np.random.default_rng(1)
    for bits, dtype in ((32, np.uint32), (64, np.uint64)):
        x = rng.integers(0, np.iinfo(dtype).max, (9, 33), dtype=dtype, endpoint=True)
        result = secure_sum(x, modulus_bits=bits, seed=3)
        assert result.total.dtype == dtype
        assert np.array_equal(result.total, x.sum(axis=0, dtype=dtype))
        assert result.survivors == tuple(range(9)) and result.dropped == ()


def _oracle(graph, t, silent):
    """Which parties' inputs end up in the sum (None: the round must abort), restating the
    protocol's rules: a party shares only with >= t live holders, masks only with >= t-1
    partners, and every needed secret must have t live holders at unmask time."""
    nb = {p: set(graph.neighbours_of(p)) for p in graph.participants}
    a0 = set(graph.participants)
    if len(a0) < t:
        return None
    a1 = {i for i in a0 - silent["share_keys"] if len(nb[i] & a0) + 1 >= t}
    if len(a1) < t:
        return None
    s = {i for i in a1 - silent["masked_input"] if len(nb[i] & a1) + 1 >= t}
    while True:  # the server leaves out survivors with fewer than t live holders
        short = {i for i in s if len(nb[i] & s) + 1 < t}
        if not short:
            break
        s -= short
    d = a1 - s
    if len(s) < t:
        return None
    needed = {j for j in d if nb[j] & s}
    if any(len(nb[j] & s) < t for j in needed):
        return None
    signers = s - silent["consistency"]
    if len(signers) < t:
        return None
    r = {i for i in signers - silent["unmask"] if len(nb[i] & signers) + 1 >= t}
    if len(r) < t:
        return None
    if any(len(nb[i] & r) + (i in r) < t for i in s) or any(len(nb[j] & r) < t for j in needed):
        return None
    return s


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 14), d=st.integers(1, 24), bits=st.sampled_from([32, 64]),
       data=st.data())
def test_secure_sum_matches_numpy_under_random_dropouts(n, d, bits, data):
    k = data.draw(st.integers(2, n - 1), label="k")
    seed = data.draw(st.integers(0, 2**32), label="seed")
    graph = build_graph(range(n), k, graph_seed_from(seed))
    required = default_threshold(graph.degree)  # parties refuse anything below it
    assume(required <= graph.min_degree + 1)
    t = data.draw(st.integers(required, graph.min_degree + 1), label="t")
    silent = {stage: set(data.draw(st.lists(st.integers(0, n - 1), max_size=n // 2 + 1),
                                   label=stage)) for stage in STAGES}
    dtype = np.uint32 if bits == 32 else np.uint64
    rng = np.random.default_rng(seed)
    x = rng.integers(0, np.iinfo(dtype).max, (n, d), dtype=dtype, endpoint=True)
    expected = _oracle(graph, t, silent)
    if expected is None:
        with pytest.raises(ThresholdError):
            secure_sum(x, modulus_bits=bits, neighbours=k, threshold=t, dropouts=silent,
                       seed=seed)
        return
    result = secure_sum(x, modulus_bits=bits, neighbours=k, threshold=t, dropouts=silent,
                        seed=seed)
    assert set(result.survivors) == expected
    assert set(result.dropped) == set(range(n)) - expected
    assert np.array_equal(result.total, x[sorted(expected)].sum(axis=0, dtype=dtype))


@pytest.mark.parametrize("n", [5, 8, 11])
def test_complete_graph_survives_n_minus_t_dropouts_at_every_stage(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2**32, (n, 20), dtype=np.uint64).astype(np.uint32)
    t = n // 2 + 1  # 2t > k + 1 with k = n - 1
    for trial in range(6):
        order = rng.permutation(n).tolist()
        drops = order[: n - t]
        cuts = sorted(rng.integers(0, len(drops) + 1, 2).tolist())
        silent = {"share_keys": drops[:cuts[0]], "masked_input": drops[cuts[0]:cuts[1]],
                  "unmask": drops[cuts[1]:]}
        result = secure_sum(x, neighbours=COMPLETE_GRAPH, dropouts=silent, seed=trial)
        survivors = sorted(set(range(n)) - set(silent["share_keys"])
                           - set(silent["masked_input"]))
        assert list(result.survivors) == survivors and result.threshold == t
        assert np.array_equal(result.total, x[survivors].sum(axis=0, dtype=np.uint32))
        # one more dropout at the unmask stage is one too many
        extra = {**silent, "unmask": list(silent["unmask"]) + [order[n - t]]}
        with pytest.raises(ThresholdError):
            secure_sum(x, neighbours=n - 1, dropouts=extra, seed=trial)


def test_sparse_default_round_with_ten_percent_dropouts():
    n = 40
    x = np.random.default_rng(0).integers(0, 2**32, (n, 64), dtype=np.uint64).astype(np.uint32)
    silent = {"share_keys": [0], "masked_input": [1, 2], "unmask": [3]}
    result = secure_sum(x, dropouts=silent, seed=5)
    assert result.neighbours < n - 1  # automatic k is sparse at n = 40
    survivors = sorted(set(range(n)) - {0, 1, 2})
    assert list(result.survivors) == survivors
    assert np.array_equal(result.total, x[survivors].sum(axis=0, dtype=np.uint32))


def test_threshold_error_when_too_few_remain_and_nothing_released():
    config, identities, inputs = make_round(6, neighbours=COMPLETE_GRAPH)  # t = 3
    for stage, silent in ((Stage.ADVERTISE_KEYS, {0, 1, 2, 3}), (Stage.SHARE_KEYS, {0, 1, 2, 3}),
                          (Stage.MASKED_INPUT, {0, 1, 2, 3}), (Stage.UNMASK, {0, 1, 2, 3})):
        requests: list = []

        def record(messages, seen=requests):
            seen.extend(messages)
            return messages

        filters = {Stage.UNMASK: record}
        with pytest.raises(ThresholdError, match="nothing released"):
            run_local_round(config, identities, inputs, silent={stage: silent},
                            filters=filters)
        if stage is not Stage.UNMASK:
            assert requests == []  # no party was ever asked for a share
    # a server that aborted stays aborted
    server = SecAggServer(config)
    with pytest.raises(ThresholdError):
        server.collect_adverts([])
    assert server.stage is None


def test_masked_inputs_look_uniform_to_the_server():
    """Chi-square on the top and bottom byte of one party's masked vector whose input is a
    constant: the server's view must be indistinguishable from uniform."""
    config, identities, _ = make_round(5, d=40_000, neighbours=4)
    inputs = {p: np.full(40_000, 7, dtype=np.uint32) for p in range(5)}
    seen: list[MaskedInput] = []
    run_local_round(config, identities, inputs,
                    filters={Stage.MASKED_INPUT: lambda ms: seen.extend(ms) or ms})
    for message in seen[:2]:
        v = message.vector
        for byte in (v >> np.uint32(24), v & np.uint32(0xFF)):
            counts = np.bincount(byte.astype(np.int64), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-6


def test_messages_and_config_pickle_for_the_runtime():
    """Hosts and the coordinator exchange these through Ray: they must pickle; a party (it
    holds private keys) must not."""
    config, identities, inputs = make_round(5, neighbours=3)
    seen: list = []

    def keep(messages):
        seen.extend(messages)
        return messages

    result = run_local_round(config, identities, inputs, filters=dict.fromkeys(Stage, keep))
    for obj in [config, result, *seen]:
        clone = pickle.loads(pickle.dumps(obj))
        assert type(clone) is type(obj)
    clone = pickle.loads(pickle.dumps(result))
    assert np.array_equal(clone.total, result.total) and clone.survivors == result.survivors
    with pytest.raises(TypeError, match="private key"):
        pickle.dumps(SecAggParty(party=0, identity=identities[0], config=config))


def test_secure_sum_input_validation():
    with pytest.raises(DataError, match="unsigned"):
        secure_sum(np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(DataError, match="2\\*\\*32"):
        secure_sum(np.full((3, 4), 2**40, dtype=np.uint64))
    with pytest.raises(DataError, match="shape"):
        secure_sum(np.zeros(4, dtype=np.uint32))
    with pytest.raises(ConfigError, match="unknown stage"):
        secure_sum(np.zeros((3, 4), dtype=np.uint32), dropouts={"sum": [0]})
    with pytest.raises(ConfigError, match="outside"):
        secure_sum(np.zeros((3, 4), dtype=np.uint32), dropouts={"unmask": [7]})
    with pytest.raises(ConfigError, match="modulus_bits"):
        secure_sum(np.zeros((3, 4), dtype=np.uint32), modulus_bits=16)


def test_participation_log_is_job_long_persisted_and_survives_a_torn_line(tmp_path):
    """A party never runs a (job, round) twice, however many rounds later (the old memory
    forgot after 64 nonces), and a restarted host reading the log still refuses."""
    path = tmp_path / "participation.jsonl"
    log = ParticipationLog(path)
    for r in range(200):
        assert log.claim("j", r, [1, 2, 3, 7]) == []
    assert log.claim("j", 0, [3, 4]) == [3]  # round 0, 200 rounds later: still refused
    assert log.claim("k", 0, [3]) == []  # another job is another transcript
    with open(path, "a") as fh:
        fh.write('{"job": "j", "round": 5, "parties": [[9')  # a crash mid-write
    again = ParticipationLog(path)
    assert again.took_part("j", 0, 4) and again.took_part("j", 199, 7)
    assert not again.took_part("j", 5, 9)  # the torn claim: nothing was said yet
    assert again.claim("j", 17, [1, 5]) == [1]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
