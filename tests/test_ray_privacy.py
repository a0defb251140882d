"""Differential privacy in the runtime: the ledger is charged before release, the budget
ends a job cleanly, bad settings fail before training, a crash between charge and release
never under-counts, and resumed jobs neither duplicate nor lose history rows."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import lepton_ray
from lepton_ray.cli import main
from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import AccountantKind, make_accountant
from lepton_ray.privacy.calibration import compute_epsilon
from lepton_ray.privacy.events import Gaussian, SelfComposed
from lepton_ray.privacy.ledger import read_ledger

pytestmark = pytest.mark.ray

DP = {"mode": "user_level", "epsilon": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 1.0}


def test_every_round_is_charged_and_history_shows_epsilon(ray_session, small_job, tmp_path):
    r = lepton_ray.run(small_job, rounds=3, privacy=DP, sampling={"kind": "poisson", "fraction": 0.5})
    rows = read_ledger(r.output_dir / "ledger.jsonl")
    assert [row.round for row in rows] == [1, 2, 3]
    from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon

    for t, row in enumerate(rows, 1):  # the discrete Gaussian's composition of t rounds
        assert row.epsilon_after == pytest.approx(
            discrete_gaussian_epsilon(sampling_rate=0.5, noise_multiplier=1.0, steps=t, delta=1e-5),
            rel=1e-9)
    np.testing.assert_allclose(r.history["epsilon"], [row.epsilon_after for row in rows], rtol=1e-5)
    assert r.summary["privacy"]["epsilon_spent"] == pytest.approx(rows[-1].epsilon_after)
    for col in ("parties_sampled", "parties_completed", "parties_clipped", "train_loss"):
        assert r.history[col].isna().all()  # exact statistics of party data: not released


def test_budget_exhaustion_ends_the_job_cleanly(ray_session, small_job):
    budget = compute_epsilon(sampling_rate=1.0, noise_multiplier=1.0, steps=2, delta=1e-5) * 1.01
    r = lepton_ray.run(small_job, rounds=5, privacy=dict(DP, epsilon=budget))
    assert r.summary["status"] == "budget_exhausted"
    assert "budget" in r.summary["reason"].lower() or "exceed" in r.summary["reason"].lower()
    assert r.history["round"].tolist() == [1, 2]
    assert len(read_ledger(r.output_dir / "ledger.jsonl")) == 2  # the refused charge wrote nothing
    assert json.loads((r.output_dir / "summary.json").read_text())["status"] == "budget_exhausted"


def test_bad_privacy_settings_fail_before_any_training(ray_session, small_job, capsys, tmp_path):
    with pytest.raises(PrivacyError, match="one round .* already costs epsilon"):
        lepton_ray.run(small_job, privacy=dict(DP, epsilon=0.1))
    assert not (tmp_path / "out" / "history.csv").exists() or \
        len(pd.read_csv(tmp_path / "out" / "history.csv")) == 0
    import yaml

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(small_job))
    for bad, needle in [("privacy.noise_multiplier=-1", "privacy.noise_multiplier: must be > 0"),
                        ("privacy.delta=1", "privacy.delta: must be in (0, 1)"),
                        ("sampling.fraction=1.5", "sampling.fraction: must be in (0, 1]")]:
        assert main(["validate", str(spec), "--set", "privacy.mode=user_level", "--set", bad]) == 2
        assert needle in capsys.readouterr().err


def test_distributed_budget_checked_with_the_skellam_event_before_training(ray_session, small_job):
    with pytest.raises(PrivacyError, match="one round .* already costs epsilon"):
        lepton_ray.run(small_job, privacy=dict(DP, noise="distributed", epsilon=0.5))


def test_adaptive_clipping_moves_the_clip_norm_at_the_same_price(ray_session, small_job, tmp_path):
    fixed = lepton_ray.run(small_job, rounds=3, privacy=dict(DP, clip_norm=0.05),
                           output__dir=str(tmp_path / "fixed"))
    adaptive = lepton_ray.run(small_job, rounds=3, privacy=dict(DP, clip_norm=0.05, adaptive_clipping={
        "enabled": True, "target_quantile": 0.5, "learning_rate": 0.5, "count_noise_std": 2.0}),
        output__dir=str(tmp_path / "adaptive"))
    audit = [json.loads(line) for line in (tmp_path / "adaptive" / "audit.jsonl").read_text().splitlines()]
    norms = [e["clip_norm"] for e in audit if e["event"] == "round"]
    assert norms[0] == 0.05 and norms[-1] > norms[0]  # every update is longer: C grows
    np.testing.assert_allclose(adaptive.history["epsilon"], fixed.history["epsilon"], rtol=1e-9)


def test_dp_sgd_reports_only_the_largest_record_level_epsilon(ray_session, small_job):
    r = lepton_ray.run(small_job, rounds=2, privacy={"dp_sgd": {"noise_multiplier": 1.1, "clip_norm": 1.0}})
    rec = r.summary["privacy"]["record_level"]
    assert "per_party" not in rec and "epsilon_median" not in rec  # each party's is its own
    # every party trained in both rounds; the smallest has the largest q = 32 / n: composition
    # of 2 * ceil(n / 32) Poisson-sampled discrete Gaussian steps (DP-SGD's integer noise)
    from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon

    n = r.summary["party_sizes"]["min"]
    two = discrete_gaussian_epsilon(sampling_rate=32 / n, noise_multiplier=1.1,
                                    steps=2 * -(-n // 32), delta=1e-5)
    assert rec["epsilon_max"] == pytest.approx(two, rel=1e-6)
    assert r.history["test_accuracy"].iloc[-1] > 0.3


CRASHER = textwrap.dedent("""
    import os, sys, ray
    import actors.driver as driver
    from lepton_ray.config import load_spec
    ray.init(address=os.environ["LEPTON_TEST_RAY"])
    real = driver.Federation._plain_round
    def crash(self, r, *a, **k):
        if r == 3:      # round 3 was charged (fsynced) and is about to train: die hard
            os._exit(17)
        return real(self, r, *a, **k)
    driver.Federation._plain_round = crash
    driver.run_job(load_spec(sys.argv[1]))
""")


def test_crash_between_charge_and_release_then_resume(ray_session, small_job, tmp_path):
    import yaml

    job = dict(small_job, rounds=5, privacy=DP, secure_aggregation={"mode": "none"})
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    env = dict(os.environ, LEPTON_TEST_RAY=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(spec)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert pd.read_csv(out / "history.csv")["round"].tolist() == [1, 2]
    charged = read_ledger(out / "ledger.jsonl")
    assert [row.round for row in charged] == [1, 2, 3]  # round 3 charged, never released

    assert main(["simulate", str(spec), "--resume", str(out), "--quiet"]) == 0
    history = pd.read_csv(out / "history.csv")
    assert history["round"].tolist() == [1, 2, 3, 4, 5]  # no gap, no duplicate
    rows = read_ledger(out / "ledger.jsonl")
    assert [row.round for row in rows] == [1, 2, 3, 3, 4, 5]  # replayed, never reduced
    released = make_accountant(AccountantKind.RDP).composed(
        SelfComposed(event=Gaussian(noise_multiplier=1.0), count=5)).epsilon(1e-5)
    assert rows[-1].epsilon_after >= released  # over-counts the crashed round, never under
    assert history["epsilon"].iloc[-1] == pytest.approx(rows[-1].epsilon_after, rel=1e-5)
    assert main(["audit", str(out)]) == 0
    assert "resumed from the checkpoint of round 2" in (out / "audit.md").read_text()


def test_resume_refuses_a_changed_spec(ray_session, small_job, tmp_path, capsys):
    import yaml

    r = lepton_ray.run(small_job, rounds=2)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(small_job))
    assert main(["simulate", str(spec), "--resume", str(r.output_dir), "--quiet",
                 "--set", "training.lr=0.5"]) == 2
    assert "the spec differs" in capsys.readouterr().err
    assert main(["simulate", str(spec), "--resume", str(r.output_dir), "--quiet", "--set", "rounds=4"]) == 0
    assert pd.read_csv(r.output_dir / "history.csv")["round"].tolist() == [1, 2, 3, 4]


def test_distributed_dp_sum_already_carries_the_calibrated_noise(ray_session, small_job):
    """The coordinator's view with noise: distributed. Updates are ~0 (lr 1e-9), so the sum
    SecAgg+ reveals is the parties' Skellam shares alone: its per-coordinate variance must be
    the calibrated survivors * mu / n_min (scaled back by gamma), with no central noise on top."""
    from actors.driver import Federation
    from lepton_ray.config import load_spec
    from lepton_ray.learning.data import load_federated
    from lepton_ray.privacy.skellam import skellam_params

    spec = load_spec(small_job, training={"lr": 1e-9, "momentum": 0.0},
                     privacy=dict(DP, noise="distributed", bits=16, noise_multiplier=0.5))
    fed = Federation(spec, load_federated(spec.data, spec.parties.count, spec.seed))
    fed.start()
    try:
        start = fed.params.copy()
        row = fed.run_round(1)
        assert row["status"] == "ok" and "parties_completed" not in row
        released_sum = (fed.params - start) * 6  # FedAvg lr 1, fixed denominator qN = 6
    finally:
        fed.stop()
    n_min = 6  # ceil(0.9 * 6), and the complete graph's threshold is lower
    params = skellam_params(bits=16, dim=len(start), clip_norm=1.0, parties=6, min_survivors=n_min,
                            noise_multiplier=0.5, colluding=1)  # default: max(1, 10% of 6)
    expected = 6 * params.share_variance / params.gamma**2
    observed = float(np.var(released_sum))
    # d ~ 2,500 coordinates: the sample variance is within ~3% (1 sd) of the truth
    assert observed == pytest.approx(expected, rel=0.12)
    assert abs(float(np.mean(released_sum))) < 4 * np.sqrt(expected / len(start))


DPSGD_CRASHER = textwrap.dedent("""
    import os, sys, ray
    import actors.driver as driver
    from lepton_ray.config import load_spec
    ray.init(address=os.environ["LEPTON_TEST_RAY"])
    real = driver.Federation.run_round
    def crash(self, r, *a, **k):
        if r == 4:      # round 3 released (history row written), its checkpoint never was
            os._exit(17)
        return real(self, r, *a, **k)
    driver.Federation.run_round = crash
    driver.run_job(load_spec(sys.argv[1]))
""")


def test_attack_resume_undercounts_dp_sgd_participation(ray_session, small_job, tmp_path):
    """Attack (issue 13, finding 3): round 3 runs DP-SGD on every party and releases, the
    job dies before round 3's checkpoint, and the resume re-runs round 3: every party ran its
    DP-SGD mechanism 5 times (rounds 1, 2, 3, 3, 4). Restoring the checkpoint's counts alone
    reported 4; the resume must count the lost execution for every party."""
    import yaml

    from lepton_ray.learning.data import load_federated
    from lepton_ray.privacy.calibration import record_level_event

    job = dict(small_job, rounds=4, secure_aggregation={"mode": "none"},
               privacy={"dp_sgd": {"noise_multiplier": 1.1, "clip_norm": 1.0}},
               output=dict(small_job["output"], checkpoint_every=2))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    env = dict(os.environ, LEPTON_TEST_RAY=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-c", DPSGD_CRASHER, str(spec)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert pd.read_csv(out / "history.csv")["round"].tolist() == [1, 2, 3]  # 3 was released
    assert main(["simulate", str(spec), "--resume", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sizes = load_federated(lepton_ray.load_spec(job).data, 6, 0).party_sizes
    acc = AccountantKind.RDP
    # oracle: every party (sampling: all) composed 5 times, the largest epsilon of them
    truth = max(make_accountant(acc).composed(SelfComposed(
        event=record_level_event(n_local=int(n), batch_size=min(32, int(n)), epochs=1,
                                 noise_multiplier=1.1), count=5)).epsilon(1e-5) for n in sizes)
    got = summary["privacy"]["record_level"]["epsilon_max"]
    assert got >= truth * (1 - 1e-9)


def test_audit_records_what_the_distributed_job_actually_used(ray_session, small_job, capsys):
    r = lepton_ray.run(small_job, rounds=1, privacy=dict(DP, noise="distributed", bits=16))
    events = [json.loads(x) for x in (r.output_dir / "audit.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "job_start")
    plan = next(e for e in events if e["event"] == "secagg_plan")
    assert start["dp"]["neighbouring"] == "zero_out_party"
    assert start["dp"]["round_event"]["type"] == "skellam"
    assert plan["round"] == 1 and plan["complete_graph"] is True  # 6 parties: k = n - 1
    assert (plan["neighbours"], plan["modulus_bits"]) == (5, 32)
    sk = plan["skellam"]
    assert (sk["min_survivors"], sk["colluding"], sk["honest_survivors"]) == (6, 1, 5)
    assert main(["audit", str(r.output_dir)]) == 0
    text = (r.output_dir / "audit.md").read_text()
    assert f"| threshold t (round 1) | {plan['threshold']} |" in text
    assert "| neighbours k (round 1, the first secure round) | 5 (complete graph) |" in text
    assert "**zero-out one party**" in text and "257" not in text
