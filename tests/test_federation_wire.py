"""The wire schema: every message type round-trips; malformed, oversized, truncated or
unknown input is refused with a clear error; pickle never runs."""

from __future__ import annotations

import os
import pickle

import msgpack
import numpy as np
import pytest

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.errors import FederationError
from lepton_ray.federation import wire
from lepton_ray.learning.aggregation import PartialSum
from lepton_ray.learning.party_update import SecureRoundPlan, UpdateRule
from lepton_ray.secagg import messages as m
from lepton_ray.secagg.plan import plan_round
from lepton_ray.secagg.quantize import QuantizationSpec
from lepton_ray.secagg.stages import Rejection, RejectionReason, Stage


def _roundtrip(obj, **kw):
    frames = list(wire.encode(obj, **kw))
    assert all(isinstance(f, bytes) for f in frames)
    assert not any(b"\x80\x04" == f[:2] for f in frames)  # not a pickle stream
    return wire.decode(frames)


def _eq(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_eq(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b and type(a) is type(b)


def _plan():
    roster = Roster.of(IdentityKey.generate() for _ in range(5))
    config = plan_round(job_id="j", round_=3, roster=roster, dim=11, graph_seed=b"s" * 32,
                        neighbours=4)
    return SecureRoundPlan(config=config, rule=UpdateRule(clip_norm=1.5, weight_cap=40.0),
                           quantization=QuantizationSpec(clip_norm=1.5, scale=1000.0),
                           rotation_seed=os.urandom(16))


def every_message():
    advert = m.AdvertiseKeys(job_id="j", round=1, party=2, public_key=os.urandom(32),
                             signature=os.urandom(64))
    vec = np.arange(7, dtype=np.uint32)
    return [
        advert,
        m.KeyBroadcast(job_id="j", round=1, adverts=(advert, advert)),
        m.ShareKeys(job_id="j", round=1, party=2, receivers=(0, 1),
                    envelopes=os.urandom(2 * m.ENVELOPE_BYTES), recovery=os.urandom(100)),
        m.ShareInbox(job_id="j", round=1, receiver=0, senders=(1, 2), envelopes=os.urandom(200_000)),
        m.MaskedInput(job_id="j", round=1, party=2, vector=vec, rejected_senders=(4,)),
        m.MaskedSum(job_id="j", round=1, parties=(1, 2), vector=vec.astype(np.uint64),
                    rejected=((1, (3, 4)),)),
        m.UnmaskRequest(job_id="j", round=1, survivors=(0, 1), dropped=(2,)),
        m.UnmaskResponse(job_id="j", round=1, party=0, seed_owners=(1,), seed_shares=b"ab" * 4,
                         recovery_owners=(2,), recovery_shares=b"cd" * 4),
        m.AggregateResult(job_id="j", round=1, total=vec, survivors=(0, 1), dropped=(2,),
                          neighbours=2, threshold=2, modulus_bits=32,
                          rejections=(Rejection(2, Stage.SHARE_KEYS, RejectionReason.TAMPERED, "x"),)),
        _plan(),
        PartialSum(total=np.linspace(0, 1, 9), parties=3),
        wire.Hello(federation="demo", site="north", roster_hash="ab" * 32),
        wire.Welcome(session="s1", roster_hash="ab" * 32),
        wire.JobOffer(job_id="j", spec={"name": "x", "rounds": 3, "model": {"hidden": [128]},
                                        "privacy": {"epsilon": 2.5, "noise_multiplier": None}}),
        wire.JobAnswer(job_id="j", accepted=False, reason="policy"),
        wire.Call(id=7, method="advertise", args=(3, {0: [1, 2]}, (np.ones(3, np.float32),), None)),
        wire.Reply(id=7, value=(wire.Report(host=0, parties=(0,), failed=((1, "dropout"),),
                                            examples=10, train_loss=0.5, clipped=1), [advert])),
        wire.Reply(id=8, error="boom"),
    ]


@pytest.mark.parametrize("msg", every_message(), ids=lambda x: type(x).__name__)
def test_every_message_round_trips(msg):
    assert _eq(msg, _roundtrip(msg))
    assert _eq(msg, _roundtrip(msg, chunk_bytes=5))  # tiny chunks: the same message


def test_every_stage_message_type_is_in_the_schema():
    for cls in (*m.PARTY_MESSAGES, *m.SERVER_MESSAGES, m.AggregateResult):
        assert any(s.cls is cls for s in wire.REGISTRY.values()), cls


def test_plan_graph_rebuilt_exactly():
    plan = _plan()
    back = _roundtrip(plan)
    assert back.config.graph == plan.config.graph and back.config.roster == plan.config.roster
    assert back.config.nonce == plan.config.nonce


def test_large_vector_streams_in_bounded_chunks():
    v = np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)
    msg = m.MaskedInput(job_id="j", round=1, party=0, vector=v.view(np.uint32))
    frames = wire.encode(msg)
    dec = wire.Decoder()
    n, total, out = 0, 0, None
    for f in frames:
        assert len(f) <= wire.CHUNK_BYTES + 1
        n, total = n + 1, total + len(f)
        out = dec.feed(f)
    assert np.array_equal(out.vector.view(np.float32), v)
    assert out.vector.flags.writeable
    assert n == 1 + -(-v.nbytes // wire.CHUNK_BYTES) and total < 1.001 * v.nbytes  # <0.1% overhead


def test_pickle_is_never_accepted():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(FederationError, match="not in the wire schema"):
        list(wire.encode(Evil()))
    with pytest.raises(FederationError, match="not valid msgpack|must be a map"):
        wire.decode([wire.HEADER + pickle.dumps(Evil())])


def _header(body, blobs=(), v=wire.WIRE_VERSION):
    return wire.HEADER + msgpack.packb({"v": v, "body": body, "blobs": list(blobs)}, use_bin_type=True)


@pytest.mark.parametrize("frames, match", [
    ([b""], "empty"),
    ([b"X123"], "unknown frame kind"),
    ([wire.CHUNK + b"abc"], "without a message header"),
    ([_header(1, v=2)], "wire version 2"),
    ([_header({"~": "os.system", "f": {}})], "not in the schema"),
    ([_header({"~": "Hello", "f": {"federation": "d", "site": "n"}})], "missing fields"),
    ([_header({"~": "Hello", "f": {"federation": "d", "site": 3, "roster_hash": "x",
                                   "wire_version": 1}})], r"Hello\.site: expected a str"),
    ([_header({"~": "UnmaskRequest", "f": {"job_id": "j", "round": 1, "survivors":
                                           {"~": "tuple", "v": [1, "2"]}, "dropped": {"~": "tuple", "v": []},
                                           "signatures": {"~": "tuple", "v": []}}})],
     "survivors: expected a tuple of ints"),
    ([_header({"~": "nd", "i": 0, "dtype": "object", "shape": [1]}, [8]), wire.CHUNK + b"x" * 8],
     "dtype 'object'"),
    ([_header({"~": "nd", "i": 0, "dtype": "uint32", "shape": [3]}, [8]), wire.CHUNK + b"x" * 8],
     "needs 12 bytes"),
    ([_header({"~": "nd", "i": 0, "dtype": "uint32", "shape": [2]}, [8]), wire.CHUNK + b"x" * 9],
     "overruns"),
    ([_header({"~": "blob", "i": 1}, [1]), wire.CHUNK + b"x"], "out of range"),
    ([_header(1, [1]), wire.CHUNK + b"x"], "does not use"),
    ([_header(1, [0] * (wire.MAX_BLOBS + 1))], "at most"),
    ([_header({"~": "JobOffer", "f": {"job_id": "j", "spec": {"~": "dict", "k": [1], "v": [2]}}})],
     "job spec key 1"),
    ([_header({"~": "NeighbourGraph", "f": {"participants": {"~": "tuple", "v": [0, 1, 2]},
                                            "adjacency": {"~": "tuple", "v": [{"~": "tuple", "v": [1]},
                                                                              {"~": "tuple", "v": []},
                                                                              {"~": "tuple", "v": []}]},
                                            "degree": 1}})], "not symmetric"),
    ([_header({"~": "QuantizationSpec", "f": {"clip_norm": -1.0, "scale": 1.0, "modulus_bits": 32}})],
     "invalid content"),
])
def test_malformed_input_is_refused_with_a_clear_error(frames, match):
    with pytest.raises(FederationError, match=match):
        wire.decode(frames)


def test_oversized_input_is_refused_before_allocating():
    dec = wire.Decoder(max_message_bytes=1000)
    with pytest.raises(FederationError, match="over the limit 1000"):
        dec.feed(_header({"~": "blob", "i": 0}, [1 << 40]))  # 1 TiB declared: refused, not allocated
    with pytest.raises(FederationError, match="exceeds the limit"):
        wire.Decoder(max_frame_bytes=10).feed(wire.CHUNK + b"x" * 10)
    with pytest.raises(FederationError, match="truncated"):
        wire.decode(list(wire.encode(np.zeros(1000)))[:-1])
    with pytest.raises(FederationError, match="not valid msgpack"):
        wire.decode([wire.HEADER + msgpack.packb({"v": 1, "body": b"x" * (wire.INLINE_BYTES + 1),
                                                  "blobs": []})])
    deep: list = []
    for _ in range(wire.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(FederationError, match="nested deeper"):
        list(wire.encode(deep))


def test_job_spec_travels_as_data_and_rebuilds():
    from lepton_ray.config import load_spec

    spec = load_spec("jobs/digits.yaml")
    offer = _roundtrip(wire.JobOffer(job_id="j", spec=spec.to_dict()))
    assert load_spec(offer.spec) == spec
