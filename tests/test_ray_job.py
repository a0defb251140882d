"""End-to-end jobs on the shared local Ray instance (marked ``ray``)."""

import json

import numpy as np
import pytest
import torch

import lepton_ray
from lepton_ray.cli import main
from lepton_ray.errors import ConfigError
from lepton_ray.outputs import HISTORY_COLUMNS
from lepton_ray.result import load_result

pytestmark = pytest.mark.ray


def test_job_end_to_end_outputs_and_predict(ray_session, small_job, tmp_path):
    result = lepton_ray.run(small_job, rounds=5)
    out = result.output_dir
    h = result.history
    assert list(h.columns) == list(HISTORY_COLUMNS)
    assert h["round"].tolist() == [1, 2, 3, 4, 5]
    assert (h["parties_completed"] == 6).all() and (h["status"] == "ok").all()
    assert h["epsilon"].isna().all()  # no privacy yet: left empty
    assert h["test_accuracy"].iloc[-1] > 0.85
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 5
    assert summary["final"]["test_accuracy"] == pytest.approx(h["test_accuracy"].iloc[-1], abs=1e-6)
    assert summary["devices"] == ["cpu"]
    # the model file carries the spec and predicts raw features like the in-memory result
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    again = load_result(out)
    assert np.array_equal(again.predict(X), result.predict(X))
    assert (result.predict(X) == y).mean() > 0.85
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["spec"]["parties"]["count"] == 6
    assert (out / "checkpoint.pt").exists()


def test_same_seed_same_history(ray_session, small_job, tmp_path):
    same = {"training__deterministic_seeds": True}  # opt-in: training seeds are secret by default
    a = lepton_ray.run(small_job, output__dir=str(tmp_path / "a"), **same).history
    b = lepton_ray.run(small_job, output__dir=str(tmp_path / "b"), **same).history
    cols = ["test_loss", "test_accuracy"]
    assert a[cols].equals(b[cols])
    # train_loss arrives through the secure sum, stochastically rounded with OS randomness
    # (quantisation step ~ loss bound / scale): equal up to that, not bit for bit
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    c = lepton_ray.run(small_job, seed=1, output__dir=str(tmp_path / "c")).history
    assert not a[cols].equals(c[cols])


def test_hosts_only_carry_parties(ray_session, small_job, tmp_path):
    """The same job on 1, 2 or 6 hosts trains the same model (up to float summation order)."""
    losses = []
    for per_host in (6, 3, 1):
        r = lepton_ray.run(small_job, parties__per_host=per_host, output__dir=str(tmp_path / str(per_host)),
                           training__deterministic_seeds=True)
        assert r.summary["hosts"] == 6 // per_host
        losses.append(r.history["test_loss"].to_numpy())
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    np.testing.assert_allclose(losses[0], losses[2], rtol=1e-4)


def test_ray_calls_grow_with_hosts_not_parties(ray_session, small_job, tmp_path):
    def calls(parties, per_host):
        r = lepton_ray.run(small_job, rounds=2, parties={"count": parties, "per_host": per_host},
                           model={"kind": "logistic"}, secure_aggregation__mode=mode,
                           output__dir=str(tmp_path / f"{mode}-{parties}-{per_host}"))
        return r.summary["ray_calls_per_round"]

    mode = "none"
    assert calls(10, 5) == calls(200, 100) == 2 * 2 + 1  # per host: train + its task; + reduce
    assert calls(200, 50) == 2 * 4 + 1
    mode = "secagg+"  # begin + per host (5 stages + training task) + 5 server stages
    assert calls(10, 5) == calls(40, 20) == 1 + 2 * 6 + 5


def test_sampling_fixed_fraction(ray_session, small_job, tmp_path):
    r = lepton_ray.run(small_job, sampling={"kind": "fixed", "fraction": 0.5})
    assert (r.history["parties_sampled"] == 3).all()
    assert (r.history["parties_completed"] == 3).all()


def test_existing_outputs_are_never_overwritten_silently(ray_session, small_job):
    first = lepton_ray.run(small_job, rounds=2)
    before = (first.output_dir / "history.csv").read_bytes()
    with pytest.raises(ConfigError, match="already holds a job's outputs"):
        lepton_ray.run(small_job, rounds=2)
    assert (first.output_dir / "history.csv").read_bytes() == before
    lepton_ray.run(small_job, rounds=1, overwrite=True)
    assert len(load_result(first.output_dir).history) == 1


def test_cli_simulate_then_plot(ray_session, small_job, tmp_path, capsys):
    import yaml

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(small_job))
    assert main(["simulate", str(spec), "--quiet", "--set", "rounds=2", "--set", "server.strategy=fedadam",
                 "--set", "server.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "t: completed, 2 rounds, 6 parties" in out
    assert main(["plot", small_job["output"]["dir"]]) == 0
    assert (tmp_path / "out" / "history.png").stat().st_size > 10_000


@pytest.mark.parametrize("mode", ["none", "secagg+"])
def test_diverged_parties_drop_out_and_the_job_goes_on(ray_session, small_job, tmp_path, mode):
    """lr 1e30 makes every party's update non-finite: each is dropped with its reason, the
    round releases nothing, the model is untouched and the job completes."""
    r = lepton_ray.run(small_job, rounds=2, training={"lr": 1e30, "momentum": 0.0},
                       secure_aggregation__mode=mode, output__dir=str(tmp_path / mode))
    assert r.summary["status"] == "completed"
    assert (r.history["parties_completed"] == 0).all()
    assert r.history["status"].str.startswith("aborted").all()
    audit = [json.loads(x) for x in (r.output_dir / "audit.jsonl").read_text().splitlines()]
    assert [e["dropped"] for e in audit if e["event"] == "round"] == [6, 6]  # a count, never ids
    assert r.history["test_loss"].nunique() == 1  # the global model never moved
