"""A real SecAgg+ round across three sites over mutual TLS on localhost: each site plays its
party with its kit's Ed25519 identity and pinned roster; the coordinator runs the real
server. The aggregate equals the sum of what the sites recorded locally."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.errors import FederationError
from lepton_ray.federation.provision import FederationSpec, load_kit, provision
from lepton_ray.federation.site import SiteSecAgg, drive_round
from lepton_ray.federation.transport import CoordinatorServer, SiteClient
from lepton_ray.secagg.plan import job_graph_seed, plan_round

PARTIES = ("north", "south", "east")


@pytest.fixture
def federation(tmp_path):
    kits = provision(FederationSpec(name="demo", host="127.0.0.1", port=1, parties=PARTIES),
                     tmp_path / "kits")
    coordinator = load_kit(kits["coordinator"])
    server = CoordinatorServer(coordinator, host="127.0.0.1", port=0).start()
    sites, clients = {}, {}
    for name in PARTIES:
        kit = load_kit(kits[name])
        rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
        sites[name] = SiteSecAgg(kit, lambda r, rng=rng: sites_dim[0] and rng.integers(
            0, 2**32, sites_dim[0], dtype=np.uint64).astype(np.uint32))
        clients[name] = SiteClient(kit, sites[name], address=f"127.0.0.1:{server.port}")
        threading.Thread(target=clients[name].run, kwargs={"max_backoff": 0.5}, daemon=True).start()
    sessions = server.wait_for(3, timeout=30)
    assert len(sessions) == 3
    yield coordinator, server, sessions, sites, clients
    for c in clients.values():
        c.stop()
    server.stop()


sites_dim = [0]


def _config(coordinator, dim, round_=1, roster=None, job="job-1"):
    sites_dim[0] = dim
    return plan_round(job_id=job, round_=round_, roster=roster or coordinator.roster.secagg_roster(),
                      dim=dim, graph_seed=job_graph_seed(job))


def test_secure_sum_across_three_sites_equals_their_recorded_inputs(federation):
    coordinator, server, sessions, sites, _ = federation
    config = _config(coordinator, 1000)
    outcome = drive_round(config, sessions, stage_timeout=30)
    expected = sum(s.record[1].astype(np.uint64) for s in sites.values()) % 2**32
    assert outcome.dropped == {}
    assert sorted(outcome.result.survivors) == [0, 1, 2]
    assert np.array_equal(outcome.result.total.astype(np.uint64), expected)


def test_a_site_that_disconnects_mid_round_is_a_dropout(federation):
    coordinator, server, sessions, sites, clients = federation
    config = _config(coordinator, 500)
    original = sites["east"].rpc_masked_input

    def die(inbox):  # east goes away after sharing its keys
        clients["east"].stop()
        raise FederationError("killed")

    sites["east"].rpc_masked_input = die
    outcome = drive_round(config, sessions, stage_timeout=30)
    assert "east" in outcome.dropped
    assert sorted(outcome.result.survivors) == [0, 1]
    expected = (sites["north"].record[1].astype(np.uint64) + sites["south"].record[1]) % 2**32
    assert np.array_equal(outcome.result.total.astype(np.uint64), expected)
    sites["east"].rpc_masked_input = original


def test_attack_coordinator_swaps_the_roster_sites_refuse(federation):
    """Attack: the coordinator plans a round whose roster replaces south's key with one it
    holds (to impersonate south and learn the others' masks). Every site checks the plan's
    roster against the CA-signed roster in its own kit and refuses: the round cannot run."""
    coordinator, server, sessions, sites, _ = federation
    keys = list(coordinator.roster.secagg_roster().public_keys)
    keys[1] = IdentityKey.generate().public_bytes
    config = _config(coordinator, 100, roster=Roster(tuple(keys)))
    from lepton_ray.errors import ThresholdError

    with pytest.raises(ThresholdError):
        drive_round(config, sessions, stage_timeout=30)
    assert all(s.state is None for s in sites.values())


def test_sites_never_take_part_twice_in_one_round(federation):
    coordinator, server, sessions, sites, _ = federation
    config = _config(coordinator, 50)
    drive_round(config, sessions, stage_timeout=30)
    from lepton_ray.errors import ThresholdError

    with pytest.raises(ThresholdError):
        drive_round(config, sessions, stage_timeout=30)  # the same (job, round) again


@pytest.mark.slow
@pytest.mark.parametrize("dim", [112_510, 10_000_000])
def test_bytes_on_the_wire_per_party_per_round(federation, dim):
    coordinator, server, sessions, sites, _ = federation
    outcome = drive_round(_config(coordinator, dim), sessions, stage_timeout=300)
    raw = 4 * dim  # the party's update in Z_{2^32}
    for site in PARTIES:
        up, down = outcome.bytes_in[site], outcome.bytes_out[site]
        print(f"d={dim}: {site} sent {up} B ({up / raw:.4f}x raw), received {down} B, "
              f"round {outcome.seconds:.2f} s")
        assert up <= 1.1 * raw + 64 * 1024  # 1.1x the raw update + O(k) overhead
        assert down <= 64 * 1024 + 64 * len(PARTIES) * 1024


def _dp_spec(**privacy):
    return {"name": "fed", "rounds": 5, "data": {"source": "party_files", "test_path": "t.csv",
                                                 "label": "y"},
            "parties": {"count": 3}, "model": {"kind": "mlp"},
            "privacy": {"mode": "user_level", "epsilon": 3.0, "noise_multiplier": 1.2, **privacy}}


@pytest.fixture
def policed(tmp_path):
    """Three sites with data paths, policies and lifetime ledgers."""
    from lepton_ray.federation.ledger import SiteLedger
    from lepton_ray.federation.policy import SitePolicy

    kits = provision(FederationSpec(name="demo", host="127.0.0.1", port=1, parties=PARTIES),
                     tmp_path / "kits")
    coordinator = load_kit(kits["coordinator"])
    server = CoordinatorServer(coordinator, host="127.0.0.1", port=0).start()
    policies = {"north": SitePolicy(), "south": SitePolicy(),
                "east": SitePolicy(allowed_models=("logistic",))}
    budgets = {"north": 100.0, "south": 100.0, "east": 100.0}
    sites, clients, ledgers = {}, {}, {}
    for name in PARTIES:
        kit = load_kit(kits[name])
        ledgers[name] = SiteLedger(tmp_path / f"{name}.jsonl", lifetime_epsilon=budgets[name])
        sites[name] = SiteSecAgg(kit, lambda r: np.arange(sites_dim[0], dtype=np.uint32),
                                 policy=policies[name], data_path=f"/srv/{name}.csv",
                                 ledger=ledgers[name])
        clients[name] = SiteClient(kit, sites[name], address=f"127.0.0.1:{server.port}")
        threading.Thread(target=clients[name].run, kwargs={"max_backoff": 0.5}, daemon=True).start()
    sessions = server.wait_for(3, timeout=30)
    yield coordinator, server, sessions, sites, ledgers
    for c in clients.values():
        c.stop()
    for ledger in ledgers.values():
        ledger.close()
    server.stop()


def test_policy_refusal_is_recorded_and_the_job_runs_without_that_site(policed):
    from lepton_ray.federation.site import offer_job

    coordinator, server, sessions, sites, _ = policed
    accepted, refused = offer_job(sessions, "job-7", _dp_spec())
    assert sorted(accepted) == ["north", "south"]
    assert "model.kind: mlp is not in the site's allowed_models" in refused["east"]
    participants = sorted(sessions[s].index for s in accepted)  # indexes follow connect order
    sites_dim[0] = 64
    config = plan_round(job_id="job-7", round_=1, roster=coordinator.roster.secagg_roster(), dim=64,
                        graph_seed=job_graph_seed("job-7"), participants=participants, threshold=2)
    outcome = drive_round(config, accepted, stage_timeout=30)
    assert sorted(outcome.result.survivors) == participants
    assert np.array_equal(outcome.result.total, 2 * np.arange(64, dtype=np.uint32))
    # east never accepted the job: a round of it sent to east anyway is refused
    with pytest.raises(Exception):
        sessions["east"].call("advertise", config, timeout=10)


def test_attack_job_beyond_a_sites_lifetime_budget_is_refused(policed):
    """Attack: a coordinator keeps running rounds of a DP job past what the site allows over
    its lifetime. The site's own ledger (epsilon computed by the site from the accepted spec)
    refuses the round that would exceed it, before revealing anything."""
    from lepton_ray.federation.ledger import job_epsilon
    from lepton_ray.federation.site import offer_job

    coordinator, server, sessions, sites, ledgers = policed
    spec = _dp_spec(noise_multiplier=0.8)
    spec["model"] = {"kind": "logistic"}
    spec["rounds"] = 100
    accepted, refused = offer_job(sessions, "job-8", spec)
    assert sorted(accepted) == ["east", "north", "south"], refused
    per_round = [job_epsilon(sites["north"].jobs["job-8"], r) for r in (1, 2, 3)]
    ledgers["north"].lifetime_epsilon = (per_round[1] + per_round[2]) / 2  # 2 rounds fit, not 3
    sites_dim[0] = 16
    roster = coordinator.roster.secagg_roster()
    for r in (1, 2):
        config = plan_round(job_id="job-8", round_=r, roster=roster, dim=16, graph_seed=job_graph_seed("job-8"))
        assert drive_round(config, accepted, stage_timeout=30).dropped == {}
    config = plan_round(job_id="job-8", round_=3, roster=roster, dim=16, graph_seed=job_graph_seed("job-8"))
    outcome = drive_round(config, accepted, stage_timeout=30)
    assert "north" in outcome.dropped and "site budget" in outcome.dropped["north"]
    assert sorted(outcome.result.survivors) == [1, 2]
    assert ledgers["north"].jobs["job-8"][0] == pytest.approx(per_round[1])
