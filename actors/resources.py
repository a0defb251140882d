"""Does the cluster a job will run on have the GPUs the job asks for? Checked before any
actor starts, so a job never waits forever on a request no node can meet (Ray's autoscaler
would repeat "No available node types can fulfill resource request" every 35 s).

* The embedded local Ray that ``simulate`` starts itself (no ``RAY_ADDRESS``) is ours: on a
  machine without GPUs, ``training.gpus_per_party > 0`` falls back to the CPU (said once);
  ``training.device: cuda`` cannot, and is refused naming the field.
* A cluster we join (``RAY_ADDRESS``, or a Ray already initialised) is the user's: if no node
  offers the GPUs, its autoscaler is asked for them (``ray.autoscaler.sdk.request_resources``)
  and given :data:`GPU_WAIT_S` seconds to start a node; then the job is refused naming the
  field. An autoscaler whose node types (as Ray reports them) offer no GPU refuses at once.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from lepton_ray.config import Device, JobSpec
from lepton_ray.errors import ConfigError

GPU_WAIT_S = 300.0  # a cloud GPU node takes a few minutes to start


def gpus_asked(spec: JobSpec) -> tuple[float, str]:
    """The largest GPU share one training task asks for, and the field that asks for it."""
    best, where = spec.training.gpus_per_party, "training.gpus_per_party"
    for i, d in enumerate(spec.parties.deploy):
        if d.gpus is not None and d.gpus > best:
            best, where = d.gpus, f"parties.deploy[{i}].gpus"
    return float(best), where


def fits(ask: float, node_gpus: list[float]) -> bool:
    """A task asking ``ask`` GPUs (a fraction, or a whole number) fits on one node."""
    return any(g >= ask for g in node_gpus) if ask > 0 else True


def local_gpu_count() -> int:
    """GPUs an embedded Ray started on this machine would see (Ray's own detection, which
    honours CUDA_VISIBLE_DEVICES), without starting Ray."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        return int(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
    except Exception:  # noqa: BLE001 - a private Ray API: fall back to torch's view
        import torch

        return int(torch.cuda.device_count())


def cpu_fallback(spec: JobSpec) -> JobSpec:
    """The spec with no GPU requested anywhere (``device`` stays as asked)."""
    deploy = tuple(dataclasses.replace(d, gpus=None if d.gpus is None else 0.0)
                   for d in spec.parties.deploy)
    return dataclasses.replace(
        spec, training=dataclasses.replace(spec.training, gpus_per_party=0.0),
        parties=dataclasses.replace(spec.parties, deploy=deploy))


def check_local(spec: JobSpec, n_gpus: int, *, say=print) -> JobSpec:
    """The check for a machine (or embedded Ray) with ``n_gpus`` GPUs: the spec to run."""
    ask, where = gpus_asked(spec)
    if ask <= 0 or fits(ask, [float(n_gpus)]):
        return spec
    if spec.training.device is Device.CUDA:
        raise ConfigError([f"training.device: 'cuda' but this machine has no GPU "
                           f"({where} asks for {ask:g}); use device 'auto' to train on the CPU"])
    say(f"{where}: {ask:g} GPU(s) asked but this machine has {n_gpus}; training on the CPU")
    return cpu_fallback(spec)


def check_cluster(spec: JobSpec, *, embedded: bool, wait_s: float = GPU_WAIT_S) -> JobSpec:
    """Check ``spec``'s GPU request against the Ray this process is connected to; returns
    the spec to run (see the module docstring)."""
    import ray

    ask, where = gpus_asked(spec)
    if ask <= 0:
        return spec

    def node_gpus() -> list[float]:
        return [float(n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]

    if fits(ask, node_gpus()):
        return spec
    if embedded:
        return check_local(spec, int(max(node_gpus(), default=0.0)),
                           say=lambda m: print(m, file=sys.stderr, flush=True))
    offered = _autoscaler_max_gpus()
    if offered is not None and offered < ask:
        raise ConfigError([f"{where}: {ask:g} GPU(s) asked but no node of this cluster has "
                           "them and its autoscaler's node types offer none; set it to 0 "
                           "(CPU) or add GPU nodes"])
    from ray.autoscaler.sdk import request_resources

    print(f"{where}: no node of this cluster offers {ask:g} GPU(s) yet; asked its autoscaler "
          f"for one, waiting up to {wait_s:.0f} s", file=sys.stderr, flush=True)
    request_resources(bundles=[{"GPU": ask}])
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if fits(ask, node_gpus()):
                return spec
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])  # our request only; the job's own tasks keep the node
    raise ConfigError([f"{where}: {ask:g} GPU(s) asked but no node of this cluster offered "
                       f"them within {wait_s:.0f} s; set it to 0 (CPU) or add GPU nodes"])


def _autoscaler_max_gpus() -> float | None:
    """GPUs the cluster's autoscaler could provide, when Ray reports its node types (the v2
    autoscaler does); None when unknown."""
    try:
        import ray._private.state as state

        most = state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private Ray API; unknown is a safe answer
        return None
    return None if most is None else float(most.get("GPU", 0) or 0)
