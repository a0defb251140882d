"""Deployment mode on a real three-node Ray cluster (ray.cluster_utils.Cluster, in its own
process so the shared test instance is untouched): each party's host and training tasks run
on the party's node, and its raw data is only ever in that node's object store."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, sys, ray
    from ray.cluster_utils import Cluster
    from lepton_ray.config import load_spec
    import actors.driver as driver

    spec = load_spec(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {}
    for d in spec.parties.deploy:
        node = cluster.add_node(num_cpus=1, resources={d.node_resource: 1})
        nodes[d.id] = node.node_id
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    captured = {}
    real = driver.Federation.stop
    def stop(self):
        locs = {}
        for h in self.hosts:  # after training: where did each party's rows end up?
            info = ray.get(h.placement.remote())
            locs[info["node"]] = info["data_nodes"]
            captured["placement_keys"] = sorted(info)
        captured["data_locations"] = locs
        real(self)
    driver.Federation.stop = stop
    result = driver.run_job(spec)
    print("RESULT" + json.dumps({"nodes": nodes, "placement": result.summary["placement"],
                                 "data_locations": captured["data_locations"],
                                 "placement_keys": captured["placement_keys"],
                                 "summary_keys": sorted(result.summary),
                                 "status": result.summary["status"],
                                 "history": result.history["parties_completed"].tolist()}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_three_parties_on_three_nodes(tmp_path):
    rng = np.random.default_rng(0)

    def frame(n):
        X = rng.normal(size=(n, 4))
        return pd.DataFrame({**{f"f{i}": X[:, i] for i in range(4)}, "y": (X[:, 0] > 0).astype(int)})

    deploy = []
    for pid in ("north", "south", "east"):
        path = tmp_path / f"{pid}.csv"
        frame(80).to_csv(path, index=False)
        deploy.append({"id": pid, "data": str(path)})
    frame(60).to_csv(tmp_path / "test.csv", index=False)
    import yaml

    spec = tmp_path / "deploy.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "deploy", "rounds": 2,
        "data": {"source": "party_files", "test_path": str(tmp_path / "test.csv"), "label": "y"},
        "parties": {"count": 3, "deploy": deploy},
        "secure_aggregation": {"weight_cap": 80},  # public: the driver never learns a party's size
        "model": {"kind": "logistic"},
        "output": {"dir": str(tmp_path / "out"), "progress": False},
    }))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(spec)], capture_output=True, text=True, check=False,
                          timeout=400)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT"):])
    assert out["status"] == "completed" and out["history"] == [3, 3]
    # a host tells the driver where it runs, never its party's row count (issue 13)
    assert out["placement_keys"] == ["data_nodes", "node"]
    assert "party_sizes" not in out["summary_keys"]
    for pid, node in out["nodes"].items():
        placed = out["placement"][pid]
        assert placed["host_node"] == node, f"{pid}'s host ran on another node"
        assert placed["train_node"] == node, f"{pid}'s training ran on another node"
        # the party's rows are only in its own node's object store
        assert out["data_locations"][node] == [node]
    print(json.dumps(out["placement"], indent=1))  # for the closing note
