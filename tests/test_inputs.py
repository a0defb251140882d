"""What a new user feeds in: every bad, empty, tiny, missing or mismatched input is refused
at validation (``lepton-ray validate``, exit 2) with a message naming the field, the column,
the rows or the party. Ray-free: ``validate`` loads the spec and the data only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lepton_ray.config import load_spec
from lepton_ray.errors import ConfigError, DataError
from lepton_ray.learning.data import load_federated


def _hospitals(sizes: dict[str, int], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for h, n in sizes.items():
        for i in range(n):
            rows.append({"f0": rng.normal(), "f1": rng.normal(), "hospital": h,
                         "outcome": ["sick", "well"][i % 2]})
    return pd.DataFrame(rows)


def _csv_spec(path, count, **data):
    return {"data": {"source": "csv", "path": str(path), "label": "outcome", **data},
            "parties": {"count": count}}


# ----------------------------------------------------------------------- bug 2: target leakage
def test_label_listed_as_a_feature_is_refused(tmp_path, cli, capsys):
    """Today's code trains on the answer (accuracy 1.0) without a word."""
    path = tmp_path / "p.csv"
    _hospitals({"a": 20, "b": 20}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"data.features: lists the label 'outcome'"):
        load_spec(_csv_spec(path, 2, features=["f0", "outcome"]))
    code = cli(["validate", "jobs/digits.yaml", "--set", "data.source=csv",
                "--set", f"data.path={path}", "--set", "data.label=outcome",
                "--set", "data.features=[f0, outcome]"])
    assert code == 2
    assert "data.features: lists the label 'outcome'" in capsys.readouterr().err


def test_empty_and_repeated_feature_lists_are_refused(tmp_path):
    path = tmp_path / "p.csv"
    with pytest.raises(ConfigError) as err:
        load_spec(_csv_spec(path, 2, features=[]))
    assert "data.features: empty" in str(err.value)
    with pytest.raises(ConfigError, match=r"data.features: repeated column\(s\) f0"):
        load_spec(_csv_spec(path, 2, features=["f0", "f1", "f0"]))


# ------------------------------------------------------- bug 5: missing value in partition column
def test_missing_partition_value_names_the_column_and_rows(tmp_path, cli, capsys):
    """Today: TypeError: '<' not supported between instances of 'str' and 'float'."""
    frame = _hospitals({"north": 10, "south": 10})
    frame.loc[[3, 12], "hospital"] = np.nan
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    spec = load_spec(_csv_spec(path, 2, partition={"kind": "column", "column": "hospital"}))
    with pytest.raises(DataError, match=r"column 'hospital' has 2 missing value\(s\).*rows 3, 12"):
        load_federated(spec.data, 2, 0)
    code = cli(["validate", "jobs/digits.yaml", "--set", "data.source=csv", "--set", f"data.path={path}",
                "--set", "data.label=outcome", "--set", "data.partition={kind: column, column: hospital}",
                "--set", "parties.count=2"])
    err = capsys.readouterr().err
    assert code == 2 and "data.partition.column" in err and "Traceback" not in err


def test_partition_column_that_mixes_numbers_and_text_still_partitions(tmp_path):
    frame = _hospitals({"north": 10, "south": 10, "7": 10})
    frame["hospital"] = frame["hospital"].map({"north": "north", "south": "south", "7": 7})
    path = tmp_path / "p.csv"
    frame.to_csv(path, index=False)
    spec = load_spec(_csv_spec(path, 3, partition={"kind": "column", "column": "hospital"}))
    data = load_federated(spec.data, 3, 0)
    assert data.party_sizes.tolist() == [8, 8, 8]


# ------------------------------------------------------------- minimum party size, after the split
def test_tiny_party_named_and_check_independent_of_the_seed(tmp_path):
    """A 2-row hospital: with the test split taken before partitioning (today), whether the
    spec validates depends on the seed (the split may take both rows). Now the split is
    taken inside each party, so the party keeps 2 - floor(2 * 0.2) = 2 rows whatever the
    seed, and min_size names it."""
    path = tmp_path / "p.csv"
    _hospitals({"big": 40, "mid": 30, "tiny": 2}).to_csv(path, index=False)
    spec = load_spec(_csv_spec(path, 3, partition={"kind": "column", "column": "hospital"}))
    sizes = {tuple(load_federated(spec.data, 3, seed).party_sizes.tolist()) for seed in range(30)}
    assert sizes == {(32, 24, 2)}
    spec = load_spec(_csv_spec(path, 3, partition={"kind": "column", "column": "hospital",
                                                   "min_size": 5}))
    with pytest.raises(DataError, match=r"data.partition.min_size: every party needs at least 5 "
                                        r"training row\(s\).*party 2 \(hospital = 'tiny'\) has 2"):
        load_federated(spec.data, 3, 0)


def test_parties_too_small_to_give_test_rows(tmp_path):
    path = tmp_path / "p.csv"
    _hospitals({"a": 4, "b": 3}).to_csv(path, index=False)  # floor(4 * 0.2) = floor(3 * 0.2) = 0
    spec = load_spec(_csv_spec(path, 2, partition={"kind": "column", "column": "hospital"}))
    with pytest.raises(DataError, match=r"data.test_fraction: 0.2 of 7 rows leaves no test rows"):
        load_federated(spec.data, 2, 0)


def test_min_size_applies_to_iid_parties():
    spec = load_spec({"data": {"source": "wine", "partition": {"min_size": 20}},
                      "parties": {"count": 10}})
    with pytest.raises(DataError, match=r"10 parties x data.partition.min_size 20 need 200"):
        load_federated(spec.data, 10, 0)


# ------------------------------------------------------------------- empty, tiny, mismatched files
@pytest.mark.parametrize("text,needle", [
    ("", "cannot read"),
    ("f0,f1,outcome\n", "no data rows (columns: f0, f1, outcome)"),
    ("f0,f1,outcome\n1,2,sick\n", "has a single class"),
    ("f0,f1,outcome\n1,x,sick\n3,4,well\n1,1,sick\n2,2,well\n", "non-numeric feature column(s) f1"),
])
def test_empty_and_tiny_csv_refused_at_validation(tmp_path, cli, capsys, text, needle):
    path = tmp_path / "t.csv"
    path.write_text(text)
    code = cli(["validate", "jobs/digits.yaml", "--set", "data.source=csv", "--set", f"data.path={path}",
                "--set", "data.label=outcome", "--set", "parties.count=1",
                "--set", "data.test_fraction=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_missing_and_mismatched_party_files(tmp_path, cli, capsys):
    test = tmp_path / "test.csv"
    _hospitals({"x": 10}).drop(columns=["hospital"]).to_csv(test, index=False)
    good = tmp_path / "a.csv"
    _hospitals({"x": 10}).drop(columns=["hospital"]).to_csv(good, index=False)
    other = tmp_path / "b.csv"
    _hospitals({"x": 10}).drop(columns=["hospital"]).rename(columns={"f1": "g"}).to_csv(other, index=False)

    def validate(paths):
        code = cli(["validate", "jobs/digits.yaml", "--set", "data.source=party_files",
                    "--set", f"data.test_path={test}", "--set", "data.label=outcome",
                    "--set", f"data.party_paths=[{', '.join(map(str, paths))}]",
                    "--set", f"parties.count={len(paths)}"])
        return code, capsys.readouterr()

    code, out = validate([good, good])
    assert code == 0, out.err
    code, out = validate([good, tmp_path / "nope.csv"])
    assert code == 2 and "data.party_paths[1]: file not found" in out.err
    code, out = validate([good, other])
    assert code == 2 and "data.party_paths[1]: columns ['f0', 'g'] differ" in out.err


def test_device_cuda_without_a_gpu_request_is_refused_at_validation():
    """Ray gives a task a GPU only when it asks for one: device 'cuda' with
    gpus_per_party 0 could never run (today it passes validate and fails at run time)."""
    with pytest.raises(ConfigError, match=r"training.device: 'cuda' needs training.gpus_per_party > 0"):
        load_spec({"training": {"device": "cuda"}})
    load_spec({"training": {"device": "cuda", "gpus_per_party": 0.5}})  # fine as a spec
