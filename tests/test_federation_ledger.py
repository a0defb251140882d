"""A site's lifetime ledger: refuses a round beyond the site's budget across jobs,
write-ahead, locked, reopened with what was charged."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lepton_ray.config import load_spec
from lepton_ray.errors import BudgetExhaustedError, FederationError
from lepton_ray.federation.ledger import SiteLedger, job_epsilon


def test_refuses_a_round_beyond_the_lifetime_budget_across_jobs(tmp_path):
    path = tmp_path / "site.jsonl"
    with SiteLedger(path, lifetime_epsilon=5.0) as ledger:
        for r, eps in enumerate([1.0, 1.5, 2.0], start=1):  # job A: cumulative epsilons
            ledger.charge("A", r, epsilon=eps, delta=1e-5)
        assert ledger.spent() == (2.0, 1e-5)
        ledger.charge("B", 1, epsilon=2.5, delta=1e-5)
        with pytest.raises(BudgetExhaustedError, match="epsilon 5.1, delta 2e-05 over its lifetime"):
            ledger.charge("B", 2, epsilon=3.1, delta=1e-5)
    with SiteLedger(path, lifetime_epsilon=5.0) as again:  # reopened: the books survive
        assert again.spent() == pytest.approx((4.5, 2e-5))
        with pytest.raises(BudgetExhaustedError):
            again.charge("C", 1, epsilon=0.6, delta=1e-6)


def test_write_ahead_and_torn_tail(tmp_path):
    path = tmp_path / "site.jsonl"
    with SiteLedger(path, lifetime_epsilon=10.0) as ledger:
        ledger.charge("A", 1, epsilon=1.0, delta=0.0)
        assert path.read_bytes().count(b"\n") == 1  # on disk before charge() returns
    with open(path, "ab") as f:
        f.write(b'{"job": "A", "rou')  # crash mid-write
    with SiteLedger(path, lifetime_epsilon=10.0) as ledger:
        assert ledger.spent() == (1.0, 0.0)
    path.write_text('garbage\n{"job": "A", "round": 1, "epsilon": 1, "delta": 0}\n')
    with pytest.raises(FederationError, match="line 1 is corrupt"):
        SiteLedger(path, lifetime_epsilon=10.0)


def test_a_second_process_cannot_open_the_ledger(tmp_path):
    path = tmp_path / "site.jsonl"
    with SiteLedger(path, lifetime_epsilon=1.0):
        code = ("from lepton_ray.federation.ledger import SiteLedger\n"
                f"SiteLedger({str(path)!r}, lifetime_epsilon=1.0)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode != 0 and "locked by another process" in out.stderr


def test_job_epsilon_from_the_accepted_spec():
    base = {"name": "j", "data": {"source": "digits"}, "parties": {"count": 3}}
    assert job_epsilon(load_spec(base), 1) == math.inf  # no DP: never within a finite budget
    dp = load_spec({**base, "privacy": {"mode": "user_level", "epsilon": 4.0,
                                        "noise_multiplier": 1.1, "delta": 1e-5}})
    from lepton_ray.privacy.accountants import AccountantKind
    from lepton_ray.privacy.calibration import compute_epsilon

    assert job_epsilon(dp, 7) == pytest.approx(compute_epsilon(
        sampling_rate=1.0, noise_multiplier=1.1, steps=7, delta=1e-5, accountant=AccountantKind.RDP))
    assert job_epsilon(dp, 7) > job_epsilon(dp, 3)
    calibrated = load_spec({**base, "privacy": {"mode": "user_level", "epsilon": 4.0}})
    assert job_epsilon(calibrated, 1) == 4.0
