"""The two federation processes on localhost: ``lepton-ray coordinator`` and three
``lepton-ray party`` sites, each a separate OS process with its own kit, talking over mutual
TLS. Checked against independent references: ``lepton-ray simulate`` of the same spec on the
same three files (accuracy), and numpy's sum of what each site recorded as its ring input
(the aggregate the coordinator unmasked)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.federation, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SITES = ("north", "south", "east")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digits_files(where: Path) -> None:
    """The digits data as a test file and three site files (a stratified 20 % test split, the
    rest shuffled into three parts), as a federation's organisations would hold them."""
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    frame = pd.DataFrame(d.data, columns=[f"p{i}" for i in range(64)])
    frame["digit"] = d.target
    train, test = train_test_split(frame, test_size=0.2, random_state=0, stratify=frame["digit"])
    test.to_csv(where / "test.csv", index=False)
    shuffled = train.sample(frac=1.0, random_state=0)
    for i, rows in enumerate(np.array_split(np.arange(len(shuffled)), len(SITES))):
        shuffled.iloc[rows].to_csv(where / f"{SITES[i]}.csv", index=False)


def _job(where: Path, rounds: int, **extra) -> dict:
    """jobs/digits.yaml (its model, training, server and secure-aggregation sections) for the
    three sites' files and the coordinator's test file."""
    import yaml

    main = yaml.safe_load((ROOT / "jobs" / "digits.yaml").read_text())
    return {"name": "digits-fed", "seed": 0, "rounds": rounds,
            "data": {"source": "party_files", "test_path": str(where / "test.csv"),
                     "label": "digit", "standardize": True},
            "parties": {"count": 3}, "model": main["model"], "training": main["training"],
            "server": main["server"], "secure_aggregation": main["secure_aggregation"],
            "privacy": {"mode": "none"}, "output": {"dir": str(where / "out"), "progress": False},
            **extra}


class Federation:
    """Provisioned kits, data files and the processes started (killed by process group)."""

    def __init__(self, where: Path):
        import yaml

        from lepton_ray.federation.provision import FederationSpec, provision

        self.where = where
        self.port = _free_port()
        provision(FederationSpec(name="demo", host="127.0.0.1", port=self.port, parties=SITES),
                  where / "kits")
        _digits_files(where)
        self.yaml = yaml
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.where / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "lepton_ray.cli", *args], cwd=self.where,
                                stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def coordinator(self, job: dict, *args: str) -> subprocess.Popen:
        (self.where / "job.yaml").write_text(self.yaml.safe_dump(job))
        return self.start("coordinator", "coordinator", "--kit", "kits/coordinator", "job.yaml",
                          "--wait-s", "90", "--record", "rec-coordinator", *args)

    def site(self, name: str, *args: str) -> subprocess.Popen:
        return self.start(name, "party", "--kit", f"kits/{name}", "--data", f"{name}.csv",
                          "--record", f"rec-{name}", "--exit-after-job", *args)

    def log(self, name: str) -> str:
        return (self.where / f"{name}.log").read_text()

    def wait(self, name: str, timeout: float = 240) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout} s:\n{self.log(name)[-3000:]}")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
            proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()


def _check_release(fed, job_id: str, r: int, sites) -> None:
    """The coordinator's released sum of round ``r`` (test mode: the float sum after
    unmasking, with the ring it came from) equals numpy's sum mod 2^32 of the ring inputs the
    ``sites`` recorded locally, dequantised; and exactly those sites survived."""
    from lepton_ray.learning.party_update import ring_to_float
    from lepton_ray.secagg.quantize import QuantizationSpec

    rec = np.load(fed.where / "rec-coordinator" / f"{job_id}-round-{r}.npz")
    assert sorted(rec["survivors"].tolist()) == sorted(SITES.index(s) for s in sites)
    inputs = [np.load(fed.where / f"rec-{s}" / f"{job_id}-round-{r}.npy") for s in sites]
    ring = (sum(v.astype(np.uint64) for v in inputs) % 2**32).astype(np.uint32)
    quant = QuantizationSpec(clip_norm=float(rec["clip_norm"]), scale=float(rec["scale"]),
                             modulus_bits=int(rec["modulus_bits"]))
    np.testing.assert_array_equal(rec["total"], ring_to_float(ring, quant))


def _summary(fed) -> dict:
    return json.loads((fed.where / "out" / "summary.json").read_text())


def _history(fed):
    from lepton_ray.outputs import read_history

    return read_history(fed.where / "out")


def test_three_site_processes_run_digits_like_the_simulation(federation):
    fed = federation
    job = _job(fed.where, rounds=5)
    # public per-(round, party) training seeds in both runs (a test setting): the federation
    # and simulate then train the same parties from the same seeds on the same features, and
    # differ only by the stochastic rounding into the ring (OS randomness)
    job["training"] = {**job["training"], "deterministic_seeds": True}
    fed.coordinator(job)
    for name in SITES:
        fed.site(name)
    t0 = time.perf_counter()
    assert fed.wait("coordinator") == 0, fed.log("coordinator")
    seconds = time.perf_counter() - t0
    for name in SITES:  # each site exits once the coordinator ends the job
        assert fed.wait(name, timeout=60) == 0, fed.log(name)
    summary, history = _summary(fed), _history(fed)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 5
    assert summary["training_rows"] == 1437  # the secure sum of the sites' row counts
    assert list(history["status"]) == ["ok"] * 5
    assert list(history["parties_completed"]) == [3] * 5
    assert (fed.where / "out" / "model.pt").exists()
    fed_acc = float(history["test_accuracy"].iloc[-1])

    # the aggregate of a round equals the sum (mod 2^32) of what the sites recorded locally
    job_id = summary["job_id"]
    for r in (1, 3):
        inputs = [np.load(fed.where / f"rec-{s}" / f"{job_id}-round-{r}.npy") for s in SITES]
        assert all(v.dtype == np.uint32 for v in inputs)
        assert len({v.tobytes() for v in inputs}) == 3  # three different updates
        _check_release(fed, job_id, r, SITES)

    # the reference: lepton-ray simulate of the same spec on the same three files
    sim = dict(job)
    sim["data"] = {**job["data"], "party_paths": [str(fed.where / f"{s}.csv") for s in SITES]}
    sim["output"] = {**job["output"], "dir": str(fed.where / "sim")}
    (fed.where / "sim.yaml").write_text(fed.yaml.safe_dump(sim))
    done = subprocess.run([sys.executable, "-m", "lepton_ray.cli", "simulate", "sim.yaml",
                           "--quiet", "--num-cpus", "2"], cwd=fed.where, env=fed.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from lepton_ray.outputs import read_history

    sim_acc = float(read_history(fed.where / "sim")["test_accuracy"].iloc[-1])
    print(f"federation: accuracy {fed_acc:.4f} in {seconds:.1f} s; simulate: {sim_acc:.4f}")
    # the bar: within 1 point of simulate of the same spec (chance is 0.10)
    assert abs(fed_acc - sim_acc) <= 0.01
    assert fed_acc > 0.9


def test_a_site_whose_policy_refuses_is_recorded_and_the_job_continues(federation):
    fed = federation
    (fed.where / "east-policy.yaml").write_text("allowed_models: [logistic]\n")
    fed.coordinator(_job(fed.where, rounds=2))
    fed.site("north")
    fed.site("south")
    fed.site("east", "--policy", "east-policy.yaml")
    assert fed.wait("coordinator") == 0, fed.log("coordinator")
    summary, history = _summary(fed), _history(fed)
    assert summary["status"] == "completed"
    assert summary["sites"]["east"]["status"] == "refused"
    assert "model.kind: mlp is not in the site's allowed_models" in summary["sites"]["east"]["reason"]
    assert summary["sites"]["north"]["status"] == summary["sites"]["south"]["status"] == "accepted"
    assert list(history["parties_completed"]) == [2, 2]
    assert list(history["status"]) == ["ok", "ok"]
    assert not (fed.where / "rec-east").exists()  # east computed nothing for the job
    assert "refused" in fed.log("east")
    audit = [json.loads(line) for line in (fed.where / "out" / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "site_refused" and e["site"] == "east" for e in audit)


def _kill_east_after_round_2(fed, *, rounds: int) -> None:
    """Start the coordinator and the three sites on a digits job of ``rounds`` rounds, and
    SIGKILL east once it has recorded its round-2 input: its TLS stream breaks, pending calls
    fail (SiteGone)."""
    fed.coordinator(_job(fed.where, rounds=rounds))
    for name in SITES:
        fed.site(name)
    deadline = time.monotonic() + 120
    while not list((fed.where / "rec-east").glob("*-round-2.npy")):
        assert time.monotonic() < deadline, fed.log("coordinator")
        time.sleep(0.05)
    fed.kill("east")


def _recorded_rounds(fed, site: str) -> list[int]:
    """The rounds whose ring input ``site`` recorded (test mode, ``--record``)."""
    names = (p.stem.split("-round-")[1] for p in (fed.where / f"rec-{site}").glob("*-round-*.npy"))
    return sorted(int(n) for n in names if n.isdigit())


def test_a_site_killed_mid_job_is_a_dropout_and_the_rounds_go_on(federation):
    fed = federation
    _kill_east_after_round_2(fed, rounds=6)
    assert fed.wait("coordinator") == 0, fed.log("coordinator")
    summary, history = _summary(fed), _history(fed)
    assert summary["status"] == "completed"
    assert list(history["status"]) == ["ok"] * 6  # t = 2 of 3: one dropout is survivable
    assert list(history["parties_completed"])[-2:] == [2, 2]
    assert float(history["test_accuracy"].iloc[-1]) > 0.85
    job_id = summary["job_id"]
    _check_release(fed, job_id, 6, ("north", "south"))


def test_a_killed_site_restarted_with_its_kit_rejoins_and_never_reruns_a_round(federation):
    """East is SIGKILLed after round 2 and started again with the same kit and state dir:
    the coordinator offers it the job again and it takes part in later rounds; its
    participation log (fsynced in its state dir) holds the rounds of both runs, so the
    restarted site knows every round it already took part in and refuses them (the refusal
    itself is tested on the real classes in tests/test_secagg_adversary.py and
    tests/test_secagg_protocol.py)."""
    fed = federation
    _kill_east_after_round_2(fed, rounds=200)  # ~0.2 s a round: long enough to restart east
    killed_after = max(_recorded_rounds(fed, "east"))
    fed.site("east")
    assert fed.wait("coordinator") == 0, fed.log("coordinator")
    history = _history(fed)
    assert list(history["status"]) == ["ok"] * 200
    later = [int(r) for r, n in zip(history["round"], history["parties_completed"])
             if int(r) > killed_after + 1 and int(n) == 3]
    assert later, f"east never rejoined:\n{fed.log('east')[-2000:]}"
    assert max(_recorded_rounds(fed, "east")) >= later[0]
    log = [json.loads(line) for line in
           (fed.where / "kits" / "east" / "state" / "participation.jsonl").read_text().splitlines()]
    logged = [rec["round"] for rec in log]
    assert len(logged) == len(set(logged))  # one claim per round, across both processes
    assert min(logged) <= killed_after < later[0] <= max(logged)


def _participation(fed, site: str) -> list[tuple[str, int]]:
    """``(job, round)`` of every claim in a site's fsynced participation log."""
    path = fed.where / "kits" / site / "state" / "participation.jsonl"
    return [(rec["job"], int(rec["round"])) for rec in
            (json.loads(line) for line in path.read_text().splitlines() if line.strip())]


def test_the_coordinator_killed_and_resumed_reruns_no_round_under_the_same_transcript(federation):
    """SIGKILL the coordinator after a few checkpointed rounds, start it again with
    ``--resume``: the sites reconnect to it, are offered the job again under a fresh job id,
    and the job finishes from the checkpoint. Every round's transcript binds the job id, so
    the rounds run again after the checkpoint are new executions under new transcripts; no
    site ever claims one (job, round) twice."""
    fed = federation
    rounds = 60
    job = _job(fed.where, rounds=rounds)
    job["output"]["checkpoint_every"] = 1
    fed.coordinator(job)
    for name in SITES:
        fed.site(name)
    history_file = fed.where / "out" / "history.csv"
    deadline = time.monotonic() + 120
    while not (history_file.exists() and len(history_file.read_text().splitlines()) > 5):
        assert time.monotonic() < deadline, fed.log("coordinator")
        time.sleep(0.05)
    fed.kill("coordinator")
    first_log = fed.log("coordinator")
    fed.coordinator(job, "--resume")
    assert fed.wait("coordinator") == 0, fed.log("coordinator")
    for name in SITES:
        assert fed.wait(name, timeout=60) == 0, fed.log(name)
    summary, history = _summary(fed), _history(fed)
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    assert list(history["round"]) == list(range(1, rounds + 1))  # no row lost or repeated
    assert float(history["test_accuracy"].iloc[-1]) > 0.9
    audit = [json.loads(line) for line in (fed.where / "out" / "audit.jsonl").read_text().splitlines()]
    resumed = [e for e in audit if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["from_round"] >= 5
    first_job = first_log.split("job ")[1].split(" ")[0]
    assert summary["job_id"] != first_job  # a fresh transcript for every re-run round
    for name in SITES:
        claims = _participation(fed, name)
        assert len(claims) == len(set(claims)), f"{name} took part in a (job, round) twice"
        jobs = {j for j, _ in claims}
        assert jobs == {first_job, summary["job_id"]}
        rerun = {r for j, r in claims if j == first_job} & {r for j, r in claims
                                                            if j == summary["job_id"]}
        # each job's round 0 is its own standardisation sum; of the training rounds only
        # the one the kill cut can have run under both job ids
        assert rerun - {0} <= {resumed[0]["from_round"] + 1}


def test_a_dp_job_runs_across_sites_and_a_site_over_its_lifetime_budget_sits_it_out(federation):
    """User-level DP (central discrete Gaussian, the driver's DpAccountant and write-ahead
    ledger) across three sites; east's own policy allows a lifetime epsilon of 1 and the job
    costs 2, so east's ledger refuses every round before its host sees it, and the job goes
    on over north and south. Each accepting site charged its own ledger before each round."""
    fed = federation
    (fed.where / "east-policy.yaml").write_text("lifetime_epsilon: 1.0\n")
    (fed.where / "west-policy.yaml").write_text("lifetime_epsilon: 10.0\n")
    job = _job(fed.where, rounds=3, privacy={"mode": "user_level", "epsilon": 2.0,
                                             "delta": 1e-5, "clip_norm": 1.0})
    fed.coordinator(job)
    fed.site("north", "--policy", "west-policy.yaml")
    fed.site("south")
    fed.site("east", "--policy", "east-policy.yaml")
    assert fed.wait("coordinator") == 0, fed.log("coordinator")
    summary, history = _summary(fed), _history(fed)
    assert summary["status"] == "completed"
    assert list(history["status"]) == ["ok"] * 3
    assert 0 < history["epsilon"].iloc[-1] <= 2.0 + 1e-9
    assert summary["privacy"]["epsilon_spent"] <= 2.0 + 1e-9
    assert (fed.where / "out" / "ledger.jsonl").exists()  # the coordinator's accountant
    assert "standardisation: secure sum" not in fed.log("coordinator")  # no exact statistics
    # east: refused by its own ledger every round, nothing written to it
    assert fed.log("coordinator").count("site budget") >= 3
    assert not (fed.where / "kits" / "east" / "state" / "ledger.jsonl").read_text().strip()
    assert not (fed.where / "rec-east").exists()
    # north: one write-ahead line per round, at the job's epsilon computed by the site
    lines = [json.loads(x) for x in
             (fed.where / "kits" / "north" / "state" / "ledger.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert all(x["job"] == summary["job_id"] and x["epsilon"] == 2.0 for x in lines)
