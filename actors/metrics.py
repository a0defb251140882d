"""Round metrics as Ray metrics (``ray.util.metrics``), for Ray's dashboard / Prometheus.

One gauge per history column (``lepton_ray_<name>``, tagged with the job name), set after
each round from the same row that goes to ``history.csv``: aggregate values only."""

from __future__ import annotations

import re
from typing import Any

from lepton_ray.tracking import round_scalars


class RoundGauges:
    def __init__(self, job: str):
        self.job = job
        self._gauges: dict[str, Any] = {}

    def set(self, row: dict[str, Any], stage_seconds: dict[str, float] | None = None) -> None:
        from ray.util.metrics import Gauge

        for k, v in round_scalars(row, stage_seconds).items():
            name = "lepton_ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)
            g = self._gauges.get(name)
            if g is None:
                g = self._gauges[name] = Gauge(name, description=f"Lepton-Ray round metric {k}",
                                               tag_keys=("job",))
            g.set(v, tags={"job": self.job})
