"""The driver's outputs part: the audit records, checkpoints, ``--resume``, the model and
the summary.

:class:`JobOutputs` is one of the three parts :class:`actors.driver.Federation` is built from
(see :mod:`actors.job_privacy`). Every file is written atomically (``lepton_ray.outputs``)
and, with ``output.encryption``, encrypted at rest; a resume reads only until the job has
started (:meth:`JobOutputs.commit_resume` then cuts the history after the checkpoint, never
the privacy ledger). Under DP nothing the accountant did not charge is released here: no
per-round time, no party sizes, no Ray call counts (:meth:`JobOutputs.summary`).

State (on the Federation): ``spec``, ``data``, ``out``, ``key``, ``model``, ``params``,
``optimizer``, ``dp``, ``history``, ``audit``, ``first_round``, ``prior_executions``,
``round_seconds``, ``stage_seconds``, ``ray_calls``, ``devices``, ``placement``, ``hosts``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from lepton_ray.errors import ResumeError
from lepton_ray.outputs import AUDIT, CHECKPOINT, LEDGER, MODEL, read_audit, write_output
from lepton_ray.privacy.resume import executions_after, prior_executions


class JobOutputs:
    def _record_plan(self, r: int, plan) -> None:
        """Audit what the first secure round actually used (k, t, ring; with distributed DP
        the Skellam ring, scale, survivors and colluders): the spec's k and t are usually
        null (chosen per round from the sample size), so only the plan can say."""
        if getattr(self, "_plan_recorded", False):
            return
        self._plan_recorded = True
        cfg = plan.config
        info: dict[str, Any] = {
            "round": r, "neighbours": cfg.graph.degree, "complete_graph": cfg.graph.complete,
            "threshold": cfg.threshold, "modulus_bits": cfg.modulus_bits,
            "neighbours_chosen": "spec" if self.spec.secure_aggregation.neighbours else "auto",
        }
        if plan.skellam is not None:
            sk = plan.skellam
            info["skellam"] = {"bits": sk.bits, "gamma": sk.gamma, "min_survivors": sk.min_survivors,
                               "colluding": sk.colluding, "honest_survivors": sk.honest_survivors,
                               "l2_sensitivity": sk.l2_sensitivity, "mu": sk.mu,
                               "wraparound_probability": sk.wraparound_probability}
        elif plan.quantization is not None:
            info["quantization_scale"] = getattr(plan.quantization, "scale", None)
        self.audit.write("secagg_plan", **info)

    def _trust_model(self) -> dict[str, Any]:
        sa, p = self.spec.secure_aggregation, self.spec.privacy
        info: dict[str, Any] = {
            "job": self.spec.name, "parties": self.spec.parties.count, "hosts": len(self.blocks),
            "rounds": self.spec.rounds, "secure_aggregation": sa.mode.value,
            "sampling": {"kind": self.spec.sampling.kind.value, "fraction": self.spec.sampling.fraction},
            "privacy": p.mode.value,
        }
        if self.secure:
            from lepton_ray.crypto import shamir

            # k and t are chosen per round from the sample (null here = automatic); the values
            # used are in the "secagg_plan" record of the first secure round
            info["secagg"] = {"modulus_bits": sa.modulus_bits, "neighbours_spec": sa.neighbours,
                              "threshold_spec": sa.threshold, "stage_timeout_s": sa.stage_timeout_s,
                              "job_id": self.job_id, "corrupt_fraction": sa.corrupt_fraction,
                              "roster_hash": self.roster.digest.hex(),
                              "shamir_field": f"GF(2^31 - 1), {shamir.SECRET_BYTES * 8}-bit secrets "
                                              f"in {shamir.LIMBS} limbs of {shamir.LIMB_BITS} bits"}
        if self.dp is not None:
            info["dp"] = {"noise": p.noise.value, "epsilon_budget": p.epsilon, "delta": p.delta,
                          "noise_multiplier": self.dp.noise_multiplier,
                          "delta_noise_multiplier": self.dp.delta_noise_multiplier,
                          "clip_norm": self.dp.clip_norm, "sampling_rate": self.dp.sampling_rate,
                          "expected_parties": self.dp.expected_parties,
                          "adaptive_clipping": p.adaptive_clipping.enabled,
                          "accountant": p.accountant.value,
                          # the event charged per round, i.e. the mechanism actually accounted
                          "round_event": self.dp.event(self._expected_skellam() if
                                                       self.dp.distributed is not None else None
                                                       ).to_dict(),
                          "neighbouring": ("zero_out_party" if self.dp.distributed is not None
                                           else "add_remove_party")}
            if self.dp.distributed is not None:
                dn = self.dp.distributed
                info["dp"]["distributed"] = {
                    "bits": dn.bits, "min_survivor_fraction": dn.min_survivor_fraction,
                    "colluding_parties": p.colluding_parties,
                    "colluding_at_expected_sample": dn.colluding(max(2, round(self.dp.expected_parties))),
                    "amplification": dn.amplification.value}
        if p.dp_sgd.enabled:
            info["dp_sgd"] = {"noise_multiplier": p.dp_sgd.noise_multiplier,
                              "clip_norm": p.dp_sgd.clip_norm, "delta": p.dp_sgd.delta}
        return info

    def _record_release(self, r: int, outcome) -> None:
        """Test mode (``record``): the round's released sum, its survivors and the ring it
        was dequantised from, so a test can check it against what the hosts computed."""
        self.record.mkdir(parents=True, exist_ok=True)
        quant = getattr(self._plan_used, "quantization", None)
        np.savez(self.record / f"{self.job_id}-round-{r}.npz", total=outcome.released.total,
                 survivors=np.asarray(sorted(outcome.released.survivors)),
                 scale=getattr(quant, "scale", np.nan),
                 modulus_bits=getattr(quant, "modulus_bits", 0),
                 clip_norm=getattr(quant, "clip_norm", np.nan))

    def write_checkpoint(self, r: int) -> None:
        import torch

        state = {
            "round": r,
            # round executions so far, re-runs included (a count, no party id): a resume
            # counts every party in all of them (record-level DP-SGD; over-count, never under)
            "executions": self.prior_executions + r - self.first_round + 1,
            "params": self.params,
            "server_state": self.optimizer.state,
            "dp": self.dp,
            "spec": self.spec.to_dict(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        write_output(self.out, CHECKPOINT, buf.getvalue(), self.key)

    def restore(self, state: dict | None = None) -> int:
        """Resume from ``checkpoint.pt`` (``state``: as :func:`read_checkpoint` returns it):
        parameters, server-optimiser and DP state. Read-only; :meth:`commit_resume` cuts the
        history once the job has started. Returns the checkpoint's round."""
        from lepton_ray.learning.models import load_flat

        if state is None:  # died before its first checkpoint (run_job checked): from round 1
            lost = executions_after(0, audit_events=read_audit(self.out) if (self.out / AUDIT)
                                    .exists() else [], ledger_rounds=self._ledger_rounds())
            self.prior_executions = prior_executions(0, lost)
            self._recounted = lost
            return 0
        if state["params"].shape != self.params.shape:
            raise ResumeError(f"--resume {self.out}: checkpoint parameters have shape "
                              f"{state['params'].shape}, the model {self.params.shape}")
        self.params = state["params"]
        load_flat(self.model, self.params)  # the model written if no round runs is the checkpoint's
        self.optimizer.state = state["server_state"]
        self.dp = state["dp"]
        r = int(state["round"])
        # every execution after the checkpoint may have released: DP-SGD participation counts
        # each for every party (lepton_ray.privacy.resume); the ledger is never cut, so those
        # rounds stay charged and are charged again when they re-run
        lost = executions_after(r, audit_events=read_audit(self.out) if (self.out / AUDIT).exists()
                                else [], ledger_rounds=self._ledger_rounds())
        self.prior_executions = prior_executions(int(state.get("executions", r)), lost)
        self._recounted = lost
        self.first_round = r + 1
        return r

    def _ledger_rounds(self) -> list[int]:
        from lepton_ray.privacy.ledger import read_ledger

        path = self.out / LEDGER
        if not path.exists() or path.stat().st_size == 0:
            return []
        return [row.round for row in read_ledger(path)]

    def commit_resume(self) -> None:
        """History rows after the checkpoint are cut (those rounds run again, so no row is
        duplicated); the privacy ledger is only ever replayed, never cut."""
        from lepton_ray.outputs import truncate_history

        r = self.first_round - 1
        cut = truncate_history(self.out, r)
        self.audit.write("resume", from_round=r, history_rows_cut=cut,
                         executions_recounted=self._recounted)
        self.resumed = True

    def write_model(self) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(
            {
                "state_dict": self.model.state_dict(),
                "spec": self.spec.to_dict(),
                "n_features": self.data.n_features,
                "classes": self.data.classes,
                "feature_names": list(self.data.feature_names),
                "mean": self.data.mean,
                "scale": self.data.scale,
            },
            buf,
        )
        write_output(self.out, MODEL, buf.getvalue(), self.key)

    def released_stage_seconds(self) -> dict[str, float] | None:
        """The last round's wall seconds by stage for trackers and gauges; None under DP (a
        round's time grows with the secret number of parties it trained)."""
        if self.dp is not None or not self.stage_seconds:
            return None
        return self.stage_seconds[-1]

    def summary(self, last: dict[str, Any], status: str, seconds: float) -> dict[str, Any]:
        after_first = self.round_seconds[1:] or self.round_seconds
        out = {
            "name": self.spec.name,
            "status": status,
            # rounds in history.csv: those before the checkpoint a resumed job started from,
            # and those run now
            "rounds_completed": self.first_round - 1 + len(self.round_seconds),
            "rounds_planned": self.spec.rounds,
            "parties": self.spec.parties.count,
            "hosts": len(self.blocks),
            # simulation only: a deployment's party sizes never leave the parties' nodes
            **({"party_sizes": {
                "min": int(self.data.party_sizes.min()),
                "median": float(np.median(self.data.party_sizes)),
                "max": int(self.data.party_sizes.max()),
            }} if not self.remote_parties else {}),
            "test_rows": int(len(self.data.y_test)),
            "final": {k: last.get(k) for k in ("test_loss", "test_accuracy", "test_precision",
                                               "test_recall", "test_f1")},
            "seconds_total": seconds,
            "seconds_per_round": float(np.mean(after_first)) if after_first else None,
            "first_round_seconds": self.round_seconds[0] if self.round_seconds else None,
            "ray_calls_per_round": float(np.mean(self.ray_calls)) if self.ray_calls else None,
            "stage_seconds_per_round": _mean_laps(self.stage_seconds[1:] or self.stage_seconds),
            "devices": sorted(self.devices),
            "secure_aggregation": self.spec.secure_aggregation.mode.value,
            "training_path": getattr(self, "training_path", None),
            "privacy": self.privacy_summary(),
            **({"placement": self.placement} if self.placement else {}),
            **self.hosts.summary(),
            "spec": self.spec.to_dict(),
        }
        if self.dp is not None:
            # Exact statistics of party data outside the accountant: the party sizes, the
            # Ray calls per round (they grow with the hosts sampled: one per party deployed),
            # and per-round times (they grow with the parties trained). Kept: whole-job totals
            # (seconds_total, and seconds_per_round as the mean over every round run).
            out.pop("party_sizes", None)
            del out["ray_calls_per_round"], out["first_round_seconds"], out["stage_seconds_per_round"]
            out["seconds_per_round"] = (float(np.mean(self.round_seconds))
                                        if self.round_seconds else None)
        return out


def _mean_laps(rounds: list[dict[str, float]]) -> dict[str, float]:
    stages = {s for laps in rounds for s in laps}
    return {s: round(float(np.mean([laps.get(s, 0.0) for laps in rounds])), 4)
            for s in sorted(stages)} if rounds else {}
