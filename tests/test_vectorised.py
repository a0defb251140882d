"""Vectorised training gives the same model as training the parties one by one."""

import numpy as np
import pytest
import torch

from lepton_ray.config import ModelKind, ModelSpec, OptimizerKind, TrainingSpec
from lepton_ray.learning.local import train_parties
from lepton_ray.learning.models import build_model, flat_parameters
from lepton_ray.learning.vectorised import schedule, train_parties_vectorised

rng = np.random.default_rng(0)
SIZES = [1, 5, 33, 64, 100, 7, 32, 2]  # unequal, incl. exact multiples of the batch and a single row
DATASETS = [(rng.normal(size=(n, 12)).astype(np.float32), rng.integers(0, 4, n)) for n in SIZES]
SEEDS = [101 + i for i in range(len(SIZES))]


@pytest.mark.parametrize(
    "model, training",
    [
        (ModelSpec(kind=ModelKind.LOGISTIC), TrainingSpec(lr=0.2, batch_size=16)),
        (ModelSpec(hidden=(16,)), TrainingSpec(lr=0.1, batch_size=32)),
        (ModelSpec(hidden=(16, 8)), TrainingSpec(lr=0.05, momentum=0.9, epochs=3, batch_size=8)),
        (ModelSpec(hidden=(16,)), TrainingSpec(optimizer=OptimizerKind.ADAM, lr=0.01, epochs=2, batch_size=16)),
        (ModelSpec(hidden=(16,)), TrainingSpec(lr=0.1, proximal_mu=0.5, epochs=2, batch_size=4)),
    ],
)
def test_vectorised_equals_one_by_one(model, training):
    params = flat_parameters(build_model(model, 12, 4, seed=3))
    kw = dict(model_spec=model, training=training, n_features=12, n_classes=4,
              global_params=params, datasets=DATASETS, seeds=SEEDS)
    one = train_parties(**kw)
    vec = train_parties_vectorised(**kw)
    assert np.abs(one.deltas).max() > 1e-3  # the parties really trained
    np.testing.assert_allclose(vec.deltas, one.deltas, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(vec.losses, one.losses, rtol=1e-5)
    np.testing.assert_array_equal(vec.examples, one.examples)


def test_schedule_covers_each_partys_rows_once_per_epoch():
    sched = schedule([5, 3], [1, 2], epochs=2, batch=2)
    assert sched.shape == (2, 6, 2)
    for i, n in enumerate([5, 3]):
        per_epoch = -(-n // 2)
        for e in range(2):
            rows = sched[i, e * per_epoch : (e + 1) * per_epoch].ravel()
            assert sorted(rows[rows >= 0].tolist()) == list(range(n))
    # the same order torch.randperm draws in the one-by-one loop
    gen = torch.Generator().manual_seed(1)
    assert sched[0, :3].ravel()[:5].tolist() == torch.randperm(5, generator=gen).tolist()


def test_single_party_and_repeated_calls_reuse_workspace():
    model, training = ModelSpec(hidden=(8,)), TrainingSpec(lr=0.1)
    params = flat_parameters(build_model(model, 12, 4))
    kw = dict(model_spec=model, training=training, n_features=12, n_classes=4, global_params=params)
    big = train_parties_vectorised(datasets=DATASETS, seeds=SEEDS, **kw)
    small = train_parties_vectorised(datasets=DATASETS[:1], seeds=SEEDS[:1], **kw)
    np.testing.assert_allclose(small.deltas[0], big.deltas[0], atol=1e-7)
    big.deltas[0] += 1  # results are the caller's own arrays, not views of the workspace
    again = train_parties_vectorised(datasets=DATASETS[:1], seeds=SEEDS[:1], **kw)
    np.testing.assert_allclose(again.deltas[0], small.deltas[0], atol=1e-7)
