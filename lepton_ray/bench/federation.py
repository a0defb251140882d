"""``python -m lepton_ray.bench federation [--hidden H ...] [--rounds R] [--json PATH]``

A localhost federation through the real processes: three sites (north, south, east)
provisioned in a temporary directory, each a ``lepton-ray party`` OS process with its own
embedded Ray, dialling out over mutual TLS to a ``lepton-ray coordinator`` process that runs
the job (SecAgg+, privacy none, MLP 64-H-10 on scikit-learn digits, 1 local epoch, batch 32,
SGD lr 0.05). In the same run, ``lepton-ray simulate`` of the same spec on the same three
files is the baseline.

Printed per model width: the frame bytes each site sent to the coordinator (``from_site``) and
received from it (``to_site``) in the last round, as read by the coordinator's stream
counters (``summary.json: wire_bytes_last_round``), each also as a multiple of the raw update:
d x 4 bytes, the masked update being a vector in Z_2^32 (Bonawitz et al., CCS 2017, and Bell
et al., CCS 2020: the SecAgg+ party's upload is one ring element per coordinate plus O(k)
key and share messages). The global parameters sent to a site are d float32, also d x 4
bytes, so ``to_site`` is about 1x raw plus the protocol's messages. Then federation seconds
per round against simulate's, and both final test accuracies.

Every process it starts gets its own session and is killed by its process group in a
``finally`` block; a process that fails or overruns its timeout is reported with its log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

SITES = ("north", "south", "east")
FEATURES, CLASSES = 64, 10  # scikit-learn digits: 8x8 pixels, ten digits
RING_BYTES = 4  # one Z_2^32 element (and one float32) per coordinate
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- pure helpers
def mlp_dim(hidden: int, features: int = FEATURES, classes: int = CLASSES) -> int:
    """Parameters of an MLP with one hidden layer (weights and biases of both layers)."""
    if hidden < 1 or features < 1 or classes < 1:
        raise ValueError(f"mlp_dim: hidden={hidden}, features={features}, classes={classes}; "
                         "each must be >= 1")
    return features * hidden + hidden + hidden * classes + classes


@dataclass(frozen=True)
class WireRow:
    """One site's bytes of one round against the raw update (d ring elements)."""

    d: int
    site: str
    from_site: int
    to_site: int

    @property
    def raw(self) -> int:
        return self.d * RING_BYTES

    @property
    def from_ratio(self) -> float:
        return self.from_site / self.raw

    @property
    def to_ratio(self) -> float:
        return self.to_site / self.raw

    @property
    def from_overhead(self) -> int:
        return self.from_site - self.raw

    @property
    def to_overhead(self) -> int:
        return self.to_site - self.raw


@dataclass(frozen=True)
class TimeRow:
    """One width's federation against simulate: seconds per round and final accuracy."""

    d: int
    rounds: int
    federation_seconds: float
    simulate_seconds: float
    federation_accuracy: float
    simulate_accuracy: float

    @property
    def ratio(self) -> float:
        return self.federation_seconds / self.simulate_seconds


def wire_rows(d: int, wire: dict[str, dict[str, int]]) -> list[WireRow]:
    """``summary.json``'s ``wire_bytes_last_round`` as rows, one per site, sorted by name."""
    return [WireRow(d=d, site=s, from_site=int(b["from_site"]), to_site=int(b["to_site"]))
            for s, b in sorted(wire.items())]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_wire(rows: list[WireRow]) -> str:
    header = ["d", "site", "raw B (4d)", "from_site B", "x raw", "overhead B",
              "to_site B", "x raw", "overhead B"]
    return _table(header, [[f"{r.d:,}", r.site, f"{r.raw:,}", f"{r.from_site:,}",
                            f"{r.from_ratio:.4f}", f"{r.from_overhead:+,}", f"{r.to_site:,}",
                            f"{r.to_ratio:.4f}", f"{r.to_overhead:+,}"] for r in rows])


def format_times(rows: list[TimeRow]) -> str:
    header = ["d", "rounds", "federation s/round", "simulate s/round", "ratio",
              "federation acc", "simulate acc"]
    return _table(header, [[f"{r.d:,}", str(r.rounds), f"{r.federation_seconds:.3f}",
                            f"{r.simulate_seconds:.3f}", f"{r.ratio:.2f}",
                            f"{r.federation_accuracy:.4f}", f"{r.simulate_accuracy:.4f}"]
                           for r in rows])


def job(where: Path, *, hidden: int, rounds: int) -> dict:
    """The benchmark's job spec (the coordinator's; simulate's adds ``data.party_paths``)."""
    return {"name": f"fbench-h{hidden}", "seed": 0, "rounds": rounds,
            "data": {"source": "party_files", "test_path": str(where / "test.csv"),
                     "label": "digit", "standardize": True},
            "parties": {"count": len(SITES)}, "model": {"kind": "mlp", "hidden": [hidden]},
            "training": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 32},
            "server": {"strategy": "fedavg", "lr": 1.0},
            "secure_aggregation": {"mode": "secagg+"}, "privacy": {"mode": "none"},
            "output": {"dir": str(where / "out"), "progress": False}}


# ---------------------------------------------------------------------- processes
class BenchError(RuntimeError):
    """A process of the benchmark failed or overran; the message carries its log's tail."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digits_files(where: Path) -> None:
    """The digits data as a test file (a stratified 20 % split) and one file per site (the
    rest shuffled into three parts), as a federation's organisations would hold them."""
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    frame = pd.DataFrame(d.data, columns=[f"p{i}" for i in range(FEATURES)])
    frame["digit"] = d.target
    train, test = train_test_split(frame, test_size=0.2, random_state=0, stratify=frame["digit"])
    test.to_csv(where / "test.csv", index=False)
    shuffled = train.sample(frac=1.0, random_state=0)
    for i, rows in enumerate(np.array_split(np.arange(len(shuffled)), len(SITES))):
        shuffled.iloc[rows].to_csv(where / f"{SITES[i]}.csv", index=False)


class Processes:
    """The OS processes of one run, each in its own session (killed by its process group)."""

    def __init__(self, where: Path):
        self.where = where
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, IO] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

    def start(self, name: str, *args: str) -> None:
        log = open(self.where / f"{name}.log", "w")
        self.logs[name] = log
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "lepton_ray.cli", *args], cwd=self.where, stdout=log,
            stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def tail(self, name: str, chars: int = 3000) -> str:
        try:
            return (self.where / f"{name}.log").read_text()[-chars:]
        except OSError:
            return "(no log)"

    def wait(self, name: str, deadline: float) -> None:
        """Wait for ``name`` until the monotonic ``deadline``; it must exit 0."""
        proc = self.procs[name]
        while proc.poll() is None:
            for other, p in self.procs.items():  # a site dying early stalls the coordinator
                if other != name and p.poll() not in (None, 0):
                    raise BenchError(f"{other} exited with {p.returncode} while waiting for "
                                     f"{name}; its log ends:\n{self.tail(other)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not finish in time; its log ends:\n{self.tail(name)}")
            time.sleep(0.2)
        if proc.returncode != 0:
            raise BenchError(f"{name} exited with {proc.returncode}; its log ends:\n{self.tail(name)}")

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print(f"warning: {name} (pid {proc.pid}) did not die", file=sys.stderr)
        for log in self.logs.values():
            log.close()


def run_federation(where: Path, *, hidden: int, rounds: int, timeout: float) -> dict:
    """Provision three sites into ``where`` and run the job through the real processes;
    return the coordinator's summary.json."""
    import yaml

    from lepton_ray.federation.provision import FederationSpec, provision

    try:
        where.mkdir(parents=True)
    except FileExistsError:
        raise BenchError(f"{where} already exists; --keep needs a new directory") from None
    provision(FederationSpec(name="fbench", host="127.0.0.1", port=_free_port(), parties=SITES),
              where / "kits")
    digits_files(where)
    (where / "job.yaml").write_text(yaml.safe_dump(job(where, hidden=hidden, rounds=rounds)))
    procs = Processes(where)
    try:
        procs.start("coordinator", "coordinator", "--kit", "kits/coordinator", "job.yaml",
                    "--wait-s", "90", "--out", "out")
        for site in SITES:
            procs.start(site, "party", "--kit", f"kits/{site}", "--data", f"{site}.csv",
                        "--exit-after-job")
        deadline = time.monotonic() + timeout
        procs.wait("coordinator", deadline)
        for site in SITES:  # each site exits once the coordinator ends the job
            procs.wait(site, time.monotonic() + 60)
    finally:
        procs.close()
    summary = json.loads((where / "out" / "summary.json").read_text())
    if summary.get("status") != "completed" or "wire_bytes_last_round" not in summary:
        raise BenchError(f"coordinator summary: status {summary.get('status')}, keys "
                         f"{sorted(summary)}; its log ends:\n{procs.tail('coordinator')}")
    return summary


def run_simulate(where: Path, *, hidden: int, rounds: int, timeout: float) -> dict:
    """``lepton-ray simulate`` of the same job on the same three site files; its summary."""
    import yaml

    spec = job(where, hidden=hidden, rounds=rounds)
    spec["data"]["party_paths"] = [str(where / f"{s}.csv") for s in SITES]
    spec["output"]["dir"] = str(where / "sim")
    (where / "sim.yaml").write_text(yaml.safe_dump(spec))
    procs = Processes(where)
    try:
        procs.start("simulate", "simulate", "sim.yaml", "--quiet", "--num-cpus", "2")
        procs.wait("simulate", time.monotonic() + timeout)
    finally:
        procs.close()
    return json.loads((where / "sim" / "summary.json").read_text())


def _accuracy(summary: dict) -> float:
    return float((summary.get("final") or {}).get("test_accuracy") or float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lepton_ray.bench federation",
                                 description="Three site processes and a coordinator on "
                                             "localhost against lepton-ray simulate.")
    ap.add_argument("--hidden", type=int, nargs="+", default=[1500], metavar="H",
                    help="MLP hidden width(s); d = 64H + H + 10H + 10 (1500: 112,510; "
                         "133333: ~10.0M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200.0, metavar="S",
                    help="seconds allowed for each federation run and each simulate run")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the figures here")
    ap.add_argument("--keep", metavar="DIR", default=None,
                    help="work in DIR (kept: kits, logs, outputs) instead of a temporary directory")
    args = ap.parse_args(argv)
    problems = [f"--hidden {h}: must be >= 1" for h in args.hidden if h < 1]
    problems += [f"--rounds {args.rounds}: must be >= 2 (seconds/round is the mean after the "
                 "first)"] if args.rounds < 2 else []
    if problems:
        ap.error("; ".join(problems))

    wire: list[WireRow] = []
    times: list[TimeRow] = []
    with tempfile.TemporaryDirectory(prefix="fbench-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for hidden in args.hidden:
            d = mlp_dim(hidden)
            where = base / f"h{hidden}"
            print(f"d = {d:,} (hidden {hidden}): federation, {args.rounds} rounds ...",
                  file=sys.stderr, flush=True)
            try:
                fed = run_federation(where, hidden=hidden, rounds=args.rounds, timeout=args.timeout)
                print("... simulate ...", file=sys.stderr, flush=True)
                sim = run_simulate(where, hidden=hidden, rounds=args.rounds, timeout=args.timeout)
            except BenchError as exc:
                print(f"bench federation: d = {d:,}: {exc}", file=sys.stderr)
                return 1
            wire += wire_rows(d, fed["wire_bytes_last_round"])
            times.append(TimeRow(d=d, rounds=args.rounds,
                                 federation_seconds=float(fed["seconds_per_round"]),
                                 simulate_seconds=float(sim["seconds_per_round"]),
                                 federation_accuracy=_accuracy(fed),
                                 simulate_accuracy=_accuracy(sim)))
    print("bytes per site in the last round (raw = d x 4 B: the Z_2^32 update, and the float32 "
          "parameters sent)")
    print(format_wire(wire))
    print()
    print(format_times(times))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "wire": [{**asdict(r), "raw": r.raw, "from_ratio": r.from_ratio,
                      "to_ratio": r.to_ratio, "from_overhead": r.from_overhead,
                      "to_overhead": r.to_overhead} for r in wire],
            "time": [{**asdict(r), "ratio": r.ratio} for r in times]}, indent=2))
    return 0
