"""cluster.yaml and cluster-local.yaml pass Ray's own config validation (no Ray started).

``ray up`` runs ``prepare_config`` (merge with the provider's defaults) then
``validate_config`` (Ray's JSON schema and cross-field checks) before it touches the cloud;
the v1 autoscaler validates the fake_multinode config as-is. We run the same functions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def aws():
    from ray.autoscaler._private.util import prepare_config

    raw = _load("cluster.yaml")
    return raw, prepare_config(copy.deepcopy(raw))


def test_cluster_yaml_passes_ray_validation(aws):
    from ray.autoscaler._private.util import validate_config

    raw, prepared = aws
    assert raw["provider"]["type"] == "aws"
    validate_config(prepared)


def test_cluster_yaml_has_head_cpu_and_gpu_workers(aws):
    raw, prepared = aws
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(types) == {"head", "cpu_worker",
                                                                    "gpu_worker"}
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_worker"]["resources"]
    for name in ("cpu_worker", "gpu_worker"):
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
    assert types["head"]["max_workers"] == 0
    assert 0 < raw["idle_timeout_minutes"] <= 30


def test_cluster_yaml_installs_torch_then_the_synced_project(aws):
    raw, prepared = aws
    [remote] = [r for r, v in raw["file_mounts"].items() if v == "."]  # the project root
    for commands in (prepared["setup_commands"],
                     prepared["available_node_types"]["gpu_worker"]["worker_setup_commands"]):
        torch = next(i for i, c in enumerate(commands) if '"torch==2.13.0"' in c)
        project = next(i for i, c in enumerate(commands) if f"pip install -e {remote}" in c)
        assert torch < project, commands
    assert "whl/cpu" in prepared["setup_commands"][0]  # CPU nodes: never the CUDA build
    assert not any("whl/cpu" in c for c in
                   prepared["available_node_types"]["gpu_worker"]["worker_setup_commands"])
    assert {"runs/", ".git/"} <= set(raw["rsync_exclude"])
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker


def test_local_variant_passes_validation_as_the_autoscaler_reads_it():
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import validate_config

    local, cloud = _load("cluster-local.yaml"), _load("cluster.yaml")
    validate_config(local)  # the v1 autoscaler validates the file as-is, without defaults
    assert local["provider"]["type"] == "fake_multinode"
    assert _get_node_provider_cls(local["provider"]).__name__ == "FakeMultiNodeProvider"
    workers = {k for k in local["available_node_types"] if k != local["head_node_type"]}
    assert workers == {k for k in cloud["available_node_types"] if k != cloud["head_node_type"]}
    assert local["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


@pytest.mark.parametrize("breakage", ["gpu_as_text", "unknown_key", "head_type_missing"])
def test_validation_rejects_broken_configs(aws, breakage):
    """The check above has teeth: Ray's validator rejects each of these."""
    from ray.autoscaler._private.util import validate_config

    config = copy.deepcopy(aws[1])
    if breakage == "gpu_as_text":
        config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    elif breakage == "unknown_key":
        config["available_node_types"]["gpu_worker"]["max_worker"] = 3
    else:
        config["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(config)
