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
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.coordinator import SmpcCoordinator
from actors.party_host import HostReport, PartyHost
from lepton_ray.config import JobSpec
from lepton_ray.errors import ConfigError, LeptonError
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
        self.round_seconds: list[float] = []
        self.ray_calls: list[int] = []
        self.devices: set[str] = set()
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.blocks = split_hosts(self.spec, cpus)
        parties = as_float32(self.data.parties)
        host_cls = ray.remote(PartyHost).options(num_cpus=0)
        self.hosts = [
            host_cls.remote(h, self.spec, block, [parties[p] for p in block],
                            self.data.n_features, self.data.n_classes)
            for h, block in enumerate(self.blocks)
        ]
        self.coordinator = ray.remote(SmpcCoordinator).options(num_cpus=0).remote(
            self.spec.secure_aggregation.mode
        )
        ray.get([h.ready.remote() for h in self.hosts] + [self.coordinator.ready.remote()])

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
        sampled = sample_parties(self.spec.sampling, self.spec.parties.count, round_rng(self.spec.seed, r))
        params_ref = ray.put(self.params)
        metas, partials, calls = [], [], 0
        for block, host in zip(self.blocks, self.hosts):
            mine = [int(p) for p in sampled if block[0] <= p <= block[-1]]
            if not mine:
                continue
            meta, partial = host.train.options(num_returns=2).remote(r, [params_ref], mine)
            metas.append(meta)
            partials.append(partial)
            calls += 1
        reports: list[HostReport] = []
        good_partials = []
        for meta, partial in zip(metas, partials):
            try:
                reports.append(ray.get(meta))
                good_partials.append(partial)
            except ray.exceptions.RayError as exc:
                if not is_dropout(exc):
                    raise  # a bug or a bad input in training: surface it, never hide it
                print(f"round {r}: a host or its training task died; its parties count as "
                      f"dropped ({type(exc).__name__})", file=sys.stderr, flush=True)
        row: dict[str, Any] = {
            "round": r,
            "parties_sampled": len(sampled),
            "parties_completed": sum(len(rep.completed) for rep in reports),
            "parties_clipped": 0,
        }
        if good_partials:
            total = ray.get(self.coordinator.aggregate.remote(r, *good_partials))
            calls += 1
            self.params = self.optimizer.step(self.params, total.mean)
            row["status"] = "ok"
            weights = np.array([rep.examples for rep in reports], dtype=float)
            losses = np.array([rep.train_loss for rep in reports])
            row["train_loss"] = float(np.average(losses, weights=weights))
        else:
            row["status"] = "no_parties"
        calls += sum(rep.ray_calls for rep in reports)
        self.devices.update(rep.device for rep in reports)
        load_flat(self.model, self.params)
        row.update(evaluate(self.model, self.data.X_test, self.data.y_test, self.data.n_classes))
        row["round_seconds"] = time.perf_counter() - t0
        self.history.write(row)
        if r % self.spec.output.checkpoint_every == 0 or r == self.spec.rounds:
            self.write_checkpoint(r)
        self.round_seconds.append(row["round_seconds"])
        self.ray_calls.append(calls)
        return row

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
