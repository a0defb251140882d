"""The pieces of the federation processes that need no network: the job the coordinator
offers (no site's data path in it; jobs it cannot run refused with every reason), the new
wire messages, and a site's own checks on a round's training message."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray.errors import ConfigError, FederationError
from lepton_ray.federation import wire
from lepton_ray.federation.coordinator_process import job_from_file
from lepton_ray.learning.party_update import UpdateRule, quantization_for
from lepton_ray.secagg.quantize import QuantizationSpec

NAMES = ["north", "south", "east"]


def _raw(**extra):
    return {"name": "j", "rounds": 3, "data": {"source": "party_files", "test_path": "t.csv",
                                               "label": "y"},
            "model": {"kind": "logistic"}, **extra}


def test_offered_spec_never_names_a_site_data_path():
    raw = _raw()
    raw["data"]["party_paths"] = ["/data/a.csv", "/data/b.csv", "/data/c.csv"]
    spec, offered = job_from_file(raw, 3, NAMES)
    assert spec.parties.count == 3
    assert "party_paths" not in offered["data"]
    assert "/data/" not in repr(offered)
    # what a site's policy does with it: accepted, run on the site's own path
    from lepton_ray.federation.policy import SitePolicy

    local = SitePolicy().accept(offered, "/srv/mine.csv")
    assert set(local.data.party_paths) == {"/srv/mine.csv"}
    wire.decode(wire.encode(wire.JobOffer(job_id="x", spec=offered)))  # data only on the wire


def test_jobs_the_coordinator_cannot_run_are_refused_with_every_reason():
    raw = _raw(secure_aggregation={"mode": "none"}, evaluation={"federated": True})
    with pytest.raises(ConfigError) as err:
        job_from_file(raw, 3, NAMES)
    text = str(err.value)
    assert "secure_aggregation.mode: none" in text and "evaluation.federated" in text
    with pytest.raises(ConfigError, match="privacy.dp_sgd"):
        job_from_file(_raw(privacy={"mode": "none", "dp_sgd": {"noise_multiplier": 1.0}}), 3,
                      NAMES)
    with pytest.raises(ConfigError, match="roster has 3 parties"):
        job_from_file(_raw(parties={"count": 4}), 3, NAMES)
    # user-level DP runs in a federation now (the driver's accountant and ledger)
    spec, _ = job_from_file(_raw(privacy={"mode": "user_level", "epsilon": 3.0,
                                          "delta": 1e-5, "clip_norm": 1.0}), 3, NAMES)
    assert spec.privacy.enabled


def test_new_wire_messages_roundtrip_and_are_type_checked():
    rule = UpdateRule(clip_norm=10.0, weight_cap=1437.0, stats=True)
    quant = quantization_for(n_parties=3, rule=rule, modulus_bits=32, dim=5)
    msgs = [wire.JobData(job_id="j", features=("a", "b"), classes=(0, 1, 2), moments=True),
            wire.JobData(job_id="j", features=("a",), classes=("cat", "dog"), moments=False),
            wire.Standardisation(job_id="j", mean=np.arange(2.0), scale=np.ones(2)),
            wire.TrainRound(job_id="j", round=1, params=np.arange(5, dtype=np.float32),
                            rule=rule, quantization=quant)]
    for msg in msgs:
        back = wire.decode(wire.encode(msg))
        assert type(back) is type(msg)
        for f in msg.__dataclass_fields__:
            a, b = getattr(msg, f), getattr(back, f)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    with pytest.raises(FederationError, match="TrainRound.params"):
        wire.decode(wire.encode(wire.TrainRound(job_id="j", round=1, params=[1.0, 2.0], rule=rule,
                                                quantization=quant)))
    with pytest.raises(FederationError, match="JobData.classes"):
        wire.decode(wire.encode(wire.JobData(job_id="j", features=("a",), classes=((1, 2),),
                                             moments=True)))


@pytest.fixture
def site(tmp_path):
    """A party site that accepted a small job and prepared its data (no network)."""
    import pandas as pd

    from lepton_ray.federation.party_process import PartySite
    from lepton_ray.federation.provision import FederationSpec, load_kit, provision

    kits = provision(FederationSpec(name="demo", host="127.0.0.1", port=1, parties=tuple(NAMES)),
                     tmp_path / "kits")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(40, 3)), columns=["a", "b", "c"])
    frame["y"] = rng.integers(0, 2, 40)
    frame.to_csv(tmp_path / "mine.csv", index=False)
    s = PartySite(load_kit(kits["north"]), str(tmp_path / "mine.csv"), state_dir=str(tmp_path / "st"))
    _, offered = job_from_file(_raw(), 3, NAMES)
    assert s.offer(wire.JobOffer(job_id="j", spec=offered)).accepted
    return s


def test_site_refuses_data_that_disagrees_with_the_federation(site):
    with pytest.raises(FederationError, match="columns"):
        site.rpc_prepare(wire.JobData(job_id="j", features=("a", "b", "x"), classes=(0, 1),
                                      moments=True))
    with pytest.raises(FederationError, match="labels not seen"):
        site.rpc_prepare(wire.JobData(job_id="j", features=("a", "b", "c"), classes=(0, 7),
                                      moments=True))


def _plan(site, *, rule, round_=1, modulus_bits=32, roster=None, dp_noise=None):
    """A round plan for job "j" as the driver makes it (the job's pins, its graph)."""
    from lepton_ray.learning.party_update import SecureRoundPlan
    from lepton_ray.secagg import JobPins

    roster = roster or site.roster
    spec = site.jobs["j"]
    params = 3 * 2 + 2
    config = JobPins.for_job("j", roster, spec.secure_aggregation).plan(
        roster=roster, round_=round_, dim=rule.width(params), participants=[0, 1, 2],
        modulus_bits=modulus_bits)
    quant = quantization_for(n_parties=3, rule=rule, modulus_bits=modulus_bits, dim=params)
    return SecureRoundPlan(config=config, rule=rule, quantization=quant)


@pytest.mark.ray
def test_site_refuses_a_round_that_asks_for_an_unclipped_or_foreign_update(site, ray_session):
    """The site's own checks, before its PartyHost (on the site's Ray) sees the plan; then a
    good plan is answered by the host with the site's own advert, and only once."""
    from lepton_ray.crypto.identity import IdentityKey, Roster

    site.rpc_prepare(wire.JobData(job_id="j", features=("a", "b", "c"), classes=(0, 1),
                                  moments=True))
    site.rpc_standardise(wire.Standardisation(job_id="j", mean=np.zeros(3), scale=np.ones(3)))
    params = [np.zeros(3 * 2 + 2, dtype=np.float32)]
    good = UpdateRule(clip_norm=10.0, weight_cap=40.0, stats=True)  # the spec's default clip norm
    loose = UpdateRule(clip_norm=1e6, weight_cap=40.0, stats=True)

    def advertise(plan, round_=1, parties=(0,)):
        return site(wire.Call(id=1, method="advertise",
                              args=(round_, plan, params, list(parties), ())))

    with pytest.raises(FederationError, match="clip norm"):
        advertise(_plan(site, rule=loose))
    with pytest.raises(FederationError, match="ring of 64 bits"):
        advertise(_plan(site, rule=good, modulus_bits=64))
    with pytest.raises(FederationError, match="outside the accepted job"):
        advertise(_plan(site, rule=good, round_=99), round_=99)
    with pytest.raises(FederationError, match="its own party 0 only"):
        advertise(_plan(site, rule=good), parties=(0, 1))
    swapped = Roster(site.roster.public_keys[:2] + (IdentityKey.generate().public_bytes,))
    with pytest.raises(FederationError, match="roster is not the roster pinned"):
        advertise(_plan(site, rule=good, roster=swapped))
    report, adverts = advertise(_plan(site, rule=good))
    assert type(report) is wire.Report and report.parties == (0,) and report.failed == ()
    assert [a.party for a in adverts] == [0] and adverts[0].job_id == "j"
    # the same round again (a replay by the coordinator): the host refuses, nothing sent
    report, adverts = advertise(_plan(site, rule=good))
    assert adverts == [] and "never twice" in report.failed[0][1]


def test_a_dp_site_refuses_a_weighted_or_unnoised_plan():
    """Under user-level DP every party weighs 1 and the noise is where the accepted spec puts
    it: a plan asking for a weighted update or for no Skellam noise (distributed) is refused
    by the site's rule check (pure; no Ray)."""
    from lepton_ray.config import load_spec
    from lepton_ray.federation.party_process import check_rule
    from lepton_ray.learning.party_update import SecureRoundPlan

    def spec(noise):
        raw = _raw(privacy={"mode": "user_level", "epsilon": 3.0, "delta": 1e-5,
                            "clip_norm": 1.0, "noise": noise})
        raw["data"]["party_paths"] = ["a.csv"] * 3
        return load_spec({**raw, "parties": {"count": 3}})

    dp_rule = UpdateRule(clip_norm=1.0, weight_cap=None)
    quant = quantization_for(n_parties=3, rule=dp_rule, modulus_bits=32, dim=8)
    fine = SecureRoundPlan(config=None, rule=dp_rule, quantization=quant)
    assert check_rule(spec("central"), fine) == []
    weighted = SecureRoundPlan(config=None, rule=UpdateRule(clip_norm=1.0, weight_cap=40.0),
                               quantization=quant)
    assert any("weighted" in p for p in check_rule(spec("central"), weighted))
    assert any("clip norm" in p for p in check_rule(
        spec("central"), SecureRoundPlan(config=None, rule=UpdateRule(clip_norm=5.0),
                                         quantization=quant)))
    assert any("distributed" in p for p in check_rule(spec("distributed"), fine))


def test_a_site_that_answers_for_another_party_is_refused():
    """Attack: a site's stage reply claims another party's report. The coordinator takes a
    reply only as its own party's (its mTLS identity); the messages inside are checked again
    by the SmpcCoordinator (IMPERSONATION, tests/test_secagg_adversary.py)."""
    from lepton_ray.federation.site_hosts import _stage_reply

    report, messages = _stage_reply((wire.Report(host=1, parties=(1,)), []), 1)
    assert report.host == 1 and report.parties == (1,) and messages == []
    with pytest.raises(FederationError, match="answered for"):
        _stage_reply((wire.Report(host=1, parties=(2,)), []), 1)
    with pytest.raises(FederationError, match="answered for"):
        _stage_reply((wire.Report(host=2, parties=()), []), 1)
    with pytest.raises(FederationError, match="expected"):
        _stage_reply(("not a report", []), 1)
    # a failure the site reports is its own party's, whatever id it wrote
    report, _ = _stage_reply((wire.Report(host=1, parties=(), failed=((7, "diverged"),)), []), 1)
    assert report.failed == ((1, "diverged"),)


def test_a_distributed_dp_site_refuses_less_noise_than_the_spec_promises():
    """Attack: the coordinator sends the parties Skellam parameters with a smaller noise
    multiplier (or another rotation) than the accepted spec's calibration gives, while every
    site's ledger would charge the promised epsilon. The site recomputes the parameters from
    its own copy of the spec (the driver's calibration, dp_fedavg_for_spec) and refuses."""
    import dataclasses
    import hashlib

    from lepton_ray.config import load_spec
    from lepton_ray.crypto.identity import IdentityKey, Roster
    from lepton_ray.federation.party_process import check_rule
    from lepton_ray.learning.party_update import SecureRoundPlan
    from lepton_ray.privacy.dpfedavg import dp_fedavg_for_spec
    from lepton_ray.secagg import JobPins

    raw = _raw(privacy={"mode": "user_level", "epsilon": 3.0, "delta": 1e-5, "clip_norm": 1.0,
                        "noise": "distributed", "colluding_parties": 0})
    raw["data"]["party_paths"] = ["a.csv"] * 3
    spec = load_spec({**raw, "parties": {"count": 3}})
    n_params = 8
    roster = Roster(tuple(IdentityKey.generate().public_bytes for _ in range(3)))
    dp = dp_fedavg_for_spec(spec, n_params)
    config = JobPins.for_job("j", roster, spec.secure_aggregation).plan(
        roster=roster, round_=1, dim=8, participants=[0, 1, 2], modulus_bits=32)
    honest = dp.distributed.params(n=3, threshold=config.threshold, clip_norm=1.0,
                                   noise_multiplier=dp.noise_multiplier)
    seed = hashlib.sha256(b"lepton-ray/rotation/j/1").digest()
    rule = UpdateRule(clip_norm=1.0, weight_cap=None)

    def plan(skellam, rotation=seed):
        return SecureRoundPlan(config=config, rule=rule, quantization=None, skellam=skellam,
                               rotation_seed=rotation)

    assert check_rule(spec, plan(honest), n_params=n_params) == []
    quieter = dataclasses.replace(honest, noise_multiplier=honest.noise_multiplier / 10)
    assert any("Skellam parameters" in p for p in check_rule(spec, plan(quieter), n_params=n_params))
    fewer = dataclasses.replace(honest, min_survivors=1)
    assert any("Skellam parameters" in p for p in check_rule(spec, plan(fewer), n_params=n_params))
    assert any("rotation seed" in p for p in check_rule(spec, plan(honest, rotation=b"\0" * 32),
                                                       n_params=n_params))
