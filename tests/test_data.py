import numpy as np
import pandas as pd
import pytest

from lepton_ray.config import load_spec
from lepton_ray.errors import DataError
from lepton_ray.learning.data import load_federated
from lepton_ray.learning.partition import partition_column, partition_dirichlet, partition_iid


def assert_disjoint_cover(shards, n):
    allrows = np.concatenate(shards)
    assert len(allrows) == n
    assert np.array_equal(np.sort(allrows), np.arange(n))


def test_iid_is_a_balanced_disjoint_cover():
    shards = partition_iid(103, 10, np.random.default_rng(0))
    assert_disjoint_cover(shards, 103)
    assert {len(s) for s in shards} == {10, 11}


def test_dirichlet_cover_and_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 200)

    def mean_classes_per_party(alpha):
        shards = partition_dirichlet(labels, 20, alpha, np.random.default_rng(1))
        assert_disjoint_cover(shards, len(labels))
        assert min(len(s) for s in shards) >= 1
        # brute force: count classes that hold >= 5% of each party's rows
        counts = [np.bincount(labels[s], minlength=10) / len(s) for s in shards]
        return np.mean([(c >= 0.05).sum() for c in counts])

    assert mean_classes_per_party(0.1) < mean_classes_per_party(1.0) < mean_classes_per_party(100.0)
    assert mean_classes_per_party(100.0) >= 9.5  # near IID


def test_dirichlet_min_size_respected_even_with_tiny_alpha():
    labels = np.repeat(np.arange(3), 30)
    shards = partition_dirichlet(labels, 30, 0.01, np.random.default_rng(0), min_size=2)
    assert_disjoint_cover(shards, 90)
    assert min(len(s) for s in shards) >= 2


def test_column_partition_one_party_per_value():
    groups = np.array(["b", "a", "b", "c", "a"])
    shards = partition_column(groups, 3, column="hospital")
    assert [groups[s].tolist() for s in shards] == [["a", "a"], ["b", "b"], ["c"]]
    with pytest.raises(DataError, match="parties.count: is 2 but data.partition.column 'hospital' has 3"):
        partition_column(groups, 2, column="hospital")


@pytest.mark.parametrize("source,features,classes", [("digits", 64, 10), ("breast_cancer", 30, 2), ("wine", 13, 3)])
def test_builtin_sources(source, features, classes):
    spec = load_spec({"data": {"source": source}, "parties": {"count": 5}})
    data = load_federated(spec.data, 5, 0)
    assert data.n_features == features and data.n_classes == classes
    n_train = sum(len(y) for _, y in data.parties)
    assert abs(len(data.y_test) / (n_train + len(data.y_test)) - 0.2) < 0.01
    # standardised on the training rows
    X_train = np.concatenate([X for X, _ in data.parties])
    assert np.allclose(X_train.mean(axis=0), 0, atol=1e-9)


def test_split_is_stratified_and_deterministic():
    spec = load_spec({"data": {"source": "digits"}})
    a = load_federated(spec.data, 10, 7)
    b = load_federated(spec.data, 10, 7)
    assert np.array_equal(a.y_test, b.y_test)
    share = np.bincount(a.y_test) / len(a.y_test)
    assert np.all(np.abs(share - 0.1) < 0.02)


def test_synthetic_source_size():
    spec = load_spec({"data": {"source": "synthetic", "synthetic": {"samples": 500, "features": 7,
                                                                     "informative": 4, "classes": 3}}})
    data = load_federated(spec.data, 4, 0)
    assert data.n_features == 7 and data.n_classes == 3
    assert sum(len(y) for _, y in data.parties) + len(data.y_test) == 500


def _frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.normal(50, 10, n),
        "bp": rng.normal(120, 15, n),
        "hospital": np.array(["north", "south", "east"])[np.arange(n) % 3],
        "outcome": np.array(["sick", "well"])[rng.integers(0, 2, n)],
    })


def test_csv_with_natural_split_and_string_labels(tmp_path):
    path = tmp_path / "h.csv"
    _frame().to_csv(path, index=False)
    spec = load_spec({"data": {"source": "csv", "path": str(path), "label": "outcome",
                               "partition": {"kind": "column", "column": "hospital"}},
                      "parties": {"count": 3}})
    data = load_federated(spec.data, 3, 0)
    assert data.feature_names == ("age", "bp")  # grouping column is not a feature
    assert list(data.classes) == ["sick", "well"]
    assert sum(len(y) for _, y in data.parties) == 48


def test_parquet_source(tmp_path):
    path = tmp_path / "h.parquet"
    _frame().drop(columns=["hospital"]).to_parquet(path)
    spec = load_spec({"data": {"source": "parquet", "path": str(path), "label": "outcome"},
                      "parties": {"count": 4}})
    assert load_federated(spec.data, 4, 0).n_features == 2


def test_party_files(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"party{i}.csv"
        _frame(20, seed=i).drop(columns=["hospital"]).to_csv(p, index=False)
        paths.append(str(p))
    test = tmp_path / "test.csv"
    _frame(30, seed=9).drop(columns=["hospital"]).to_csv(test, index=False)
    spec = load_spec({"data": {"source": "party_files", "party_paths": paths, "test_path": str(test),
                               "label": "outcome"}, "parties": {"count": 3}})
    data = load_federated(spec.data, 3, 0)
    assert [len(y) for _, y in data.parties] == [20, 20, 20]
    assert len(data.y_test) == 30


def test_missing_values_and_too_many_parties(tmp_path):
    f = _frame()
    f.loc[3, "age"] = np.nan
    path = tmp_path / "m.csv"
    f.to_csv(path, index=False)
    spec = load_spec({"data": {"source": "csv", "path": str(path), "label": "outcome",
                               "features": ["age", "bp"]}})
    with pytest.raises(DataError, match="non-finite feature values in rows \\[3\\]"):
        load_federated(spec.data, 2, 0)
    spec = load_spec({"data": {"source": "wine"}, "parties": {"count": 500}})
    with pytest.raises(DataError, match="parties.count: 500 parties but only 142 training rows"):
        load_federated(spec.data, 500, 0)
