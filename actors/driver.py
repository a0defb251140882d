"""The federation driver: the round loop of one job, whatever reaches its hosts.

One round (see shared/DESIGN.md): sample parties -> put the global parameters in the object
store once -> one call per host and stage (each host trains its sampled parties in a
GPU-allocated task and accumulates locally; with SecAgg+ five batched stages) -> the
coordinator reduces across hosts -> the server optimiser steps -> evaluate -> history row
(fsynced) and checkpoint (atomic).

:class:`Federation` is built from parts, each in its own module:

- the round loop (here): sampling, the plain and secure rounds, the plan, the stage gather;
- the hosts (:mod:`actors.hosts`): one :class:`~actors.hosts.HostPool` interface, with
  ``PartyHost`` actors in this Ray cluster (:class:`~actors.hosts.RayHosts`: simulation and
  the trusted-cluster deployment) or a federation's sites over mutual TLS
  (:class:`lepton_ray.federation.site_hosts.SiteHosts`);
- privacy (:mod:`actors.job_privacy`): calibration, the write-ahead ledger, record-level
  reporting;
- outputs (:mod:`actors.job_outputs`): audit records, checkpoints and ``--resume``, the model
  and the summary.

:func:`run_job` runs a spec on its own hosts; :func:`run_with_hosts` on a given pool (the
federation coordinator).
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.coordinator import Released, SmpcCoordinator
from actors.hosts import HostPool, RayHosts, discard, gather
from actors.job_outputs import JobOutputs
from actors.job_privacy import JobPrivacy
from actors.party_host import StageReport
from lepton_ray.config import JobSpec, SecureAggregation
from lepton_ray.errors import (BudgetExhaustedError, ConfigError, LeptonError, ResumeError,
                               user_message)
from lepton_ray.learning.data import FederatedData, load_federated
from lepton_ray.learning.sampling import sample_parties
from lepton_ray.privacy.resume import ROUND_START
from lepton_ray.outputs import (
    AUDIT,
    CHECKPOINT,
    HISTORY,
    LEDGER,
    MODEL,
    PARTICIPANTS,
    SUMMARY,
    AuditLog,
    HistoryWriter,
    ParticipantsLog,
    atomic_write_json,
    output_path,
    read_history,
    read_output,
)
from lepton_ray.result import RunResult

log = logging.getLogger("lepton_ray.driver")

OUTPUT_FILES = (HISTORY, SUMMARY, MODEL, CHECKPOINT, MODEL + ".enc", CHECKPOINT + ".enc", LEDGER,
                AUDIT, "history.png", "audit.md", PARTICIPANTS)

PARTICIPANTS_WARNING = (
    "WARNING output.record_participants is true: {path} lists the party ids sampled, completed "
    "and dropped in every round. It is confidential (under DP the guarantee relies on the "
    "sample staying secret): never publish it or store it with the released outputs."
)


def ensure_ray(num_cpus: int | None = None, *, dashboard: bool = False) -> bool:
    """Join the Ray instance already initialised, or start an embedded local one. Returns
    True when this call started an embedded local instance (ours to configure and to fall
    back on: see :func:`check_gpu_request`). With ``dashboard`` the embedded instance runs
    Ray's dashboard and its URL is printed."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(logging_level=logging.WARNING)
        if dashboard:
            _say_dashboard(ctx, joined=True)
        return False
    # "local": always a fresh embedded instance, never a stale cluster left on the machine.
    # Ray enables token authentication for a new local instance and warns that it did on
    # every start; for our own instance that is the setting we want, so only that one
    # warning is held back, only while this instance starts (a user's cluster settings and
    # every other Ray message are left alone).
    with _quiet_token_auth_notice():
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                       logging_level=logging.WARNING)
    if dashboard:
        _say_dashboard(ctx, joined=False)
    return True


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        notice = "Token authentication is enabled for this Ray cluster"
        return not record.getMessage().startswith(notice)


class _quiet_token_auth_notice:
    """Scoped: a filter on Ray's token-setup logger for the duration of ``ray.init``."""

    LOGGER = "ray._private.authentication.authentication_token_setup"

    def __enter__(self):
        self._filter = _DropTokenAuthNotice()
        logging.getLogger(self.LOGGER).addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger(self.LOGGER).removeFilter(self._filter)


def _say_dashboard(ctx, *, joined: bool) -> None:
    url = getattr(ctx, "dashboard_url", None)
    if url:
        url = url if "://" in url else f"http://{url}"
        print(f"Ray dashboard: {url}" + (" (the cluster's)" if joined else ""),
              file=sys.stderr, flush=True)
    else:
        print("Ray dashboard: not available (is ray[default] installed?)", file=sys.stderr,
              flush=True)


def prepare_output_dir(out: Path, *, overwrite: bool, discard_privacy_ledger: bool = False,
                       lock=None) -> None:
    """Refuse a directory that holds a job's outputs unless ``overwrite``; never delete a
    privacy ledger unless ``discard_privacy_ledger`` too: then it is replaced by a ledger
    whose first line records the discard (:func:`~lepton_ray.privacy.ledger.discard_ledger`,
    under ``lock``, the job's held ledger lock)."""
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise ConfigError(
            [f"output.dir: {out} already holds a job's outputs ({', '.join(existing)}); "
             "choose a new output.dir or pass --overwrite"]
        )
    ledger = out / LEDGER
    keep_ledger = ledger.exists() and ledger.stat().st_size > 0
    if keep_ledger and not discard_privacy_ledger:
        raise ConfigError(
            [f"output.dir: {out} holds a privacy ledger ({LEDGER}) that records the budget "
             "already spent on this data; --overwrite does not delete it. Choose a new "
             "output.dir, --resume the job, or pass --discard-privacy-ledger too (the new "
             "ledger's first line then records the discard)"]
        )
    for f in existing:
        if f != LEDGER or not keep_ledger:
            (out / f).unlink()
    if keep_ledger:
        from lepton_ray.privacy.ledger import discard_ledger

        record = discard_ledger(ledger, lock=lock)
        print(f"discarded privacy ledger {ledger} (epsilon spent {record.epsilon_spent}, "
              f"sha256 {record.sha256}); recorded in the new ledger's first line",
              file=sys.stderr, flush=True)
    if overwrite and (out / "tensorboard").is_dir():  # output.tensorboard's event files
        import shutil

        shutil.rmtree(out / "tensorboard")
    out.mkdir(parents=True, exist_ok=True)


class Federation(JobPrivacy, JobOutputs):
    """The driver's state for one job: the round loop, the global model, privacy and
    outputs. It reaches the parties' hosts only through ``hosts`` (:class:`actors.hosts.HostPool`):
    by default ``PartyHost`` actors in this Ray cluster (:class:`~actors.hosts.RayHosts`); a
    federation coordinator passes its sites (:class:`lepton_ray.federation.site_hosts.SiteHosts`)
    and the job id it offered them."""

    def __init__(self, spec: JobSpec, data: FederatedData, hosts: HostPool | None = None,
                 job_id: str | None = None):
        import torch

        from lepton_ray.learning.models import build_model, flat_parameters
        from lepton_ray.learning.strategies import ServerOptimizer

        self.spec = spec
        self.data = data
        self.out = Path(spec.output.dir)
        self.model = build_model(spec.model, data.n_features, data.n_classes, seed=spec.seed)
        self.params = flat_parameters(self.model)
        self.optimizer = ServerOptimizer(spec.server)
        self.key = _encryption_key(spec)  # checked before anything runs
        self.history = HistoryWriter(self.out / HISTORY)
        self.audit = AuditLog(self.out / AUDIT)
        self.participants = None
        if spec.output.record_participants:
            self.participants = ParticipantsLog(self.out / PARTICIPANTS)
            print(PARTICIPANTS_WARNING.format(path=self.out / PARTICIPANTS), file=sys.stderr, flush=True)
        self.first_round = 1
        self.round_now = 0  # the round being run (a host started in it counts all before it)
        # DP-SGD executions before this driver's first round (resume: the checkpoint's rounds
        # and every execution after it that may have released; lepton_ray.privacy.resume)
        self.prior_executions = 0
        self.resumed = False  # a resume that changed files (see commit_resume)
        self._recounted = 0  # executions after the checkpoint counted again on resume
        self.dp = None  # DpFedAvg state when user-level DP is on
        self.accountant = None
        self.ledger_lock = None  # the job's held LedgerLock (run_job takes it)
        self.epsilon: float | None = None
        self.record_level_max: float | None = None  # largest per-party DP-SGD epsilon (hosts')
        self.placement: dict[str, dict] = {}
        self.hosts: HostPool = hosts if hosts is not None else RayHosts(spec, data)
        self.remote_parties = self.hosts.remote  # party sizes never reach this driver
        self.job_id = job_id
        self.blocks: list[list[int]] = []
        self.coordinator = None
        self.secure = False
        self.dead: set[int] = set()
        self._lost: set[int] = set()
        self._round_parties: dict[int, list[int]] = {}
        self._evaluators: set[int] = set()  # this round's federated evaluators (run_round)
        self.round_seconds: list[float] = []
        self.ray_calls: list[int] = []
        self.stage_seconds: list[dict[str, float]] = []  # wall seconds by stage, per round
        self._clock = StageClock()
        self.devices: set[str] = set()
        self.record: Path | None = None  # test mode: each round's released sum is saved here
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.blocks = self.hosts.layout(cpus)
        self.hosts.start(self._host_prior)
        if self.spec.parties.deploy:
            self._check_placement_feasible()
            # where each host runs, nothing about its party's data: a party's row count is a
            # statistic of its data and stays on its node (the example counts the round needs
            # travel inside the secure sum; the weight cap is public, from the spec)
            placed = self.hosts.get_all("placement")
            self.placement = {self.spec.parties.deploy[b[0]].id: {"host_node": pl["node"]}
                              for b, pl in zip(self.blocks, placed)}
        self.coordinator = ray.remote(SmpcCoordinator).options(num_cpus=0).remote(
            self.spec.secure_aggregation.mode
        )
        ray.get(self.coordinator.ready.remote())
        self.hosts.ready()
        self.secure = self.spec.secure_aggregation.mode is not SecureAggregation.NONE
        if self.secure:
            self.keys: dict[int, bytes] = self.hosts.keys()
            self._update_roster()
            self.job_id = self.job_id or f"{self.spec.name}-{os.urandom(8).hex()}"
            self.pins = self._job_pins()
            self.hosts.pin(self.pins)
        self.weight_cap = self._weight_cap()
        self.eval_rows = 0  # public bound on a party's held-out rows (federated evaluation)
        if self.spec.evaluation.federated:
            from lepton_ray.learning.fed_eval import check_holdout
            from lepton_ray.learning.party_update import UpdateRule

            self.eval_rows = check_holdout(self.data.party_sizes, self.spec.evaluation.holdout)
            if self.secure:  # the counts are exact integers in the ring: room for all parties
                UpdateRule(clip_norm=1.0, eval_classes=self.data.n_classes,
                           eval_rows=self.eval_rows).check_count_room(
                    self.spec.parties.count, self.spec.secure_aggregation.modulus_bits)
        if self.spec.privacy.enabled:
            self._start_privacy()
        self.audit.write("job_start", **self._trust_model())
        self._audit_host_events()

    def _audit_host_events(self) -> None:
        for event, info in self.hosts.events():
            self.audit.write(event, **info)

    def _weight_cap(self) -> float | None:
        """The public example count at which a party's FedAvg weight stops growing: the
        spec's ``secure_aggregation.weight_cap``, else (simulation, where the driver holds the
        split it made) the largest party. A deployment never tells the driver its parties'
        sizes, so there the spec must give it (``JobSpec.problems`` requires it without
        user-level DP; under DP every party weighs 1 and no cap is used)."""
        cap = self.spec.secure_aggregation.weight_cap
        if cap is not None:
            return float(cap)
        if self.hosts.public_weight_cap() is not None:
            return float(self.hosts.public_weight_cap())
        if self.remote_parties:
            if not self.spec.privacy.enabled:  # validation refuses this spec; never guess
                raise ConfigError(["secure_aggregation.weight_cap: required with parties.deploy"])
            return None
        return float(self.data.party_sizes.max())

    def _job_pins(self):
        """What every host checks each round's plan against (lepton_ray.secagg.JobPins): the
        job id, the roster's hash, the graph seed, and the k/t policy of the spec."""
        from lepton_ray.secagg import JobPins

        return JobPins.for_job(self.job_id, self.roster, self.spec.secure_aggregation)

    def _host_prior(self) -> dict:
        """What a host started now is told about the job so far: rounds it ran before the
        host existed (resume, restart; the host counts its parties in all of them for
        record-level DP-SGD accounting: over-count, never under) and the round it starts in
        (it never joins an earlier one)."""
        return {"prior_rounds": self.prior_executions
                + max(self.round_now, self.first_round) - self.first_round,
                "first_round": self.round_now}

    def _check_placement_feasible(self) -> None:
        """A party whose node resource no node offers would wait forever: say so instead."""
        available = ray.cluster_resources()
        missing = [d.node_resource for d in self.spec.parties.deploy if d.node_resource not in available]
        if missing:
            raise ConfigError([f"parties.deploy: no node offers the resource(s) {', '.join(missing)}; "
                               "start each party's node with ray start --resources "
                               "'{\"party:<id>\": 1}' (or set parties.deploy[i].resource)"])

    def _update_roster(self) -> None:
        from lepton_ray.crypto.identity import Roster

        # the job's admitted identity keys, party id = index
        self.roster = Roster(tuple(self.keys[p] for p in range(self.spec.parties.count)))

    def restart_dead_hosts(self) -> None:
        """Hosts that died last round come back before this one (:meth:`HostPool.revive`:
        same identities, fresh round keys, never a round that started before)."""
        self.hosts.revive(set(self.dead), self._host_prior)
        self.dead.clear()
        self._audit_host_events()

    def stop(self) -> None:
        if self.spec.privacy.dp_sgd.enabled and self.blocks:
            self.record_level_max = self._record_level_max()
        if self.accountant is not None:
            self.accountant.close()
        self.hosts.stop()
        if self.coordinator is not None:
            ray.kill(self.coordinator)
        self.coordinator, self.accountant = None, None

    # ------------------------------------------------------------------ one round
    def run_round(self, r: int) -> dict[str, Any]:
        """One round. With DP, the round's event is charged (and fsynced to the ledger)
        before anything runs; ``BudgetExhaustedError`` propagates and nothing is released."""
        from lepton_ray.learning.evaluate import evaluate
        from lepton_ray.learning.models import load_flat
        from lepton_ray.learning.party_update import Aggregate, UpdateRule

        t0 = time.perf_counter()
        # write-ahead (fsynced) before anyone is sampled or trains: a resume counts this
        # execution even if it dies before its history row (lepton_ray.privacy.resume)
        self.audit.write(ROUND_START, round=r)
        self._lost = set()  # parties lost at any stage of this round (why: on stderr)
        self.round_now = r
        self._clock = StageClock()
        self.restart_dead_hosts()
        sampled = sample_parties(self.spec.sampling, self.spec.parties.count)  # OS CSPRNG: secret
        by_host = {h: [int(p) for p in sampled if block[0] <= p <= block[-1]]
                   for h, block in enumerate(self.blocks)}
        by_host = {h: ps for h, ps in by_host.items() if ps}
        self._round_parties = by_host
        self._evaluators: set[int] = set()
        if self.spec.evaluation.in_round(r):  # never under DP (refused by the config)
            from lepton_ray.learning.fed_eval import choose_evaluators

            picked = choose_evaluators(len(sampled), self.spec.evaluation.fraction)
            self._evaluators = {int(sampled[i]) for i in picked}
        plan, noise = None, None
        if self.dp is not None:
            rule = UpdateRule(clip_norm=self.dp.clip_norm, weight_cap=None,
                              clip_bit=self.dp.clipping is not None)
            skellam = None
            if self.dp.distributed is not None:
                plan, skellam = self._distributed_plan(r, by_host, rule)
            else:
                noise = self.dp.noise(len(self.params))
            # write-ahead: charged (and fsynced) before anything noised can be released
            self.epsilon = self.accountant.charge(
                r, self.dp.event(skellam), f"round {r}: DP-FedAvg "
                f"{'distributed Skellam' if skellam is not None else 'central discrete Gaussian'} "
                f"z={self.dp.noise_multiplier:.4g} C={self.dp.clip_norm:.4g} q={self.dp.sampling_rate:g}")
        else:
            clip = self.spec.secure_aggregation.clip_norm if self.secure else None
            # no DP: the hosts' loss and clip counts travel inside the sum (only totals seen)
            # with federated evaluation the evaluators' counts and loss sums travel there too
            evaluating = self.spec.evaluation.in_round(r)
            rule = UpdateRule(clip_norm=clip, weight_cap=self.weight_cap, stats=True,
                              eval_classes=self.data.n_classes if evaluating else 0,
                              eval_rows=self.eval_rows if evaluating else 0)
        params_ref = ray.put(self.params)
        if not by_host:
            outcome = RoundOutcome(status="no_parties")
        elif isinstance(plan, str):  # a distributed round that cannot run (charged all the same)
            outcome = RoundOutcome(status=plan)
        elif self.secure:
            outcome = self._secure_round(r, by_host, params_ref, rule, noise, plan)
        else:
            outcome = self._plain_round(r, by_host, params_ref, rule, noise)
        agg, clipped_estimate = None, None
        if outcome.released is not None and self.record is not None:
            self._record_release(r, outcome)
        if outcome.released is not None and self.dp is not None and self.dp.distributed is not None:
            mean = self.dp.mean(outcome.released.total)  # Skellam: the decoded, noised sum
            self.params = self.optimizer.step(self.params, mean)
        elif outcome.released is not None:
            agg = Aggregate.split(outcome.released.total, len(self.params), rule)
            if self.dp is not None:
                mean = self.dp.mean(agg.weighted)
                clipped_estimate = self.dp.noised_clipped_count(agg.clip_bits)
                self.dp = self.dp.after_round(agg.clip_bits)
            elif agg.weight > 0:
                mean = agg.weighted / agg.weight
            else:
                mean = None
            if mean is not None:
                self.params = self.optimizer.step(self.params, mean)
        if self.participants is not None:
            self.participants.write(r, sampled=sampled, completed=outcome.participants,
                                    dropped=outcome.dropped)
        row: dict[str, Any] = {"round": r, "status": outcome.status, "epsilon": self.epsilon}
        if self.dp is None:  # totals from the sum; under DP none is released (not charged)
            row.update(parties_sampled=len(sampled), parties_completed=outcome.completed,
                       parties_clipped=agg.clipped_count if agg is not None else None,
                       train_loss=agg.mean_loss if agg is not None else float("nan"))
        else:  # no status detail either: it may hold counts ("only 3 survivors")
            row["status"] = "ok" if outcome.released is not None else "not released"
            # with adaptive clipping: the noised (charged) estimate, never the exact count
            row["parties_clipped"] = clipped_estimate
        self.devices.update(d.split("@")[0] for d in outcome.devices)
        if self.placement and self.dp is None:  # under DP: which party trained is secret
            for h, node in outcome.train_nodes.items():
                self.placement[self.spec.parties.deploy[self.blocks[h][0]].id]["train_node"] = node
        if agg is not None and agg.evaluation is not None:  # totals of the global model the
            from lepton_ray.learning.fed_eval import metrics_from_sum  # round started from

            row.update(metrics_from_sum(agg.evaluation, self.data.n_classes))
        load_flat(self.model, self.params)
        row.update(evaluate(self.model, self.data.X_test, self.data.y_test, self.data.n_classes))
        self._clock.lap("evaluate")
        seconds = time.perf_counter() - t0
        # Under DP a round's wall time grows with the parties it trained (the secret size of
        # the Poisson sample), so no per-round time is released: history, tensorboard and the
        # Ray gauges get none; the summary keeps only whole-job totals (summary()).
        row["round_seconds"] = seconds if self.dp is None else None
        self.stage_seconds.append(self._clock.laps)
        self.audit.write("round", **_audit_round(row, outcome, dp=self.dp is not None),
                         clip_norm=rule.clip_norm, epsilon=self.epsilon)
        self.history.write(row)
        if r % self.spec.output.checkpoint_every == 0 or r == self.spec.rounds:
            self.write_checkpoint(r)
        self.round_seconds.append(seconds)
        self.ray_calls.append(outcome.calls)
        return row

    def _plain_round(self, r: int, by_host: dict[int, list[int]], params_ref, rule,
                     noise=None) -> "RoundOutcome":
        ring = None
        if noise is not None:  # central DP: hosts quantise, the noise goes into the ring sum
            quant, bound = self._quantization(sum(len(ps) for ps in by_host.values()), rule)
            noise, ring = noise.in_ring(quant, bound), (quant, bound)
        outs = {h: self.hosts.call(h, "train", r, [params_ref], ps, rule, ring,
                                   self._evaluating(ps))
                for h, ps in by_host.items()}
        live = self._gather(r, "train", outs, timeout=None)
        self._clock.lap("hosts.train")
        calls = len(outs) + sum(rep.ray_calls for rep, _ in live.values())
        reports = [rep for rep, _ in live.values()]
        if not live or not any(rep.parties for rep in reports):
            return RoundOutcome(status="aborted: no party's update arrived", calls=calls,
                                dropped=set(self._lost))
        released = ray.get(self.coordinator.aggregate.remote(r, noise, *[ref for _, ref in live.values()]))
        self._clock.lap("server.aggregate")
        participants = {p for rep in reports for p in rep.parties}
        return RoundOutcome(
            status="ok", released=released, calls=calls + 1, completed=len(participants),
            participants=participants, dropped=set(self._lost), devices={rep.device for rep in reports},
            train_nodes={h: rep.device.split("@")[-1] for h, (rep, _) in live.items()},
        )

    def _secure_round(self, r: int, by_host: dict[int, list[int]], params_ref, rule,
                      noise=None, plan=None) -> "RoundOutcome":
        """SecAgg+ with five batched stages (the fourth, the consistency check, makes it
        secure against a malicious coordinator); each waits at most ``stage_timeout_s`` and a
        host that fails or is late drops its parties from the rest of the round."""
        from lepton_ray.errors import ConfigError as _ConfigError

        sa = self.spec.secure_aggregation
        timeout = sa.stage_timeout_s
        hosts = self.hosts
        self._rejections: list[dict] = []
        try:
            plan = plan or self._plan(r, [p for ps in by_host.values() for p in ps], rule)
        except _ConfigError as exc:  # e.g. too few sampled parties for any threshold
            return RoundOutcome(status=f"aborted: {exc.problems[0]}")
        self._record_plan(r, plan)
        self._plan_used = plan
        if noise is not None:  # central DP: integer sigmas for this round's ring
            noise = noise.in_ring(plan.quantization, plan.rounding_bound_sq)
        plan_ref = ray.put(plan)
        calls = 1
        ray.get(self.coordinator.begin.remote(plan_ref, noise))
        c = self.coordinator
        self._clock.lap("plan")

        def stage(name: str, live: dict, call_host, server_method, extra_calls: int = 0):
            """One stage: every live host's call, at most ``timeout`` s, then the
            coordinator's on the answers (bound to each host's own parties). Returns the
            hosts that answered, the coordinator's output and the abort reason, if any."""
            nonlocal calls
            outs = {h: call_host(h) for h in live}
            answered = self._gather(r, name, outs, timeout)
            self._clock.lap(f"hosts.{name}")
            calls += len(outs) + 1 + extra_calls
            status, out = server_method.options(num_returns=2).remote(
                [by_host[h] for h in answered], *_payloads(answered))
            why = self._aborted(r, status)
            self._clock.lap(f"server.{name}")
            return answered, out, why

        live, broadcast, why = stage(
            "advertise_keys", by_host, lambda h: hosts.call(
                h, "advertise", r, plan_ref, [params_ref], by_host[h], self._evaluating(by_host[h])),
            c.collect_adverts, extra_calls=len(by_host))  # + each host's training task
        if why:
            return RoundOutcome(status=why, calls=calls, dropped=set(self._lost))

        outs = {h: hosts.call(h, "share_keys", r, broadcast) for h in live}
        live = self._gather(r, "share_keys", outs, timeout)
        self._clock.lap("hosts.share_keys")
        calls += len(outs) + 1
        order = list(live)  # the coordinator returns one inbox dict per host, in this order
        routed = c.route_shares.options(num_returns=1 + len(order)).remote(
            [by_host[h] for h in order], *_payloads(live))
        why = self._aborted(r, routed[0])
        self._clock.lap("server.share_keys")
        if why:
            return RoundOutcome(status=why, calls=calls, dropped=set(self._lost))
        inbox = dict(zip(order, routed[1:]))

        trained: list = []

        def aborted(why: str) -> RoundOutcome:
            return RoundOutcome(status=why, calls=calls, devices={t.device for t in trained},
                                dropped=set(self._lost))

        live, check, why = stage(
            "masked_input", live,
            lambda h: hosts.call(h, "masked_input", r, inbox[h]),
            c.collect_masked)
        trained = [rep for rep, _ in live.values()]
        if why:
            return aborted(why)
        live, request, why = stage(  # every survivor signs the survivor set (Bonawitz §4)
            "consistency", live,
            lambda h: hosts.call(h, "consistency", r, check),
            c.collect_consistency)
        if why:
            return aborted(why)
        live, result, why = stage(
            "unmask", live, lambda h: hosts.call(h, "unmask", r, request),
            c.finish)
        if why:
            return aborted(why)
        released: Released = ray.get(result)
        survivors = set(released.survivors)
        return RoundOutcome(
            status="ok", released=released, calls=calls, completed=len(survivors),
            participants=survivors, dropped=set(released.dropped) | self._lost,
            devices={t.device for t in trained}, rejections=self._rejections,
            train_nodes={t.host: t.device.split("@")[-1] for t in trained},
        )

    def _evaluating(self, parties: list[int]) -> tuple[int, ...]:
        """Which of a host's sampled ``parties`` evaluate this round (federated evaluation)."""
        return tuple(p for p in parties if p in self._evaluators)

    def _plan(self, r: int, participants: list[int], rule):
        import hashlib

        from lepton_ray.learning.party_update import SecureRoundPlan
        from lepton_ray.secagg import required_threshold

        sa = self.spec.secure_aggregation
        dp = self.dp.distributed if self.dp is not None else None
        if dp is not None:  # distributed DP: the Skellam pipeline sets the ring and the width
            from lepton_ray.privacy.rotation import padded_dim

            dim, bits = padded_dim(len(self.params)), (32 if dp.bits <= 32 else 64)
        else:
            dim, bits = rule.width(len(self.params)), sa.modulus_bits
        # the graph comes from the job's pinned seed: the same participants get the same graph
        # every round, so parties reuse their pair secrets (the round's fresh nonce keeps every
        # round's masks independent)
        config = self.pins.plan(roster=self.roster, round_=r, dim=dim,
                                participants=sorted(participants), modulus_bits=bits)
        secure_t = required_threshold(config.graph, self.pins.policy)
        if config.threshold < secure_t:
            raise ConfigError([f"secure_aggregation.threshold: t = {config.threshold} is below "
                               f"{secure_t}, the smallest secure against a malicious "
                               f"coordinator for k = {config.graph.degree} (2t > k + 1 + c); "
                               "the parties would refuse the round"])
        if dp is not None:
            skellam = dp.params(n=len(participants), threshold=config.threshold,
                                clip_norm=self.dp.clip_norm, noise_multiplier=self.dp.noise_multiplier)
            seed = hashlib.sha256(f"lepton-ray/rotation/{self.job_id}/{r}".encode()).digest()
            return SecureRoundPlan(config=config, rule=rule, quantization=None, skellam=skellam,
                                   rotation_seed=seed)
        quant, bound = self._quantization(len(participants), rule)
        return SecureRoundPlan(config=config, rule=rule, quantization=quant, rounding_bound_sq=bound)

    def _gather(self, r: int, stage: str, outs: dict, timeout: float | None):
        """Wait (at most ``timeout`` s) for each host's stage report; returns the hosts that
        answered, ``{host: (report, payload)}``. Parties lost at this stage (a dead or late
        host's parties of this round, parties a host reports as failed) join ``self._lost``."""
        got = gather(outs, timeout)
        dropped: list[int] = []
        for h, exc in got.failed.items():
            lost, died = self.hosts.dropout(exc)
            if not lost:
                discard(outs)  # so Ray reports no "unhandled error" for the stage's others
                raise exc  # a bug or a bad input: surface it, never hide it
            if died:
                self.dead.add(h)
            print(f"round {r} {stage}: host {h} failed; its parties count as dropped "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                  file=sys.stderr, flush=True)
            dropped += self._round_parties.get(h, [])
        live: dict[int, tuple[StageReport, Any]] = {}
        for h, (report, payload) in got.answered.items():
            for party, reason in report.failed:
                print(f"round {r} {stage}: party {party} dropped: {reason}", file=sys.stderr, flush=True)
            dropped += [party for party, _ in report.failed]
            live[h] = (report, payload)
        for h in got.late:
            print(f"round {r} {stage}: host {h} did not answer within {timeout} s; "
                  "its parties count as dropped", file=sys.stderr, flush=True)
            dropped += self._round_parties.get(h, [])
        self._lost.update(dropped)
        return live

    def _aborted(self, r: int, status_ref) -> str | None:
        status = ray.get(status_ref)
        for rej in status.rejections:
            self._rejections.append({"party": rej.party, "stage": rej.stage.value,
                                     "reason": rej.reason.value, "detail": rej.detail})
            print(f"round {r}: rejected {rej}", file=sys.stderr, flush=True)
        if status.ok:
            return None
        print(f"round {r}: aborted, nothing released: {status.reason}", file=sys.stderr, flush=True)
        return f"aborted: {status.reason}"

    # ------------------------------------------------------------------ outputs
def run_job(spec: JobSpec, *, overwrite: bool = False, resume: bool = False,
            num_cpus: int | None = None, on_round=None, dashboard: bool = False,
            discard_privacy_ledger: bool = False) -> RunResult:
    """Run (or with ``resume`` continue) a job; see the module docstring. ``on_round(row)``
    is called with each round's history row (for notebooks and benchmarks).

    The job holds its output directory's privacy-ledger lock
    (:class:`~lepton_ray.privacy.ledger.LedgerLock`) from before it touches the directory
    until it has ended, also on failure: a second job on the same directory (e.g. a
    ``--resume`` while this one runs) gets ``LedgerLockedError`` naming this pid."""
    from actors.resources import check_local, local_gpu_count
    from lepton_ray.privacy.ledger import LedgerLock

    out = Path(spec.output.dir)
    embedded = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if embedded and (spec.training.gpus_per_party > 0 or spec.parties.deploy):
        # the GPUs asked for against this machine, before any file or Ray process
        spec = check_local(spec, local_gpu_count(),
                           say=lambda m: print(m, file=sys.stderr, flush=True))
    if spec.parties.deploy:  # the parties' data stays on their nodes: load only the test set
        from lepton_ray.learning.data import load_server_data

        data = load_server_data(spec.data)
    else:
        data = load_federated(spec.data, spec.parties.count, spec.seed)  # data errors before Ray
        if spec.evaluation.federated:  # an empty held-out split too
            from lepton_ray.learning.fed_eval import check_holdout

            check_holdout(data.party_sizes, spec.evaluation.holdout)
    training_path = _check_model(spec, data)  # model errors before Ray too
    if resume and not out.is_dir():
        raise ResumeError(f"--resume {out}: no such directory; nothing to resume")
    with LedgerLock.acquire(out / LEDGER) as lock:
        return _run_locked(spec, data, lock, overwrite=overwrite, resume=resume,
                           num_cpus=num_cpus, on_round=on_round, dashboard=dashboard,
                           embedded=embedded, discard_privacy_ledger=discard_privacy_ledger,
                           training_path=training_path)


def run_with_hosts(spec: JobSpec, data: FederatedData, hosts: HostPool, *, job_id: str,
                   overwrite: bool = False, resume: bool = False, on_round=None,
                   record: Path | None = None) -> RunResult:
    """:func:`run_job` over a given :class:`~actors.hosts.HostPool` (a federation's sites):
    the same round loop, privacy, checkpoints, ``--resume`` and outputs. ``data`` holds only
    the coordinator's test set (standardised); ``job_id`` is the id the hosts accepted.
    ``record`` (test mode): each round's released sum is written there."""
    from lepton_ray.privacy.ledger import LedgerLock

    training_path = _check_model(spec, data)
    out = Path(spec.output.dir)
    if resume and not out.is_dir():
        raise ResumeError(f"--resume {out}: no such directory; nothing to resume")
    with LedgerLock.acquire(out / LEDGER) as lock:
        return _run_locked(spec, data, lock, overwrite=overwrite, resume=resume, num_cpus=None,
                           on_round=on_round, dashboard=False, embedded=True,
                           discard_privacy_ledger=False, training_path=training_path,
                           hosts=hosts, job_id=job_id, record=record)


def _run_locked(spec: JobSpec, data: FederatedData, lock, *, overwrite: bool, resume: bool,
                num_cpus: int | None, on_round, dashboard: bool, embedded: bool,
                discard_privacy_ledger: bool, training_path: str,
                hosts: HostPool | None = None, job_id: str | None = None,
                record: Path | None = None) -> RunResult:
    from actors.metrics import RoundGauges
    from lepton_ray.tracking import Trackers
    from actors.resources import check_cluster

    out = Path(spec.output.dir)
    state = None
    if resume:  # read-only until the job has started: a resume that fails changes no file
        key = _encryption_key(spec)
        if (output_path(out, CHECKPOINT, encrypted=key is not None).exists()
                or not ((out / LEDGER).exists() or (out / AUDIT).exists())):
            state = read_checkpoint(spec, key)
            finished = ((out / SUMMARY).exists()
                        and output_path(out, MODEL, encrypted=key is not None).exists())
            if int(state["round"]) >= spec.rounds and finished:  # else: write the missing files
                return _already_finished(spec, out, int(state["round"]))
        # else: died before its first checkpoint; start from round 1 keeping the ledger (an
        # --overwrite would need --discard-privacy-ledger) and counting what ran
    else:
        prepare_output_dir(out, overwrite=overwrite, discard_privacy_ledger=discard_privacy_ledger,
                           lock=lock)
    trackers = Trackers(spec, out)  # a missing extra fails here, before Ray starts
    ensure_ray(num_cpus, dashboard=dashboard)
    gauges = RoundGauges(spec.name)
    if not embedded:  # a cluster we joined: its GPUs (or its autoscaler's) against the job's
        spec = check_cluster(spec, embedded=False)
    fed = Federation(spec, data, hosts=hosts, job_id=job_id)
    fed.record = record
    fed.ledger_lock = lock
    fed.training_path = training_path
    if resume:
        fed.restore(state)
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    status, reason = "failed", ""
    bar = None
    try:
        fed.start()
        if resume:
            fed.commit_resume()
        bar = _progress(spec, fed.first_round)
        for r in range(fed.first_round, spec.rounds + 1):
            try:
                last = fed.run_round(r)
                trackers.log_round(last, fed.released_stage_seconds())
                gauges.set(last, fed.released_stage_seconds())
                if on_round is not None:
                    on_round(last)
            except BudgetExhaustedError as exc:
                status, reason = "budget_exhausted", user_message(exc)
                print(f"round {r} not run: {reason}", file=sys.stderr, flush=True)
                break
            if bar is not None:
                bar.set_postfix(acc=f"{last['test_accuracy']:.3f}", loss=f"{last['test_loss']:.3f}",
                                **({"eps": f"{fed.epsilon:.2f}"} if fed.epsilon is not None else {}))
                bar.update(1)
        else:
            status = "completed"
    finally:
        if bar is not None:
            bar.close()
        fed.stop()
        if not resume or fed.resumed:  # a resume that never started leaves every file as it was
            if not last and resume:
                last = _last_history_row(out)
            summary = fed.summary(last, status, time.perf_counter() - t0)
            if reason:
                summary["reason"] = reason
            fed.audit.write("job_end", status=status, reason=reason, epsilon=fed.epsilon)
            fed.write_model()
            atomic_write_json(out / SUMMARY, summary)
            trackers.close(out, status, [out / SUMMARY, *sorted(out.glob(f"{MODEL}*"))])
    return RunResult(
        history=read_history(out),
        summary=summary,
        model=fed.model,
        output_dir=out,
        classes=data.classes,
        mean=data.mean,
        scale=data.scale,
    )


def read_checkpoint(spec: JobSpec, key: bytes | None) -> dict[str, Any]:
    """The checkpoint in ``spec.output.dir`` for ``--resume``, checked to belong to the same
    job (:mod:`lepton_ray.resume` names what differs). Reads only."""
    import torch

    from lepton_ray.config import load_spec
    from lepton_ray.resume import check_same_job

    out = Path(spec.output.dir)
    path = output_path(out, CHECKPOINT, encrypted=key is not None)
    if not path.exists():
        raise ResumeError(f"--resume {out}: no {path.name} there; nothing to resume")
    raw = read_output(out, CHECKPOINT, key)  # a wrong key is a clear LeptonError
    try:
        state = torch.load(io.BytesIO(raw), weights_only=False)
    except Exception as exc:  # a checkpoint is written atomically, so this is not ours
        raise ResumeError(f"--resume {out}: cannot read {CHECKPOINT}: {exc}") from None
    check_same_job(load_spec(state["spec"]).to_dict(), spec.to_dict(), out)
    return state


def _already_finished(spec: JobSpec, out: Path, done: int) -> RunResult:
    """``--resume`` of a job whose checkpoint is its last round: say so, touch nothing, and
    return the outputs as they are."""
    import json

    from lepton_ray.result import load_result

    s = json.loads((out / SUMMARY).read_text())
    print(f"{spec.name}: already finished ({s.get('status')}, {done} rounds, "
          f"{spec.rounds} asked); nothing to resume, no file changed", file=sys.stderr, flush=True)
    return load_result(out, key=_encryption_key(spec))


def _last_history_row(out: Path) -> dict[str, Any]:
    try:
        h = read_history(out)
    except LeptonError:
        return {}
    return {} if h.empty else {k: (None if isinstance(v, float) and math.isnan(v) else v)
                               for k, v in h.iloc[-1].to_dict().items()}


def _check_model(spec: JobSpec, data: FederatedData) -> str:
    """Build the model once and check it against the data (a custom factory's output
    shape, DP-SGD on a BatchNorm-like model); say once how parties will be trained."""
    from lepton_ray.learning.custom import validate
    from lepton_ray.learning.models import build_model

    path = validate(spec, data, build_model(spec.model, data.n_features, data.n_classes, seed=spec.seed))
    if path != "vectorised":
        print(f"training {path}", flush=True)
    return path


def _encryption_key(spec: JobSpec) -> bytes | None:
    enc = spec.output.encryption
    if not enc.enabled:
        return None
    from lepton_ray.crypto.at_rest import load_key

    try:
        return load_key(key_file=enc.key_file, key_env=enc.key_env)
    except LeptonError as exc:
        raise ConfigError([f"output.encryption: {exc}"]) from None


def _progress(spec: JobSpec, first_round: int = 1):
    if not spec.output.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=spec.rounds, initial=first_round - 1, desc=spec.name, unit="round",
                file=sys.stderr, dynamic_ncols=True)


@dataclass
class RoundOutcome:
    status: str
    released: Released | None = None
    calls: int = 0
    completed: int = 0
    participants: set = field(default_factory=set)
    dropped: set = field(default_factory=set)
    devices: set = field(default_factory=set)
    rejections: list = field(default_factory=list)
    train_nodes: dict = field(default_factory=dict)  # host -> node its training task ran on


class StageClock:
    """Wall-clock laps of one round, by stage (where the time of a round goes)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self._last
        self._last = now


def _payloads(live: dict) -> list:
    return [payload for _, payload in live.values()]


def _audit_round(row: dict[str, Any], outcome: RoundOutcome, *, dp: bool) -> dict[str, Any]:
    """A round's record in ``audit.jsonl``. Never a party id sampled or dropped (those go to
    ``participants.jsonl`` only when asked). Without DP: the round's counts (totals, from the
    sum) and rejected messages naming the party (the protocol needs to say whom it refused).
    Under DP nothing the accountant did not charge: no count of the sample, of survivors or
    of clipped parties, and rejections only as counts by stage and reason (a named party is
    a member of the secret sample)."""
    if not dp:
        return {"round": row["round"], "status": row["status"], "sampled": row["parties_sampled"],
                "completed": row["parties_completed"], "dropped": len(outcome.dropped),
                "rejections": outcome.rejections, "clipped": row["parties_clipped"]}
    counts: dict[tuple[str, str], int] = {}
    for rej in outcome.rejections:
        key = (rej["stage"], rej["reason"])
        counts[key] = counts.get(key, 0) + 1
    return {"round": row["round"], "status": row["status"],
            "rejections": [{"stage": st, "reason": why, "count": n} for (st, why), n in sorted(counts.items())]}
