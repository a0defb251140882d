"""Ray Jobs: ``python -m jobs.run``, ``lepton-ray submit | status | logs`` and a plain
``ray job submit``, the last three against a real local Ray head with a dashboard.

The head is started with ``ray start --head --block`` in its own process group, on free ports
and its own ``--temp-dir`` (other Ray instances may run on this machine), with token
authentication on and a token of its own. Teardown ends that process group, then every
process of that session (found by temp dir, working directory or descent from the head).
The CLI runs in subprocesses: the test process may hold its own Ray connection and token.
"""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from ray_heads import free_port, stop_session

from lepton_ray.cli_cluster import job_entrypoint, resolve_address

ROOT = Path(__file__).resolve().parent.parent
# One host carrying both parties: the fewest Ray processes a federated round can take.
TINY = ["rounds=1", "parties.count=2", "parties.per_host=2", "secure_aggregation.mode=none",
        "output.progress=false"]

# the real command line, as a user runs it
CLI = ["-m", "lepton_ray.cli"]


# --------------------------------------------------------------------------- no Ray


def test_entrypoint_is_a_quoted_jobs_run_command():
    cmd = job_entrypoint("jobs/digits.yaml", ["rounds=1", "output.dir=/tmp/a b"], overwrite=True)
    assert shlex.split(cmd) == ["python", "-m", "jobs.run", "jobs/digits.yaml", "--set",
                                "rounds=1", "output.dir=/tmp/a b", "--overwrite"]
    assert job_entrypoint("s.yaml", []) == "python -m jobs.run s.yaml"


def test_address_precedence(monkeypatch):
    from lepton_ray.errors import LeptonError

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(LeptonError, match="no cluster address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert resolve_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265")
    assert resolve_address(None) == "http://a:8265"
    assert resolve_address("http://explicit:8265") == "http://explicit:8265"


def test_submit_checks_the_spec_before_contacting_the_cluster(cli, tmp_path, capsys):
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert cli(["submit", str(ROOT / "jobs/digits.yaml"), "--address", unreachable,
                "--set", "parties.count=-3", "training.lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "parties.count: must be > 0" in err and "training.lr" in err
    outside = tmp_path / "spec.yaml"
    outside.write_text("name: x\n")
    assert cli(["submit", str(outside), "--address", unreachable]) == 2
    assert "outside the working directory" in capsys.readouterr().err
    assert cli(["submit", "jobs/nope.yaml", "--address", unreachable]) == 2
    assert "job spec not found" in capsys.readouterr().err


def test_cluster_commands_fail_cleanly_without_a_cluster(cli, monkeypatch, capsys):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli(["status", "raysubmit_x"]) == 2
    assert "no cluster address" in capsys.readouterr().err
    assert cli(["logs", "raysubmit_x", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "lepton-ray logs: error: cannot reach the Ray job server" in err
    assert "Traceback" not in err


def test_jobs_run_reports_a_bad_spec_with_exit_2(capsys):
    from jobs.run import main

    assert main([str(ROOT / "jobs/digits.yaml"), "--set", "parties.count=-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jobs.run: error: invalid job spec") and "parties.count" in err


# --------------------------------------------------------------------------- a real head


@pytest.fixture(scope="module")
def head():
    """A real Ray head with the job server on http://127.0.0.1:PORT; yields (url, env)."""
    temp_dir = tempfile.mkdtemp(prefix="lr-jobs-", dir="/tmp")  # short: socket paths < 108
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(32).hex())
    dashboard = free_port()
    with open(Path(temp_dir) / "head.log", "w") as log:
        proc = subprocess.Popen(
            ["ray", "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
             f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{dashboard}"
            _wait_for_job_server(url, env["RAY_AUTH_TOKEN"], proc, temp_dir)
            yield url, env
        finally:
            leftovers = stop_session(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftovers, f"processes of the test's Ray session survived: {leftovers}"


def _wait_for_job_server(url: str, token: str, proc: subprocess.Popen, temp_dir: str,
                         limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    request = urllib.request.Request(f"{url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    log = (Path(temp_dir) / "head.log").read_text()[-3000:]
    pytest.fail(f"the Ray head's job server did not come up at {url}:\n{log}")


def _run(argv, env, timeout=300, **kw):
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def _rounds(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
@pytest.mark.slow
def test_submit_wait_status_logs_and_a_failing_job(head, tmp_path):
    url, env = head
    out = tmp_path / "digits"  # absolute: the job runs in Ray's copy of the project
    sets = ["--set", *TINY, f"output.dir={out}"]
    # An explicit --address wins over a (here: wrong) RAY_API_SERVER_ADDRESS.
    bogus = dict(env, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    done = _run([sys.executable, *CLI, "submit", "jobs/digits.yaml", "--address", url,
                 "--wait", *sets], bogus)
    submit_s = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "digits: completed, 1 rounds, 2 parties on 1 hosts" in done.stdout  # streamed logs
    assert f"job {job_id} SUCCEEDED" in done.stderr
    assert [r["status"] for r in _rounds(out)] == ["ok"]

    # status and logs, with the address from the environment this time
    by_env = dict(env, RAY_API_SERVER_ADDRESS=url)
    status = _run([sys.executable, *CLI, "status", job_id], by_env)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED")
    logs = _run([sys.executable, *CLI, "logs", job_id], by_env)
    assert logs.returncode == 0 and "digits: completed" in logs.stdout
    missing = _run([sys.executable, *CLI, "status", "raysubmit_nope"], by_env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    # The same output dir again without --overwrite: the job fails cleanly, exit 1.
    t1 = time.monotonic()
    failed = _run([sys.executable, *CLI, "submit", "jobs/digits.yaml", "--wait", *sets],
                  by_env)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "already holds a job's outputs" in failed.stdout
    assert "FAILED: Job entrypoint command failed with exit code 2" in failed.stderr
    print(f"\nsubmit --wait: 1-round job {submit_s:.1f} s, failing job "
          f"{time.monotonic() - t1:.1f} s")


@pytest.mark.ray
@pytest.mark.slow
def test_plain_ray_job_submit_runs_jobs_run(head, tmp_path):
    url, env = head
    out = tmp_path / "plain"
    done = _run(["ray", "job", "submit", "--address", url, "--working-dir", ".", "--",
                 "python", "-m", "jobs.run", "jobs/digits.yaml", "--set", *TINY,
                 f"output.dir={out}"], env)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "digits: completed" in done.stdout and f"outputs in {out}" in done.stdout
    assert [r["round"] for r in _rounds(out)] == ["1"]
