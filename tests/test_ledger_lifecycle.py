"""A job's ledger cannot be reset or forked (issue 13, finding 3), without Ray: the lock is
taken and the output directory prepared before Ray starts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from lepton_ray.errors import ConfigError
from lepton_ray.privacy.budget import PrivacyBudget
from lepton_ray.privacy.events import Gaussian, PoissonSampled
from lepton_ray.privacy.ledger import Ledger, LedgerLock, read_discard_record, read_ledger

ROUND = PoissonSampled(sampling_probability=0.5, event=Gaussian(noise_multiplier=1.0))
BUDGET = PrivacyBudget(epsilon=50.0, delta=1e-5)


@pytest.fixture
def job_dir(tmp_path, small_job):
    """An output directory a DP job left: two charges, a history, a spec to run again."""
    out = tmp_path / "out"
    with Ledger.open(out / "ledger.jsonl", budget=BUDGET) as led:
        led.charge(round=1, event=ROUND)
        led.charge(round=2, event=ROUND)
    (out / "history.csv").write_text("round\n1\n2\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(dict(small_job, privacy={"mode": "user_level", "epsilon": 50.0,
                                                            "noise_multiplier": 1.0})))
    return out, spec


def test_attack_overwrite_deleted_the_ledger(job_dir):
    """Attack: ``--overwrite`` deleted ledger.jsonl, resetting the budget already spent on
    this data. Now it is refused, and nothing in the directory is touched."""
    from actors.driver import prepare_output_dir

    out, _ = job_dir
    before = (out / "ledger.jsonl").read_bytes()
    with LedgerLock.acquire(out / "ledger.jsonl") as lock:
        with pytest.raises(ConfigError, match="--discard-privacy-ledger"):
            prepare_output_dir(out, overwrite=True, lock=lock)
    assert (out / "ledger.jsonl").read_bytes() == before
    assert (out / "history.csv").exists()


def test_discard_privacy_ledger_records_the_discard(job_dir):
    from actors.driver import prepare_output_dir

    out, _ = job_dir
    before = (out / "ledger.jsonl").read_bytes()
    spent = read_ledger(out / "ledger.jsonl")[-1].epsilon_after
    with LedgerLock.acquire(out / "ledger.jsonl") as lock:
        prepare_output_dir(out, overwrite=True, discard_privacy_ledger=True, lock=lock)
    assert not (out / "history.csv").exists()
    record = read_discard_record(out / "ledger.jsonl")
    assert record.sha256 == hashlib.sha256(before).hexdigest()
    assert record.charges == 2 and record.epsilon_spent == spent
    assert read_ledger(out / "ledger.jsonl") == ()


def test_cli_overwrite_without_the_flag_exits_2(job_dir, cli, capsys):
    out, spec = job_dir
    before = (out / "ledger.jsonl").read_bytes()
    assert cli(["simulate", str(spec), "--overwrite", "--quiet"]) == 2
    assert "--discard-privacy-ledger" in capsys.readouterr().err
    assert (out / "ledger.jsonl").read_bytes() == before


_HOLD = """
import sys, time
from lepton_ray.privacy.ledger import LedgerLock
lock = LedgerLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_second_driver_on_a_locked_ledger_exits_2_naming_the_holder(job_dir, cli, capsys):
    """Attack: a ``--resume`` while the first job still runs; each driver checked the budget
    against only its own charges. The first job (here: a process holding the lock, as the
    driver does for its lifetime) now makes the second exit 2, naming its pid."""
    out, spec = job_dir
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / "ledger.jsonl")],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (out / "ledger.jsonl").read_bytes()
        for argv in (["--resume", str(out)], ["--overwrite", "--discard-privacy-ledger"]):
            assert cli(["simulate", str(spec), "--quiet", *argv]) == 2
            err = capsys.readouterr().err
            assert f"locked by another job (pid {holder.pid} on" in err
        assert (out / "ledger.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    info = (out / "ledger.jsonl.lock").read_text()
    assert json.loads(info)["pid"] == holder.pid  # a killed holder leaves its pid, not its lock
    LedgerLock.acquire(out / "ledger.jsonl").release()
