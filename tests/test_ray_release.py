"""What a job releases (issue 13, "nothing about party data leaves outside the secure sum and
the accountant"): a DP job's every output file holds no exact per-round count or loss of
party data and no participant id; the driver and coordinator see only totals of the hosts'
statistics; without DP the training loss comes from the sum and equals the direct
example-weighted mean (marked ``ray``)."""

import dataclasses
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

import lepton_ray
from actors.party_host import StageReport
from lepton_ray.audit import write_report

pytestmark = pytest.mark.ray

DP = {"mode": "user_level", "epsilon": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 1.0,
      "dp_sgd": {"noise_multiplier": 1.1, "clip_norm": 1.0},
      "adaptive_clipping": {"enabled": True, "target_quantile": 0.5, "learning_rate": 0.2,
                            "count_noise_std": 2.0}}
PARTY_COLUMNS = ("parties_sampled", "parties_completed", "parties_clipped", "train_loss")
# keys that would carry a per-round or per-party count/loss of party data, or party ids, or a
# per-round time (it grows with the number of parties trained, the secret sample's size)
FORBIDDEN_KEYS = {"per_party", "epsilon_median", "party_sizes", "ray_calls_per_round", "sampled",
                  "completed", "dropped", "clipped", "participants", "participation", "train_loss",
                  "survivors", "party", "examples", "losses", "round_seconds", "first_round_seconds",
                  "stage_seconds", "stage_seconds_per_round"}


def _keys(obj, path=""):
    """Every key of a JSON-like value, recursively, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k), f"{path}.{k}"
            yield from _keys(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _keys(v, f"{path}[{i}]")


def _assert_no_forbidden(obj, where):
    bad = [p for k, p in _keys(obj) if k in FORBIDDEN_KEYS]
    assert not bad, f"{where} releases {bad}"


def test_a_dp_job_releases_no_party_statistics_and_no_participant_ids(ray_session, small_job, tmp_path):
    out = tmp_path / "dp"
    r = lepton_ray.run(small_job, rounds=2, privacy=DP, sampling={"kind": "poisson", "fraction": 0.8},
                       output={"dir": str(out), "progress": False, "tensorboard": True})
    write_report(out)  # audit.md, as `lepton-ray audit` makes it
    files = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert files <= {"history.csv", "summary.json", "audit.jsonl", "audit.md", "model.pt",
                     "checkpoint.pt", "ledger.jsonl", "ledger.jsonl.lock", "history.png",
                     "tensorboard"}, files
    # no participants.jsonl; the lock file holds at most the (finished) job's pid and host
    assert "party" not in (out / "ledger.jsonl.lock").read_text()

    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2
    for col in ("parties_sampled", "parties_completed", "train_loss"):
        # blank: exact statistics of party data, charged to no one
        assert history[col].isna().all(), (col, history[col].tolist())
    # adaptive clipping: the noised (charged) estimate, a float (exactness is tested below)
    assert history["parties_clipped"].notna().all()
    assert history["round_seconds"].isna().all()  # grows with the secret number trained
    assert set(history["status"]) <= {"ok", "not released"}  # no detail that may hold counts
    assert history["epsilon"].notna().all()

    summary = json.loads((out / "summary.json").read_text())
    _assert_no_forbidden(summary, "summary.json")
    timing = {k for k in summary if "second" in k}
    assert timing == {"seconds_total", "seconds_per_round"}, timing  # whole-job totals only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for ev in (out / "tensorboard").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "test_accuracy" in tags, tags
    assert not {t for t in tags if "second" in t or t.startswith("stage/")}, tags
    rec = summary["privacy"]["record_level"]
    assert set(rec) == {"noise_multiplier", "clip_norm", "delta", "epsilon_max"} and rec["epsilon_max"] > 0

    events = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["event"] == "round"]
    assert len(rounds) == 2
    for e in rounds:
        assert set(e) <= {"event", "time", "round", "status", "rejections", "clip_norm", "epsilon"}, e
        assert all(set(rej) == {"stage", "reason", "count"} for rej in e["rejections"])
    for e in events:
        _assert_no_forbidden({k: v for k, v in e.items() if k != "event"}, f"audit.jsonl {e['event']}")

    md = (out / "audit.md").read_text()
    table = md.split("## Rounds")[1].split("## Messages rejected")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    for cells in rows:  # round, status, sampled, completed, dropped, clipped: blank counts
        assert [c.strip() for c in cells[2:6]] == ["", "", "", ""], cells
    assert "per party in summary.json" not in md and "median" not in md

    model = torch.load(io.BytesIO((out / "model.pt").read_bytes()), weights_only=False)
    assert set(model) == {"state_dict", "spec", "n_features", "classes", "feature_names", "mean", "scale"}
    assert not model["spec"]["output"]["record_participants"]
    ckpt = torch.load(io.BytesIO((out / "checkpoint.pt").read_bytes()), weights_only=False)
    assert set(ckpt) == {"round", "executions", "params", "server_state", "dp", "spec"}  # no participation vector
    assert r.summary == summary


def test_record_participants_writes_a_confidential_separate_file(ray_session, small_job, tmp_path, capfd):
    out = tmp_path / "rp"
    lepton_ray.run(small_job, rounds=2, privacy={k: v for k, v in DP.items() if k != "dp_sgd"},
                   sampling={"kind": "poisson", "fraction": 0.5},
                   output={"dir": str(out), "progress": False, "record_participants": True})
    assert "record_participants is true" in capfd.readouterr().err
    lines = [json.loads(x) for x in (out / "participants.jsonl").read_text().splitlines()]
    assert lines[0]["confidential"] is True and "CONFIDENTIAL" in lines[0]["warning"]
    assert [x["round"] for x in lines[1:]] == [1, 2]
    for x in lines[1:]:
        assert set(x["completed"]) <= set(x["sampled"]) <= set(range(6))
        assert set(x["dropped"]) <= set(x["sampled"])
    assert (out / "participants.jsonl").stat().st_mode & 0o077 == 0
    # the ids stay there: the released files are as without the option
    history = pd.read_csv(out / "history.csv")
    assert history["parties_sampled"].isna().all()


def test_attack_driver_reads_a_single_hosts_loss_and_example_count(ray_session, small_job, tmp_path,
                                                                  monkeypatch):
    """One party per host (a deployment): the driver/coordinator tries to read each host's,
    i.e. each party's, exact example count, loss and clip flag from what the host sends.
    Before issue 13 StageReport carried them in plaintext and this attack recovered every
    party's exact size; now only the summed vector carries them."""
    from actors import driver as drv

    seen = []
    real = drv.Federation._gather

    def spy(self, r, stage, outs, timeout):
        live = real(self, r, stage, outs, timeout)
        seen.extend((stage, rep, payload) for rep, payload in live.values())
        return live

    monkeypatch.setattr(drv.Federation, "_gather", spy)
    r = lepton_ray.run(small_job, rounds=1, parties={"count": 6, "per_host": 1},
                       secure_aggregation__mode="secagg+", output__dir=str(tmp_path / "a"))
    from lepton_ray.config import load_spec
    from lepton_ray.learning.data import load_federated

    spec = load_spec(small_job)
    sizes = sorted(int(n) for n in load_federated(spec.data, 6, spec.seed).party_sizes)
    learned = {}
    for stage, rep, _ in seen:
        if stage not in ("train", "masked_input"):  # the stages at which a host has trained
            continue
        for attr in ("examples", "train_loss", "clipped"):
            if getattr(rep, attr, None) is not None and rep.parties:
                learned.setdefault(attr, []).append(getattr(rep, attr))
    assert sorted(learned.get("examples", [])) != sizes, "the driver learned every party's exact size"
    assert learned == {}, f"stage reports carry party statistics: {learned}"
    fields = {f.name for f in dataclasses.fields(StageReport)}
    assert fields == {"host", "parties", "failed", "device", "ray_calls"}
    # what reaches the coordinator at stage 3 is one masked ring sum per host, nothing beside it
    from lepton_ray.secagg.messages import MaskedSum

    import ray

    masked = [ray.get(p) for stage, _, p in seen if stage == "masked_input"]
    for batch in masked:
        assert all(type(m) is MaskedSum for m in batch)
        for m in batch:
            floats = [f.name for f in dataclasses.fields(m)
                      if isinstance(getattr(m, f.name), float)]
            assert floats == [], floats
    assert r.history["train_loss"].notna().all()  # the total still arrives, from the sum


def test_train_loss_without_dp_is_the_example_weighted_mean_from_the_sum(ray_session, small_job, tmp_path):
    """Oracle: the parties trained directly (same seeds, same start) and their losses averaged
    with their example counts; the job's train_loss comes from the (secure) sum."""
    from actors.training import choose_trainer
    from lepton_ray.config import load_spec
    from lepton_ray.learning.data import as_float32, load_federated
    from lepton_ray.learning.local import public_party_seed
    from lepton_ray.learning.models import build_model, flat_parameters

    spec = load_spec(small_job, rounds=1)
    data = load_federated(spec.data, spec.parties.count, spec.seed)
    model = build_model(spec.model, data.n_features, data.n_classes, seed=spec.seed)
    torch.set_num_threads(1)
    res = choose_trainer(spec)(model_spec=spec.model, training=spec.training, n_features=data.n_features,
                               n_classes=data.n_classes, global_params=flat_parameters(model),
                               datasets=list(as_float32(data.parties)),
                               seeds=[public_party_seed(spec.seed, 1, p) for p in range(6)],
                               device=torch.device("cpu"))
    expected = float(np.average(res.losses, weights=res.examples))
    for mode in ("none", "secagg+"):
        r = lepton_ray.run(small_job, rounds=1, secure_aggregation__mode=mode,
                           training__deterministic_seeds=True, output__dir=str(tmp_path / mode))
        assert r.history["train_loss"].iloc[0] == pytest.approx(expected, rel=1e-4), mode
        assert r.history["parties_clipped"].iloc[0] == 0


def test_a_host_tells_each_party_its_own_epsilon_and_the_driver_only_the_maximum(ray_session, small_job,
                                                                                 capfd):
    from actors.party_host import PartyHost
    from lepton_ray.config import load_spec
    from lepton_ray.learning.data import as_float32, load_federated
    from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon as compute_epsilon

    spec = load_spec(small_job, privacy={"dp_sgd": {"noise_multiplier": 1.1, "clip_norm": 1.0}})
    data = load_federated(spec.data, 6, spec.seed)
    host = PartyHost(0, spec, [0, 1], list(as_float32(data.parties[:2])), data.n_features,
                     data.n_classes, prior_rounds=1)
    host.participation[1] += 2  # party 1 trained in two more rounds
    worst = host.record_level_epsilon_max()
    err = capfd.readouterr().err
    n = int(data.party_sizes[1])  # oracle: RDP of 3 rounds of ceil(n/32) sampled discrete
    # Gaussian steps each (the integer noise DP-SGD adds)
    expected = compute_epsilon(sampling_rate=32 / n, noise_multiplier=1.1, steps=3 * -(-n // 32), delta=1e-5)
    assert "party 0: record-level DP-SGD epsilon" in err and "party 1: record-level" in err
    assert "(3 rounds" in err and "(1 rounds" in err
    assert worst >= expected * (1 - 1e-6)
    assert worst == pytest.approx(max(expected, compute_epsilon(
        sampling_rate=32 / int(data.party_sizes[0]), noise_multiplier=1.1,
        steps=-(-int(data.party_sizes[0]) // 32), delta=1e-5)), rel=1e-6)


def test_a_host_tells_the_driver_where_it_runs_but_not_its_partys_size(ray_session, small_job):
    """In a deployment a host is one party: ``placement()`` (what the driver asks each host at
    start) used to return each party's row count in plaintext, outside the secure sum."""
    from actors.party_host import PartyHost
    from lepton_ray.config import load_spec
    from lepton_ray.learning.data import as_float32, load_federated

    spec = load_spec(small_job)
    data = load_federated(spec.data, 6, spec.seed)
    host = PartyHost(0, spec, [0, 1], list(as_float32(data.parties[:2])), data.n_features,
                     data.n_classes)
    placed = host.placement()
    assert set(placed) == {"node", "data_nodes"}, placed
    sizes = {int(n) for n in data.party_sizes[:2]}
    assert not any(isinstance(v, int) and v in sizes for v in placed.values())


def test_under_dp_parties_clipped_is_the_charged_noised_estimate_never_the_exact_count(
        ray_session, small_job, tmp_path):
    """Adaptive clipping pays (in the round's charged event) for noise on the clipped-party
    bit sum; history.csv releases that noised value, post-processed with the public m = qN.
    Oracle: the same noised sum moved the clip norm, C' = C exp(-eta (b - gamma)), so from
    audit.jsonl's clip norms b = gamma - ln(C'/C) / eta and the estimate must be m (1 - b).
    A clip norm far below every update clips every party, so the exact count is the number
    that completed (participants.jsonl, the confidential file): the release must differ."""
    import math

    out = tmp_path / "clip"
    q, eta, gamma = 0.8, 0.2, 0.5
    lepton_ray.run(small_job, rounds=3, privacy=dict({k: v for k, v in DP.items() if k != "dp_sgd"},
                                                     clip_norm=1e-4),
                   sampling={"kind": "poisson", "fraction": q},
                   output={"dir": str(out), "progress": False, "record_participants": True})
    history = pd.read_csv(out / "history.csv")
    events = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    norms = [e["clip_norm"] for e in events if e["event"] == "round"]
    norms.append(json.loads((out / "summary.json").read_text())["privacy"]["clip_norm"])  # C after
    exact = [len(x["completed"]) for x in map(json.loads, (out / "participants.jsonl").read_text()
                                                   .splitlines()[1:])]
    m = q * 6
    released = history["parties_clipped"].tolist()
    assert len(released) == 3 and history["status"].eq("ok").all()
    for r in range(3):
        b = gamma - math.log(norms[r + 1] / norms[r]) / eta
        assert released[r] == pytest.approx(m * (1 - b), rel=1e-5, abs=1e-4), (r, released, norms)
        assert released[r] != exact[r] and released[r] != round(released[r]), (released, exact)
    # no other released file holds a clipped count (audit.md's column is blank under DP)
    for e in events:
        assert "clipped" not in e
    _assert_no_forbidden(json.loads((out / "summary.json").read_text()), "summary.json")


def test_without_adaptive_clipping_dp_releases_no_clipped_count(ray_session, small_job, tmp_path):
    r = lepton_ray.run(small_job, rounds=1, privacy={k: v for k, v in DP.items()
                                                     if k not in ("dp_sgd", "adaptive_clipping")},
                       sampling={"kind": "poisson", "fraction": 0.8}, output__dir=str(tmp_path / "f"))
    assert r.history["parties_clipped"].isna().all() and r.history["round_seconds"].isna().all()
