"""Federated evaluation end to end (marked ``ray``): the totals in history.csv equal a
brute-force evaluation of the same global model on every party's held-out rows, computed
here party by party with plain torch and scikit-learn and summed, through the plaintext sum
and through SecAgg+."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score

import lepton_ray
from lepton_ray.config import load_spec
from lepton_ray.learning.data import load_federated
from lepton_ray.learning.fed_eval import holdout_split
from lepton_ray.learning.models import build_model

pytestmark = pytest.mark.ray

FED = ["fed_loss", "fed_accuracy", "fed_f1", "fed_examples"]


def _held_out(spec):
    data = load_federated(spec.data, spec.parties.count, spec.seed)
    return data, [holdout_split(X.astype(np.float32), y, spec.evaluation.holdout, spec.seed, p)[1]
                  for p, (X, y) in enumerate(data.parties)]


def _brute_force(model, parties, n_classes):
    """Per party: summed cross-entropy, correct count, confusion matrix (sklearn); summed over
    parties, then the metrics."""
    loss_sum, correct, n = 0.0, 0, 0
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    ys, preds = [], []
    model.eval()
    for X, y in parties:
        with torch.no_grad():
            logits = model(torch.as_tensor(X)).double()
        pred = logits.argmax(dim=1).numpy()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y),
                                                            reduction="sum"))
        correct += int((pred == y).sum())
        n += len(y)
        cm += confusion_matrix(y, pred, labels=np.arange(n_classes))
        ys.append(y)
        preds.append(pred)
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean()
    # the summed confusion counts give scikit-learn's macro F1 of all the rows at once
    assert f1 == pytest.approx(f1_score(np.concatenate(ys), np.concatenate(preds), average="macro",
                                        labels=np.arange(n_classes), zero_division=0), abs=1e-12)
    return {"fed_loss": loss_sum / n, "fed_accuracy": correct / n, "fed_f1": f1, "fed_examples": n}


def _check(row, expected, *, loss_rtol):
    assert int(row["fed_examples"]) == expected["fed_examples"]
    # history.csv keeps 6 significant digits
    assert row["fed_accuracy"] == pytest.approx(expected["fed_accuracy"], rel=1e-5)
    assert row["fed_f1"] == pytest.approx(expected["fed_f1"], rel=1e-5)
    assert row["fed_loss"] == pytest.approx(expected["fed_loss"], rel=loss_rtol)


@pytest.fixture
def fed_job(small_job):
    return {**small_job, "rounds": 1, "evaluation": {"federated": True},
            "training": {**small_job["training"], "deterministic_seeds": True}}


@pytest.mark.parametrize("mode", ["none", "secagg+"])
def test_totals_equal_brute_force_per_party_evaluation(ray_session, fed_job, tmp_path, mode):
    fed_job["secure_aggregation"] = {"mode": mode}
    fed_job["output"]["dir"] = str(tmp_path / "one")
    spec = load_spec(fed_job)
    data, parties = _held_out(spec)
    first = lepton_ray.run(fed_job)
    # round 1: the initial global model (public: built from the spec's seed)
    initial = build_model(spec.model, data.n_features, data.n_classes, seed=spec.seed)
    expected = _brute_force(initial, parties, data.n_classes)
    assert expected["fed_examples"] == sum(int(np.floor(len(y) * 0.2)) for _, y in data.parties)
    # plaintext: float64 sums; SecAgg+: the counts are exact ring integers, the loss sum is
    # quantised (step E L / scale per party)
    _check(first.history.iloc[0], expected, loss_rtol=1e-5)
    if mode == "none":  # round 2 evaluates the model after round 1 (deterministic here)
        second = lepton_ray.run(fed_job, rounds=2, output__dir=str(tmp_path / "two"))
        _check(second.history.iloc[0], expected, loss_rtol=1e-5)
        after_one = _brute_force(first.model, parties, data.n_classes)
        assert after_one["fed_accuracy"] != expected["fed_accuracy"]
        _check(second.history.iloc[1], after_one, loss_rtol=1e-5)


def test_every_and_fraction(ray_session, fed_job, tmp_path):
    h = lepton_ray.run(fed_job, rounds=3, evaluation__every=2, evaluation__fraction=0.5).history
    assert list(h.columns[-4:]) == FED
    assert h.loc[1, FED].isna().all()  # round 2 does not evaluate: blank
    spec = load_spec(fed_job)
    _, parties = _held_out(spec)
    # half the 6 sampled parties evaluate: the examples are those of some 3 of them
    subsets = {sum(len(parties[i][1]) for i in c) for c in itertools.combinations(range(6), 3)}
    for r in (0, 2):
        assert int(h.loc[r, "fed_examples"]) in subsets
        assert 0 <= h.loc[r, "fed_accuracy"] <= 1
