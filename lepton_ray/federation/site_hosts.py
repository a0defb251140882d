"""The coordinator's sites as the driver's hosts: :class:`SiteHosts`, a
:class:`actors.hosts.HostPool` over mutual-TLS links, one site per party.

Each call of the round loop (``advertise``, ``share_keys``, ...) becomes one
:class:`~lepton_ray.federation.wire.Call` to that site; the site checks it and hands it to its
own ``PartyHost`` on its own Ray, and its ``(Report, messages)`` come back as the stage's
``(StageReport, payload)``. Arguments the driver holds as Ray ``ObjectRef`` (the plan, the
parameters, the coordinator's broadcast and inboxes) are read from the coordinator's object
store once and encoded by value: only registered, schema-checked types cross (never pickle).

Admission is here too, because a site can come back at any round: the job is offered to a
site as data (its policy accepts or refuses, the refusal is recorded), the accepting site is
sent the schema (:class:`~lepton_ray.federation.wire.JobData`) and the standardisation; a site
whose session changed (it reconnected, or its process restarted) goes through the same steps
before the next round (:meth:`SiteHosts.revive`), and until then every call to it fails at
once as a dropout. The roster is the CA-signed one in the coordinator's kit: the driver never
takes a site's word for a key.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

import numpy as np

from actors.hosts import HostPool, LinkCall
from lepton_ray.errors import FederationError, LeptonError
from lepton_ray.federation import wire

SETUP_ROUND = 0  # the secure sum of the sites' moments runs as round 0 of the job


class SiteHosts(HostPool):
    """``kit``: the coordinator's kit; ``server``: its :class:`.transport.CoordinatorServer`;
    ``job_id``/``spec``/``offered``: the job and the dict offered; ``test``: the coordinator's
    test table (its columns and classes are the federation's schema)."""

    remote = True

    def __init__(self, kit, server, *, job_id: str, spec, offered: dict, test):
        self.kit, self.server, self.job_id = kit, server, job_id
        self.spec, self.offered, self.test = spec, offered, test
        self.roster = kit.roster.secagg_roster()
        self.names = {e.index: e.id for e in kit.roster.parties}
        self.index = {e.id: e.index for e in kit.roster.parties}
        self.sites: dict[str, dict[str, Any]] = {}  # site -> status, reason, session id
        self.links: dict[int, Any] = {}  # party -> the live, admitted SiteSession
        n_features = test.X.shape[1]
        self.mean, self.scale = np.zeros(n_features), np.ones(n_features)
        self.rows: int | None = None  # pooled training rows (round 0's secure sum), no DP
        self.bytes: list[dict[str, dict[str, int]]] = []
        self._counters: dict[str, tuple[int, int]] = {}
        self._values: dict[Any, Any] = {}  # ObjectRef -> value, for the round in progress
        self._events: list[tuple[str, dict]] = []  # audit records not yet written

    # ------------------------------------------------------------------ admission
    def admit(self, sessions: Mapping[str, Any]) -> dict[str, Any]:
        """Offer the job to ``sessions`` and send the accepting sites the data schema;
        returns the sites that accepted and prepared. Refusals are recorded."""
        from lepton_ray.federation.site import offer_job

        accepted, refused = offer_job(sessions, self.job_id, self.offered, timeout=30.0)
        job = wire.JobData(job_id=self.job_id, features=tuple(self.test.feature_names),
                           classes=tuple(c.item() if hasattr(c, "item") else c
                                         for c in self.test.classes),
                           moments=bool(self.spec.data.standardize))
        ready = {}
        calls = {s: v.call_async("prepare", job) for s, v in accepted.items()}
        for site, fut in calls.items():
            try:
                fut.result(timeout=120)
                ready[site] = accepted[site]
            except Exception as exc:  # noqa: BLE001 - the site's refusal, recorded
                refused[site] = why(exc)
        for site, reason in refused.items():
            self.sites[site] = {"status": "refused", "reason": reason}
            self._events.append(("site_refused", {"site": site, "reason": reason}))
            say(f"site {site} refused the job: {reason}")
        for site, session in ready.items():
            self.sites[site] = {"status": "accepted", "session": session.session}
            self._events.append(("site_accepted", {"site": site, "party": session.index}))
        self.refusals = refused
        return ready

    def standardise(self, sessions: Mapping[str, Any]) -> dict[str, Any]:
        """The job's standardisation, then every site's host is started with it.

        Without DP, round 0 is a SecAgg+ secure sum of the sites' moments (:mod:`.stats`):
        the pooled row count (a public weight cap N >= every n_i, so FedAvg weights are exact)
        and, with ``data.standardize``, the pooled mean and scale. Under DP no such round runs:
        exact pooled statistics would leave the secure sum outside the accountant, so the
        coordinator's test file's mean and scale are used (as a simulation with
        ``party_files`` does) and every party weighs 1 (no weight cap)."""
        from lepton_ray.federation.site import drive_round
        from lepton_ray.federation.stats import decode_moments, moments_width
        from lepton_ray.learning.data import _standardisation

        live = dict(sessions)
        if self.spec.privacy.enabled:
            if self.spec.data.standardize:
                self.mean, self.scale = _standardisation(self.test.X, True)
            say("standardisation: from the coordinator's test file (DP job: no pooled "
                "statistics leave the secure sum)")
        else:
            from lepton_ray.secagg import JobPins

            features = self.test.X.shape[1] if self.spec.data.standardize else 0
            pins = JobPins.for_job(self.job_id, self.roster, self.spec.secure_aggregation)
            config = pins.plan(roster=self.roster, round_=SETUP_ROUND, dim=moments_width(features),
                               modulus_bits=64,
                               participants=sorted(v.index for v in sessions.values()))
            outcome = drive_round(config, sessions,
                                  stage_timeout=self.spec.secure_aggregation.stage_timeout_s)
            for site, reason in outcome.dropped.items():
                say(f"standardisation: site {site} dropped: {reason}")
            self.rows, mean, scale = decode_moments(outcome.result.total, features)
            if features:
                self.mean, self.scale = mean, scale
            say(f"standardisation: secure sum over {len(outcome.result.survivors)} sites, "
                f"{self.rows} training rows" + (", pooled mean and scale sent to the sites"
                                                if features else ""))
            self._events.append(("standardisation", {
                "sites": len(outcome.result.survivors), "rows": self.rows,
                "standardize": bool(features)}))
            survivors = {self.names[p] for p in outcome.result.survivors}
            live = {s: v for s, v in sessions.items() if s in survivors}
        message = self._standardisation()
        started = {}
        for site, fut in {s: v.call_async("standardise", message) for s, v in live.items()}.items():
            try:
                fut.result(timeout=120)
                started[site] = live[site]
            except Exception as exc:  # noqa: BLE001 - that site sits this job out for now
                say(f"site {site}: could not start its host: {why(exc)}")
        self.links = {v.index: v for v in started.values()}
        return started

    def _standardisation(self) -> wire.Standardisation:
        return wire.Standardisation(job_id=self.job_id, mean=np.asarray(self.mean, np.float64),
                                    scale=np.asarray(self.scale, np.float64))

    # ------------------------------------------------------------------ HostPool
    def layout(self, cpus: int) -> list[list[int]]:
        return [[p] for p in range(len(self.roster))]

    def start(self, prior: Callable[[], dict]) -> None:
        self._snapshot()

    def ready(self) -> None:
        if len(self.links) < 2:
            raise FederationError(f"{len(self.links)} site(s) ready for the job; a secure job "
                                  "needs at least 2")

    def keys(self) -> dict[int, bytes]:
        return {p: self.roster.public_key(p) for p in range(len(self.roster))}

    def pin(self, pins) -> None:
        """Nothing to send: every site builds the job's pins itself, from its own kit's
        roster and the spec it accepted, and checks each round's plan against them."""

    def call(self, h: int, method: str, *args: Any) -> LinkCall:
        session = self.links.get(h)
        out: futures.Future = futures.Future()
        if session is None or not session.alive:
            out.set_exception(_gone(self.names.get(h, h)))
            return LinkCall(out)
        inner = session.call_async(method, *[self._value(a) for a in args])

        def done(f: futures.Future) -> None:
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
                return
            try:
                out.set_result(_stage_reply(f.result(), h))
            except FederationError as bad:
                out.set_exception(bad)

        inner.add_done_callback(done)
        return LinkCall(out)

    def get(self, h: int, method: str, *args: Any, timeout: float | None = None) -> Any:
        session = self.links.get(h)
        if session is None or not session.alive:
            raise _gone(self.names.get(h, h))
        return session.call(method, *[self._value(a) for a in args], timeout=timeout)

    def dropout(self, exc: BaseException) -> tuple[bool, bool]:
        from lepton_ray.federation.transport import SiteGone

        return isinstance(exc, FederationError), isinstance(exc, SiteGone)

    def revive(self, dead: set[int], prior: Callable[[], dict]) -> None:
        """Before each round: sites that left are forgotten; accepted sites whose session
        changed (reconnected or restarted), or that connected only now, are offered the job
        again, prepared and standardised, and rejoin this round."""
        self._values.clear()
        self._snapshot()
        self.links = {p: s for p, s in self.links.items() if s.alive}
        back = {}
        for site, session in self.server.live().items():
            info = self.sites.get(site)
            if info is not None and info["status"] == "refused":
                continue  # a refusal stands for the job
            if self.links.get(session.index) is session:
                continue
            back[site] = session
        if not back:
            return
        say(f"sites back: {', '.join(sorted(back))}; offering the job again")
        accepted = self.admit(back)
        message = self._standardisation()
        for site, session in accepted.items():
            try:
                session.call("standardise", message, timeout=120)
                self.links[session.index] = session
            except Exception as exc:  # noqa: BLE001
                say(f"site {site}: {why(exc)}")

    def public_weight_cap(self) -> float | None:
        return None if self.rows is None else float(max(self.rows, 1))

    def summary(self) -> dict[str, Any]:
        self._snapshot()
        out: dict[str, Any] = {
            "mode": "federation", "federation": self.kit.federation, "job_id": self.job_id,
            "roster_hash": self.kit.roster.roster_hash,
            "sites": {s: {k: v for k, v in info.items() if k != "session"}
                      for s, info in sorted(self.sites.items())},
        }
        if self.rows is not None:
            out["training_rows"] = self.rows
        if not self.spec.privacy.enabled and self.bytes:
            # bytes per site per round (a site's count grows with whether it took part: kept
            # out of DP jobs' outputs like every other per-round figure)
            out["wire_bytes_last_round"] = self.bytes[-1]
        return out

    def events(self) -> list[tuple[str, dict]]:
        out, self._events = self._events, []
        return out

    def finish(self, status: str) -> None:
        """Tell every connected site the job ended (it stops the job's host, forgets the
        rows); a site that is gone needs no goodbye."""
        for session in self.server.live().values():
            try:
                session.call("finish", self.job_id, status, timeout=10)
            except Exception:  # noqa: BLE001
                pass

    def stop(self) -> None:
        self.links = {}

    # ------------------------------------------------------------------ helpers
    def _value(self, arg: Any) -> Any:
        """A driver-side argument by value: ``ObjectRef`` read once per round (the plan and
        parameters go to every site), lists of them element by element."""
        import ray

        if isinstance(arg, ray.ObjectRef):
            if arg not in self._values:
                self._values[arg] = ray.get(arg)
            return self._values[arg]
        if type(arg) is list:
            return [self._value(a) for a in arg]
        return arg

    def _snapshot(self) -> None:
        """Close the bytes count of the round that ended; start the next."""
        now = {s: (v.bytes_out, v.bytes_in) for s, v in self.server.live().items()}
        if self._counters:
            moved = {}
            for site, (out, inn) in now.items():
                if site in self._counters:
                    o0, i0 = self._counters[site]
                    moved[site] = {"to_site": out - o0, "from_site": inn - i0}
            if any(m["to_site"] or m["from_site"] for m in moved.values()):
                self.bytes.append(moved)
        self._counters = now


def _stage_reply(value: Any, h: int):
    """A site's ``(wire.Report, messages)`` as the driver's ``(StageReport, payload)``; the
    report must be for the site's own party (its mTLS identity)."""
    from actors.party_host import StageReport

    if (type(value) is not tuple or len(value) != 2 or type(value[0]) is not wire.Report
            or type(value[1]) is not list):
        raise FederationError("stage reply: expected (Report, messages)")
    report, messages = value
    if report.host != h or any(p != h for p in report.parties):
        raise FederationError(f"stage reply: party {h}'s site answered for {report.parties}")
    return StageReport(host=h, parties=tuple(report.parties),
                       failed=tuple((h, w) for _, w in report.failed),
                       device=report.device, ray_calls=report.ray_calls), messages


def _gone(site) -> FederationError:
    from lepton_ray.federation.transport import SiteGone

    return SiteGone(f"site {site} is not connected to this job")


def why(exc: BaseException) -> str:
    if isinstance(exc, futures.TimeoutError):
        return "no answer in time"
    if isinstance(exc, LeptonError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def say(text: str) -> None:
    print(f"[coordinator] {text}", file=sys.stderr, flush=True)
