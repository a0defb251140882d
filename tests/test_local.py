import numpy as np
import torch

from lepton_ray.config import ModelKind, ModelSpec, TrainingSpec
from lepton_ray.learning.evaluate import evaluate
from lepton_ray.learning.local import party_seed, train_parties
from lepton_ray.learning.models import build_model, flat_parameters, load_flat

rng = np.random.default_rng(0)
X = rng.normal(size=(40, 5)).astype(np.float32)
y = rng.integers(0, 3, 40)
LOGISTIC = ModelSpec(kind=ModelKind.LOGISTIC)


def run(training, datasets=((X, y),), seeds=(1,), spec=LOGISTIC):
    params = flat_parameters(build_model(spec, 5, 3, seed=0))
    return params, train_parties(model_spec=spec, training=training, n_features=5, n_classes=3,
                                 global_params=params, datasets=list(datasets), seeds=list(seeds))


def test_one_full_batch_sgd_step_matches_numpy_gradient():
    params, res = run(TrainingSpec(lr=0.5, batch_size=40, epochs=1))
    W = params[:15].reshape(3, 5).astype(np.float64)
    b = params[15:].astype(np.float64)
    logits = X @ W.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(40), y] -= 1  # d(mean CE)/d(logits) * 40
    gW, gb = p.T @ X / 40, p.mean(axis=0)
    np.testing.assert_allclose(res.deltas[0], -0.5 * np.concatenate([gW.ravel(), gb]), atol=1e-6)
    assert res.examples.tolist() == [40]


def test_deterministic_under_seed_and_seed_matters():
    t = TrainingSpec(lr=0.1, batch_size=8, epochs=2)
    _, a = run(t, seeds=(3,))
    _, b = run(t, seeds=(3,))
    _, c = run(t, seeds=(4,))
    assert np.array_equal(a.deltas, b.deltas)
    assert not np.array_equal(a.deltas, c.deltas)


def test_fedprox_pulls_towards_global():
    free = run(TrainingSpec(lr=0.1, batch_size=8, epochs=5))[1].deltas
    prox = run(TrainingSpec(lr=0.1, batch_size=8, epochs=5, proximal_mu=5.0))[1].deltas
    assert np.linalg.norm(prox) < 0.8 * np.linalg.norm(free)


def test_party_order_does_not_matter():
    t = TrainingSpec(lr=0.1, batch_size=8)
    X2, y2 = X[:20], y[:20]
    _, ab = run(t, datasets=((X, y), (X2, y2)), seeds=(1, 2), spec=ModelSpec(hidden=(8,)))
    _, ba = run(t, datasets=((X2, y2), (X, y)), seeds=(2, 1), spec=ModelSpec(hidden=(8,)))
    np.testing.assert_array_equal(ab.deltas, ba.deltas[::-1])


def test_party_seed_is_secret_and_fresh():
    """Attack: the seed used to be party_seed(spec.seed, round, party), so anyone with the
    spec re-ran a party's training; now every call draws 256 fresh OS bits."""
    seeds = {party_seed() for _ in range(25)}
    assert len(seeds) == 25 and max(seeds) >= 1 << 64


def test_load_flat_copies_and_checks_shape():
    model = build_model(LOGISTIC, 5, 3)
    v = np.arange(18, dtype=np.float32)
    v.setflags(write=False)  # like a buffer in Ray's object store
    load_flat(model, v)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # must not write through to v
    assert v[0] == 0.0
    try:
        load_flat(model, np.zeros(3, dtype=np.float32))
    except ValueError as exc:
        assert "model needs (18,)" in str(exc)


def test_evaluate_loss_matches_sklearn_log_loss():
    from sklearn.metrics import f1_score, log_loss

    model = build_model(ModelSpec(hidden=(8,)), 5, 3, seed=1)
    m = evaluate(model, X, y, 3)
    with torch.no_grad():
        proba = torch.softmax(model(torch.tensor(X)).double(), 1).numpy()
    assert abs(m["test_loss"] - log_loss(y, proba, labels=[0, 1, 2])) < 1e-5
    assert abs(m["test_f1"] - f1_score(y, proba.argmax(1), average="macro", zero_division=0)) < 1e-12
