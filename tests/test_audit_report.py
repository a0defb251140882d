"""``lepton-ray audit`` states what a job actually protected (issue 13, finding 7): the
neighbouring relation, the k, t, ring and field actually used, the mechanism charged, a
discarded ledger, and where each guarantee comes from. No Ray: the report is built from the
logs a job writes, here written by hand in the driver's format."""

from __future__ import annotations

from lepton_ray.audit import build_report
from lepton_ray.outputs import AuditLog
from lepton_ray.privacy.budget import PrivacyBudget
from lepton_ray.privacy.events import Gaussian, PoissonSampled, Skellam
from lepton_ray.privacy.ledger import Ledger, LedgerLock, discard_ledger

SKELLAM = PoissonSampled(sampling_probability=0.1, event=Gaussian(noise_multiplier=1.0))


def write_job(out, *, distributed: bool):
    log = AuditLog(out / "audit.jsonl")
    event = (Skellam(variance=1e6, l1_sensitivity=3e4, l2_sensitivity=1e3, sampling_probability=0.1)
             if distributed else PoissonSampled(sampling_probability=0.1,
                                                event=Gaussian(noise_multiplier=1.1)))
    dp = {"noise": "distributed" if distributed else "central", "epsilon_budget": 3.0,
          "delta": 1e-5, "noise_multiplier": 1.1, "delta_noise_multiplier": 1.1, "clip_norm": 1.0,
          "sampling_rate": 0.1, "expected_parties": 100.0, "adaptive_clipping": False,
          "accountant": "rdp", "round_event": event.to_dict(),
          "neighbouring": "zero_out_party" if distributed else "add_remove_party"}
    if distributed:
        dp["distributed"] = {"bits": 16, "min_survivor_fraction": 0.9, "colluding_parties": None,
                             "colluding_at_expected_sample": 10, "amplification": "mixture"}
    log.write("job_start", job="j", parties=1000, hosts=2, rounds=2, secure_aggregation="secagg+",
              sampling={"kind": "poisson", "fraction": 0.1}, privacy="user_level",
              secagg={"modulus_bits": 32, "neighbours_spec": None, "threshold_spec": None,
                      "stage_timeout_s": 60, "job_id": "j-1"}, dp=dp)
    plan = {"round": 1, "neighbours": 19, "complete_graph": False, "threshold": 10,
            "modulus_bits": 32, "neighbours_chosen": "auto"}
    if distributed:
        plan["skellam"] = {"bits": 16, "gamma": 1503.0, "min_survivors": 90, "colluding": 10,
                           "honest_survivors": 80, "l2_sensitivity": 1e3, "mu": 1e6,
                           "wraparound_probability": 1e-7}
    log.write("secagg_plan", **plan)
    log.write("round", round=1, status="ok", sampled=100, completed=100, dropped=[],
              rejections=[], clipped=3, clip_norm=1.0, epsilon=0.5)
    log.write("job_end", status="completed", reason="", epsilon=0.5)


def test_attack_report_claimed_a_257_bit_field_spec_nulls_and_user_level_for_zero_out(tmp_path):
    """Before issue 13 this report said "Shamir t-of-n over a 257-bit prime field", showed no k
    and t (the spec's nulls), and described distributed noise as the coordinator's Gaussian
    noise with user-level (add/remove) DP."""
    write_job(tmp_path, distributed=True)
    text = build_report(tmp_path)
    assert "257" not in text
    assert "GF(2^31 - 1), each 256-bit secret shared as 9 limbs of 30 bits" in text
    assert "| neighbours k (round 1, the first secure round) | 19 |" in text
    assert "| threshold t (round 1) | 10 |" in text
    assert "| ring | Z_2^32 |" in text
    assert "**zero-out one party**" in text and "not *whether* it took part" in text
    assert "add or remove one party" not in text
    assert "coordinator adds Gaussian noise" not in text
    assert "Skellam noise shares added by every party" in text
    assert "| colluding parties c | 10 (default: 10% of the sampled, at least 1) |" in text
    assert "| honest shares carrying the noise | 80 |" in text
    assert "Agarwal, Kairouz and Liu 2021" in text


def test_central_report_states_add_remove_and_its_mechanism(tmp_path):
    write_job(tmp_path, distributed=False)
    text = build_report(tmp_path)
    assert "**add or remove one party** (user-level DP)" in text
    assert "| mechanism charged per round | gaussian |" in text
    assert "Gaussian noise added by the coordinator" in text
    assert "zero-out" not in text
    assert "Mironov, Talwar and Zhang 2019" in text


def test_report_says_when_the_ledger_replaced_a_discarded_one(tmp_path):
    write_job(tmp_path, distributed=False)
    path = tmp_path / "ledger.jsonl"
    with Ledger.open(path, budget=PrivacyBudget(epsilon=50, delta=1e-5)) as led:
        led.charge(round=1, event=SKELLAM)
    with LedgerLock.acquire(path) as lock:
        record = discard_ledger(path, lock=lock)
    with Ledger.open(path, budget=PrivacyBudget(epsilon=50, delta=1e-5)) as led:
        led.charge(round=1, event=SKELLAM)
    text = build_report(tmp_path)
    assert "**This ledger replaced a discarded one**" in text
    assert record.sha256 in text and "1 charges in `ledger.jsonl`" in text
