"""What may change when a job is resumed, and what may not. Pure: dicts in, messages out.

A job is its spec minus how and where it runs. ``--resume`` continues the job whose
checkpoint is in ``OUT`` only with the same job: the same data, model, training, protocol and
privacy settings (otherwise the rounds before and after the checkpoint would belong to two
different jobs under one ledger). What may change: how many rounds (``rounds``), the output
options (``output.dir``, ``output.progress``, ``output.checkpoint_every``) and the resources
the training tasks ask for (``training.gpus_per_party``, ``cpus_per_task``, ``memory_mb``,
``device``, ``parties.per_host``): a job started on a GPU machine may finish on a CPU one.
"""

from __future__ import annotations

from typing import Any

from lepton_ray.errors import ResumeError

RESUMABLE_FIELDS = frozenset({
    "rounds",
    "output.dir", "output.progress", "output.checkpoint_every",
    "training.gpus_per_party", "training.cpus_per_task", "training.memory_mb", "training.device",
    "parties.per_host",
})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def spec_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"path: saved -> now"`` for every field (outside :data:`RESUMABLE_FIELDS`) whose value
    differs between two specs given as ``JobSpec.to_dict()``."""
    a, b = _flatten(saved), _flatten(now)
    diffs = []
    for path in sorted(set(a) | set(b)):
        if path in RESUMABLE_FIELDS:
            continue
        if a.get(path) != b.get(path):
            diffs.append(f"{path}: {a.get(path)!r} -> {b.get(path)!r}")
    return diffs


def check_same_job(saved: dict[str, Any], now: dict[str, Any], out: Any) -> None:
    """Raise :class:`ResumeError` naming every field that differs (see module docstring)."""
    diffs = spec_differences(saved, now)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ResumeError(
            f"--resume {out}: the spec differs from the one the job started with in "
            f"{len(diffs)} field(s) (checkpoint -> now): {shown}. Only rounds, the output "
            "options and the training resources may change on resume")
