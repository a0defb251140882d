"""Experiment tracking: TensorBoard event files and MLflow runs, both optional extras.

``output.tensorboard: true`` writes scalars under ``OUTPUT_DIR/tensorboard/`` with
``torch.utils.tensorboard`` (needs ``pip install lepton-ray[tensorboard]``);
``output.mlflow: {tracking_uri, experiment}`` logs the flattened spec as params, every
round's metrics (step = round) and, at the end, ``summary.json`` and the final model file
(needs ``pip install lepton-ray[mlflow]``). Only what the job already releases is logged:
the history row (aggregate metrics after secure aggregation and DP), stage times and
epsilon; nothing per party. A missing extra is an error at job start naming the
``pip install`` to run, not a silent no-op.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lepton_ray.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


def round_scalars(row: dict[str, Any], stage_seconds: dict[str, float] | None = None) -> dict[str, float]:
    """The numbers of a history row worth a curve: finite floats, plus ``dropouts``
    (sampled minus completed) and ``stage/<name>`` seconds."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    if "parties_sampled" in row and "parties_completed" in row:
        out["dropouts"] = float(row["parties_sampled"] - row["parties_completed"])
    for k, v in (stage_seconds or {}).items():
        out[f"stage/{k}"] = float(v)
    return out


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested spec dict as ``{"training.lr": "0.1", ...}`` (MLFlow params are strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class Trackers:
    """Everything a job logs to, opened at start, fed each round, closed at the end."""

    def __init__(self, spec, out_dir: Path):
        self.tb = None
        self.mlflow = None
        o = spec.output
        if o.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(["output.tensorboard: needs the tensorboard package "
                                   "(pip install 'lepton-ray[tensorboard]')"]) from None
            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR))
        if o.mlflow.enabled:
            try:
                import mlflow
            except ImportError:
                raise ConfigError(["output.mlflow: needs the mlflow package "
                                   "(pip install 'lepton-ray[mlflow]')"]) from None
            mlflow.set_tracking_uri(o.mlflow.tracking_uri)
            mlflow.set_experiment(o.mlflow.experiment)
            self.mlflow = mlflow
            self.run = mlflow.start_run(run_name=spec.name)
            params = flat_params(spec.to_dict())
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i: i + 100]))

    def log_round(self, row: dict[str, Any], stage_seconds: dict[str, float] | None = None) -> None:
        r = int(row["round"])
        scalars = round_scalars(row, stage_seconds)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, global_step=r)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=r)

    def close(self, out_dir: Path, status: str, artifacts: list[Path] = ()) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            for path in artifacts:
                if Path(path).exists():
                    self.mlflow.log_artifact(str(path))
            self.mlflow.end_run(status="FINISHED" if status == "completed" else "FAILED")
