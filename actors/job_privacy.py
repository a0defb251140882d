"""The driver's privacy part (user-level DP-FedAvg and record-level DP-SGD reporting).

:class:`JobPrivacy` is one of the three parts :class:`actors.driver.Federation` is built from
(the round loop in ``driver.py``; the hosts behind :class:`actors.hosts.HostPool`; this; the
outputs in :mod:`actors.job_outputs`). It calibrates DP-FedAvg and opens (or replays) the
write-ahead ledger before any training (:class:`actors.accountant.DpAccountant`, in the
driver's process under the job's ledger lock), charges each round's event before anything
noised can be released (``run_round``), sizes the ring for central noise, and reports what
the privacy summary may say. The maths lives in :mod:`lepton_ray.privacy`; this holds the
job's state only.

State (on the Federation): ``spec``, ``out``, ``params``, ``first_round``, ``dp``,
``accountant``, ``ledger_lock``, ``epsilon``, ``record_level_max``, ``hosts``, ``blocks``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import ray

from lepton_ray.errors import BudgetExhaustedError, ConfigError, LeptonError, PrivacyError
from lepton_ray.outputs import LEDGER


class JobPrivacy:
    def _start_privacy(self) -> None:
        """Calibrate DP-FedAvg, open (or replay) the ledger, and refuse a job whose first
        round alone would exceed the budget, before any training."""
        from actors.accountant import DpAccountant
        from lepton_ray.privacy.accountants import AccountantKind
        from lepton_ray.privacy.dpfedavg import dp_fedavg_for_spec

        p = self.spec.privacy
        kind = AccountantKind(p.accountant.value)
        if self.dp is None:  # a resumed job restores its state from the checkpoint
            self.dp = dp_fedavg_for_spec(self.spec, len(self.params))
        q = self.dp.sampling_rate
        # in the driver's process, under the job's ledger lock (held since before the output
        # directory was touched): the ledger lives beside the other outputs, on this node
        self.accountant = DpAccountant(str(self.out / LEDGER), p.epsilon, p.delta, kind,
                                       lock=self.ledger_lock)
        self.epsilon = self.accountant.spent()
        skellam = self._expected_skellam() if self.dp.distributed is not None else None
        first = self.accountant.epsilon_if_charged(self.dp.event(skellam))
        if first > p.epsilon and self.first_round > 1:  # a resume asking for more rounds
            raise BudgetExhaustedError(
                f"rounds: {self.spec.rounds} asked, but the privacy budget allows no round after "
                f"round {self.first_round - 1}: epsilon spent {self.epsilon:.4g}, the next round "
                f"would take it to {first:.4g} > privacy.epsilon {p.epsilon:g}; no file changed")
        if first > p.epsilon:
            from lepton_ray.errors import PrivacyError

            raise PrivacyError(
                f"privacy.epsilon: one round at noise multiplier {self.dp.noise_multiplier:.4g}"
                f" and sampling rate {q:g} already costs epsilon {first:.4g} (spent so far "
                f"{self.epsilon:.4g}) > budget {p.epsilon:g}; raise privacy.noise_multiplier "
                "or the budget, or lower sampling.fraction")

    def _distributed_plan(self, r: int, by_host: dict[int, list[int]], rule):
        """The round's SecAgg+ plan with its Skellam parameters, and those parameters. A round
        that cannot run (fewer than 2 parties, no valid threshold) gets the reason instead of
        a plan and the parameters at the expected size, so it is still charged."""
        participants = [p for ps in by_host.values() for p in ps]
        why = "no_parties" if not participants else "aborted: fewer than 2 parties sampled"
        if len(participants) >= 2:
            try:
                plan = self._plan(r, participants, rule)
                return plan, self._expected_skellam()  # charged: independent of the sample size
            except ConfigError as exc:
                why = f"aborted: {exc.problems[0]}"
            except PrivacyError as exc:  # e.g. too few sampled parties for the colluders
                why = f"aborted: {exc}"
        return why, self._expected_skellam()

    def _expected_skellam(self):
        """The parameters every distributed round is charged at (the scale for the public
        bound on the sample; a job checkpointed before there was one keeps the old rule)."""
        dn = self.dp.distributed
        if getattr(dn, "max_sample", None) is not None:
            return dn.charged_params(clip_norm=self.dp.clip_norm,
                                     noise_multiplier=self.dp.noise_multiplier)
        return dn.params(n=max(2, round(self.dp.expected_parties)), threshold=1,
                         clip_norm=self.dp.clip_norm, noise_multiplier=self.dp.noise_multiplier)

    def _quantization(self, n: int, rule):
        """The round's quantisation for ``n`` parties and, with central DP, the conditional-
        rounding bound (the sensitivity in ring units). Under DP the scale also leaves room
        for the coordinator's noise: 13 sigma per coordinate (P[|N_Z| > 13 sigma] < 1e-36)
        counted as extra parties of norm C (sigma_ring / (norm bound s) <= z)."""
        import math

        from lepton_ray.learning.party_update import quantization_for, rounding_bound_sq

        sa = self.spec.secure_aggregation
        central = self.dp is not None and self.dp.distributed is None
        extra = 0
        if central:
            noise = self.dp.noise(len(self.params))
            ratio = max(noise.delta_multiplier, (noise.bits_multiplier or 0.0) / rule.norm_bound)
            extra = math.ceil(13 * ratio)
        quant = quantization_for(n_parties=n + extra, rule=rule, modulus_bits=sa.modulus_bits,
                                 dim=len(self.params), scale=sa.scale)
        if central:  # the exact sampler takes sigma <= 2^24 ring units: a finer scale buys nothing
            from dataclasses import replace

            from lepton_ray.privacy.discrete_gaussian import MAX_SIGMA

            top = max(noise.delta_multiplier * rule.clip_norm, noise.bits_multiplier or 0.0)
            quant = replace(quant, scale=min(quant.scale, MAX_SIGMA / (1.01 * top) - 2.0))
        return quant, (rounding_bound_sq(rule, quant, len(self.params)) if central else None)

    def privacy_summary(self) -> dict[str, Any]:
        p = self.spec.privacy
        out: dict[str, Any] = {"mode": p.mode.value}
        if self.dp is not None:
            out.update({
                "noise": p.noise.value, "epsilon_spent": self.epsilon, "epsilon_budget": p.epsilon,
                "delta": p.delta, "accountant": p.accountant.value,
                "noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.clip_norm,
                "sampling_rate": self.dp.sampling_rate, "ledger": str(self.out / LEDGER),
            })
        if p.dp_sgd.enabled:
            out["record_level"] = self.record_level_epsilons()
        return out

    def record_level_epsilons(self) -> dict[str, Any]:
        """Record-level (epsilon, delta) of local DP-SGD: only the largest over the parties.
        Each party's own epsilon (it reveals how often the party was sampled) is written by
        its host to the host's own log, for that party alone."""
        d = self.spec.privacy.dp_sgd
        return {"noise_multiplier": d.noise_multiplier, "clip_norm": d.clip_norm, "delta": d.delta,
                "epsilon_max": self.record_level_max}

    def _record_level_max(self) -> float | None:
        """The hosts' largest per-party record-level epsilon. A host that cannot answer (it
        died) is replaced by the bound for its parties had they trained in every round run."""
        from lepton_ray.privacy.accountants import AccountantKind
        from lepton_ray.privacy.calibration import record_level_epsilon_over_rounds

        worst = 0.0
        for h in range(len(self.blocks)):
            try:
                worst = max(worst, float(self.hosts.get(h, "record_level_epsilon_max", timeout=60)))
            except (ray.exceptions.RayError, LeptonError):
                if self.remote_parties:
                    # the driver does not know a deployed party's size (it stays on its node),
                    # so it has no bound to put in: report none rather than too little
                    print(f"host {h} did not report its parties' record-level epsilon; the "
                          "job's maximum is unbounded (see that party's own log)",
                          file=sys.stderr, flush=True)
                    return math.inf
                d, t = self.spec.privacy.dp_sgd, self.spec.training
                n = int(min(self.data.party_sizes[p] for p in self.blocks[h]))
                worst = max(worst, record_level_epsilon_over_rounds(
                    n_local=n, rounds=self.prior_executions + max(0, self.round_now - self.first_round + 1),
                    batch_size=t.batch_size, epochs=t.epochs,
                    noise_multiplier=d.noise_multiplier, delta=d.delta,
                    accountant=AccountantKind(self.spec.privacy.accountant.value)))
        return worst
