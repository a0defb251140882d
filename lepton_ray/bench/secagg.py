"""Benchmark of one SecAgg+ round, all parties and the server in this process.

``python -m lepton_ray.bench secagg --parties N --dim D --dropout F [--neighbours K]
[--modulus-bits 32|64] [--dropout-stage masked_input] [--seed S] [--repeat R]``

Prints ONE JSON object: party-side seconds per stage (summed over parties, and per party),
server-side seconds per stage, setup (graph) seconds, the total (wall clock; ``cpu_seconds``
is the process CPU time of the same round, a check on a shared machine), the plaintext sum of the
same vectors (``np.sum`` with wraparound) timed in the same run, their ratio, k, t, n, d and
whether the secure sum was exact. Dropouts go silent at ``--dropout-stage`` (default
``masked_input``, the costliest for the server: their pairwise masks must be rebuilt).
With ``--repeat R`` the round with the median total is reported.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.crypto.prg import ring_dtype
from lepton_ray.secagg.graph import NeighbourPolicy
from lepton_ray.secagg.local import StageTimings, graph_seed_from, run_local_round
from lepton_ray.secagg.plan import plan_round
from lepton_ray.secagg.stages import Stage


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lepton_ray.bench secagg",
                                description="Time one SecAgg+ round against a plaintext sum.")
    p.add_argument("--parties", type=int, default=100)
    p.add_argument("--dim", type=int, default=100_000)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="fraction of parties that drop out (also the rate k is chosen for)")
    p.add_argument("--neighbours", type=int, default=None, help="k (default: automatic)")
    p.add_argument("--modulus-bits", type=int, choices=(32, 64), default=32)
    p.add_argument("--dropout-stage", choices=[s.value for s in Stage][1:],
                   default=Stage.MASKED_INPUT.value)
    p.add_argument("--seed", type=int, default=0, help="public randomness and test inputs")
    p.add_argument("--repeat", type=int, default=1)
    return p


def _one_round(args: argparse.Namespace) -> dict:
    n, d = args.parties, args.dim
    dtype = ring_dtype(args.modulus_bits)
    rng = np.random.default_rng(args.seed)  # public benchmark data, not secret
    inputs = rng.integers(0, np.iinfo(dtype).max, size=(n, d), dtype=dtype, endpoint=True)
    dropped = sorted(rng.choice(n, size=round(args.dropout * n), replace=False).tolist())
    identities = [IdentityKey.generate() for _ in range(n)]  # long-lived, not per round
    timings = StageTimings()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    config = plan_round(job_id="bench", round_=0, roster=Roster.of(identities), dim=d,
                        graph_seed=graph_seed_from(args.seed), modulus_bits=args.modulus_bits,
                        neighbours=args.neighbours,
                        policy=NeighbourPolicy(dropout_rate=min(0.99, args.dropout)))
    timings.setup = time.perf_counter() - t0
    result = run_local_round(config, dict(enumerate(identities)),
                             {p: inputs[p] for p in range(n)},
                             silent={Stage(args.dropout_stage): dropped}, timings=timings)
    cpu = time.process_time() - cpu0
    t0 = time.perf_counter()
    plain = np.sum(inputs, axis=0, dtype=dtype)
    plain_s = time.perf_counter() - t0
    survivors = list(result.survivors)
    exact = bool(np.array_equal(result.total, inputs[survivors].sum(axis=0, dtype=dtype)))
    party_total = sum(timings.party.values())
    return {
        "n": n, "d": d, "k": config.neighbours, "t": config.threshold,
        "modulus_bits": args.modulus_bits, "dropout": args.dropout,
        "dropout_stage": args.dropout_stage, "dropped": len(result.dropped),
        "survivors": len(survivors),
        "party_seconds": {s.value: round(v, 6) for s, v in timings.party.items()},
        "party_seconds_per_party": round(party_total / n, 6),
        "server_seconds": {s.value: round(v, 6) for s, v in timings.server.items()},
        "setup_seconds": round(timings.setup, 6),
        "party_total_seconds": round(party_total, 6),
        "server_total_seconds": round(sum(timings.server.values()), 6),
        "total_seconds": round(timings.total, 6),
        "cpu_seconds": round(cpu, 6),
        "plaintext_sum_seconds": round(plain_s, 6),
        "ratio_total_to_plaintext": round(timings.total / max(plain_s, 1e-9), 1),
        "exact": exact,
        "plaintext_checksum": int(plain[:8].astype(np.uint64).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.parties < 2 or args.dim < 1 or not 0 <= args.dropout < 1 or args.repeat < 1:
        print(json.dumps({"error": "need --parties >= 2, --dim >= 1, 0 <= --dropout < 1, "
                                   "--repeat >= 1"}))
        return 2
    runs = sorted((_one_round(args) for _ in range(args.repeat)),
                  key=lambda r: r["total_seconds"])
    report = runs[len(runs) // 2]
    if args.repeat > 1:
        report["repeat"] = args.repeat
        report["total_seconds_all"] = [r["total_seconds"] for r in runs]
    print(json.dumps(report))
    return 0 if report["exact"] else 1
