"""cluster-local.yaml on a real (fake-provider) autoscaling Ray cluster on this machine.

A head started with ``ray start --autoscaling-config=cluster-local.yaml`` (Ray's
fake_multinode provider, autoscaler v1) must start a GPU worker node when a task needs
``{"GPU": 1}`` and release it once it has been idle for ``idle_timeout_minutes``.

The head runs in its own process group with its own ``--temp-dir``; the fake worker nodes are
started by the head's autoscaler and use the same temp dir. Teardown ends that process group
and then every process of that session (found by its temp dir, its working directory, or
being a descendant of the head), never any other Ray instance on this machine.
The fake provider points its workers at GCS port 6379, so the test is skipped when 6379 is
taken.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_heads import free_port, stop_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster-local.yaml"
GCS_PORT = 6379  # fixed by the fake_multinode provider
SCALE_UP_LIMIT_S = 60  # asserted; the driver waits longer, to report what happened
SCALE_DOWN_LIMIT_S = 90

# Runs in its own interpreter (the test process may already hold another Ray connection).
DRIVER = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
t0 = time.monotonic()
rows, last = [], None

def snapshot(event=None):
    global last
    alive = [n for n in ray.nodes() if n["Alive"]]
    gpu = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    key = (len(alive), len(gpu))
    if key != last or event:
        rows.append({"t": round(time.monotonic() - t0, 1), "alive": len(alive),
                     "gpu_nodes": len(gpu), "event": event or ""})
        last = key
    return gpu

@ray.remote(num_gpus=1)
def on_gpu():
    time.sleep(1)
    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

snapshot("submit task needing GPU: 1")
ref = on_gpu.remote()
up = None
deadline = t0 + float(sys.argv[2])
while True:
    ready, _ = ray.wait([ref], timeout=0.5)
    gpu = snapshot()
    if gpu and up is None:
        up = time.monotonic() - t0
    if ready or time.monotonic() > deadline:
        break
if not ready:
    print(json.dumps({"error": "task never ran", "rows": rows}))
    sys.exit(0)
node_id, gpu_ids = ray.get(ref)
done = time.monotonic() - t0
snapshot("task done")
released = None
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    time.sleep(0.5)
    snapshot()
    if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        released = time.monotonic() - t0
        snapshot("GPU node released")
        break
print(json.dumps({"scale_up_s": up, "task_done_s": done, "released_s": released,
                  "gpu_ids": gpu_ids, "rows": rows}))
"""


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0 or _bound(port)


def _bound(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def test_gpu_worker_scales_up_on_demand_and_down_when_idle():
    if _port_in_use(GCS_PORT):
        pytest.skip(f"port {GCS_PORT} is in use here; the fake_multinode provider needs it "
                    "for its head's GCS")
    import yaml

    idle_minutes = yaml.safe_load(CONFIG.read_text())["idle_timeout_minutes"]
    temp_dir = tempfile.mkdtemp(prefix="lr-as-", dir="/tmp")  # short: socket paths < 108
    token = os.urandom(32).hex()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                              "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head_env = dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                    RAY_enable_autoscaler_v2="0")
    with open(Path(temp_dir) / "head.log", "w") as log:
        t_start = time.monotonic()
        head = subprocess.Popen(
            ["ray", "start", "--head", f"--port={GCS_PORT}", "--num-cpus=1", "--num-gpus=0",
             f"--autoscaling-config={CONFIG}", f"--temp-dir={temp_dir}",
             "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--object-store-memory=100000000",
             "--disable-usage-stats", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
        try:
            driver = subprocess.run(
                [sys.executable, "-c", DRIVER, f"127.0.0.1:{GCS_PORT}",
                 str(2 * SCALE_UP_LIMIT_S), str(SCALE_DOWN_LIMIT_S)],
                check=False, env=env, capture_output=True, text=True, timeout=300)
            head_alive_s = time.monotonic() - t_start
            lines = [ln for ln in driver.stdout.splitlines() if ln.startswith("{")]
            assert driver.returncode == 0 and lines, (
                f"driver failed ({driver.returncode}):\n{driver.stderr[-3000:]}\n"
                f"head log:\n{(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            report = json.loads(lines[-1])
        finally:
            leftovers = stop_session(head, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"\nautoscaler (idle_timeout_minutes={idle_minutes}, head up + test "
          f"{head_alive_s:.0f} s):")
    for row in report["rows"]:
        print(f"  t={row['t']:6.1f}s  alive nodes={row['alive']}  GPU nodes={row['gpu_nodes']}"
              f"  {row['event']}")
    assert not leftovers, f"processes of the test's Ray session survived: {leftovers}"

    assert "error" not in report, report
    assert report["scale_up_s"] is not None and report["scale_up_s"] < SCALE_UP_LIMIT_S
    assert report["gpu_ids"], "the task ran without a GPU assigned"
    assert max(r["alive"] for r in report["rows"]) == 2, "exactly one worker node was needed"
    assert report["released_s"] is not None, "the idle GPU node was never released"
    idle_s = report["released_s"] - report["task_done_s"]
    print(f"  scale-up {report['scale_up_s']:.1f} s; released {idle_s:.1f} s after the task "
          f"ended (idle timeout {idle_minutes * 60:.0f} s)")
    # Released only after the idle timeout (minus one autoscaler tick of slack), and soon after.
    assert idle_s >= idle_minutes * 60 - 2
    assert idle_s < idle_minutes * 60 + 60
