"""``--path DIR`` on ``simulate``, ``validate`` and ``submit``: user code outside the project
and outside ``sys.path`` resolves from DIR, in this process and in the job's Ray workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MODULE = """
import torch

def factory(hidden=8):
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
"""


@pytest.fixture
def user_dir(tmp_path):
    """A directory holding a package that nothing else puts on sys.path (a fresh name per
    test process, so no earlier import can satisfy it)."""
    name = f"lr_path_pkg_{os.getpid()}"
    pkg = tmp_path / "code" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODULE)
    (tmp_path / "code" / "loose.py").write_text("")
    yield tmp_path / "code", f"{name}.models:factory"
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]
    if str(tmp_path / "code") in sys.path:
        sys.path.remove(str(tmp_path / "code"))


def _custom(factory: str) -> list[str]:
    return ["--set", "model.kind=custom", "--set", f"model.factory={factory}"]


def test_validate_resolves_the_factory_from_path(cli, user_dir, capsys, monkeypatch):
    code, factory = user_dir
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after
    assert cli(["validate", "jobs/digits.yaml", *_custom(factory)]) == 2
    assert "cannot import module" in capsys.readouterr().err
    assert cli(["validate", "jobs/digits.yaml", "--path", str(code), *_custom(factory)]) == 0
    assert "model custom" in capsys.readouterr().out
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(code.resolve())
    assert cli(["validate", "jobs/digits.yaml", "--path", str(code / "nope")]) == 2
    assert f"--path {code / 'nope'}: not a directory" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_simulate_trains_a_model_from_path_in_ray_workers(user_dir, tmp_path):
    """A fresh process and embedded Ray: the hosts and training tasks import the factory."""
    code, factory = user_dir
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "lepton_ray.cli", "simulate", "jobs/digits.yaml", "--quiet",
         "--num-cpus", "2", "--path", str(code), *_custom(factory),
         "--set", "rounds=1", "--set", "parties.count=2", "--set", "parties.per_host=2",
         "--set", f"output.dir={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "digits: completed, 1 rounds" in done.stdout


def test_submit_uploads_the_path_packages(cli, user_dir, monkeypatch, capsys):
    import lepton_ray.cli_cluster as cc

    code, factory = user_dir
    sent = {}

    class Client:
        def submit_job(self, **kw):
            sent.update(kw)
            return "raysubmit_x"

    monkeypatch.setattr(cc, "_client", lambda address: (Client(), "http://head:8265"))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    assert cli(["submit", "jobs/digits.yaml", "--path", str(code),
                "--set", "model.kind=custom", f"model.factory={factory}"]) == 0
    name = factory.split(".")[0]
    assert sent["runtime_env"]["py_modules"] == [str(code.resolve() / "loose.py"),
                                                 str(code.resolve() / name)]
    assert sent["runtime_env"]["working_dir"] == str(ROOT)
    assert cc.path_modules([code.resolve() / name]) == [str(code.resolve() / name / "models.py")]
    empty = code / "empty"
    empty.mkdir()
    assert cli(["submit", "jobs/digits.yaml", "--path", str(empty)]) == 2
    assert "holds no Python package" in capsys.readouterr().err
