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


# ---------------------------------------------------------------- the secure sum's layout
import pytest  # noqa: E402

from lepton_ray.learning.fed_eval import check_holdout, choose_evaluators, holdout_split  # noqa: E402
from lepton_ray.learning.party_update import (  # noqa: E402
    LOSS_BOUND,
    Aggregate,
    UpdateRule,
    encode_float,
    encode_ring_batch,
    fold,
    quantization_for,
    ring_to_float,
)


def _party_vectors(k, C, rng, rows=500):
    ev = np.zeros((k, 3 + 3 * C))
    for i in range(k):
        n = int(rng.integers(1, rows + 1))
        correct = int(rng.integers(0, n + 1))
        ev[i, :3] = [rng.uniform(0, 3) * n, correct, n]
        ev[i, 3:] = rng.integers(0, n + 1, size=3 * C)
    return ev


@pytest.mark.parametrize("bits", [32, 64])
def test_ring_sum_of_counts_is_exact_and_equals_the_float_fold(bits):
    rng = np.random.default_rng(1)
    k, d, C, rows = 40, 7, 5, 500
    rule = UpdateRule(clip_norm=1.0, weight_cap=100.0, stats=True, eval_classes=C, eval_rows=rows)
    deltas = rng.normal(size=(k, d)).astype(np.float32)
    examples = rng.integers(1, 100, size=k)
    losses = rng.uniform(0, 3, size=k)
    evals = _party_vectors(k, C, rng, rows)
    quant = quantization_for(n_parties=k, rule=rule, modulus_bits=bits, dim=d)
    batch = encode_ring_batch(deltas, examples, rule, quant, losses=losses, evals=evals)
    ring = batch.rings.sum(axis=0, dtype=batch.rings.dtype)  # wraps mod 2^b like SecAgg
    agg = Aggregate.split(ring_to_float(ring, quant, rule), d, rule)
    # the brute-force sum of the parties' own vectors: counts exact, loss to the quantisation step
    want = evals.sum(axis=0)
    assert np.array_equal(agg.evaluation[1:], want[1:])
    assert agg.evaluation[0] == pytest.approx(want[0], abs=k * rows * LOSS_BOUND / quant.scale)
    # the plaintext path sums the same vector (encode_float of each party, or fold at once)
    total, _ = fold(deltas, examples, rule, losses, evals)
    one_by_one = sum(encode_float(deltas[i], int(examples[i]), rule, losses[i], evals[i])[0]
                     for i in range(k))
    np.testing.assert_allclose(total, one_by_one, rtol=1e-12)
    plain = Aggregate.split(total, d, rule)
    assert np.array_equal(plain.evaluation[1:], want[1:])
    assert plain.evaluation[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(agg.weighted, plain.weighted, atol=k / quant.scale)
    assert agg.mean_loss == pytest.approx(plain.mean_loss, rel=1e-5)


def test_rule_without_evaluation_keeps_the_old_layout():
    rule = UpdateRule(clip_norm=1.0, stats=True)
    assert rule.width(10) == 13 and rule.eval_width == 0
    with_eval = UpdateRule(clip_norm=1.0, stats=True, eval_classes=3, eval_rows=4)
    assert with_eval.width(10) == 13 + 12
    assert with_eval.norm_bound == pytest.approx(np.sqrt(rule.norm_bound**2 + 1))
    with pytest.raises(ValueError, match="evaluation vectors"):
        fold(np.zeros((1, 10)), np.ones(1), with_eval, np.ones(1), None)


def test_count_room_in_the_ring():
    from lepton_ray.errors import ConfigError

    rule = UpdateRule(clip_norm=1.0, eval_classes=2, eval_rows=10**6)
    rule.check_count_room(1000, 32)  # 1e9 < 2^31
    with pytest.raises(ConfigError, match="modulus_bits 64"):
        rule.check_count_room(5000, 32)
    rule.check_count_room(5000, 64)


# ---------------------------------------------------------------- held-out splits, evaluators
def test_holdout_split_is_public_disjoint_and_sized():
    X, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    (Xt, yt), (Xe, ye) = holdout_split(X, y, 0.3, seed=4, party=2)
    assert len(ye) == 3 and len(yt) == 7
    assert sorted(np.concatenate([yt, ye]).tolist()) == list(range(10))
    again = holdout_split(X, y, 0.3, seed=4, party=2)[1][1]
    assert np.array_equal(again, ye)  # from the public seed: reproducible
    assert not np.array_equal(holdout_split(X, y, 0.3, seed=4, party=3)[1][1], ye)


def test_empty_holdout_is_refused_naming_the_parties():
    from lepton_ray.errors import DataError

    assert check_holdout([10, 25, 5], 0.2) == 5
    with pytest.raises(DataError, match=r"at least 5 rows; party 1 has 4 row\(s\)"):
        check_holdout([10, 4, 7], 0.2)


def test_choose_evaluators():
    assert choose_evaluators(6, 1.0).tolist() == list(range(6))
    picked = choose_evaluators(10, 0.3)
    assert len(picked) == 3 and len(set(picked.tolist())) == 3 and picked.max() < 10
    assert len(choose_evaluators(3, 0.01)) == 1  # at least one
    assert len(choose_evaluators(0, 0.5)) == 0


# ---------------------------------------------------------------- config
def test_evaluation_config_defaults_and_problems():
    from lepton_ray.config import load_spec
    from lepton_ray.errors import ConfigError

    spec = load_spec({})
    assert not spec.evaluation.federated and spec.evaluation.fraction == 1.0
    assert spec.evaluation.every == 1
    with pytest.raises(ConfigError) as err:
        load_spec({"evaluation": {"federated": True, "fraction": 0, "every": 0, "holdout": 1.0}})
    text = "\n".join(err.value.problems)
    assert "evaluation.fraction: must be in (0, 1], got 0" in text
    assert "evaluation.every: must be >= 1, got 0" in text
    assert "evaluation.holdout: must be in (0, 1), got 1.0" in text
    with pytest.raises(ConfigError, match="evaluation.fedrated"):
        load_spec({"evaluation": {"fedrated": True}})


@pytest.mark.parametrize("privacy", [{"mode": "user_level"},
                                     {"dp_sgd": {"noise_multiplier": 1.0, "clip_norm": 1.0}}])
def test_federated_evaluation_is_refused_with_differential_privacy(privacy):
    from lepton_ray.config import load_spec
    from lepton_ray.errors import ConfigError

    load_spec({"privacy": privacy})  # fine alone
    with pytest.raises(ConfigError, match="evaluation.federated: not available with differential "
                                          "privacy .*outside the privacy accountant"):
        load_spec({"privacy": privacy, "evaluation": {"federated": True}})


def test_in_round():
    from lepton_ray.config import EvaluationSpec

    ev = EvaluationSpec(federated=True, every=3)
    assert [r for r in range(1, 10) if ev.in_round(r)] == [1, 4, 7]
    assert not EvaluationSpec(every=1).in_round(1)


def test_validate_refuses_an_empty_holdout(cli, capsys):
    assert cli(["validate", "jobs/digits.yaml", "--set", "parties.count=300",
                "--set", "evaluation.federated=true"]) == 2
    assert "evaluation.holdout" in capsys.readouterr().err
    assert cli(["validate", "jobs/digits.yaml", "--set", "evaluation.federated=true"]) == 0
    assert "federated evaluation on" in capsys.readouterr().out


def test_history_header_upgrade(tmp_path):
    from lepton_ray.outputs import HISTORY_COLUMNS, HistoryWriter, read_history

    old = HISTORY_COLUMNS[:-4]
    (tmp_path / "history.csv").write_text(",".join(old) + "\n1,ok" + "," * (len(old) - 2) + "\n")
    HistoryWriter(tmp_path / "history.csv").write({"round": 2, "status": "ok", "fed_examples": 7})
    h = read_history(tmp_path)
    assert list(h.columns) == list(HISTORY_COLUMNS)
    assert h["round"].tolist() == [1, 2] and np.isnan(h["fed_examples"][0])
    assert h["fed_examples"][1] == 7
