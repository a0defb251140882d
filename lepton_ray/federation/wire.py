"""The wire schema: what may cross a trust boundary, and how it is encoded. Never pickle.

Unpickling runs code chosen by whoever wrote the bytes, so a site that unpickled a message
from the coordinator would hand the coordinator its process (RayFed restricts unpickling to an
allow-list for this reason; STYLE point 13). Here every value is encoded with msgpack into
plain data (nil, bool, int, float, str, bin, array, map) and rebuilt only as one of:

- primitives, tuples, lists, dicts (keys: int or str), numpy arrays of an allowed dtype;
- a **registered** frozen dataclass (:data:`REGISTRY`): each has an explicit field schema, every
  field is type-checked on decode and the class's own constructor validates the rest.

Nothing else can be named, so no code and no arbitrary class is ever instantiated. The job spec
travels as data (``JobSpec.to_dict()``) and the receiving site rebuilds and validates it.

**Framing.** A message is one header frame (``b"H"`` + msgpack: version, body, blob sizes)
followed by its blobs (numpy arrays and large ``bytes``) in chunk frames (``b"C"`` + raw
bytes, at most ``chunk_bytes`` each, 1 MiB by default), so a 100M-parameter vector streams in
a few hundred frames and never sits in one gRPC message. Limits are checked before memory is
allocated: header size, number of blobs, each blob's declared size, the message total
(``max_message_bytes``) and each chunk's size; chunks must fill the declared blobs exactly. Any
violation is a :class:`~lepton_ray.errors.FederationError` naming what was wrong.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from lepton_ray.errors import FederationError

WIRE_VERSION = 1
CHUNK_BYTES = 1 << 20  # chunk frames carry at most this much
MAX_FRAME_BYTES = 4 << 20  # a frame (header or chunk) larger than this is refused
MAX_HEADER_BYTES = (4 << 20) - 64
MAX_MESSAGE_BYTES = 2 << 30  # blobs of one message (a 100M-parameter uint64 vector is 800 MB)
INLINE_BYTES = 64 << 10  # ``bytes`` longer than this travel as a blob
MAX_BLOBS = 4096
MAX_DEPTH = 24
HEADER, CHUNK = b"H", b"C"
DTYPES = frozenset({"uint8", "int32", "int64", "uint32", "uint64", "float32", "float64", "bool"})


# --------------------------------------------------------------------------- site messages
@dataclass(frozen=True)
class Hello:
    """Site -> coordinator, first message on a stream: who it says it is (checked against the
    TLS peer certificate) and the roster it pinned (must equal the coordinator's)."""

    federation: str
    site: str
    roster_hash: str
    wire_version: int = WIRE_VERSION


@dataclass(frozen=True)
class Welcome:
    """Coordinator -> site: the handshake is accepted (``session`` names this connection)."""

    session: str
    roster_hash: str


@dataclass(frozen=True)
class JobOffer:
    """Coordinator -> site: a job spec as data (``JobSpec.to_dict()``), never code."""

    job_id: str
    spec: dict


@dataclass(frozen=True)
class JobAnswer:
    """Site -> coordinator: whether the site's policy accepts the job, and why not."""

    job_id: str
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class Call:
    """Coordinator -> site: call ``method`` of the site's PartyHost with ``args``."""

    id: int
    method: str
    args: tuple


@dataclass(frozen=True)
class Reply:
    """Site -> coordinator: the result of :class:`Call` ``id``, or ``error`` (a message)."""

    id: int
    value: Any = None
    error: str = ""


@dataclass(frozen=True)
class Report:
    """The per-stage metadata a host returns (the fields of ``actors.party_host.StageReport``)."""

    host: int
    parties: tuple
    failed: tuple = ()
    examples: int = 0
    train_loss: float = float("nan")
    clipped: int = 0
    device: str = ""
    ray_calls: int = 0


@dataclass(frozen=True)
class JobData:
    """Coordinator -> site, once the site accepted ``job_id``: the feature columns and class
    set of the coordinator's test file, which every site's own file must agree with (a site
    that disagrees refuses, naming the difference), and whether the job standardises
    (``moments``: the site's secure-sum input is its row count, feature sums and sums of
    squares, else its row count alone; :mod:`lepton_ray.federation.stats`)."""

    job_id: str
    features: tuple
    classes: tuple
    moments: bool


@dataclass(frozen=True)
class Standardisation:
    """Coordinator -> site: the pooled mean and scale decoded from the secure sum of every
    site's moments (what ``data.standardize`` computes over pooled rows in a simulation)."""

    job_id: str
    mean: Any  # 1-D float64 array
    scale: Any  # 1-D float64 array


@dataclass(frozen=True)
class TrainRound:
    """Coordinator -> site, before a round's SecAgg+ stages: the global parameters, and how
    the site turns its delta into its ring input (the update rule and the quantisation,
    which the site checks against the spec it accepted)."""

    job_id: str
    round: int
    params: Any  # 1-D float32 array
    rule: Any  # lepton_ray.learning.party_update.UpdateRule
    quantization: Any  # lepton_ray.secagg.quantize.QuantizationSpec


# --------------------------------------------------------------------------- field checks
@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    what: str


def _is_int(v: Any) -> bool:
    return type(v) is int


INT = Check(_is_int, "an int")
STR = Check(lambda v: type(v) is str, "a str")
BOOL = Check(lambda v: type(v) is bool, "a bool")
BYTES = Check(lambda v: type(v) is bytes, "bytes")
FLOAT = Check(lambda v: type(v) in (float, int), "a number")
INTS = Check(lambda v: type(v) is tuple and all(type(x) is int for x in v), "a tuple of ints")
VECTOR = Check(lambda v: isinstance(v, np.ndarray) and v.ndim == 1, "a 1-D numpy array")
DICT = Check(lambda v: type(v) is dict, "a dict")
ANY = Check(lambda v: True, "any value")


def optional(c: Check) -> Check:
    return Check(lambda v: v is None or c.ok(v), f"None or {c.what}")


def tuple_of(c: Check) -> Check:
    return Check(lambda v: type(v) is tuple and all(c.ok(x) for x in v), f"a tuple of ({c.what})")


def pair(a: Check, b: Check) -> Check:
    return Check(lambda v: type(v) is tuple and len(v) == 2 and a.ok(v[0]) and b.ok(v[1]),
                 f"a pair ({a.what}, {b.what})")


def instance(cls: type) -> Check:
    return Check(lambda v: type(v) is cls, cls.__name__)


@dataclass(frozen=True)
class Schema:
    cls: type
    fields: dict[str, Check]
    build: Callable[[dict], Any] | None = None  # default: cls(**fields)
    validate: Callable[[Any], None] | None = None


REGISTRY: dict[str, Schema] = {}
ENUMS: dict[str, type] = {}


def register(cls: type, fields: dict[str, Check], *, tag: str | None = None, build=None,
             validate=None) -> None:
    """Admit ``cls`` to the wire with an explicit schema for each of its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        raise TypeError(f"schema of {cls.__name__}: fields {sorted(fields)} != {sorted(names)}")
    REGISTRY[tag or cls.__name__] = Schema(cls, fields, build, validate)


def _tag_of(cls: type) -> str | None:
    for tag, schema in REGISTRY.items():
        if schema.cls is cls:
            return tag
    return None


# --------------------------------------------------------------------------- encoding
def encode(obj: Any, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Frames for ``obj``: one header frame, then its blobs in chunks of ``chunk_bytes``."""
    blobs: list[memoryview] = []
    body = _enc(obj, blobs, 0)
    header = msgpack.packb({"v": WIRE_VERSION, "body": body, "blobs": [b.nbytes for b in blobs]},
                           use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise FederationError(f"wire: header of {type(obj).__name__} is {len(header)} bytes "
                              f"(limit {MAX_HEADER_BYTES}): too large to send")
    yield HEADER + header
    for blob in blobs:
        for start in range(0, blob.nbytes, chunk_bytes):
            yield CHUNK + blob[start:start + chunk_bytes].tobytes()


def encode_bytes(obj: Any) -> list[bytes]:
    return list(encode(obj))


def _enc(v: Any, blobs: list, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise FederationError(f"wire: value nested deeper than {MAX_DEPTH}")
    if v is None or type(v) in (bool, str, float):
        return v
    if type(v) is int:
        if not -(1 << 63) <= v < (1 << 64):
            raise FederationError(f"wire: int {v} does not fit 64 bits")
        return v
    if type(v) is bytes:
        if len(v) <= INLINE_BYTES:
            return v
        blobs.append(memoryview(v))
        return {"~": "blob", "i": len(blobs) - 1}
    if isinstance(v, np.ndarray):
        if v.dtype.name not in DTYPES or v.dtype.byteorder == ">":
            raise FederationError(f"wire: arrays of dtype {v.dtype} are not in the schema")
        blobs.append(memoryview(np.ascontiguousarray(v)).cast("B"))
        return {"~": "nd", "i": len(blobs) - 1, "dtype": v.dtype.name, "shape": list(v.shape)}
    if isinstance(v, (np.integer, np.bool_)):
        return _enc(v.item(), blobs, depth)
    if isinstance(v, np.floating):
        return float(v)
    if type(v) is tuple:
        return {"~": "tuple", "v": [_enc(x, blobs, depth + 1) for x in v]}
    if type(v) is list:
        return [_enc(x, blobs, depth + 1) for x in v]
    if type(v) is dict:
        for k in v:
            if type(k) not in (int, str):
                raise FederationError(f"wire: dict key {k!r} is not an int or str")
        return {"~": "dict", "k": list(v), "v": [_enc(x, blobs, depth + 1) for x in v.values()]}
    if isinstance(v, enum.Enum) and type(v).__name__ in ENUMS:
        return {"~": "enum", "c": type(v).__name__, "v": v.name}
    tag = _tag_of(type(v))
    if tag is None:
        raise FederationError(f"wire: {type(v).__module__}.{type(v).__name__} is not in the wire "
                              "schema (only registered message types cross a trust boundary)")
    return {"~": tag, "f": {f: _enc(getattr(v, f), blobs, depth + 1) for f in REGISTRY[tag].fields}}


# --------------------------------------------------------------------------- decoding
class Decoder:
    """Rebuilds messages from frames, one message at a time. :meth:`feed` returns the message
    when its last frame arrives, else ``None``. Every limit is checked before allocating."""

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_frame_bytes
        self._body: Any = None
        self._sizes: list[int] = []
        self._blobs: list[np.ndarray] = []
        self._blob = 0
        self._filled = 0
        self.bytes_in = 0  # every frame byte received, for measurements

    @property
    def idle(self) -> bool:
        return self._body is None

    def feed(self, frame: bytes) -> Any:
        if not isinstance(frame, (bytes, bytearray, memoryview)) or len(frame) < 1:
            raise FederationError("wire: empty or non-bytes frame")
        if len(frame) > self.max_frame_bytes:
            raise FederationError(f"wire: frame of {len(frame)} bytes exceeds the limit "
                                  f"{self.max_frame_bytes}")
        self.bytes_in += len(frame)
        kind, payload = bytes(frame[:1]), memoryview(frame)[1:]
        if kind == HEADER:
            if self._body is not None:
                raise FederationError("wire: a new message began before the last one's chunks ended")
            return self._header(payload)
        if kind == CHUNK:
            if self._body is None:
                raise FederationError("wire: chunk frame without a message header")
            return self._chunk(payload)
        raise FederationError(f"wire: unknown frame kind {kind!r}")

    def _header(self, payload) -> Any:
        try:
            head = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                                   max_bin_len=INLINE_BYTES, max_str_len=MAX_HEADER_BYTES,
                                   max_array_len=1 << 22, max_map_len=1 << 16, max_ext_len=0)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
                TypeError) as exc:
            raise FederationError(f"wire: header is not valid msgpack ({type(exc).__name__}: "
                                  f"{exc})") from None
        if type(head) is not dict or set(head) != {"v", "body", "blobs"}:
            raise FederationError("wire: header must be a map of exactly v, body, blobs")
        if head["v"] != WIRE_VERSION:
            raise FederationError(f"wire: peer speaks wire version {head['v']!r}, this site "
                                  f"{WIRE_VERSION}: upgrade one of them")
        sizes = head["blobs"]
        if (type(sizes) is not list or len(sizes) > MAX_BLOBS
                or not all(type(s) is int and s >= 0 for s in sizes)):
            raise FederationError(f"wire: blob sizes must be a list of at most {MAX_BLOBS} ints >= 0")
        if sum(sizes) > self.max_message_bytes:
            raise FederationError(f"wire: message declares {sum(sizes)} bytes of vectors, over the "
                                  f"limit {self.max_message_bytes}")
        self._sizes = sizes
        self._blobs = [np.empty(s, dtype=np.uint8) for s in sizes]
        self._blob = self._filled = 0
        self._body = head["body"]
        self._skip_empty()
        return self._finish() if self._blob == len(self._sizes) else None

    def _chunk(self, payload) -> Any:
        if self._blob >= len(self._sizes):
            raise FederationError("wire: more chunk bytes than the header declared")
        room = self._sizes[self._blob] - self._filled
        if len(payload) > room:
            raise FederationError(f"wire: chunk of {len(payload)} bytes overruns blob {self._blob} "
                                  f"({room} bytes left)")
        self._blobs[self._blob][self._filled:self._filled + len(payload)] = np.frombuffer(payload, np.uint8)
        self._filled += len(payload)
        self._skip_empty()
        return self._finish() if self._blob == len(self._sizes) else None

    def _skip_empty(self) -> None:
        while self._blob < len(self._sizes) and self._filled == self._sizes[self._blob]:
            self._blob += 1
            self._filled = 0

    def _finish(self) -> Any:
        body, blobs = self._body, self._blobs
        self._body, self._blobs, self._sizes = None, [], []
        used: set[int] = set()
        value = _dec(body, blobs, used, 0)
        if used != set(range(len(blobs))):
            raise FederationError("wire: the header declares blobs its body does not use")
        return value


def decode(frames, **limits) -> Any:
    """Decode exactly one message from ``frames`` (tests and small messages)."""
    dec = Decoder(**limits)
    out = None
    frames = list(frames)
    for i, frame in enumerate(frames):
        out = dec.feed(frame)
        if out is not None and i != len(frames) - 1:
            raise FederationError("wire: frames continue after the message ended")
    if not dec.idle or out is None:
        raise FederationError("wire: message truncated (frames ended before its last chunk)")
    return out


def _dec(v: Any, blobs: list, used: set, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise FederationError(f"wire: value nested deeper than {MAX_DEPTH}")
    if v is None or type(v) in (bool, int, float, str, bytes):
        return v
    if type(v) is list:
        return [_dec(x, blobs, used, depth + 1) for x in v]
    if type(v) is not dict or type(v.get("~")) is not str:
        raise FederationError(f"wire: unexpected {type(v).__name__} in a message body")
    tag = v["~"]
    if tag == "tuple":
        return tuple(_dec(x, blobs, used, depth + 1) for x in _field(v, "v", list))
    if tag == "dict":
        keys, vals = _field(v, "k", list), _field(v, "v", list)
        if len(keys) != len(vals) or not all(type(k) in (int, str) for k in keys):
            raise FederationError("wire: malformed dict (keys must be ints or strs, one per value)")
        return {k: _dec(x, blobs, used, depth + 1) for k, x in zip(keys, vals)}
    if tag == "blob":
        return _take(v, blobs, used).tobytes()
    if tag == "nd":
        dtype, shape = _field(v, "dtype", str), _field(v, "shape", list)
        if dtype not in DTYPES:
            raise FederationError(f"wire: arrays of dtype {dtype!r} are not in the schema")
        if not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 8:
            raise FederationError(f"wire: bad array shape {shape!r}")
        raw = _take(v, blobs, used)
        dt = np.dtype(dtype)
        if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != raw.nbytes:
            raise FederationError(f"wire: array of shape {shape} {dtype} needs "
                                  f"{int(np.prod(shape)) * dt.itemsize} bytes, its blob has {raw.nbytes}")
        return raw.view(dt).reshape(shape)
    if tag == "enum":
        cls = ENUMS.get(_field(v, "c", str))
        if cls is None or _field(v, "v", str) not in cls.__members__:
            raise FederationError(f"wire: unknown enum value {v.get('c')!r}.{v.get('v')!r}")
        return cls[v["v"]]
    schema = REGISTRY.get(tag)
    if schema is None:
        raise FederationError(f"wire: message type {tag!r} is not in the schema")
    raw = _field(v, "f", dict)
    if set(raw) != set(schema.fields):
        missing, extra = set(schema.fields) - set(raw), set(raw) - set(schema.fields)
        raise FederationError(f"wire: {tag}: missing fields {sorted(missing)}, unknown "
                              f"fields {sorted(map(str, extra))}")
    fields = {}
    for name, check in schema.fields.items():
        value = _dec(raw[name], blobs, used, depth + 1)
        if not check.ok(value):
            raise FederationError(f"wire: {tag}.{name}: expected {check.what}, got "
                                  f"{type(value).__name__}")
        fields[name] = value
    try:
        obj = schema.build(fields) if schema.build else schema.cls(**fields)
        if schema.validate:
            schema.validate(obj)
    except FederationError:
        raise
    except Exception as exc:  # the class's own validation (ConfigError, ValueError, ...)
        raise FederationError(f"wire: {tag}: invalid content: {exc}") from None
    return obj


def _field(v: dict, name: str, tp: type) -> Any:
    value = v.get(name)
    if type(value) is not tp:
        raise FederationError(f"wire: {v.get('~')!r}.{name} must be a {tp.__name__}")
    return value


def _take(v: dict, blobs: list, used: set) -> np.ndarray:
    i = _field(v, "i", int)
    if not 0 <= i < len(blobs) or i in used:
        raise FederationError(f"wire: blob reference {i} is out of range or used twice")
    used.add(i)
    return blobs[i]


# --------------------------------------------------------------------------- the schema
def _register_all() -> None:
    from lepton_ray.crypto.identity import Roster
    from lepton_ray.learning.aggregation import PartialSum
    from lepton_ray.learning.party_update import SecureRoundPlan, UpdateRule
    from lepton_ray.secagg import messages as m
    from lepton_ray.secagg.graph import NeighbourGraph
    from lepton_ray.secagg.plan import RoundConfig
    from lepton_ray.secagg.quantize import QuantizationSpec
    from lepton_ray.secagg.stages import Rejection, RejectionReason, Stage

    ENUMS.update({"Stage": Stage, "RejectionReason": RejectionReason})
    job = {"job_id": STR, "round": INT}
    register(m.AdvertiseKeys, {**job, "party": INT, "public_key": BYTES, "signature": BYTES,
                               "issued": INT})
    register(m.KeyBroadcast, {**job, "adverts": tuple_of(instance(m.AdvertiseKeys))})
    register(m.ShareKeys, {**job, "party": INT, "receivers": INTS, "envelopes": BYTES,
                           "recovery": BYTES, "commitments": BYTES, "signature": BYTES})
    register(m.ShareInbox, {**job, "receiver": INT, "senders": INTS, "envelopes": BYTES})
    register(m.MaskedInput, {**job, "party": INT, "vector": VECTOR, "rejected_senders": INTS,
                             "signature": BYTES})
    register(m.MaskedSum, {**job, "parties": INTS, "vector": VECTOR,
                           "rejected": tuple_of(pair(INT, INTS)),
                           "signatures": tuple_of(BYTES)})
    register(m.ConsistencyRequest, {**job, "survivors": INTS})
    register(m.ConsistencySignature, {**job, "party": INT, "signature": BYTES})
    register(m.UnmaskRequest, {**job, "survivors": INTS, "dropped": INTS,
                               "signatures": tuple_of(pair(INT, BYTES))})
    register(m.UnmaskResponse, {**job, "party": INT, "seed_owners": INTS, "seed_shares": BYTES,
                                "recovery_owners": INTS, "recovery_shares": BYTES,
                                "signature": BYTES})
    register(Rejection, {"party": INT, "stage": instance(Stage),
                         "reason": instance(RejectionReason), "detail": STR})
    register(m.AggregateResult, {**job, "total": VECTOR, "survivors": INTS, "dropped": INTS,
                                 "neighbours": INT, "threshold": INT, "modulus_bits": INT,
                                 "rejections": tuple_of(instance(Rejection))})
    register(Roster, {"public_keys": tuple_of(BYTES)})
    register(NeighbourGraph, {"participants": INTS, "adjacency": tuple_of(INTS), "degree": INT},
             validate=_check_graph)
    register(RoundConfig, {**job, "roster": instance(Roster), "graph": instance(NeighbourGraph),
                           "threshold": INT, "dim": INT, "modulus_bits": INT, "nonce": BYTES,
                           "graph_seed": BYTES})
    register(UpdateRule, {"clip_norm": optional(FLOAT), "weight_cap": optional(FLOAT),
                          "clip_bit": BOOL, "stats": BOOL, "loss_bound": FLOAT,
                          "eval_classes": INT, "eval_rows": INT})
    register(QuantizationSpec, {"clip_norm": FLOAT, "scale": FLOAT, "modulus_bits": INT})
    try:
        from lepton_ray.privacy.skellam import SkellamParams

        register(SkellamParams, {f.name: (INT if f.type in ("int", int) else FLOAT)
                                 for f in dataclasses.fields(SkellamParams)})
        skellam = optional(instance(SkellamParams))
    except ImportError:  # pragma: no cover
        skellam = Check(lambda v: v is None, "None")
    register(SecureRoundPlan, {"config": instance(RoundConfig), "rule": instance(UpdateRule),
                               "quantization": optional(instance(QuantizationSpec)),
                               "skellam": skellam, "rotation_seed": BYTES,
                               # central DP's bound: < 2^63, the ring scale keeps sigma <= 2^24
                               "rounding_bound_sq": optional(INT)})
    register(PartialSum, {"total": VECTOR, "parties": INT})
    register(Hello, {"federation": STR, "site": STR, "roster_hash": STR, "wire_version": INT})
    register(Welcome, {"session": STR, "roster_hash": STR})
    register(JobOffer, {"job_id": STR, "spec": DICT}, validate=lambda o: _check_data(o.spec, 0))
    register(JobAnswer, {"job_id": STR, "accepted": BOOL, "reason": STR})
    register(Call, {"id": INT, "method": STR, "args": Check(lambda v: type(v) is tuple, "a tuple")})
    register(Reply, {"id": INT, "value": ANY, "error": STR})
    scalars = Check(lambda v: type(v) is tuple and all(type(x) in (int, str, float, bool)
                                                      for x in v), "a tuple of scalars")
    register(JobData, {"job_id": STR, "features": tuple_of(STR), "classes": scalars,
                       "moments": BOOL})
    register(Standardisation, {"job_id": STR, "mean": VECTOR, "scale": VECTOR})
    register(TrainRound, {"job_id": STR, "round": INT, "params": VECTOR,
                          "rule": instance(UpdateRule),
                          "quantization": instance(QuantizationSpec)})
    register(Report, {"host": INT, "parties": INTS, "failed": tuple_of(pair(INT, STR)),
                      "examples": INT, "train_loss": FLOAT, "clipped": INT, "device": STR,
                      "ray_calls": INT})


def _check_graph(g) -> None:
    """A graph from the wire must be well formed: one sorted neighbour list per participant,
    only participants as neighbours, never itself, symmetric (an undirected graph)."""
    ids = set(g.participants)
    if len(ids) != len(g.participants) or len(g.adjacency) != len(g.participants):
        raise FederationError("wire: NeighbourGraph: participants repeat or adjacency has the "
                              "wrong length")
    pos = {p: i for i, p in enumerate(g.participants)}
    for p, nbrs in zip(g.participants, g.adjacency):
        if list(nbrs) != sorted(set(nbrs)) or p in nbrs or not set(nbrs) <= ids:
            raise FederationError(f"wire: NeighbourGraph: bad neighbour list of party {p}")
        if any(p not in g.adjacency[pos[q]] for q in nbrs):
            raise FederationError(f"wire: NeighbourGraph: not symmetric at party {p}")


def _check_data(v: Any, depth: int) -> None:
    """A job spec is YAML data: str-keyed maps, lists, scalars; nothing else."""
    if depth > MAX_DEPTH:
        raise FederationError("wire: job spec nested too deep")
    if type(v) is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise FederationError(f"wire: job spec key {k!r} is not a str")
            _check_data(x, depth + 1)
    elif type(v) is list:
        for x in v:
            _check_data(x, depth + 1)
    elif v is not None and type(v) not in (bool, int, float, str):
        raise FederationError(f"wire: job spec holds a {type(v).__name__}, only YAML data may cross")


_register_all()
