"""How the driver reaches the hosts of a job's parties: one small interface, two ways.

The round loop (:class:`actors.driver.Federation`) never touches a host directly. It asks a
:class:`HostPool` for

- :meth:`~HostPool.layout`: which parties each host holds;
- :meth:`~HostPool.call`: one protocol stage at one host (``train``, ``advertise``,
  ``share_keys``, ``masked_input``, ``consistency``, ``unmask``), answered by the host's
  ``(StageReport, payload)``, collected for all hosts at once by :func:`gather` with the
  stage's timeout;
- :meth:`~HostPool.keys`, :meth:`~HostPool.pin`, :meth:`~HostPool.revive`,
  :meth:`~HostPool.stop`: the job's roster identities, its pins, hosts coming back, the end.

:class:`RayHosts` (this module) holds ``PartyHost`` actors in the driver's own Ray cluster:
simulation and the trusted-cluster deployment, where the driver's operator is one trust
domain with every host. :class:`lepton_ray.federation.site_hosts.SiteHosts` reaches one site
per party over mutual-TLS gRPC, each site running its own ``PartyHost`` on its own Ray: the
protocol code, the round loop, privacy accounting and outputs are the same.

A stage's payload stays where it is as long as it can: with Ray it is an ``ObjectRef`` the
driver hands to the ``SmpcCoordinator`` unread; from a site it is the decoded message list.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import ray


@dataclass
class RayCall:
    """A stage in flight at a Ray actor: its report and its payload, both ``ObjectRef``."""

    report: Any
    payload: Any


@dataclass
class LinkCall:
    """A stage in flight over a federation link: a future of ``(StageReport, payload)``."""

    future: futures.Future


@dataclass
class Gathered:
    """What :func:`gather` found: ``answered`` hosts' ``(report, payload)``, the hosts whose
    call failed (with the exception) and those that did not answer in time."""

    answered: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    failed: dict[int, BaseException] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)


def gather(calls: dict[int, RayCall | LinkCall], timeout: float | None) -> Gathered:
    """Wait at most ``timeout`` s (None: no limit) for every host's stage report. Ray reports
    are fetched; Ray payloads stay references. Answers keep the order of ``calls``."""
    import time

    out = Gathered()
    deadline = None if timeout is None else time.monotonic() + timeout
    rays = {c.report: h for h, c in calls.items() if isinstance(c, RayCall)}
    links = {c.future: h for h, c in calls.items() if isinstance(c, LinkCall)}
    got: dict[int, tuple[Any, Any]] = {}
    if rays:
        ready, late = ray.wait(list(rays), num_returns=len(rays), timeout=timeout)
        for ref in ready:
            h = rays[ref]
            try:
                got[h] = (ray.get(ref), calls[h].payload)
            except ray.exceptions.RayError as exc:
                out.failed[h] = exc
        out.late += [rays[ref] for ref in late]
    if links:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, late = futures.wait(list(links), timeout=left)
        for fut in done:
            h = links[fut]
            exc = fut.exception()
            if exc is not None:
                out.failed[h] = exc
            else:
                got[h] = fut.result()
        out.late += [links[f] for f in late]
    out.answered = {h: got[h] for h in calls if h in got}
    return out


def discard(calls: dict[int, RayCall | LinkCall], timeout: float = 30.0) -> None:
    """Read (and drop) every result of a stage that is being abandoned. An object ref whose
    task failed and that is freed unread makes Ray print an "Unhandled error" traceback at
    exit; after a clean error the user should see the error, once."""
    for call in calls.values():
        refs = [call.report, call.payload] if isinstance(call, RayCall) else []
        for ref in refs:
            try:
                ray.get(ref, timeout=timeout)
            except Exception:  # noqa: BLE001 - already reported by the error being raised
                pass


class HostPool:
    """The interface the round loop uses (see the module docstring)."""

    #: party data never reaches the driver (a deployment's nodes, a federation's sites): the
    #: driver knows no party size, so the weight cap must be public
    remote: bool = False

    def layout(self, cpus: int) -> list[list[int]]:
        raise NotImplementedError

    def start(self, prior: Callable[[], dict]) -> None:
        raise NotImplementedError

    def ready(self) -> None:
        """Block until every host is up (a start error surfaces here)."""
        raise NotImplementedError

    def keys(self) -> dict[int, bytes]:
        """Each party's long-term Ed25519 identity (the job's roster)."""
        raise NotImplementedError

    def pin(self, pins) -> None:
        raise NotImplementedError

    def call(self, h: int, method: str, *args: Any) -> RayCall | LinkCall:
        raise NotImplementedError

    def get(self, h: int, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One blocking call returning one value (``ready``, ``placement``, ...)."""
        raise NotImplementedError

    def dropout(self, exc: BaseException) -> tuple[bool, bool]:
        """``(is_dropout, host_died)`` for a failed call: a dropout loses the host's parties
        for this round; anything else is a bug or a bad input and is raised."""
        raise NotImplementedError

    def revive(self, dead: set[int], prior: Callable[[], dict]) -> None:
        """Before a round: bring back the hosts that died (or rejoined) since the last one."""
        raise NotImplementedError

    def public_weight_cap(self) -> float | None:
        """A public bound on every party's example count the pool knows (None: use the
        spec's, or in simulation the largest party)."""
        return None

    def summary(self) -> dict[str, Any]:
        """What the pool adds to ``summary.json``."""
        return {}

    def events(self) -> list[tuple[str, dict]]:
        """Audit records the pool made since last asked (``audit.jsonl``: e.g. a site's
        refusal of the job, with its reason)."""
        return []

    def stop(self) -> None:
        raise NotImplementedError


DROPOUT_ERRORS = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
)
HOST_DEATH = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)


def is_dropout(exc: BaseException) -> bool:
    """A process or node died (the parties it carried drop out), as opposed to an exception
    raised by our own code, which is a bug or a bad input and must surface."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DROPOUT_ERRORS):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return False


def split_hosts(spec, n_cpus: int) -> list[list[int]]:
    """Simulation: about one host per CPU; a deployment: one host per party, on its node."""
    import math

    import numpy as np

    n = spec.parties.count
    if spec.parties.deploy:
        return [[p] for p in range(n)]
    if spec.parties.per_host:
        n_hosts = math.ceil(n / spec.parties.per_host)
    else:
        n_hosts = max(1, min(n, n_cpus))
    return [list(map(int, block)) for block in np.array_split(np.arange(n), n_hosts)]


class RayHosts(HostPool):
    """``PartyHost`` actors in the driver's Ray cluster. Indexing and iterating give the
    actor handles (tests and tools reach a host directly)."""

    def __init__(self, spec, data):
        self.spec = spec
        self.data = data
        self.remote = bool(spec.parties.deploy)
        self.blocks: list[list[int]] = []
        self.handles: list[Any] = []
        self.seeds: list[bytes] = []
        self._pins = None
        self._keys: dict[int, bytes] = {}

    def layout(self, cpus: int) -> list[list[int]]:
        self.blocks = split_hosts(self.spec, cpus)
        return self.blocks

    def start(self, prior: Callable[[], dict]) -> None:
        from lepton_ray.learning.data import as_float32

        self.parties = None if self.remote else as_float32(self.data.parties)
        # each host's identity seed (OS CSPRNG, never written anywhere): a restarted host gets
        # the same one back, so its parties keep their roster identities for the whole job
        self.seeds = [os.urandom(32) for _ in self.blocks]
        self.handles = [self._new(h, prior()) for h in range(len(self.blocks))]

    def _new(self, h: int, prior: dict):
        from actors.party_host import PartyHost

        block = self.blocks[h]
        # rounds this job ran before the host existed (resume, restart): the host counts its
        # parties in all of them for record-level DP-SGD accounting (over-count, never under)
        prior = {**prior, "identity_seed": self.seeds[h]}
        if self.spec.parties.deploy:  # one host per party, pinned to the party's node
            import dataclasses

            party = self.spec.parties.deploy[block[0]]
            stats = dataclasses.replace(self.data, X_test=self.data.X_test[:0],
                                        y_test=self.data.y_test[:0])
            return ray.remote(PartyHost).options(
                num_cpus=0, resources={party.node_resource: 0.001}, name=None).remote(
                h, self.spec, block, None, self.data.n_features, self.data.n_classes, stats,
                **prior)
        return ray.remote(PartyHost).options(num_cpus=0).remote(
            h, self.spec, block, [self.parties[p] for p in block],
            self.data.n_features, self.data.n_classes, **prior)

    def ready(self) -> None:
        ray.get([h.ready.remote() for h in self.handles])

    def keys(self) -> dict[int, bytes]:
        keys: dict[int, bytes] = {}
        for part in ray.get([h.public_keys.remote() for h in self.handles]):
            keys.update(part)
        self._keys = keys
        return keys

    def pin(self, pins) -> None:
        self._pins = pins
        ray.get([h.pin.remote(pins) for h in self.handles])

    def call(self, h: int, method: str, *args: Any) -> RayCall:
        report, payload = getattr(self.handles[h], method).options(num_returns=2).remote(*args)
        return RayCall(report, payload)

    def get(self, h: int, method: str, *args: Any, timeout: float | None = None) -> Any:
        return ray.get(getattr(self.handles[h], method).remote(*args), timeout=timeout)

    def get_all(self, method: str, *args: Any) -> list:
        return ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def dropout(self, exc: BaseException) -> tuple[bool, bool]:
        return is_dropout(exc), isinstance(exc, HOST_DEATH)

    def revive(self, dead: set[int], prior: Callable[[], dict]) -> None:
        """A host that died last round is started again with its identity seed: its parties
        keep their roster identities (the roster is fixed for the job), get fresh SecAgg+
        keys, and never join a round that started before the restart."""
        from lepton_ray.errors import ProtocolError

        for h in sorted(dead):
            self.handles[h] = self._new(h, prior())
            if self._pins is not None:
                keys = ray.get(self.handles[h].public_keys.remote())
                if any(self._keys[p] != k for p, k in keys.items()):  # same seed: cannot happen
                    raise ProtocolError(f"host {h} restarted with identities outside the job's "
                                        "roster")
                ray.get(self.handles[h].pin.remote(self._pins))
            print(f"host {h} restarted for parties {self.blocks[h][0]}..{self.blocks[h][-1]} "
                  "(same identities, fresh round keys)", file=sys.stderr, flush=True)

    def stop(self) -> None:
        for actor in self.handles:
            ray.kill(actor)
        self.handles = []

    def __getitem__(self, h: int):
        return self.handles[h]

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.handles)
