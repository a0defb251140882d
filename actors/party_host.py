"""PartyHost: one Ray actor hosting one or many federated parties.

Simulation runs about one host per CPU, each hosting N/W parties; a deployment runs one
host per party on that party's node. Every exchange is batched: one call per round stage
carries the work of all the parties this host holds, so Ray calls grow with hosts, not
parties. The host holds state (its parties' data, in the object store once) and moves
messages; training happens in :func:`actors.training.train_task`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from lepton_ray.config import JobSpec
from lepton_ray.learning.aggregation import PartialSum
from lepton_ray.learning.local import party_seed


@dataclass(frozen=True)
class HostReport:
    """Small per-round metadata the driver reads (the update itself travels separately)."""

    host: int
    completed: tuple[int, ...]
    examples: int
    train_loss: float
    device: str
    ray_calls: int


class PartyHost:
    def __init__(self, host: int, spec: JobSpec, party_ids: list[int], datasets: list,
                 n_features: int, n_classes: int):
        self.host = host
        self.spec = spec
        self.party_ids = list(party_ids)
        self.index = {p: i for i, p in enumerate(self.party_ids)}
        self.n_features = n_features
        self.n_classes = n_classes
        self.data_ref = ray.put(datasets)  # once; every round's task reads the same ref

    def ready(self) -> int:
        return len(self.party_ids)

    def train(self, round_: int, params_box: list, sampled: list[int]) -> tuple[HostReport, PartialSum]:
        """Train ``sampled`` (global party ids hosted here) from the global parameters in
        ``params_box[0]`` (an ObjectRef, boxed so Ray hands it on without fetching it)."""
        from actors.training import train_task

        picks = [self.index[p] for p in sampled]
        seeds = [party_seed(self.spec.seed, round_, p) for p in sampled]
        t = self.spec.training
        task = train_task.options(num_gpus=t.gpus_per_party, num_cpus=1)
        (partial, losses, examples), device = ray.get(
            task.remote(self.spec, self.n_features, self.n_classes, params_box[0],
                        self.data_ref, picks, seeds, fold=True)
        )
        report = HostReport(
            host=self.host,
            completed=tuple(sampled),
            examples=int(examples.sum()),
            train_loss=float(np.average(losses, weights=examples)) if len(losses) else float("nan"),
            device=device,
            ray_calls=1,
        )
        return report, partial
