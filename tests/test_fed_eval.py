"""Federated evaluation statistics: the sum of the parties' vectors gives the metrics of a
brute-force evaluation of all their rows (scikit-learn as the oracle)."""

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss

from lepton_ray.learning.fed_eval import metrics_from_sum, party_eval_stats


def test_summed_party_statistics_equal_brute_force_evaluation():
    torch.manual_seed(0)
    C = 4
    model = torch.nn.Linear(5, C)
    rng = np.random.default_rng(0)
    parties = []
    for n in (7, 1, 30, 12, 0):
        X = rng.normal(size=(n, 5)).astype(np.float32)
        y = rng.integers(0, C - 1, size=n)  # class 3 never occurs: zero support
        parties.append((X, y))
    total = sum(party_eval_stats(model, X, y, C) for X, y in parties)
    got = metrics_from_sum(total, C)
    X = np.concatenate([X for X, _ in parties])
    y = np.concatenate([y for _, y in parties])
    with torch.no_grad():
        logits = model(torch.as_tensor(X))
    proba = torch.softmax(logits.double(), dim=1).numpy()
    pred = proba.argmax(axis=1)
    assert got["fed_examples"] == len(y) == 50
    assert got["fed_accuracy"] == accuracy_score(y, pred)
    np.testing.assert_allclose(got["fed_loss"], log_loss(y, proba, labels=np.arange(C)), rtol=1e-6)
    np.testing.assert_allclose(got["fed_f1"], f1_score(y, pred, average="macro", labels=np.arange(C),
                                                       zero_division=0), rtol=1e-12)
