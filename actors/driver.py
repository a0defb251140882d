"""The federation driver: starts hosts and the coordinator and runs the round loop.

One round (see shared/DESIGN.md): sample parties -> put the global parameters in the object
store once -> one ``train`` call per host (each trains its sampled parties in a
GPU-allocated task and accumulates locally) -> the coordinator reduces across hosts -> the
server optimiser steps -> evaluate -> history row (fsynced) and checkpoint (atomic).
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

import numpy as np
import ray

from actors.coordinator import SmpcCoordinator
from actors.party_host import PartyHost, StageReport
from lepton_ray.config import JobSpec, SecureAggregation
from lepton_ray.errors import ConfigError
from lepton_ray.learning.data import FederatedData, as_float32, load_federated
from lepton_ray.learning.sampling import round_rng, sample_parties
from lepton_ray.outputs import (
    CHECKPOINT,
    HISTORY,
    MODEL,
    SUMMARY,
    HistoryWriter,
    atomic_write_bytes,
    atomic_write_json,
    read_history,
)
from lepton_ray.result import RunResult

log = logging.getLogger("lepton_ray.driver")

OUTPUT_FILES = (HISTORY, SUMMARY, MODEL, CHECKPOINT, "history.png")


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


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the Ray instance already initialised, or start an embedded local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def prepare_output_dir(out: Path, *, overwrite: bool) -> None:
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise ConfigError(
            [f"output.dir: {out} already holds a job's outputs ({', '.join(existing)}); "
             "choose a new output.dir or pass --overwrite"]
        )
    for f in existing:
        (out / f).unlink()
    out.mkdir(parents=True, exist_ok=True)


def split_hosts(spec: JobSpec, n_cpus: int) -> list[list[int]]:
    n = spec.parties.count
    if spec.parties.per_host:
        n_hosts = math.ceil(n / spec.parties.per_host)
    else:
        n_hosts = max(1, min(n, n_cpus))
    return [list(map(int, block)) for block in np.array_split(np.arange(n), n_hosts)]


class Federation:
    """The driver's state for one job: hosts, coordinator, global model, outputs."""

    def __init__(self, spec: JobSpec, data: FederatedData):
        import torch

        from lepton_ray.learning.models import build_model, flat_parameters
        from lepton_ray.learning.strategies import ServerOptimizer

        self.spec = spec
        self.data = data
        self.out = Path(spec.output.dir)
        self.model = build_model(spec.model, data.n_features, data.n_classes, seed=spec.seed)
        self.params = flat_parameters(self.model)
        self.optimizer = ServerOptimizer(spec.server)
        self.history = HistoryWriter(self.out / HISTORY)
        self.hosts: list[Any] = []
        self.blocks: list[list[int]] = []
        self.coordinator = None
        self.secure = False
        self.dead: set[int] = set()
        self.round_seconds: list[float] = []
        self.ray_calls: list[int] = []
        self.devices: set[str] = set()
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.blocks = split_hosts(self.spec, cpus)
        self.parties = as_float32(self.data.parties)
        self.hosts = [self._new_host(h) for h in range(len(self.blocks))]
        self.coordinator = ray.remote(SmpcCoordinator).options(num_cpus=0).remote(
            self.spec.secure_aggregation.mode
        )
        ray.get([h.ready.remote() for h in self.hosts] + [self.coordinator.ready.remote()])
        self.secure = self.spec.secure_aggregation.mode is not SecureAggregation.NONE
        if self.secure:
            self.keys: dict[int, bytes] = {}
            for part in ray.get([h.public_keys.remote() for h in self.hosts]):
                self.keys.update(part)
            self._update_roster()
            self.job_id = f"{self.spec.name}-{os.urandom(8).hex()}"
            self.weight_cap = float(self.spec.secure_aggregation.weight_cap
                                    or self.data.party_sizes.max())

    def _new_host(self, h: int):
        block = self.blocks[h]
        return ray.remote(PartyHost).options(num_cpus=0).remote(
            h, self.spec, block, [self.parties[p] for p in block],
            self.data.n_features, self.data.n_classes)

    def _update_roster(self) -> None:
        from lepton_ray.crypto.identity import Roster

        # the job's admitted identity keys, party id = index
        self.roster = Roster(tuple(self.keys[p] for p in range(self.spec.parties.count)))

    def restart_dead_hosts(self) -> None:
        """A host that died last round is started again with fresh identity keys for its
        parties (its state died with it); the roster admits the new keys."""
        for h in sorted(self.dead):
            self.hosts[h] = self._new_host(h)
            keys = ray.get(self.hosts[h].public_keys.remote())
            if self.secure:
                self.keys.update(keys)
                self._update_roster()
            print(f"host {h} restarted with fresh keys for parties {self.blocks[h][0]}.."
                  f"{self.blocks[h][-1]}", file=sys.stderr, flush=True)
        self.dead.clear()

    def stop(self) -> None:
        for actor in [*self.hosts, self.coordinator]:
            if actor is not None:
                ray.kill(actor)
        self.hosts, self.coordinator = [], None

    # ------------------------------------------------------------------ one round
    def run_round(self, r: int) -> dict[str, Any]:
        from lepton_ray.learning.evaluate import evaluate
        from lepton_ray.learning.models import load_flat

        t0 = time.perf_counter()
        self.restart_dead_hosts()
        sampled = sample_parties(self.spec.sampling, self.spec.parties.count, round_rng(self.spec.seed, r))
        by_host = {h: [int(p) for p in sampled if block[0] <= p <= block[-1]]
                   for h, block in enumerate(self.blocks)}
        by_host = {h: ps for h, ps in by_host.items() if ps}
        params_ref = ray.put(self.params)
        if not by_host:
            outcome = RoundOutcome(status="no_parties")
        elif self.secure:
            outcome = self._secure_round(r, by_host, params_ref)
        else:
            outcome = self._plain_round(r, by_host, params_ref)
        if outcome.mean is not None:
            self.params = self.optimizer.step(self.params, outcome.mean)
        row: dict[str, Any] = {
            "round": r,
            "status": outcome.status,
            "parties_sampled": len(sampled),
            "parties_completed": outcome.completed,
            "parties_clipped": outcome.clipped,
            "train_loss": outcome.train_loss,
        }
        self.devices.update(outcome.devices)
        load_flat(self.model, self.params)
        row.update(evaluate(self.model, self.data.X_test, self.data.y_test, self.data.n_classes))
        row["round_seconds"] = time.perf_counter() - t0
        self.history.write(row)
        if r % self.spec.output.checkpoint_every == 0 or r == self.spec.rounds:
            self.write_checkpoint(r)
        self.round_seconds.append(row["round_seconds"])
        self.ray_calls.append(outcome.calls)
        return row

    def _plain_round(self, r: int, by_host: dict[int, list[int]], params_ref) -> "RoundOutcome":
        outs = {h: self.hosts[h].train.options(num_returns=2).remote(r, [params_ref], ps)
                for h, ps in by_host.items()}
        live, dropped = self._gather(r, "train", outs, timeout=None)
        calls = len(outs) + sum(rep.ray_calls for rep, _ in live.values())
        reports = [rep for rep, _ in live.values()]
        if not live:
            return RoundOutcome(status="aborted: every host failed", calls=calls)
        total = ray.get(self.coordinator.aggregate.remote(r, *[ref for _, ref in live.values()]))
        return RoundOutcome(
            status="ok", mean=total.mean, calls=calls + 1,
            completed=sum(len(rep.parties) for rep in reports),
            train_loss=_weighted_loss(reports), devices={rep.device for rep in reports},
        )

    def _secure_round(self, r: int, by_host: dict[int, list[int]], params_ref) -> "RoundOutcome":
        """SecAgg+ with four batched stages; each waits at most ``stage_timeout_s`` and a host
        that fails or is late drops its parties from the rest of the round."""
        from lepton_ray.errors import ConfigError as _ConfigError
        from lepton_ray.learning.secure_updates import decode_sum

        sa = self.spec.secure_aggregation
        timeout = sa.stage_timeout_s
        hosts = self.hosts
        try:
            plan = self._plan(r, [p for ps in by_host.values() for p in ps])
        except _ConfigError as exc:  # e.g. too few sampled parties for any threshold
            return RoundOutcome(status=f"aborted: {exc.problems[0]}")
        plan_ref = ray.put(plan)
        calls = 1
        ray.get(self.coordinator.begin.remote(plan_ref))
        c = self.coordinator

        outs = {h: hosts[h].advertise.options(num_returns=2).remote(r, plan_ref, [params_ref], ps)
                for h, ps in by_host.items()}
        live, _ = self._gather(r, "advertise_keys", outs, timeout)
        calls += 2 * len(outs) + 1
        status, broadcast = c.collect_adverts.options(num_returns=2).remote(*_payloads(live))
        if (why := self._aborted(r, status)):
            return RoundOutcome(status=why, calls=calls)

        outs = {h: hosts[h].share_keys.options(num_returns=2).remote(r, broadcast) for h in live}
        live, _ = self._gather(r, "share_keys", outs, timeout)
        calls += len(outs) + 1
        order = list(live)
        routed = c.route_shares.options(num_returns=1 + len(order)).remote(
            [list(live[h][0].parties) for h in order], *_payloads(live))
        if (why := self._aborted(r, routed[0])):
            return RoundOutcome(status=why, calls=calls)

        outs = {h: hosts[h].masked_input.options(num_returns=2).remote(r, routed[1 + i])
                for i, h in enumerate(order)}
        live, _ = self._gather(r, "masked_input", outs, timeout)
        calls += len(outs) + 1
        trained = [rep for rep, _ in live.values()]
        status, request = c.collect_masked.options(num_returns=2).remote(*_payloads(live))
        if (why := self._aborted(r, status)):
            return RoundOutcome(status=why, calls=calls, devices={t.device for t in trained})

        outs = {h: hosts[h].unmask.options(num_returns=2).remote(r, request) for h in live}
        live, _ = self._gather(r, "unmask", outs, timeout)
        calls += len(outs) + 1
        status, result = c.finish.options(num_returns=2).remote(*_payloads(live))
        if (why := self._aborted(r, status)):
            return RoundOutcome(status=why, calls=calls, devices={t.device for t in trained})
        result = ray.get(result)
        weighted, weight = decode_sum(result.total, plan.quantization)
        survivors = set(result.survivors)
        if weight <= 0:
            return RoundOutcome(status="aborted: the survivors' total weight is zero", calls=calls)
        return RoundOutcome(
            status="ok", mean=weighted / weight, calls=calls, completed=len(survivors),
            clipped=sum(t.clipped for t in trained), train_loss=_weighted_loss(trained),
            devices={t.device for t in trained},
        )

    def _plan(self, r: int, participants: list[int]):
        import hashlib

        from lepton_ray.learning.secure_updates import SecureRoundPlan, quantization_for
        from lepton_ray.secagg import COMPLETE_GRAPH, plan_round

        sa = self.spec.secure_aggregation
        neighbours = COMPLETE_GRAPH if sa.mode is SecureAggregation.SECAGG else sa.neighbours
        # public per-round randomness for the neighbour graph, bound to this job and round
        graph_seed = hashlib.sha256(f"lepton-ray/graph/{self.job_id}/{r}".encode()).digest()
        dim = len(self.params) + 1
        config = plan_round(job_id=self.job_id, round_=r, roster=self.roster, dim=dim,
                            graph_seed=graph_seed, participants=sorted(participants),
                            modulus_bits=sa.modulus_bits, neighbours=neighbours,
                            threshold=sa.threshold)
        quant = quantization_for(n_parties=len(participants), clip_norm=sa.clip_norm,
                                 modulus_bits=sa.modulus_bits, dim=dim - 1, scale=sa.scale)
        return SecureRoundPlan(config=config, quantization=quant, weight_cap=self.weight_cap)

    def _gather(self, r: int, stage: str, outs: dict, timeout: float | None):
        """Wait (at most ``timeout`` s) for each host's stage report; returns the hosts that
        answered, ``{host: (report, payload_ref)}``, and the parties lost at this stage."""
        metas = {meta: h for h, (meta, _) in outs.items()}
        ready, late = ray.wait(list(metas), num_returns=len(metas), timeout=timeout)
        live: dict[int, tuple[StageReport, Any]] = {}
        dropped: list[int] = []
        for ref in ready:
            h = metas[ref]
            try:
                report = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if not is_dropout(exc):
                    raise  # a bug or a bad input: surface it, never hide it
                if isinstance(exc, HOST_DEATH):
                    self.dead.add(h)
                print(f"round {r} {stage}: host {h} died; its parties count as dropped "
                      f"({type(exc).__name__})", file=sys.stderr, flush=True)
                continue
            for party, reason in report.failed:
                print(f"round {r} {stage}: party {party} dropped: {reason}", file=sys.stderr, flush=True)
            live[h] = (report, outs[h][1])
        for ref in late:
            print(f"round {r} {stage}: host {metas[ref]} did not answer within {timeout} s; "
                  "its parties count as dropped", file=sys.stderr, flush=True)
        return live, dropped

    def _aborted(self, r: int, status_ref) -> str | None:
        status = ray.get(status_ref)
        for rej in status.rejections:
            print(f"round {r}: rejected {rej}", file=sys.stderr, flush=True)
        if status.ok:
            return None
        print(f"round {r}: aborted, nothing released: {status.reason}", file=sys.stderr, flush=True)
        return f"aborted: {status.reason}"

    # ------------------------------------------------------------------ outputs
    def write_checkpoint(self, r: int) -> None:
        import torch

        state = {
            "round": r,
            "params": self.params,
            "server_state": self.optimizer.state,
            "spec": self.spec.to_dict(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.out / CHECKPOINT, buf.getvalue())

    def write_model(self) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(
            {
                "state_dict": self.model.state_dict(),
                "spec": self.spec.to_dict(),
                "n_features": self.data.n_features,
                "classes": self.data.classes,
                "feature_names": list(self.data.feature_names),
                "mean": self.data.mean,
                "scale": self.data.scale,
            },
            buf,
        )
        atomic_write_bytes(self.out / MODEL, buf.getvalue())

    def summary(self, last: dict[str, Any], status: str, seconds: float) -> dict[str, Any]:
        after_first = self.round_seconds[1:] or self.round_seconds
        return {
            "name": self.spec.name,
            "status": status,
            "rounds_completed": len(self.round_seconds),
            "rounds_planned": self.spec.rounds,
            "parties": self.spec.parties.count,
            "hosts": len(self.blocks),
            "party_sizes": {
                "min": int(self.data.party_sizes.min()),
                "median": float(np.median(self.data.party_sizes)),
                "max": int(self.data.party_sizes.max()),
            },
            "test_rows": int(len(self.data.y_test)),
            "final": {k: last.get(k) for k in ("test_loss", "test_accuracy", "test_precision",
                                               "test_recall", "test_f1")},
            "seconds_total": seconds,
            "seconds_per_round": float(np.mean(after_first)) if after_first else None,
            "first_round_seconds": self.round_seconds[0] if self.round_seconds else None,
            "ray_calls_per_round": float(np.mean(self.ray_calls)) if self.ray_calls else None,
            "devices": sorted(self.devices),
            "secure_aggregation": self.spec.secure_aggregation.mode.value,
            "spec": self.spec.to_dict(),
        }


def run_job(spec: JobSpec, *, overwrite: bool = False, num_cpus: int | None = None) -> RunResult:
    out = Path(spec.output.dir)
    data = load_federated(spec.data, spec.parties.count, spec.seed)  # data errors before Ray
    prepare_output_dir(out, overwrite=overwrite)
    ensure_ray(num_cpus)
    fed = Federation(spec, data)
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    status = "failed"
    bar = _progress(spec)
    try:
        fed.start()
        for r in range(1, spec.rounds + 1):
            last = fed.run_round(r)
            if bar is not None:
                bar.set_postfix(acc=f"{last['test_accuracy']:.3f}", loss=f"{last['test_loss']:.3f}")
                bar.update(1)
        status = "completed"
    finally:
        if bar is not None:
            bar.close()
        fed.stop()
        summary = fed.summary(last, status, time.perf_counter() - t0)
        fed.write_model()
        atomic_write_json(out / SUMMARY, summary)
    return RunResult(
        history=read_history(out),
        summary=summary,
        model=fed.model,
        output_dir=out,
        classes=data.classes,
        mean=data.mean,
        scale=data.scale,
    )


def _progress(spec: JobSpec):
    if not spec.output.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=spec.rounds, desc=spec.name, unit="round", file=sys.stderr, dynamic_ncols=True)


@dataclass
class RoundOutcome:
    status: str
    mean: np.ndarray | None = None
    calls: int = 0
    completed: int = 0
    clipped: int = 0
    train_loss: float = float("nan")
    devices: set = field(default_factory=set)


def _payloads(live: dict) -> list:
    return [payload for _, payload in live.values()]


def _weighted_loss(reports: list[StageReport]) -> float:
    weights = np.array([rep.examples for rep in reports], dtype=float)
    if not len(weights) or weights.sum() <= 0:
        return float("nan")
    return float(np.average([rep.train_loss for rep in reports], weights=weights))
