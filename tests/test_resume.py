"""--resume as a new user meets it (issue 12): a finished job is left exactly as it is, the
output options are not the job, a changed spec is named field by field, a budget that cannot
pay for more rounds refuses before anything changes, and the summary counts what
history.csv holds. Ray tests on the shared session (marked ``ray``)."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import yaml

import lepton_ray
from lepton_ray.cli import main

pytestmark = pytest.mark.ray


def _fingerprint(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _spec_file(tmp_path, job):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_resume_of_a_finished_job_changes_no_file(ray_session, small_job, tmp_path, capsys):
    """Today: summary.json is overwritten with rounds_completed 0 and null metrics, model.pt
    with the initial model, then a TypeError."""
    r = lepton_ray.run(small_job, rounds=2)
    before = _fingerprint(r.output_dir)
    spec = _spec_file(tmp_path, dict(small_job, rounds=2))
    assert main(["simulate", str(spec), "--resume", str(r.output_dir)]) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err and "no file changed" in captured.err
    assert "completed, 2 rounds" in captured.out and "test accuracy 0." in captured.out
    assert _fingerprint(r.output_dir) == before
    again = lepton_ray.run(small_job, rounds=2, resume=r.output_dir)  # the Python API too
    assert again.summary["rounds_completed"] == 2 and _fingerprint(r.output_dir) == before


def test_resume_accepts_output_options_and_names_differing_fields(ray_session, small_job, tmp_path,
                                                                 capsys):
    """Today: --quiet (output.progress) is 'the spec differs', with no field named."""
    job = dict(small_job, rounds=2, output=dict(small_job["output"], progress=True))
    r = lepton_ray.run(job)
    spec = _spec_file(tmp_path, job)
    before = _fingerprint(r.output_dir)
    assert main(["simulate", str(spec), "--resume", str(r.output_dir), "--quiet",
                 "--set", "training.lr=0.5", "--set", "model.hidden=[16]"]) == 2
    err = capsys.readouterr().err
    assert "2 field(s)" in err and "training.lr: 0.1 -> 0.5" in err and "model.hidden: [32] -> [16]" in err
    assert _fingerprint(r.output_dir) == before  # a refused resume changes nothing
    assert main(["simulate", str(spec), "--resume", str(r.output_dir), "--quiet",
                 "--set", "rounds=4", "--set", "output.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    history = pd.read_csv(r.output_dir / "history.csv")
    assert history["round"].tolist() == [1, 2, 3, 4]
    summary = json.loads((r.output_dir / "summary.json").read_text())
    # the summary line and summary.json count the rounds history.csv holds (today: 2)
    assert summary["rounds_completed"] == 4 and "completed, 4 rounds" in out


def test_resume_asking_more_rounds_than_the_budget_allows(ray_session, small_job, tmp_path, capsys):
    dp = {"mode": "user_level", "epsilon": 3.0, "delta": 1e-5, "clip_norm": 1.0}
    job = dict(small_job, rounds=2, privacy=dp, secure_aggregation={"mode": "none"})
    r = lepton_ray.run(job)  # the noise multiplier is calibrated to spend the budget in 2 rounds
    before = _fingerprint(r.output_dir)
    spec = _spec_file(tmp_path, job)
    assert main(["simulate", str(spec), "--resume", str(r.output_dir), "--set", "rounds=3"]) == 2
    err = capsys.readouterr().err
    assert "rounds: 3 asked, but the privacy budget allows no round after round 2" in err
    assert "Traceback" not in err
    assert _fingerprint(r.output_dir) == before


def test_resume_after_a_crash_before_the_final_files_writes_them(ray_session, small_job, tmp_path):
    """The driver died after the last checkpoint but before summary.json and model.pt: the
    resume runs no round, keeps history.csv, and writes the final files from it."""
    r = lepton_ray.run(small_job, rounds=2)
    out = r.output_dir
    history = (out / "history.csv").read_bytes()
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    again = lepton_ray.run(small_job, rounds=2, resume=out)
    assert (out / "history.csv").read_bytes() == history
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 2
    assert s["final"]["test_accuracy"] == pytest.approx(r.summary["final"]["test_accuracy"], abs=1e-6)
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    assert (again.predict(X) == r.predict(X)).all()  # the checkpoint's model, not a fresh one
