"""What a user sees (issue 12): GPU requests checked against the machine or cluster before
anything waits on them, dp-accounting's convergence chatter held back at our call sites
(and the one case that matters reported once), and the main job printing its progress bar
and one summary line, nothing else."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_ray.config import load_spec
from lepton_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _no_local_gpu() -> bool:
    from actors.resources import local_gpu_count

    return local_gpu_count() == 0


# ------------------------------------------------------------------------------------ GPUs
def test_gpu_request_on_a_machine_without_gpus_falls_back_once_and_cuda_is_refused():
    from actors.resources import check_local

    said = []
    spec = load_spec({"training": {"gpus_per_party": 0.5}})
    run = check_local(spec, 0, say=said.append)
    assert run.training.gpus_per_party == 0 and run.training.device is spec.training.device
    assert said == ["training.gpus_per_party: 0.5 GPU(s) asked but this machine has 0; training on the CPU"]
    assert check_local(spec, 1, say=said.append) is spec and len(said) == 1  # fits: unchanged
    cuda = load_spec({"training": {"gpus_per_party": 0.5, "device": "cuda"}})
    with pytest.raises(ConfigError, match=r"training.device: 'cuda' but this machine has no GPU"):
        check_local(cuda, 0)
    whole = load_spec({"training": {"gpus_per_party": 2}})
    with pytest.raises(ConfigError):  # two GPUs on one node, the machine has one
        check_local(load_spec(whole.to_dict(), training__device="cuda"), 1)


@pytest.mark.skipif(not _no_local_gpu(), reason="this machine has a GPU")
def test_validate_checks_gpus_against_this_machine(cli, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli(["validate", "jobs/digits.yaml", "--set", "training.gpus_per_party=0.5"]) == 0
    assert "note: training.gpus_per_party: 0.5 GPU(s) asked but this machine has 0" in capsys.readouterr().err
    assert cli(["validate", "jobs/digits.yaml", "--set", "training.gpus_per_party=0.5",
                "--set", "training.device=cuda"]) == 2
    assert "training.device: 'cuda' but this machine has no GPU" in capsys.readouterr().err


@pytest.mark.ray
def test_gpu_request_on_a_joined_cluster_without_gpus_fails_fast(ray_session):
    """A cluster we joined (the session's, no GPUs, no autoscaler to start one): refused
    after the bounded wait, naming the field; today the job waits forever."""
    from actors.resources import check_cluster

    spec = load_spec({"training": {"gpus_per_party": 0.5}})
    with pytest.raises(ConfigError, match=r"training.gpus_per_party: 0.5 GPU\(s\) asked but no node"):
        check_cluster(spec, embedded=False, wait_s=2)


# ------------------------------------------------------------------------- dp-accounting
def test_convergence_warnings_are_held_back_only_around_our_calls(caplog):
    from lepton_ray.privacy.calibration import calibrate_noise

    caplog.set_level(logging.WARNING)
    calibrate_noise(target_epsilon=3, delta=1e-5, sampling_rate=0.1, steps=100)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    logging.getLogger("absl").warning("_compute_log_a_frac failed to converge (someone else's call)")
    assert [r for r in caplog.records if "someone else's call" in r.getMessage()]  # not silenced


def test_an_excluded_order_next_to_the_optimum_is_reported_once(caplog, monkeypatch):
    """q = 0.1, z = 1, 10^5 steps: the optimal order is 1.6 and dp-accounting cannot
    compute 1.1-1.5, so the true optimum may sit at 1.5 (brute force over the grid)."""
    from lepton_ray.privacy import accountants
    from lepton_ray.privacy.calibration import compute_epsilon

    monkeypatch.setattr(accountants, "_REPORTED", set())
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        compute_epsilon(sampling_rate=0.1, noise_multiplier=1.0, steps=100_000, delta=1e-5)
    notes = [r.getMessage() for r in caplog.records if r.name == "lepton_ray.privacy"]
    assert len(notes) == 1 and "1.5 next to the optimal order 1.6" in notes[0]
    caplog.clear()
    compute_epsilon(sampling_rate=0.1, noise_multiplier=1.0, steps=100, delta=1e-5)  # optimum far away
    assert not [r for r in caplog.records if r.name == "lepton_ray.privacy"]


# ---------------------------------------------------------------------- the main job's console
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not _no_local_gpu(), reason="checks the CPU fallback")
def test_main_job_prints_its_bar_and_one_line(tmp_path):
    """``simulate jobs/digits.yaml`` on an embedded Ray: stdout is the summary line, stderr
    the progress bar; asking for GPUs this machine lacks adds one note. Today the same
    command waits forever on the GPU request; without it Ray's token-auth warning shows."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "lepton_ray.cli", "simulate", "jobs/digits.yaml", "--set", "rounds=3",
           "--set", f"output.dir={tmp_path / 'out'}", "--set", "training.gpus_per_party=0.5"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("simulate with training.gpus_per_party > 0 hung on a machine without GPUs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) == 1 and out[0].startswith("digits: completed, 3 rounds"), proc.stdout
    lines = [x for x in proc.stderr.replace("\r", "\n").splitlines() if x.strip()]
    other = [x for x in lines if not x.startswith("digits: ")]
    assert other == ["training.gpus_per_party: 0.5 GPU(s) asked but this machine has 0; "
                     "training on the CPU"], proc.stderr[-3000:]
