"""Server optimisers: turn the aggregated delta into the next global parameters.

Pure numpy. The averaged client delta ``Delta_t`` is a pseudo-gradient (Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2; the sign is such that ``x + Delta`` is the
plain FedAvg step):

* FedAvg:     ``x <- x + eta * Delta``
* FedAdagrad: ``m <- b1 m + (1-b1) Delta;  v <- v + Delta^2``
* FedYogi:    ``m <- ...;  v <- v - (1-b2) Delta^2 sign(v - Delta^2)``
* FedAdam:    ``m <- ...;  v <- b2 v + (1-b2) Delta^2``
* adaptive:   ``x <- x + eta * m / (sqrt(v) + tau)``, ``v_{-1} = tau^2``

As in the paper there is no bias correction. The state (m, v) is a plain dict of arrays so a
checkpoint can carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lepton_ray.config import ServerSpec, StrategyKind


@dataclass
class ServerOptimizer:
    spec: ServerSpec
    state: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Return new parameters; ``delta`` is the weighted mean of the parties' deltas."""
        if delta.shape != params.shape:
            raise ValueError(f"aggregate delta has shape {delta.shape}, parameters {params.shape}")
        s = self.spec
        delta = delta.astype(np.float64)
        if s.strategy is StrategyKind.FEDAVG:
            return (params + s.lr * delta).astype(params.dtype)
        m = self.state.get("m")
        v = self.state.get("v")
        if m is None or v is None:
            m = np.zeros_like(delta)
            v = np.full_like(delta, s.tau**2)
        m = s.beta1 * m + (1.0 - s.beta1) * delta
        sq = delta * delta
        if s.strategy is StrategyKind.FEDADAGRAD:
            v = v + sq
        elif s.strategy is StrategyKind.FEDYOGI:
            v = v - (1.0 - s.beta2) * sq * np.sign(v - sq)
        else:
            v = s.beta2 * v + (1.0 - s.beta2) * sq
        self.state = {"m": m, "v": v}
        return (params + s.lr * m / (np.sqrt(v) + s.tau)).astype(params.dtype)
