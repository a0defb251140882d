"""``lepton-ray audit OUT``: a compliance report a data-protection officer can read.

Built only from the append-only logs a job writes as it runs (``audit.jsonl``, the privacy
``ledger.jsonl``) and its ``summary.json``, so it describes what happened, not what the
spec intended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lepton_ray.outputs import LEDGER, SUMMARY, read_audit

SHAMIR_FIELD = "GF(2^31 - 1), each 256-bit secret shared as 9 limbs of 30 bits"

TRUST = {
    "secagg+": (
        "Secure aggregation (SecAgg+, Bell et al. 2020, on Bonawitz et al. 2017, in the "
        "malicious-server variant with a consistency check): every party masks its quantised "
        "update with pairwise masks agreed with its k neighbours (X25519, expanded by "
        "AES-256-CTR) and a self mask; both mask seeds are Shamir-shared t-of-(k+1) "
        f"over {SHAMIR_FIELD} to the party's neighbourhood over AES-256-GCM channels bound to "
        "the round transcript (job, round, nonce, roster hash, graph hash, t). Every party "
        "rebuilds the neighbour graph from the job's seed, checks the roster hash and checks "
        "2t > k + 1 + c before it sends anything; it signs (Ed25519) every message, commits to "
        "its secrets, takes part in a round at most once, and reveals shares only for a "
        "survivor set that t of its neighbourhood signed. The coordinator learns only the sum "
        "of the updates of the parties that finished the round."
    ),
    "secagg": ("As secagg+, on the complete graph (classic SecAgg, Bonawitz et al. 2017): every "
               "party's secrets are shared among all n participants."),
    "none": (
        "No secure aggregation: the coordinator sees each host's update in the clear (with "
        "one party per host, each party's own update). Every party must trust the coordinator."
    ),
}

THREAT_MODEL = [
    ("a malicious coordinator (deviates in any way)",
     "the sum of the survivors' updates; who sent a message and when; drop any party "
     "(the round then completes over the rest or aborts, releasing nothing)",
     "any single party's update: substituted graph, t or roster, split views of the survivor "
     "set, re-running a round and replaying envelopes, or padding the survivor list are all "
     "refused by the parties (tests/test_secagg_adversary.py)"),
    ("the coordinator with c colluding parties",
     "additionally the colluders' own inputs and shares",
     "an honest party's update while no neighbourhood holds more than c colluders, c from "
     "secure_aggregation.corrupt_fraction (2t > k + 1 + c); with more, a victim surrounded by "
     "colluders is exposed"),
    ("one malicious party",
     "drop itself; garble its own envelopes, shares or blob (it is named in this report, with "
     "its signature as evidence, and left out)",
     "stop a round that still has t honest survivors per secret, corrupt the sum silently, get "
     "an honest party dropped by a false accusation or a replayed message, or speak for "
     "another host's party"),
    ("the operator of a shared Ray cluster (simulation, parties.deploy)",
     "everything: it runs the hosts, so it can read every party's data, keys and update",
     "nothing is protected from it; use a federation (one Ray per organisation, mutual TLS) "
     "when parties do not trust one operator"),
]


def threat_model_table() -> list[str]:
    """The threat model as a markdown table (audit.md and the README say the same)."""
    lines = ["| adversary | can learn or do | cannot |", "|---|---|---|"]
    lines += [f"| {who} | {can} | {cannot} |" for who, can, cannot in THREAT_MODEL]
    return lines


MECHANISMS = {
    "gaussian": ("Gaussian noise added by the coordinator to the unmasked sum (central noise: the "
                 "coordinator must be trusted to add it and to discard the un-noised sum)"),
    "discrete_gaussian": ("discrete Gaussian noise added by the coordinator to the sum in the ring "
                          "(Canonne, Kamath and Steinke 2020; central noise: the coordinator must "
                          "be trusted to add it and to discard the un-noised sum)"),
    "skellam": ("Skellam noise shares added by every party before masking (distributed noise, "
                "Agarwal, Kairouz and Liu 2021): the coordinator only ever sees the noised sum"),
}

NEIGHBOURING = {
    "add_remove_party": (
        "Neighbouring relation: **add or remove one party** (user-level DP). The released "
        "models are (epsilon, delta)-indistinguishable whether or not any one party's whole "
        "data took part (McMahan et al. 2018, with the fixed-denominator estimator, so one party "
        "moves the sum by at most C)."),
    "zero_out_party": (
        "Neighbouring relation: **zero-out one party** (Kairouz et al. 2021, \"Practical and "
        "Private (Deep) Learning without Sampling or Shuffling\"). The guarantee compares a party "
        "sending its update with the same party sending zero: it still takes part and adds its "
        "noise share. It hides *what* any one party contributed, not *whether* it took part "
        "(the number of noise shares in the sum depends on who did); participation is hidden "
        "only by the secrecy of the sample. It is not the add/remove user-level DP of central "
        "DP-FedAvg. Noise shares are sized so that the n_min - c honest survivors alone carry "
        "the target noise (c parties colluding with the coordinator subtract their own shares); "
        "more colluders than c, or fewer survivors than n_min, void it, and honest parties "
        "refuse to unmask a sum of fewer than n_min."),
}


def _mechanism(event: dict | None) -> str | None:
    """The innermost mechanism of a charged event tree (``to_dict`` form)."""
    while isinstance(event, dict):
        if event.get("type") in ("poisson_sampled", "self_composed"):
            event = event.get("event")
        elif event.get("type") == "composed":
            events = event.get("events") or [None]
            event = events[0]
        else:
            return event.get("type")
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _count(value: Any) -> str:
    """A count, or the length of a list of ids (audit logs before ids were dropped)."""
    return str(len(value)) if isinstance(value, list) else _fmt(value)


def build_report(out: Path) -> str:
    out = Path(out)
    events = read_audit(out)
    start = next((e for e in events if e["event"] == "job_start"), {})
    rounds = [e for e in events if e["event"] == "round"]
    end = [e for e in events if e["event"] == "job_end"]
    resumes = [e for e in events if e["event"] == "resume"]
    summary = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).exists() else {}
    ledger_path = out / LEDGER
    lines = [f"# Audit report: {start.get('job', out.name)}", ""]
    lines += [f"Output directory: `{out}`. Built from `audit.jsonl`"
              + (", `ledger.jsonl`" if ledger_path.exists() else "") + " and `summary.json`.", ""]
    lines += ["## Trust model", ""]
    mode = start.get("secure_aggregation", "none")
    lines += [TRUST.get(mode, mode), ""]
    if mode != "none":
        lines += ["### Threat model", ""] + threat_model_table() + [""]
    plan = next((e for e in events if e["event"] == "secagg_plan"), None)
    sa = start.get("secagg")
    if sa:
        lines += ["| secure aggregation parameter | value |", "|---|---|"]
        if plan:
            k = f"{plan['neighbours']}" + (" (complete graph)" if plan.get("complete_graph") else "")
            lines += [f"| neighbours k (round {plan['round']}, the first secure round) | {k} |",
                      f"| threshold t (round {plan['round']}) | {plan['threshold']} |",
                      f"| ring | Z_2^{plan['modulus_bits']} |"]
        else:
            lines += ["| neighbours k, threshold t | no secure round ran |"]
        lines += [f"| k, t in the spec | {_fmt(sa.get('neighbours_spec', sa.get('neighbours'))) or 'automatic'}"
                  f", {_fmt(sa.get('threshold_spec', sa.get('threshold'))) or 'smallest with 2t > k + 1 + c'} "
                  "(automatic values follow each round's sample size) |",
                  f"| Shamir field | {sa.get('shamir_field', SHAMIR_FIELD)} |",
                  f"| colluding fraction c budgeted (corrupt_fraction) | "
                  f"{_fmt(sa.get('corrupt_fraction', 0.0))} |",
                  f"| roster hash (pinned by every party) | {sa.get('roster_hash', '-')} |", ""]
    dp = start.get("dp")
    if dp:
        kind = _mechanism(dp.get("round_event")) or ("skellam" if dp.get("noise") == "distributed"
                                                      else "gaussian")
        relation = dp.get("neighbouring") or ("zero_out_party" if kind == "skellam"
                                              else "add_remove_party")
        lines += [
            f"Differential privacy (DP-FedAvg, McMahan et al. 2018): each party clips its update "
            f"to L2 norm {_fmt(dp['clip_norm'])} before secure aggregation; "
            f"{MECHANISMS.get(kind, kind + ' noise')}. Every round is charged to the privacy "
            "ledger and fsynced before it runs, so a crash can only over-count.",
            "",
            NEIGHBOURING.get(relation, relation),
            "",
            "| mechanism parameter | value |", "|---|---|",
            f"| mechanism charged per round | {kind} |",
            f"| budget (epsilon, delta) | ({_fmt(dp['epsilon_budget'])}, {_fmt(dp['delta'])}) |",
            f"| noise multiplier z (charged) | {_fmt(dp['noise_multiplier'])} |",
            f"| clip norm C (initial) | {_fmt(dp['clip_norm'])} |",
            f"| adaptive clipping (Andrew et al. 2021) | {dp['adaptive_clipping']} |",
            f"| party sampling | {start['sampling']['kind']}, rate q = {_fmt(dp['sampling_rate'])} |",
            f"| accountant | {dp['accountant']} (Google dp-accounting"
            + ("; Skellam RDP of Agarwal et al. 2021, mixture amplification" if kind == "skellam"
               else "") + ") |",
        ]
        if kind != "skellam":
            lines.append(f"| noise on the update sum | std {_fmt(dp['delta_noise_multiplier'])} x C |")
        dist = dp.get("distributed")
        if dist:
            sk = (plan or {}).get("skellam") or {}
            lines += [
                f"| ring of the mechanism | Z_2^{dist['bits']} |",
                f"| survivors needed n_min | {_fmt(sk.get('min_survivors'))} "
                f"(fraction {_fmt(dist['min_survivor_fraction'])} of the sampled) |",
                f"| colluding parties c | {_fmt(sk.get('colluding', dist.get('colluding_at_expected_sample')))}"
                + (" (default: 10% of the sampled, at least 1)" if dist.get("colluding_parties") is None
                   else " (set in the spec)") + " |",
                f"| honest shares carrying the noise | {_fmt(sk.get('honest_survivors'))} |",
                f"| scale gamma, wrap-around probability | {_fmt(sk.get('gamma'))}, "
                f"<= {_fmt(sk.get('wraparound_probability'))} |",
            ]
        lines.append("")
    else:
        lines += ["No user-level differential privacy: the released model carries no formal "
                  "privacy guarantee beyond secure aggregation.", ""]
    if start.get("dp_sgd"):
        d = start["dp_sgd"]
        rec = summary.get("privacy", {}).get("record_level", {})
        lines += [f"Record-level DP-SGD inside every party (Abadi et al. 2016; per-sample "
                  "gradients conditionally rounded to integers, exact discrete Gaussian noise on "
                  "their sum, accounted as a sampled discrete Gaussian): noise multiplier "
                  f"{_fmt(d['noise_multiplier'])}, per-sample clip {_fmt(d['clip_norm'])}, delta "
                  f"{_fmt(d['delta'])}; largest per-party epsilon {_fmt(rec.get('epsilon_max'))} "
                  "(each party's own epsilon is written only to its host's log: it reveals how "
                  "often the party was sampled).", ""]
    lines += ["## Rounds", ""]
    if dp:
        lines += ["Under differential privacy no exact count of the parties sampled, completed, "
                  "dropped or clipped is released (the accountant charges none of them: the size of "
                  "the secret sample is itself not covered), nor any per-round time (it grows with "
                  "the parties trained), and rejected messages are counted by stage and reason, "
                  "never named. With adaptive clipping, history.csv's parties_clipped is the noised "
                  "estimate whose noise the round's charge includes (the same one that moves the "
                  "clip norm). Who took part is in no released file.", ""]
    lines += ["| round | status | parties sampled | completed | dropped | clipped | clip norm | rejected messages | epsilon |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in rounds:
        rej = e.get("rejections") or []
        n_rej = sum(r.get("count", 1) for r in rej)
        lines.append(f"| {e['round']} | {e['status']} | {_fmt(e.get('sampled'))} | "
                     f"{_fmt(e.get('completed'))} | {_count(e.get('dropped'))} | {_fmt(e.get('clipped'))} | "
                     f"{_fmt(e.get('clip_norm'))} | {n_rej} | {_fmt(e.get('epsilon'))} |")
    rejected = [(e["round"], r) for e in rounds for r in (e.get("rejections") or [])]
    lines += ["", "## Messages rejected", ""]
    if rejected and all("count" in r for _, r in rejected):  # under DP: counts only
        lines += ["| round | stage | reason | messages |", "|---|---|---|---|"]
        lines += [f"| {rnd} | {r['stage']} | {r['reason']} | {r['count']} |" for rnd, r in rejected]
    elif rejected:
        lines += ["| round | party | stage | reason | detail |", "|---|---|---|---|---|"]
        lines += [f"| {rnd} | {r.get('party', '')} | {r['stage']} | {r['reason']} | {r.get('detail', '')} |"
                  for rnd, r in rejected]
    else:
        lines.append("None.")
    lines += ["", "## Privacy spent", ""]
    if ledger_path.exists():
        from lepton_ray.privacy.ledger import read_discard_record, read_ledger

        rows = read_ledger(ledger_path)
        discarded = read_discard_record(ledger_path)
        if discarded is not None:
            lines += [f"**This ledger replaced a discarded one** (`--discard-privacy-ledger`) on "
                      f"{discarded.discarded_at}: {_fmt(discarded.charges) or 'unreadable'} charges, "
                      f"epsilon spent {_fmt(discarded.epsilon_spent) or 'unknown'}, sha256 "
                      f"`{discarded.sha256}`. Budget spent before it is not counted below.", ""]
        lines += [f"{len(rows)} charges in `ledger.jsonl`; epsilon after the last: "
                  f"{_fmt(rows[-1].epsilon_after) if rows else 0} at delta "
                  f"{_fmt(rows[-1].delta) if rows else ''}. A round whose charge is in the ledger "
                  "but which has no history row was charged and never released (a crash or a "
                  "refusal): it is counted all the same."]
    else:
        lines.append("No privacy ledger (privacy mode none).")
    if resumes:
        lines += ["", "## Resumptions", ""]
        lines += [f"- resumed from the checkpoint of round {e['from_round']} at {e['time']} "
                  f"({e['history_rows_cut']} history rows after it were re-run)" for e in resumes]
    lines += ["", "## Outcome", ""]
    if end:
        e = end[-1]
        lines.append(f"Status: **{e['status']}**" + (f" ({e['reason']})" if e.get("reason") else "")
                     + (f"; final epsilon {_fmt(e.get('epsilon'))}" if e.get("epsilon") is not None else "") + ".")
    else:
        lines.append("The job has not ended (or ended without writing its last record).")
    lines += ["", "## Where each guarantee comes from", "",
              "- Secrecy of individual updates: SecAgg+ (Bell et al. 2020, CCS) on SecAgg "
              "(Bonawitz et al. 2017, CCS): masks expanded by AES-256-CTR from X25519-agreed seeds, "
              f"Shamir t-of-(k+1) sharing (Shamir 1979) over {SHAMIR_FIELD}, AES-256-GCM channels "
              "whose associated data binds job, round, stage, sender and receiver; Ed25519-signed "
              "keys against a roster. There is no consistency round (Bonawitz et al. 2017, §4): a "
              "coordinator that tells different survivors different dropout sets is not detected, "
              "so this secrecy holds against a coordinator that follows the protocol.",
              "- Dropout recovery: survivors reveal shares only for parties that dropped (mask "
              "keys) or finished (self-mask seeds), never both for one party.",
              "- Differential privacy: clipping at the party and noise on the sum (McMahan et al. "
              "2018); the mechanism above; amplification by Poisson sampling of parties from the OS "
              "CSPRNG. Accounting by Google's dp-accounting: RDP (Mironov 2017; sampled Gaussian, "
              "Mironov, Talwar and Zhang 2019; conversion Canonne, Kamath and Steinke 2020, Prop. "
              "12) or PLD (Koskela et al. 2020; Doroshenko et al. 2022); Skellam noise by the RDP "
              "bound of Agarwal, Kairouz and Liu 2021 with the mixture (joint convexity) "
              "amplification bound; adaptive clipping by Andrew et al. 2021, Thm. 1; DP-SGD by "
              "Abadi et al. 2016.",
              "- The books: the ledger is write-ahead (fsynced before a round runs), held under an "
              "exclusive lock for the job's lifetime (a second job on it is refused), never deleted "
              "by `--overwrite` without `--discard-privacy-ledger` (then recorded in its first "
              "line), and a resume counts every round execution after the checkpoint again "
              "(user-level charges and DP-SGD participation): it over-counts, never under-counts.",
              ""]
    return "\n".join(lines)


def write_report(out: Path) -> Path:
    from lepton_ray.outputs import atomic_write_bytes

    path = Path(out) / "audit.md"
    atomic_write_bytes(path, build_report(out).encode("utf-8"))
    return path
