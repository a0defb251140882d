"""One SecAgg+ round across sites, over the wire: the site's side and the coordinator's side.

:class:`SiteSecAgg` is what a party site runs for each round (pure, no Ray): it takes the
coordinator's round config, **refuses it unless its roster is the roster pinned in the site's
kit** (so the coordinator cannot add Sybil parties or swap a key; the CA signed the roster),
its graph is the one the job's graph seed gives, its threshold is secure against a malicious
coordinator (:class:`~lepton_ray.secagg.JobPins`) and the site policy allows it; it takes part
in a (job, round) at most once, remembered on disk across restarts
(:class:`~lepton_ray.secagg.keys.ParticipationLog`), and then plays its own party's part with
the Ed25519 identity from its kit. :func:`drive_round` is the coordinator's side: the real :class:`SecAggServer`, each
stage one call per site in parallel with a per-stage timeout; a site that fails, times out or
disconnects is a dropout, which SecAgg+ survives down to the threshold.

This is the seam the Ray runtime uses in a federation (a site's PartyHost answers the same
stage calls for its party); the round here takes each site's input vector as given, which is
what the wire acceptance test and the byte measurements need.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton_ray.errors import FederationError, ProtocolError
from lepton_ray.federation import wire
from lepton_ray.federation.policy import SitePolicy
from lepton_ray.federation.provision import Kit


class SiteSecAgg:
    """A site's SecAgg+ party. ``inputs(round) -> ring vector`` supplies its (already
    quantised) input; ``record`` keeps, in a test mode, what the site contributed."""

    def __init__(self, kit: Kit, inputs: Callable[[int], np.ndarray], *,
                 policy: SitePolicy | None = None, data_path: str | None = None,
                 ledger=None, state_dir: str | None = None):
        import os

        from lepton_ray.secagg.keys import ParticipationLog, PartyKeyring

        if kit.identity is None:
            raise FederationError(f"kit {kit.path}: a site needs a party kit")
        self.kit = kit
        self.party = kit.index
        self.roster = kit.roster.secagg_roster()
        self.policy = policy or SitePolicy()
        self.inputs = inputs
        log = None
        if state_dir is not None:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            log = os.path.join(state_dir, "participation.jsonl")
        self.keyring = PartyKeyring(participation=ParticipationLog(log))
        self.state = None
        self.record: dict[int, np.ndarray] = {}
        self.data_path = data_path
        self.ledger = ledger  # lepton_ray.federation.ledger.SiteLedger, or None
        self.jobs: dict[str, Any] = {}  # job id -> the JobSpec this site accepted
        self.require_job = data_path is not None  # a site with data only runs accepted jobs

    def __call__(self, message: Any) -> Any:
        if isinstance(message, wire.JobOffer):
            return self.offer(message)
        if not isinstance(message, wire.Call):
            return None
        method = getattr(self, "rpc_" + message.method, None)
        if method is None:
            raise FederationError(f"unknown method {message.method!r}")
        return method(*message.args)

    def offer(self, offer: wire.JobOffer) -> wire.JobAnswer:
        """Accept or refuse a job under this site's policy; the reason goes to the coordinator."""
        try:
            self.jobs[offer.job_id] = self.policy.accept(offer.spec, self.data_path or "-")
        except FederationError as exc:
            return wire.JobAnswer(job_id=offer.job_id, accepted=False, reason=str(exc))
        return wire.JobAnswer(job_id=offer.job_id, accepted=True)

    def _charge(self, config) -> None:
        """Write-ahead: the site's own ledger records the round before the site takes part."""
        if self.ledger is None:
            return
        from lepton_ray.federation.ledger import job_epsilon

        spec = self.jobs[config.job_id]
        self.ledger.charge(config.job_id, config.round, epsilon=job_epsilon(spec, config.round),
                           delta=float(spec.privacy.delta) if spec.privacy.enabled else 0.0)

    def rpc_advertise(self, config):
        from lepton_ray.secagg import SecAggParty
        from lepton_ray.secagg.plan import RoundConfig

        if type(config) is not RoundConfig:
            raise FederationError("advertise: expected a RoundConfig")
        if config.roster != self.roster:
            raise FederationError("round refused: its roster is not the roster pinned in this "
                                  "site's kit (signed by the federation CA)")
        if self.keyring.participation.took_part(config.job_id, config.round, self.party):
            raise FederationError(f"round refused: already took part in {config.job_id} round "
                                  f"{config.round} (never twice)")
        if self.require_job and config.job_id not in self.jobs:
            raise FederationError(f"round refused: job {config.job_id!r} was not accepted by "
                                  "this site")
        self.policy.check_round(threshold=config.threshold, secure=True)
        if self.party not in config.participants:
            raise FederationError(f"party {self.party} is not a participant of this round")
        pins = site_pins(config.job_id, self.roster, self.jobs.get(config.job_id))
        try:
            self.keyring.check_plan(config, pins)
        except ProtocolError as exc:
            raise FederationError(f"round refused: {exc}") from None
        if self.require_job:
            self._charge(config)  # BudgetExhaustedError: refused, nothing revealed
        self.keyring.participation.claim(config.job_id, config.round, [self.party])
        self.state = SecAggParty(party=self.party, identity=self.kit.identity, config=config,
                                 keyring=self.keyring, pins=pins, claimed=True)
        return self.state.advertise()

    def rpc_share_keys(self, broadcast):
        return self._party().share_keys(broadcast)

    def rpc_masked_input(self, inbox):
        party = self._party()
        vector = np.ascontiguousarray(self.inputs(party.config.round), dtype=party.config.dtype)
        self.record[party.config.round] = vector.copy()
        return party.masked_input(inbox, vector)

    def rpc_consistency(self, request):
        return self._party().consistency(request)

    def rpc_unmask(self, request):
        out = self._party().unmask(request)
        self.state = None
        return out

    def _party(self):
        if self.state is None:
            raise FederationError("no round in progress at this site")
        return self.state


@dataclass
class RoundOutcome:
    result: Any  # AggregateResult
    dropped: dict[str, str] = field(default_factory=dict)  # site -> why
    seconds: float = 0.0
    bytes_out: dict[str, int] = field(default_factory=dict)  # coordinator -> site
    bytes_in: dict[str, int] = field(default_factory=dict)  # site -> coordinator


def drive_round(config, sessions: Mapping[str, Any], *, stage_timeout: float = 60.0) -> RoundOutcome:
    """The coordinator's side of one SecAgg+ round over site sessions (see module doc)."""
    from lepton_ray.secagg.server import SecAggServer

    start = time.perf_counter()
    server = SecAggServer(config)
    live = dict(sessions)
    dropped: dict[str, str] = {}
    out0 = {s: v.bytes_out for s, v in live.items()}
    in0 = {s: v.bytes_in for s, v in live.items()}

    def stage(method: str, arg_for: Callable[[str], Any]) -> list:
        calls = {}
        for site, session in list(live.items()):
            arg = arg_for(site)
            if arg is None:  # the server has nothing for it: it already dropped
                dropped.setdefault(site, f"dropped before {method}")
                live.pop(site)
                continue
            calls[site] = session.call_async(method, arg)
        deadline = time.monotonic() + stage_timeout
        replies = []
        for site, fut in calls.items():
            try:
                reply = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                if getattr(reply, "party", index[site]) != index[site]:
                    # a site speaks only for its own party (its mTLS identity is its index)
                    dropped[site] = (f"{method}: its reply claims party "
                                     f"{getattr(reply, 'party', None)!r}, not its own "
                                     f"{index[site]} (impersonation)")
                    live.pop(site, None)
                    continue
                replies.append(reply)
            except futures.TimeoutError:
                dropped[site] = f"{method}: no answer within {stage_timeout} s"
                live.pop(site, None)
            except FederationError as exc:
                dropped[site] = f"{method}: {exc}"
                live.pop(site, None)
        return replies

    index = {site: session.index for site, session in sessions.items()}
    broadcast = server.collect_adverts(stage("advertise", lambda s: config))
    inboxes = server.route_shares(stage("share_keys", lambda s: broadcast))
    check = server.collect_masked(stage("masked_input", lambda s: inboxes.get(index[s])))
    request = server.collect_consistency(stage(
        "consistency", lambda s: check if index[s] in check.survivors else None))
    result = server.finish(stage("unmask", lambda s: request if index[s] in request.survivors
                                 else None))
    return RoundOutcome(result=result, dropped=dropped, seconds=time.perf_counter() - start,
                        bytes_out={s: v.bytes_out - out0[s] for s, v in sessions.items()},
                        bytes_in={s: v.bytes_in - in0[s] for s, v in sessions.items()})


def site_pins(job_id: str, roster, spec=None):
    """The pins a site checks a round of ``job_id`` against: the kit's CA-signed roster, the
    graph seed every party derives from the job id, and the k/t policy of the job spec the
    site accepted (defaults when it accepted none)."""
    from lepton_ray.secagg import JobPins

    return JobPins.for_job(job_id, roster, getattr(spec, "secure_aggregation", None))


def offer_job(sessions: Mapping[str, Any], job_id: str, spec: dict, *, timeout: float = 30.0
              ) -> tuple[dict[str, Any], dict[str, str]]:
    """Offer a job (its spec as data) to every site; ``(accepted sessions, refusals)`` where a
    refusal records the site's reason. The job goes on with the sites that accepted."""
    import queue

    offer = wire.JobOffer(job_id=job_id, spec=spec)
    for session in sessions.values():
        session.send(offer)
    accepted, refused = {}, {}
    deadline = time.monotonic() + timeout
    for site, session in sessions.items():
        while True:
            try:
                answer = session.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                refused[site] = f"no answer to the job offer within {timeout} s"
                break
            if isinstance(answer, wire.JobAnswer) and answer.job_id == job_id:
                if answer.accepted:
                    accepted[site] = session
                else:
                    refused[site] = answer.reason
                break
    return accepted, refused
