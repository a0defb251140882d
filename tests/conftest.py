"""Shared fixtures. Ray tests share one local Ray instance for the whole session
(num_cpus=4, no dashboard) and are marked ``ray``; unit tests never start Ray."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def small_job(tmp_path):
    """A small, fast digits job as a spec dict (callers override what they test)."""
    return {
        "name": "t",
        "seed": 0,
        "rounds": 3,
        "data": {"source": "digits"},
        "parties": {"count": 6},
        "model": {"kind": "mlp", "hidden": [32]},
        "training": {"lr": 0.1, "momentum": 0.9},
        "output": {"dir": str(tmp_path / "out"), "progress": False},
    }


@pytest.fixture
def cli():
    """``lepton-ray``'s entry point: ``cli([...])`` returns the exit code."""
    from lepton_ray.cli import main

    return main
