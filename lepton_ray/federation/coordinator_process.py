"""``lepton-ray coordinator``: the coordinator of a federation across organisations.

It starts its own Ray (embedded, or ``--address``) for the driver's ``SmpcCoordinator`` and
``DpAccountant``, serves the gRPC endpoint (mutual TLS, :class:`.transport.CoordinatorServer`),
waits for sites, offers them the job (its spec as data; each site's policy accepts or refuses
it, and a refusal is recorded with its reason), standardises (without DP: a SecAgg+ secure sum
of the sites' moments, :mod:`.stats`), and then runs **the driver's round loop**
(:class:`actors.driver.Federation`, the same code as ``simulate``) over the sites as its hosts
(:class:`.site_hosts.SiteHosts`): sampling, SecAgg+ with the consistency check, central or
distributed DP with the write-ahead ledger, the server optimiser, evaluation on the
coordinator's test file, checkpoints and the same outputs as ``simulate``.

A site that disconnects or fails a stage is a dropout; SecAgg+ survives down to the threshold,
below it the round is recorded aborted and the model does not move. A site that comes back
(reconnects, or its process restarts) is offered the job again and rejoins at the next round.
``--resume OUT`` continues a job from its checkpoint under a fresh job id: sites reconnect to
the restarted coordinator, are offered the job again, and every re-run round is a new
execution under a new transcript (charged again by the coordinator's ledger and each site's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray.errors import ConfigError, FederationError



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
    if spec.evaluation.federated:
        problems.append("evaluation.federated: not run across sites yet (the held-out split "
                        "needs each site's row count); evaluate on the coordinator's test_path")
    if spec.privacy.dp_sgd.enabled:
        problems.append("privacy.dp_sgd: record-level DP-SGD is each site's own choice of "
                        "training; a federation job runs user-level DP (privacy.mode)")
    if problems:
        raise ConfigError(problems)
    offered = spec.to_dict()
    offered["data"] = {k: v for k, v in offered["data"].items() if k != "party_paths"}
    return spec, offered


def run_coordinator(*, kit: str, job: str, min_parties: int | None = None, wait_s: float = 300.0,
                    out: str | None = None, overwrite: bool = False, listen: str | None = None,
                    record: str | None = None, overrides: dict | None = None,
                    resume: bool = False, address: str | None = None) -> int:
    """The ``lepton-ray coordinator`` command (see the module docstring)."""
    import yaml

    from actors.driver import OUTPUT_FILES, run_with_hosts
    from lepton_ray.federation.party_process import start_own_ray
    from lepton_ray.federation.provision import load_kit
    from lepton_ray.federation.site_hosts import SiteHosts
    from lepton_ray.federation.transport import CoordinatorServer
    from lepton_ray.learning.data import FederatedData, read_frame, table_from_frame

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
    if resume and not out_dir.is_dir():
        raise ConfigError([f"--resume: {out_dir} does not exist; nothing to resume"])
    existing = [f for f in OUTPUT_FILES if (out_dir / f).exists()]
    if existing and not (overwrite or resume):  # before any site is asked for anything
        raise ConfigError([f"output.dir: {out_dir} already holds a job's outputs "
                           f"({', '.join(existing)}); choose another --out, pass --overwrite, "
                           "or --resume it"])
    need = len(names) if min_parties is None else int(min_parties)
    if not 2 <= need <= len(names):
        raise ConfigError([f"--min-parties: {need}; must be in 2..{len(names)}"])
    test = table_from_frame(
        read_frame(Path(spec.data.test_path or ""), spec.data.source, field="data.test_path"),
        spec.data, group_column=None, where=f"data.test_path '{spec.data.test_path}'")
    host, port = None, None
    if listen:
        host, _, p = listen.rpartition(":")
        host, port = host or None, int(p)
    start_own_ray(address)
    server = CoordinatorServer(ckit, host=host, port=port).start()
    # a fresh job id on every start, --resume included: each round's transcript binds the job
    # id, so no round ever runs twice under one transcript (sites also refuse a (job, round)
    # they took part in); the resumed job's rounds are new executions, charged again
    job_id = f"{spec.name}-{os.urandom(8).hex()}"
    sites = SiteHosts(ckit, server, job_id=job_id, spec=spec, offered=offered, test=test)
    status = "failed"
    try:
        print(f"coordinator of {ckit.federation}: job {job_id} ({spec.name}, {spec.rounds} "
              f"rounds, {spec.secure_aggregation.mode.value}, privacy {spec.privacy.mode.value}"
              f"{', resuming ' + str(out_dir) if resume else ''}); listening on port "
              f"{server.port}, waiting up to {wait_s:g} s for {need} of {len(names)} sites",
              flush=True)
        sessions = server.wait_for(need, timeout=wait_s)
        if len(sessions) < need:
            raise FederationError(f"only {len(sessions)} site(s) connected within {wait_s:g} s "
                                  f"({', '.join(sorted(sessions)) or 'none'}); --min-parties {need}")
        print(f"sites connected: {', '.join(sorted(sessions))}", flush=True)
        accepted = sites.admit(sessions)
        if len(accepted) < 2:
            raise FederationError(f"{len(accepted)} site(s) accepted the job; a secure job "
                                  "needs at least 2")
        sites.standardise(accepted)
        data = FederatedData(parties=(), X_test=((test.X - sites.mean) / sites.scale).astype(np.float32),
                             y_test=test.y, classes=test.classes, feature_names=test.feature_names,
                             mean=sites.mean, scale=sites.scale)

        def show(row):
            done = row.get("parties_completed")
            print(f"round {row['round']:>3}: {row['status']:<8} sites "
                  f"{'-' if done is None else done}/{row.get('parties_sampled') or '-'}  test "
                  f"accuracy {row['test_accuracy']:.4f}  loss {row['test_loss']:.4f}"
                  + (f"  ({row['round_seconds']:.2f} s)" if row.get("round_seconds") else "")
                  + (f"  epsilon {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""),
                  flush=True)

        result = run_with_hosts(spec, data, sites, job_id=job_id, overwrite=overwrite,
                                resume=resume, on_round=show,
                                record=Path(record) if record else None)
        status = result.summary.get("status", "failed")
        print(f"{status}: final test accuracy {result.summary['final']['test_accuracy']}; "
              f"outputs in {out_dir}", flush=True)
    finally:
        sites.finish(status)
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


def say(text: str) -> None:
    print(f"[coordinator] {text}", file=sys.stderr, flush=True)
