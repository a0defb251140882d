"""Server optimisers against independent oracles: torch.optim.Adagrad for FedAdagrad (b1=0),
and scalar loops written from Reddi et al. 2021, Algorithm 2, for FedAdam and FedYogi."""

import math

import numpy as np
import pytest
import torch

from lepton_ray.config import ServerSpec, StrategyKind
from lepton_ray.learning.aggregation import PartialSum, reduce
from lepton_ray.learning.party_update import Aggregate, UpdateRule, fold
from lepton_ray.learning.strategies import ServerOptimizer

rng = np.random.default_rng(0)
DELTAS = [rng.normal(size=5) for _ in range(6)]
X0 = rng.normal(size=5)


def test_fedavg_weighted_mean_over_hosts_equals_numpy():
    deltas = rng.normal(size=(7, 5)).astype(np.float32)
    weights = np.array([3, 1, 4, 1, 5, 9, 2])
    rule = UpdateRule(clip_norm=None, weight_cap=9.0)
    parts = [fold(deltas[:3], weights[:3], rule)[0], fold(deltas[3:], weights[3:], rule)[0]]
    total = reduce([PartialSum(total=p, parties=1) for p in parts])
    agg = Aggregate.split(total.total, 5, rule)
    np.testing.assert_allclose(agg.weighted / agg.weight, np.average(deltas, axis=0, weights=weights), rtol=1e-6)
    opt = ServerOptimizer(ServerSpec(strategy=StrategyKind.FEDAVG, lr=1.0))
    mean = agg.weighted / agg.weight
    np.testing.assert_allclose(opt.step(X0, mean), X0 + mean)


def test_fedadagrad_matches_torch_adagrad():
    tau, lr = 1e-2, 0.1
    opt = ServerOptimizer(ServerSpec(strategy=StrategyKind.FEDADAGRAD, lr=lr, beta1=0.0, tau=tau))
    p = torch.tensor(X0, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.Adagrad([p], lr=lr, eps=tau, initial_accumulator_value=tau**2)
    x = X0.copy()
    for d in DELTAS:
        x = opt.step(x, d)
        p.grad = torch.tensor(-d)  # the pseudo-gradient is minus the delta
        ref.step()
    np.testing.assert_allclose(x, p.detach().numpy(), rtol=1e-10)


@pytest.mark.parametrize("kind", [StrategyKind.FEDADAM, StrategyKind.FEDYOGI])
def test_adaptive_matches_scalar_reference(kind):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.05
    opt = ServerOptimizer(ServerSpec(strategy=kind, lr=lr, beta1=b1, beta2=b2, tau=tau))
    x = X0.copy()
    for d in DELTAS:
        x = opt.step(x, d)
    for j in range(len(X0)):  # one coordinate at a time, straight from the paper
        xj, m, v = X0[j], 0.0, tau**2
        for d in DELTAS:
            g = d[j]
            m = b1 * m + (1 - b1) * g
            if kind is StrategyKind.FEDADAM:
                v = b2 * v + (1 - b2) * g * g
            else:
                v = v - (1 - b2) * g * g * math.copysign(1.0, v - g * g)
            xj = xj + lr * m / (math.sqrt(v) + tau)
        assert math.isclose(x[j], xj, rel_tol=1e-12)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="aggregate delta has shape"):
        ServerOptimizer(ServerSpec()).step(X0, np.zeros(3))
