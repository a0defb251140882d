"""``python -m lepton_ray.bench simulate --parties N --rounds R``

Default workload (the one the issues quote Flower's figures for): scikit-learn digits
standardised, 80/20 stratified split, IID, MLP 64-128-10, 1 local epoch, batch 32, SGD lr 0.1,
FedAvg, every party every round. Prints one JSON object. With ``--baseline`` (default on) it
also times, in the same process, a plain single-process torch loop of the same training (no
framework: one model, a Python loop over parties, FedAvg) and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def workload(parties: int, rounds: int, out: str, *, synthetic: int | None = None,
             secure_aggregation: str = "none", per_host: int | None = None,
             vectorised: bool = True, hidden: int = 128, dropout: float = 0.0) -> dict:
    data: dict = {"source": "digits", "standardize": True, "test_fraction": 0.2,
                  "partition": {"kind": "iid"}}
    if synthetic:
        data = {"source": "synthetic", "standardize": True, "test_fraction": 0.2,
                "synthetic": {"samples": synthetic, "features": 64, "informative": 32, "classes": 10},
                "partition": {"kind": "iid"}}
    return {
        "name": "bench",
        "seed": 0,
        "rounds": rounds,
        "data": data,
        "parties": {"count": parties, "per_host": per_host, "simulated_dropout": dropout},
        "model": {"kind": "mlp", "hidden": [hidden]},
        "training": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 32,
                     "vectorised": vectorised},
        "server": {"strategy": "fedavg", "lr": 1.0},
        "sampling": {"kind": "all"},
        "secure_aggregation": {"mode": secure_aggregation},
        "output": {"dir": out, "progress": False, "checkpoint_every": 10**9},
    }


def plain_loop_seconds_per_round(spec, rounds: int = 4) -> float:
    """The same training as a plain single-process loop, no framework: the baseline. Like the
    framework's figure, the mean after the first round (which pays torch's lazy imports)."""
    import torch
    from torch import nn

    from lepton_ray.learning.data import load_federated

    torch.set_num_threads(1)
    data = load_federated(spec.data, spec.parties.count, spec.seed)
    parties = [(torch.tensor(X, dtype=torch.float32), torch.tensor(y)) for X, y in data.parties]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(data.n_features, 128), nn.ReLU(), nn.Linear(128, data.n_classes))
    global_state = [p.detach().clone() for p in model.parameters()]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        acc = [torch.zeros_like(p) for p in global_state]
        total = 0
        for X, y in parties:
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_state):
                    p.copy_(g)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            order = torch.randperm(len(y))
            for b in range(0, len(y), 32):
                idx = order[b : b + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                for a, p in zip(acc, model.parameters()):
                    a.add_(p, alpha=len(y))
            total += len(y)
        global_state = [a / total for a in acc]
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lepton_ray.bench simulate")
    ap.add_argument("--parties", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--synthetic", type=int, default=None, metavar="ROWS",
                    help="synthetic data with ROWS rows (64 features, 10 classes) instead of digits")
    ap.add_argument("--secure-aggregation", default="none", choices=["none", "secagg+", "secagg"])
    ap.add_argument("--vectorised", default="on", choices=["on", "off"],
                    help="train a host's parties together with torch.func (on) or one by one")
    ap.add_argument("--per-host", type=int, default=None)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-loop baseline")
    ap.add_argument("--hidden", type=int, default=128, help="MLP hidden width (sets the model size d)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="fraction of parties that go silent each round before sending their update "
                         "(SecAgg+: after sharing keys, so the server must rebuild their pairwise masks)")
    ap.add_argument("--compare-plaintext", action="store_true",
                    help="also run the same workload with secure_aggregation none in this process "
                         "and print the ratio of seconds per round")
    args = ap.parse_args(argv)

    from actors.driver import run_job
    from lepton_ray.bench.memory import PeakMemory
    from lepton_ray.config import load_spec

    plain = None
    if args.compare_plaintext:
        with tempfile.TemporaryDirectory() as out:
            spec = load_spec(workload(args.parties, args.rounds, out, synthetic=args.synthetic,
                                      secure_aggregation="none", per_host=args.per_host,
                                      vectorised=args.vectorised == "on", hidden=args.hidden,
                                      dropout=args.dropout))
            plain = run_job(spec, overwrite=True, num_cpus=args.num_cpus).summary
    with tempfile.TemporaryDirectory() as out:
        spec = load_spec(workload(args.parties, args.rounds, out, synthetic=args.synthetic,
                                  secure_aggregation=args.secure_aggregation,
                                  per_host=args.per_host, vectorised=args.vectorised == "on",
                                  hidden=args.hidden, dropout=args.dropout))
        rss_by_round: dict[int, float] = {}
        with PeakMemory() as mem:
            result = run_job(spec, overwrite=True, num_cpus=args.num_cpus,
                             on_round=lambda row: rss_by_round.__setitem__(row["round"], mem.sample()))
        s = result.summary
        report = {
            "parties": args.parties,
            "rounds": args.rounds,
            "hosts": s["hosts"],
            "secure_aggregation": args.secure_aggregation,
            "vectorised": args.vectorised,
            "seconds_per_round": s["seconds_per_round"],
            "first_round_seconds": s["first_round_seconds"],
            "peak_rss_mb": round(mem.peak_mb, 1),
            "ray_calls_per_round": s["ray_calls_per_round"],
            "dropout": args.dropout,
            "test_accuracy": s["final"]["test_accuracy"],
            "model_dim": int(sum(p.numel() for p in result.model.parameters())),
            "stage_seconds_per_round": s["stage_seconds_per_round"],
        }
        if plain is not None:
            report["plaintext_seconds_per_round"] = plain["seconds_per_round"]
            report["ratio_to_plaintext"] = s["seconds_per_round"] / plain["seconds_per_round"]
            report["plaintext_test_accuracy"] = plain["final"]["test_accuracy"]
        if args.rounds >= 10:  # memory must stay flat across rounds
            last = max(rss_by_round)
            report["rss_mb_round_10"] = round(rss_by_round[10], 1)
            report[f"rss_mb_round_{last}"] = round(rss_by_round[last], 1)
            report["rss_growth_after_round_10"] = round(rss_by_round[last] / rss_by_round[10] - 1, 4)
        if not args.no_baseline:
            base = plain_loop_seconds_per_round(spec)
            report["plain_loop_seconds_per_round"] = base
            report["speedup_vs_plain_loop"] = base / s["seconds_per_round"]
    print(json.dumps(report))
    return 0
