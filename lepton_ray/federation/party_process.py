"""``lepton-ray party``: one organisation's site process in a federation.

The site dials **out** to the coordinator named in its kit (mutual TLS, :mod:`.transport`)
and reconnects after network failures and coordinator restarts. It starts its own Ray (an
embedded local instance, or with ``--address`` the organisation's own cluster), where its
party's ``PartyHost`` actor and that actor's GPU-allocated training tasks run: the same actor
and the same protocol code as a simulation's, so one round loop drives both
(:class:`actors.hosts.HostPool`). Everything the site receives is a schema-checked message
(:mod:`.wire`), never code:

1. ``JobOffer``: the job spec as data. The site's own policy (:class:`.policy.SitePolicy`)
   accepts or refuses it; the refusal's reason goes back to the coordinator, which records it.
   The spec never names the site's data: the site runs it on its own ``--data`` file.
2. ``prepare`` (:class:`.wire.JobData`): the federation's feature columns and class set.
   The site reads its file with the same loader as a simulation's ``party_files``
   (:func:`lepton_ray.learning.data.load_party_file`), refuses (with the difference named) if
   its columns or labels disagree, and keeps its rows in memory.
3. Round 0 of a job without DP, a SecAgg+ secure sum of the sites' moments (:mod:`.stats`):
   with ``data.standardize`` the row count, feature sums and sums of squares, otherwise the
   row count alone. The coordinator learns only the pooled values. (Under DP there is no
   round 0: exact pooled statistics would be released outside the accountant, so the
   coordinator standardises with its own test file's, as a simulation does.)
4. ``standardise`` (:class:`.wire.Standardisation`): the mean and scale; the site
   standardises its rows with them and starts the job's ``PartyHost`` on its Ray with its
   kit's Ed25519 identity, its participation log and the job's pins.
5. Each round ``r``: the driver's stage calls (``advertise`` with the round's plan and the
   global parameters, ``share_keys``, ``masked_input``, ``consistency``, ``unmask``). Before
   anything reaches its host the site checks the plan: its roster is the CA-signed roster in
   the kit, its update rule is the accepted spec's (a coordinator cannot ask for an unclipped
   or unnoised update), its threshold passes the site policy, and with DP the round is
   charged to the site's own lifetime ledger first (write-ahead). The host then checks the
   graph, job and t against the job's pins and never takes part twice in one (job, round).

``--record DIR`` (a test mode) writes each round's ring input to ``DIR/<job>-round-<r>.npy``
so a test can check that the aggregate equals the sum of what the sites computed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray.errors import DataError, FederationError
from lepton_ray.federation import wire
from lepton_ray.federation.site import SiteSecAgg

HOST_STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")


class PartySite(SiteSecAgg):
    """A site with data: :class:`SiteSecAgg` (the round-0 secure sum, played in this process)
    plus the job's data, standardisation and its ``PartyHost`` on the site's own Ray, which
    answers the driver's stage calls of every training round. ``record``: a directory for
    each round's ring input (test mode), or None."""

    def __init__(self, kit, data_path: str, *, policy=None, ledger=None,
                 state_dir: str | None = None, record: str | None = None):
        super().__init__(kit, self._moments, policy=policy, data_path=data_path, ledger=ledger,
                         state_dir=state_dir)
        self.record_dir = Path(record) if record else None
        self.log_path = (os.path.join(state_dir, "participation.jsonl") if state_dir else None)
        self.data: dict[str, dict[str, Any]] = {}  # job id -> its rows, schema, host
        self.finished = threading.Event()
        self.jobs_done: list[str] = []
        self._round_job: dict[int, str] = {}  # round in progress -> its job

    def __call__(self, message: Any) -> Any:
        # the driver's stage calls carry the round first: (round, ...); round 0's secure sum
        # (SiteSecAgg) carries one protocol message
        if (isinstance(message, wire.Call) and message.method in HOST_STAGES
                and len(message.args) >= 2):
            return self._host_stage(message.method, message.args)
        return super().__call__(message)

    # ------------------------------------------------------------------ job admission
    def offer(self, offer: wire.JobOffer) -> wire.JobAnswer:
        answer = super().offer(offer)
        verdict = "accepted" if answer.accepted else f"refused: {answer.reason}"
        _say(f"job {offer.job_id}: {verdict}")
        return answer

    def rpc_prepare(self, job: Any) -> int:
        """Read this site's file for ``job`` (:class:`wire.JobData`) and check it agrees with
        the federation's columns and classes. Returns 0 (the row count travels only inside the
        secure sum)."""
        from lepton_ray.learning.data import FederatedData, load_party_file

        if type(job) is not wire.JobData:
            raise FederationError("prepare: expected JobData")
        spec = self._spec(job.job_id)
        features = len(job.features)
        schema = FederatedData(parties=(), X_test=np.zeros((0, features), dtype=np.float32),
                               y_test=np.zeros(0, dtype=np.int64), classes=np.asarray(job.classes),
                               feature_names=tuple(job.features), mean=np.zeros(features),
                               scale=np.ones(features))
        try:
            X, y = load_party_file(spec.data, self.data_path, schema, field="--data")
        except DataError as exc:
            raise FederationError(f"site data refused for job {job.job_id}: {exc}") from None
        # one job at a time: a job prepared now (a new one, the same one offered again after
        # a reconnect, or a resumed coordinator's) stops the hosts of every job before it
        for old in self.data.values():
            if old.get("host") is not None:
                _kill(old["host"])
                old["host"] = None
        self.data.pop(job.job_id, None)
        self.data[job.job_id] = {"raw": X, "y": y, "schema": job, "host": None}
        _say(f"job {job.job_id}: {len(y)} rows of {self.data_path}, {features} features, "
             f"{len(job.classes)} classes")
        return 0

    def rpc_standardise(self, message: Any) -> int:
        """Standardise this site's rows with the job's mean and scale and start the job's
        ``PartyHost`` on the site's Ray (its training tasks run there too)."""
        import ray

        from actors.party_host import PartyHost
        from lepton_ray.federation.site import site_pins

        if type(message) is not wire.Standardisation:
            raise FederationError("standardise: expected Standardisation")
        job = self._job(message.job_id)
        spec = self._spec(message.job_id)
        features = len(job["schema"].features)
        mean = np.asarray(message.mean, dtype=np.float64)
        scale = np.asarray(message.scale, dtype=np.float64)
        if mean.shape != (features,) or scale.shape != (features,):
            raise FederationError(f"standardise: mean/scale must have {features} values")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise FederationError("standardise: mean and scale must be finite, scale > 0")
        X = np.ascontiguousarray((job["raw"] - mean) / scale, dtype=np.float32)
        if job["host"] is not None:
            _kill(job["host"])
        spec = _spec_for_this_machine(spec)
        host = ray.remote(PartyHost).options(num_cpus=0).remote(
            self.party, spec, [self.party], [(X, job["y"])], features, len(job["schema"].classes),
            identity_keys={self.party: self.kit.identity.private_bytes()},
            participation_log=self.log_path,
            record=str(self.record_dir) if self.record_dir else None)
        ray.get(host.pin.remote(site_pins(message.job_id, self.roster, spec)))
        job["host"] = host
        return 0

    # ------------------------------------------------------------------ rounds
    def _host_stage(self, method: str, args: tuple) -> tuple:
        """One of the driver's stage calls, checked here and answered by the job's
        ``PartyHost``: ``(wire.Report, messages)``."""
        import ray

        round_ = args[0]
        if type(round_) is not int:
            raise FederationError(f"{method}: the round must be an int")
        if method == "advertise":
            job_id, args = self._check_advertise(args)
        else:
            job_id = self._round_job.get(round_)
            if job_id is None:
                raise FederationError(f"{method}: no round {round_} in progress at this site")
        host = self._job(job_id)["host"]
        if host is None:
            raise FederationError(f"job {job_id}: not standardised yet")
        report, payload = getattr(host, method).options(num_returns=2).remote(*args)
        report, payload = ray.get([report, payload])
        if method == "unmask":
            self._round_job.pop(round_, None)
        return (wire.Report(host=report.host, parties=tuple(report.parties),
                            failed=tuple((int(p), str(w)) for p, w in report.failed),
                            device=report.device, ray_calls=report.ray_calls), list(payload))

    def _check_advertise(self, args: tuple) -> tuple[str, tuple]:
        """The site's checks of a round's plan before its host sees it (module docstring)."""
        import ray

        from lepton_ray.learning.party_update import SecureRoundPlan

        if len(args) not in (4, 5):
            raise FederationError("advertise: expected (round, plan, [params], parties[, evaluate])")
        round_, plan, box, sampled = args[:4]
        evaluate = tuple(args[4]) if len(args) == 5 else ()
        if type(plan) is not SecureRoundPlan:
            raise FederationError("advertise: expected a SecureRoundPlan")
        config = plan.config
        spec = self._spec(config.job_id)
        job = self._job(config.job_id)
        if config.round != round_ or not 1 <= round_ <= spec.rounds:
            raise FederationError(f"round refused: round {config.round} is outside the accepted "
                                  f"job's 1..{spec.rounds}")
        if list(sampled) != [self.party] or evaluate:
            raise FederationError(f"round refused: a site answers for its own party "
                                  f"{self.party} only, not {list(sampled)}")
        if config.roster != self.roster:
            raise FederationError("round refused: its roster is not the roster pinned in this "
                                  "site's kit (signed by the federation CA)")
        if (type(box) is not list or len(box) != 1 or not isinstance(box[0], np.ndarray)
                or box[0].ndim != 1 or box[0].dtype != np.float32):
            raise FederationError("advertise: the parameters must be one float32 vector")
        self.policy.check_round(threshold=config.threshold, secure=True)
        problems = check_rule(spec, plan, n_params=len(box[0]))
        if problems:
            raise FederationError("round refused: " + "; ".join(problems))
        self._charge(config)  # write-ahead to the site's own ledger; refused if over budget
        self._round_job[round_] = config.job_id
        del job
        return config.job_id, (round_, plan, [ray.put(box[0])], [self.party], ())

    def _moments(self, round_: int) -> np.ndarray:
        """The site's round-0 input: the moments of its rows (:mod:`.stats`)."""
        from lepton_ray.federation.stats import encode_moments

        if round_ != 0:
            raise FederationError(f"round {round_}: training rounds are answered by the host")
        job_id = self.state.config.job_id
        job = self._job(job_id)
        X = job["raw"] if job["schema"].moments else job["raw"][:, :0]
        vector = encode_moments(X, max_sites=max(2, len(self.roster)))
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            np.save(self.record_dir / f"{job_id}-round-0.npy", vector)
        return vector

    def rpc_finish(self, job_id: str, status: str) -> int:
        """The coordinator says the job ended: the site forgets its rows and stops its host."""
        job = self.data.pop(job_id, None)
        if job is not None and job.get("host") is not None:
            _kill(job["host"])
        self.jobs.pop(job_id, None)
        self.jobs_done.append(job_id)
        _say(f"job {job_id} ended ({status})")
        self.finished.set()
        return 0

    # ------------------------------------------------------------------ helpers
    def _spec(self, job_id: str):
        spec = self.jobs.get(job_id)
        if spec is None:
            raise FederationError(f"job {job_id!r} was not accepted by this site")
        return spec

    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.data.get(job_id)
        if job is None:
            raise FederationError(f"job {job_id!r}: this site has not prepared its data")
        return job


def _check_skellam(spec, plan, n_params: int) -> list[str]:
    """Distributed DP: the plan's Skellam parameters must be exactly those the site computes
    from the spec it accepted (the same calibration as the driver,
    :func:`lepton_ray.privacy.dpfedavg.dp_fedavg_for_spec`) for this round's participants,
    threshold and clip norm, and its rotation seed the public one of the (job, round).
    Otherwise a coordinator could ask the parties for less noise (or a weaker survivor bound)
    than the spec promises while every site's ledger charges the promised epsilon."""
    import hashlib

    from lepton_ray.privacy.dpfedavg import dp_fedavg_for_spec

    config = plan.config
    dp = dp_fedavg_for_spec(spec, n_params)
    expected = dp.distributed.params(n=len(config.participants), threshold=config.threshold,
                                     clip_norm=plan.rule.clip_norm,
                                     noise_multiplier=dp.noise_multiplier)
    problems = []
    if plan.skellam != expected:
        problems.append(f"Skellam parameters {plan.skellam} are not the accepted spec's for "
                        f"this round ({expected})")
    seed = hashlib.sha256(f"lepton-ray/rotation/{config.job_id}/{config.round}".encode()).digest()
    if plan.rotation_seed != seed:
        problems.append("the rotation seed is not the public one of this (job, round)")
    return problems


def check_rule(spec, plan, n_params: int | None = None) -> list[str]:
    """What a site refuses in a round's plan: an update rule or ring that is not the accepted
    spec's. Without DP the clip norm, FedAvg weighting and ring are the spec's; with DP every
    party weighs 1, the noise is where the spec puts it (distributed: the plan carries the
    Skellam parameters, whose clip norm is the spec's; central: the coordinator's ring), and
    adaptive clipping sends its clip bit only when the spec asks for it."""
    from lepton_ray.config import NoisePlacement

    sa, p, rule = spec.secure_aggregation, spec.privacy, plan.rule
    problems = []
    if rule.eval_classes or rule.eval_rows:
        problems.append("federated evaluation is not part of the accepted job")
    if not p.enabled:
        if rule.clip_norm is None or abs(rule.clip_norm - sa.clip_norm) > 1e-12:
            problems.append(f"clip norm {rule.clip_norm}, the accepted spec's is {sa.clip_norm}")
        if rule.clip_bit or rule.weight_cap is None or not rule.weight_cap > 0:
            problems.append("the update rule is not the non-private FedAvg rule")
        if plan.skellam is not None or plan.quantization is None:
            problems.append("the plan is not a non-private secure sum")
        elif plan.quantization.modulus_bits != sa.modulus_bits:
            problems.append(f"ring of {plan.quantization.modulus_bits} bits, the spec's is "
                            f"{sa.modulus_bits}")
        return problems
    if rule.weight_cap is not None:
        problems.append("a weighted update under DP (every party must weigh 1)")
    if rule.clip_bit != p.adaptive_clipping.enabled:
        problems.append("the clip bit does not match the spec's adaptive clipping")
    if not p.adaptive_clipping.enabled and (rule.clip_norm is None
                                            or abs(rule.clip_norm - p.clip_norm) > 1e-9):
        problems.append(f"clip norm {rule.clip_norm}, the accepted spec's is {p.clip_norm}")
    if p.noise is NoisePlacement.DISTRIBUTED:
        if plan.skellam is None:
            problems.append("the spec puts the noise at the parties (distributed) but the plan "
                            "has no Skellam parameters")
        elif n_params is not None:
            problems += _check_skellam(spec, plan, n_params)
    elif plan.skellam is not None or plan.quantization is None:
        problems.append("the plan is not the spec's central-noise secure sum")
    return problems


def _spec_for_this_machine(spec):
    """The spec the site's host runs: GPUs asked that this site's Ray does not have fall back
    to the CPU (``training.device: auto``) or are refused (``cuda``), as for ``simulate``."""
    import ray

    from actors.resources import check_local

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return check_local(spec, gpus, say=_say)


def _kill(host) -> None:
    import ray

    try:
        ray.kill(host)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _say(text: str) -> None:
    print(f"[site] {text}", file=sys.stderr, flush=True)


def start_own_ray(address: str | None, temp_root: str | None = None) -> None:
    """The site's own Ray: ``address`` joins the organisation's cluster (``ray start`` on its
    own machines); otherwise an embedded local instance in its own temp dir, so several sites
    (and a coordinator) can share one test machine."""
    import logging
    import tempfile

    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    from actors.driver import _quiet_token_auth_notice

    temp = tempfile.mkdtemp(prefix="lrs-", dir=temp_root or "/tmp")
    with _quiet_token_auth_notice():  # token auth on our own instance is what we want
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 _temp_dir=temp)


def run_party(*, kit: str, data: str, policy: str | None = None, state: str | None = None,
              record: str | None = None, connect: str | None = None,
              exit_after_job: bool = False, address: str | None = None) -> int:
    """The ``lepton-ray party`` command (see the module docstring)."""
    import torch

    from lepton_ray.federation.policy import SitePolicy
    from lepton_ray.federation.provision import load_kit
    from lepton_ray.federation.transport import SiteClient

    site_kit = load_kit(kit)
    if site_kit.identity is None:
        raise FederationError(f"--kit {kit}: the coordinator's kit; a party site needs its own")
    if not Path(data).is_file():
        raise DataError(f"--data: file not found: {data}")
    site_policy = SitePolicy.load(policy)
    state_dir = Path(state) if state else Path(kit) / "state"
    ledger = None
    if site_policy.lifetime_epsilon is not None:
        from lepton_ray.federation.ledger import SiteLedger

        ledger = SiteLedger(state_dir / "ledger.jsonl", lifetime_epsilon=site_policy.lifetime_epsilon)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start_own_ray(address)
    site = PartySite(site_kit, str(data), policy=site_policy, ledger=ledger,
                     state_dir=str(state_dir), record=record)
    client = SiteClient(site_kit, site, address=connect)
    print(f"site {site_kit.site} (party {site_kit.index} of federation {site_kit.federation}): "
          f"data {data}, state {state_dir}, Ray {address or 'embedded'}; dialling "
          f"{client.address}", flush=True)
    try:
        if exit_after_job:  # serve in a thread; return once the coordinator ends a job
            failure: list[BaseException] = []

            def serve():
                try:
                    client.run(max_backoff=5.0)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(exc)
                    site.finished.set()

            threading.Thread(target=serve, daemon=True, name="site-client").start()
            site.finished.wait()
            if failure:
                raise failure[0]
            time.sleep(0.5)  # let the reply to ``finish`` leave before the process exits
        else:
            client.run(max_backoff=5.0)
    except FederationError as exc:  # the coordinator refused this site: final
        raise FederationError(f"site {site_kit.site}: {exc}") from None
    finally:
        if ledger is not None:
            ledger.close()
    print(f"site {site_kit.site}: done ({', '.join(site.jobs_done) or 'no job'})", flush=True)
    return 0
