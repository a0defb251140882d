"""Experiment tracking: TensorBoard event files and MLflow runs hold the round metrics."""

import importlib.util

import pytest

from lepton_ray.config import load_spec
from lepton_ray.tracking import TENSORBOARD_DIR, Trackers, round_scalars

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="tensorboard extra not installed (pip install -e '.[tensorboard]')")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow extra not installed (pip install -e '.[mlflow]')")

ROWS = [{"round": r, "status": "ok", "parties_sampled": 5, "parties_completed": 5 - (r == 2),
         "train_loss": 1.0 / r, "epsilon": None, "test_accuracy": 0.5 + 0.1 * r,
         "test_loss": float("nan"), "round_seconds": 0.25} for r in (1, 2, 3)]


def tb_scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_round_scalars_keep_finite_numbers_and_count_dropouts():
    s = round_scalars(ROWS[1], {"hosts.train": 0.1})
    assert s == {"parties_sampled": 5.0, "parties_completed": 4.0, "train_loss": 0.5,
                 "test_accuracy": pytest.approx(0.7), "round_seconds": 0.25, "dropouts": 1.0,
                 "stage/hosts.train": 0.1}


@needs_tb
def test_tensorboard_event_files_hold_the_round_metrics(tmp_path):
    t = Trackers(load_spec({"output": {"tensorboard": True}}), tmp_path)
    for row in ROWS:
        t.log_round(row, {"server.aggregate": 0.01})
    t.close(tmp_path, "completed")
    got = tb_scalars(tmp_path)
    assert [s for s, _ in got["test_accuracy"]] == [1, 2, 3]
    assert [v for _, v in got["test_accuracy"]] == pytest.approx([0.6, 0.7, 0.8])
    assert [v for _, v in got["dropouts"]] == [0, 1, 0]
    assert "stage/server.aggregate" in got and "test_loss" not in got  # NaN is not plotted


@needs_mlflow
def test_mlflow_run_holds_params_and_round_metrics(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec({"name": "trk", "training": {"lr": 0.07},
                      "output": {"mlflow": {"tracking_uri": uri, "experiment": "e1"}}})
    (tmp_path / "summary.json").write_text("{}")
    # artifacts under tmp_path (a sqlite store's default artifact root is ./mlruns)
    mlflow.tracking.MlflowClient(uri).create_experiment("e1", artifact_location=(tmp_path / "art").as_uri())
    t = Trackers(spec, tmp_path)
    for row in ROWS:
        t.log_round(row)
    t.close(tmp_path, "completed", [tmp_path / "summary.json"])
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("e1")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["training.lr"] == "0.07"
    hist = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]


def test_missing_extra_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "mlflow":
            raise ImportError("no mlflow")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from lepton_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"output.mlflow: needs the mlflow package \(pip install 'lepton-ray\[mlflow\]'\)"):
        Trackers(load_spec({"output": {"mlflow": {"tracking_uri": "file:/x"}}}), tmp_path)


@needs_tb
@pytest.mark.ray
def test_a_job_writes_tensorboard_and_ray_metrics(ray_session, tmp_path):
    import lepton_ray

    r = lepton_ray.run({"rounds": 2, "parties": {"count": 4}, "model": {"kind": "logistic"},
                        "output": {"dir": str(tmp_path / "o"), "progress": False, "tensorboard": True}})
    got = tb_scalars(tmp_path / "o")
    assert [v for _, v in got["test_accuracy"]] == pytest.approx(list(r.history["test_accuracy"]))
    assert any(tag.startswith("stage/") for tag in got)
