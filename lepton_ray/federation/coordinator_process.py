"""``lepton-ray coordinator``: the coordinator of a federation across organisations.

It serves the gRPC endpoint (mutual TLS, :class:`.transport.CoordinatorServer`), waits for
sites, offers them the job (its spec as data; each site's policy accepts or refuses it, and a
refusal is recorded with its reason), computes the standardisation statistics through a
SecAgg+ secure sum of the sites' moments (round 0; :mod:`.stats`), then runs the rounds:
params out to every live accepted site (:class:`.wire.TrainRound`), one SecAgg+ round
(:func:`.site.drive_round`, the real :class:`~lepton_ray.secagg.server.SecAggServer`), the
sum dequantised and split (:class:`~lepton_ray.learning.party_update.Aggregate`), the server
optimiser's step, evaluation on the coordinator's test file and the same outputs as
``simulate``: ``history.csv``, ``summary.json``, ``model.pt`` (and ``audit.jsonl``).

A site that disconnects or fails a stage is a dropout; SecAgg+ survives down to the threshold,
below it the round is recorded aborted and the model does not move. A site that comes back
(reconnects, or its process restarts) is offered the job again and rejoins at the next round.

What this does **not** share with ``actors/driver.py`` yet: the round loop here is a second,
smaller copy (no Ray on the coordinator, no privacy accounting, no checkpoint/``--resume``);
the issue's single round loop over "Ray handles or federation links" is the next step.
Differentially private jobs are refused here (central noise needs the ``SmpcCoordinator``
and ``DpAccountant`` of the driver).
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray.errors import (ConfigError, FederationError, LeptonError, ProtocolError,
                               ThresholdError)
from lepton_ray.federation import wire

SETUP_ROUND = 0  # the secure sum of the sites' moments runs as round 0 of the job


def job_from_file(raw: Mapping[str, Any], roster_size: int, names: list[str]):
    """``(spec, offered)``: the validated job for ``roster_size`` sites and the dict sent to
    them. A spec's ``data.party_paths`` (e.g. a simulation spec reused) is dropped from the
    offer: the coordinator never names a site's data (each site's policy refuses a spec
    that does); locally each slot holds a placeholder naming the site."""
    from lepton_ray.config import SecureAggregation, load_spec

    if not isinstance(raw, Mapping):
        raise ConfigError(["job spec: expected a mapping"])
    raw = dict(raw)
    data = dict(raw.get("data") or {})
    if data.pop("party_paths", None):
        say("note: data.party_paths dropped from the job: each site reads its own --data")
    parties = dict(raw.get("parties") or {})
    count = parties.get("count", roster_size)
    if count != roster_size:
        raise ConfigError([f"parties.count: {count}, but the federation's roster has "
                           f"{roster_size} parties (one per site)"])
    parties["count"] = roster_size
    placeholder = [f"site:{n}" for n in names]
    spec = load_spec({**raw, "parties": parties, "data": {**data, "party_paths": placeholder}})
    problems = []
    if spec.secure_aggregation.mode is SecureAggregation.NONE:
        problems.append("secure_aggregation.mode: none; a federation job runs SecAgg+ or SecAgg")
    if spec.privacy.enabled or spec.privacy.dp_sgd.enabled:
        problems.append("privacy: differentially private jobs are not run by the federation "
                        "coordinator yet (privacy.mode: none)")
    if spec.sampling.kind.value != "all":
        problems.append("sampling.kind: a federation round takes every live site (kind: all)")
    if problems:
        raise ConfigError(problems)
    offered = spec.to_dict()
    offered["data"] = {k: v for k, v in offered["data"].items() if k != "party_paths"}
    return spec, offered


class Coordinator:
    """One job across the connected sites (see the module docstring)."""

    def __init__(self, kit, spec, offered: dict, out: Path, *, server,
                 record: Path | None = None):
        import torch

        from lepton_ray.learning.data import read_frame, table_from_frame
        from lepton_ray.learning.models import build_model, flat_parameters
        from lepton_ray.learning.strategies import ServerOptimizer
        from lepton_ray.outputs import AUDIT, HISTORY, AuditLog, HistoryWriter

        self.kit, self.spec, self.offered, self.out = kit, spec, offered, out
        self.server = server
        self.record = record
        self.roster = kit.roster.secagg_roster()
        self.names = {e.index: e.id for e in kit.roster.parties}
        self.test = table_from_frame(
            read_frame(Path(spec.data.test_path or ""), spec.data.source, field="data.test_path"),
            spec.data, group_column=None, where=f"data.test_path '{spec.data.test_path}'")
        self.n_features, self.n_classes = self.test.X.shape[1], len(self.test.classes)
        self.model = build_model(spec.model, self.n_features, self.n_classes, seed=spec.seed)
        self.params = flat_parameters(self.model)
        self.optimizer = ServerOptimizer(spec.server)
        self.job_id = f"{spec.name}-{os.urandom(8).hex()}"
        self.history = HistoryWriter(out / HISTORY)
        self.audit = AuditLog(out / AUDIT)
        self.sites: dict[str, dict[str, Any]] = {}  # site -> status, reason, session
        self.mean = np.zeros(self.n_features)
        self.scale = np.ones(self.n_features)
        self.rows = 0
        self.round_seconds: list[float] = []
        self.bytes: list[dict[str, dict[str, int]]] = []
        self.X_test = self.test.X.astype(np.float32)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

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
                refused[site] = _why(exc)
        for site, reason in refused.items():
            self.sites[site] = {"status": "refused", "reason": reason}
            self.audit.write("site_refused", site=site, reason=reason)
            say(f"site {site} refused the job: {reason}")
        for site, session in ready.items():
            self.sites[site] = {"status": "accepted", "session": session.session}
            self.audit.write("site_accepted", site=site, party=session.index)
        return ready

    def live_sites(self) -> dict[str, Any]:
        """The accepted sites connected now; a site whose session changed (it reconnected or
        restarted) is offered the job again and sent the statistics before it rejoins."""
        live = {}
        back = {}
        for site, session in self.server.live().items():
            info = self.sites.get(site)
            if info is None or info["status"] != "accepted":
                continue
            if info.get("session") == session.session:
                live[site] = session
            else:
                back[site] = session
        if back:
            say(f"sites back: {', '.join(sorted(back))}; offering the job again")
            for site, session in self.admit(back).items():
                try:
                    session.call("standardise", self._standardisation(), timeout=60)
                    live[site] = session
                except Exception as exc:  # noqa: BLE001
                    say(f"site {site}: {_why(exc)}")
        return live

    # ------------------------------------------------------------------ setup
    def standardise(self, sessions: Mapping[str, Any]) -> dict[str, Any]:
        """Round 0: the secure sum of the sites' moments -> pooled row count, mean, scale."""
        from lepton_ray.federation.site import drive_round
        from lepton_ray.federation.stats import decode_moments, moments_width

        features = self.n_features if self.spec.data.standardize else 0
        config = self._config(SETUP_ROUND, sessions, moments_width(features), modulus_bits=64)
        outcome = drive_round(config, sessions, stage_timeout=self.spec.secure_aggregation.stage_timeout_s)
        for site, why in outcome.dropped.items():
            say(f"standardisation: site {site} dropped: {why}")
        self.rows, mean, scale = decode_moments(outcome.result.total, features)
        if features:
            self.mean, self.scale = mean, scale
        say(f"standardisation: secure sum over {len(outcome.result.survivors)} sites, "
            f"{self.rows} training rows" + (", pooled mean and scale sent to the sites"
                                            if features else ""))
        self.audit.write("standardisation", sites=len(outcome.result.survivors), rows=self.rows,
                         standardize=bool(features))
        survivors = {self.names[p] for p in outcome.result.survivors}
        live = {s: v for s, v in sessions.items() if s in survivors}
        message = self._standardisation()
        for site, fut in {s: v.call_async("standardise", message) for s, v in live.items()}.items():
            fut.result(timeout=60)
        self.X_test = ((self.test.X - self.mean) / self.scale).astype(np.float32)
        return live

    def _standardisation(self) -> wire.Standardisation:
        return wire.Standardisation(job_id=self.job_id, mean=np.asarray(self.mean, np.float64),
                                    scale=np.asarray(self.scale, np.float64))

    def _config(self, r: int, sessions: Mapping[str, Any], dim: int, *, modulus_bits: int):
        from lepton_ray.secagg import JobPins

        pins = JobPins.for_job(self.job_id, self.roster, self.spec.secure_aggregation)
        return pins.plan(roster=self.roster, round_=r, dim=dim, modulus_bits=modulus_bits,
                         participants=sorted(v.index for v in sessions.values()))

    # ------------------------------------------------------------------ one round
    def run_round(self, r: int) -> dict[str, Any]:
        """Params out, one SecAgg+ round, the server step, evaluation, one history row."""
        from lepton_ray.federation.site import drive_round
        from lepton_ray.learning.evaluate import evaluate
        from lepton_ray.learning.models import load_flat
        from lepton_ray.learning.party_update import (Aggregate, UpdateRule, quantization_for,
                                                      ring_to_float)

        t0 = time.perf_counter()
        sa = self.spec.secure_aggregation
        sessions = self.live_sites()
        weight_cap = float(sa.weight_cap or self.rows)  # N >= every n_i: exact FedAvg weights
        rule = UpdateRule(clip_norm=sa.clip_norm, weight_cap=weight_cap, stats=True)
        row: dict[str, Any] = {"round": r, "parties_sampled": len(sessions), "epsilon": None}
        agg, dropped = None, {}
        try:
            if len(sessions) < 2:
                raise ThresholdError(f"{len(sessions)} live site(s); a secure round needs 2")
            quant = quantization_for(n_parties=len(sessions), rule=rule,
                                     modulus_bits=sa.modulus_bits, dim=len(self.params),
                                     scale=sa.scale)
            message = wire.TrainRound(job_id=self.job_id, round=r, params=self.params, rule=rule,
                                      quantization=quant)
            for site, fut in {s: v.call_async("train", message) for s, v in sessions.items()}.items():
                try:
                    fut.result(timeout=sa.stage_timeout_s)
                except Exception as exc:  # noqa: BLE001 - that site drops out of this round
                    dropped[site] = f"train: {_why(exc)}"
                    sessions.pop(site)
            if len(sessions) < 2:
                raise ThresholdError(f"{len(sessions)} site(s) took the round's parameters")
            config = self._config(r, sessions, rule.width(len(self.params)),
                                  modulus_bits=sa.modulus_bits)
            outcome = drive_round(config, sessions, stage_timeout=sa.stage_timeout_s)
            dropped.update(outcome.dropped)
            self.bytes.append({"to_site": outcome.bytes_out, "from_site": outcome.bytes_in})
            if self.record is not None:
                self.record.mkdir(parents=True, exist_ok=True)
                np.save(self.record / f"{self.job_id}-round-{r}.npy", outcome.result.total)
                np.save(self.record / f"{self.job_id}-round-{r}-survivors.npy",
                        np.asarray(outcome.result.survivors))
            total = ring_to_float(outcome.result.total, quant)
            agg = Aggregate.split(total, len(self.params), rule)
            if agg.weight > 0:
                self.params = self.optimizer.step(self.params, agg.weighted / agg.weight)
            row.update(status="ok", parties_completed=len(outcome.result.survivors),
                       parties_clipped=agg.clipped_count, train_loss=agg.mean_loss)
        except (ThresholdError, ProtocolError, FederationError) as exc:
            row.update(status=f"aborted: {exc}", parties_completed=0, parties_clipped=None,
                       train_loss=float("nan"))
            say(f"round {r}: aborted, nothing released: {exc}")
        for site, why in dropped.items():
            say(f"round {r}: site {site} dropped: {why}")
        load_flat(self.model, self.params)
        row.update(evaluate(self.model, self.X_test, self.test.y, self.n_classes))
        row["round_seconds"] = time.perf_counter() - t0
        self.round_seconds.append(row["round_seconds"])
        self.audit.write("round", round=r, status=row["status"], sites=row["parties_sampled"],
                         completed=row["parties_completed"], dropped=sorted(dropped))
        self.history.write(row)
        return row

    # ------------------------------------------------------------------ outputs
    def finish(self, status: str, last: dict[str, Any], seconds: float) -> dict[str, Any]:
        from lepton_ray.outputs import SUMMARY, atomic_write_json

        for session in self.server.live().values():
            try:
                session.call("finish", self.job_id, status, timeout=10)
            except Exception:  # noqa: BLE001 - a site that is gone needs no goodbye
                pass
        self.write_model()
        after_first = self.round_seconds[1:] or self.round_seconds
        summary = {
            "name": self.spec.name, "status": status, "job_id": self.job_id,
            "mode": "federation", "federation": self.kit.federation,
            "roster_hash": self.kit.roster.roster_hash,
            "rounds_completed": len(self.round_seconds), "rounds_planned": self.spec.rounds,
            "parties": len(self.roster),
            "sites": {s: {k: v for k, v in info.items() if k != "session"}
                      for s, info in sorted(self.sites.items())},
            "training_rows": self.rows, "test_rows": int(len(self.test.y)),
            "final": {k: last.get(k) for k in ("test_loss", "test_accuracy", "test_precision",
                                               "test_recall", "test_f1")},
            "seconds_total": seconds,
            "seconds_per_round": float(np.mean(after_first)) if after_first else None,
            "secagg_bytes_last_round": self.bytes[-1] if self.bytes else None,
            "secure_aggregation": self.spec.secure_aggregation.mode.value,
            "privacy": {"mode": self.spec.privacy.mode.value},
            "spec": self.offered,
        }
        atomic_write_json(self.out / SUMMARY, summary)
        self.audit.write("job_end", status=status)
        return summary

    def write_model(self) -> None:
        import torch

        from lepton_ray.outputs import MODEL, write_output

        buf = io.BytesIO()
        torch.save({"state_dict": self.model.state_dict(), "spec": self.offered,
                    "n_features": self.n_features, "classes": self.test.classes,
                    "feature_names": list(self.test.feature_names), "mean": self.mean,
                    "scale": self.scale}, buf)
        write_output(self.out, MODEL, buf.getvalue(), None)


def run_coordinator(*, kit: str, job: str, min_parties: int | None = None, wait_s: float = 300.0,
                    out: str | None = None, overwrite: bool = False, listen: str | None = None,
                    record: str | None = None, overrides: dict | None = None) -> int:
    """The ``lepton-ray coordinator`` command (see the module docstring)."""
    import yaml

    from lepton_ray.federation.provision import load_kit
    from lepton_ray.federation.transport import CoordinatorServer
    from lepton_ray.outputs import HISTORY, MODEL, SUMMARY

    ckit = load_kit(kit)
    if ckit.identity is not None:
        raise FederationError(f"--kit {kit}: a party's kit; the coordinator needs KITS/coordinator")
    try:
        raw = yaml.safe_load(Path(job).read_text())
    except FileNotFoundError:
        raise ConfigError([f"job spec not found: {job}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"job spec {job}: not valid YAML: {exc}"]) from None
    raw = _apply(raw, overrides or {})
    if out is not None:
        raw["output"] = {**(raw.get("output") or {}), "dir": out}
    names = [e.id for e in sorted(ckit.roster.parties, key=lambda e: e.index)]
    spec, offered = job_from_file(raw, len(names), names)
    out_dir = Path(spec.output.dir)
    existing = [f for f in (HISTORY, SUMMARY, MODEL, "audit.jsonl") if (out_dir / f).exists()]
    if existing and not overwrite:
        raise ConfigError([f"output.dir: {out_dir} already holds a job's outputs "
                           f"({', '.join(existing)}); choose another --out or pass --overwrite"])
    for f in existing:
        (out_dir / f).unlink()
    need = len(names) if min_parties is None else int(min_parties)
    if not 2 <= need <= len(names):
        raise ConfigError([f"--min-parties: {need}; must be in 2..{len(names)}"])
    host, port = None, None
    if listen:
        host, _, p = listen.rpartition(":")
        host, port = host or None, int(p)
    server = CoordinatorServer(ckit, host=host, port=port).start()
    t0 = time.perf_counter()
    status, last = "failed", {}
    coord = None
    try:
        coord = Coordinator(ckit, spec, offered, out_dir, server=server,
                            record=Path(record) if record else None)
        print(f"coordinator of {ckit.federation}: job {coord.job_id} ({spec.name}, "
              f"{spec.rounds} rounds, {spec.secure_aggregation.mode.value}); listening on port "
              f"{server.port}, waiting up to {wait_s:g} s for {need} of {len(names)} sites",
              flush=True)
        sessions = server.wait_for(need, timeout=wait_s)
        if len(sessions) < need:
            raise FederationError(f"only {len(sessions)} site(s) connected within {wait_s:g} s "
                                  f"({', '.join(sorted(sessions)) or 'none'}); --min-parties {need}")
        print(f"sites connected: {', '.join(sorted(sessions))}", flush=True)
        accepted = coord.admit(sessions)
        if len(accepted) < 2:
            raise FederationError(f"{len(accepted)} site(s) accepted the job; a secure job "
                                  "needs at least 2")
        coord.standardise(accepted)
        for r in range(1, spec.rounds + 1):
            last = coord.run_round(r)
            print(f"round {r:>3}: {last['status']:<8} sites {last['parties_completed']}/"
                  f"{last['parties_sampled']}  test accuracy {last['test_accuracy']:.4f}  "
                  f"loss {last['test_loss']:.4f}  ({last['round_seconds']:.2f} s)", flush=True)
        status = "completed"
    finally:
        if coord is not None:
            summary = coord.finish(status, last, time.perf_counter() - t0)
            print(f"{status}: final test accuracy {summary['final']['test_accuracy']}; outputs "
                  f"in {out_dir}", flush=True)
        server.stop()
    return 0


def _apply(raw: Any, overrides: dict) -> Any:
    """``--set a.b=v`` overrides on the raw YAML mapping."""
    if not overrides:
        return raw
    raw = dict(raw or {})
    for key, value in overrides.items():
        node = raw
        parts = key.split("__")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return raw


def _why(exc: BaseException) -> str:
    if isinstance(exc, futures.TimeoutError):
        return "no answer in time"
    if isinstance(exc, LeptonError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def say(text: str) -> None:
    print(f"[coordinator] {text}", file=sys.stderr, flush=True)
