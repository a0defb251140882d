"""User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"), optionally with adaptive clipping (Andrew et al. 2021), as one small
state object the driver consults each round. Pure: no Ray, no I/O, no torch.

Per round with sampling rate q over N parties (expected m = qN parties):

* each party clips its delta to L2 norm C, weighs 1, and is quantised into Z_{2^b} with
  *conditional* stochastic rounding (its rounded delta block has norm <= Delta ring units,
  :func:`lepton_ray.learning.party_update.rounding_bound_sq`), so one party moves the integer
  sum by at most Delta (in L2) whatever the rounding did;
* the coordinator adds discrete Gaussian noise N_Z(0, sigma^2) with the integer
  sigma = ceil(z_delta Delta) to each coordinate of the sum *in the ring*, before dequantising
  (:class:`CentralNoise`, :mod:`lepton_ray.privacy.discrete_gaussian`): no floating-point noise;
* the server update is sum / m (the fixed-denominator estimator: its sensitivity does not
  depend on how many parties happened to take part);
* the accountant charges ``DiscreteGaussian(z, q)`` (CKS20 closed form unsampled, a proven
  amplification bound sampled; see :mod:`lepton_ray.privacy.discrete_gaussian`).

With adaptive clipping each party also contributes b_i = +-1/2 (its norm within C or not);
scaled and rounded, |b_i| <= ceil(s/2) ring units; the coordinator adds its own discrete
Gaussian, sigma_b' = ceil(2 sigma_b ceil(s/2)), to their sum and the clip norm follows the
target quantile geometrically. The total multiplier z is split so that the round still costs
exactly z: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1); for the
discrete Gaussian the blocks compose the same way (CKS20: sum_j Delta_j^2 / sigma_j^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import AccountantKind
from lepton_ray.privacy.adaptive_clipping import AdaptiveClipping
from lepton_ray.privacy.events import DiscreteGaussian, Event, SkellamAmplification

DEFAULT_COLLUDING_FRACTION = 0.1
"""Default share of a round's sampled parties assumed to collude with the server under
distributed noise (``privacy.colluding_parties: null``); see :class:`DistributedNoise`."""


@dataclass(frozen=True)
class CentralNoise:
    """The noise the coordinator adds to the released sum, as multipliers of the sensitivity:
    ``delta_multiplier`` z_delta on the ``dim`` delta coordinates, ``bits_multiplier`` 2 sigma_b
    on the adaptive-clipping bit (if any). :meth:`in_ring` turns them into integer ring sigmas
    for a round's quantisation."""

    dim: int
    delta_multiplier: float
    bits_multiplier: float | None = None

    def in_ring(self, quantization, rounding_bound_sq: int) -> "RingNoise":
        """Integer sigmas for the ring: sigma = ceil(z_delta * Delta) with Delta =
        sqrt(rounding_bound_sq) (the conditional-rounding bound of a party's delta block), and
        ceil(2 sigma_b * ceil(s/2)) for the bit (|round(+-s/2)| <= ceil(s/2)). Rounding up
        only adds noise, so sum_j (Delta_j / sigma_j)^2 <= z^-2: the charged event holds."""
        from lepton_ray.privacy.discrete_gaussian import ring_sigma

        delta_sigma = ring_sigma(self.delta_multiplier, math.sqrt(rounding_bound_sq))
        bits_sigma = None
        if self.bits_multiplier is not None:
            bits_sigma = ring_sigma(self.bits_multiplier, math.ceil(quantization.scale / 2))
        return RingNoise(dim=self.dim, delta_sigma=delta_sigma, bits_sigma=bits_sigma,
                         quantization=quantization)


@dataclass(frozen=True)
class RingNoise:
    """Discrete Gaussian sigmas in ring units (integers) and the quantisation they belong to:
    what the coordinator needs to noise a ring sum and dequantise it."""

    dim: int
    delta_sigma: int
    bits_sigma: int | None
    quantization: object  # lepton_ray.secagg.quantize.QuantizationSpec

    def add_to(self, ring_sum: np.ndarray, randbytes=None) -> np.ndarray:
        """``ring_sum`` + N_Z(0, delta_sigma^2) on the delta coordinates and N_Z(0, bits_sigma^2)
        on the bit (coordinate dim + 1), mod 2^b, a new array; randomness from ``randbytes``
        (default ``os.urandom``)."""
        import os

        from lepton_ray.privacy.discrete_gaussian import sample_discrete_gaussian

        rb = os.urandom if randbytes is None else randbytes
        out = np.array(ring_sum, copy=True)
        noise = np.zeros(out.shape, dtype=np.int64)
        noise[: self.dim] = sample_discrete_gaussian(self.dim, self.delta_sigma, rb)
        if self.bits_sigma is not None:
            noise[self.dim + 1] = sample_discrete_gaussian(1, self.bits_sigma, rb)[0]
        out += noise.view(np.uint64).astype(out.dtype)  # two's complement: wraps mod 2^b
        return out


@dataclass(frozen=True, kw_only=True)
class DistributedNoise:
    """Distributed DP (Skellam, Agarwal et al. 2021): each party adds its share of the noise
    before masking, so the sum SecAgg+ reveals is already private and nobody has to be
    trusted with the noise. Per round the parameters depend on how many parties were
    sampled (n), must survive (n_min) and may collude with the server (c).

    Colluders: a party colluding with the server subtracts its own share from the sum, so
    shares are calibrated for the n_min - c honest survivors (each adds mu / (n_min - c)).
    ``colluding_parties`` fixes c; None (the default) takes c = ceil(DEFAULT_COLLUDING_FRACTION
    * n) of each round's sampled parties, at least 1: the threat model of a federation is a
    coordinator colluding with a few parties (DESIGN.md), and distributed noise that any one
    colluder can shave is no better than central noise against that coordinator. n_min is
    raised to c + 1 if needed (one honest share at least); a round with n <= c cannot run.

    ``max_sample`` (a public bound on a round's sample size, :func:`sample_size_bound`): the
    charged event must not depend on how many parties were sampled, or the ``epsilon``
    column would publish the size of a secret Poisson sample. With it, every round uses the
    scale gamma chosen for ``max_sample`` parties and is charged :meth:`charged_params`'s
    event; the shares are still sized for the round's own n_min - c honest survivors, so the
    honest noise is the same mu = (z Delta_2)^2 whatever n (Delta_2 depends only on gamma, d
    and beta), and the sensitivities are those of the charged event. A round that samples more
    than ``max_sample`` parties (probability below the bound's tail) is refused, still
    charged."""

    bits: int
    dim: int
    min_survivor_fraction: float
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE
    colluding_parties: int | None = None
    max_sample: int | None = None

    def colluding(self, n: int) -> int:
        if self.colluding_parties is not None:
            return self.colluding_parties
        return max(1, math.ceil(DEFAULT_COLLUDING_FRACTION * n))

    def min_survivors(self, n: int, threshold: int = 1) -> int:
        return max(threshold, self.colluding(n) + 1,
                   min(n, math.ceil(self.min_survivor_fraction * n)))

    def params(self, *, n: int, threshold: int, clip_norm: float, noise_multiplier: float):
        from lepton_ray.privacy.skellam import (
            DEFAULT_MAX_WRAPAROUND,
            SkellamParams,
            skellam_params,
            wraparound_bound,
        )

        n_min = self.min_survivors(n, threshold)
        if n_min > n:
            raise PrivacyError(
                f"{n} parties sampled cannot carry distributed noise against "
                f"{self.colluding(n)} colluding parties (need at least {n_min}); round refused")
        if self.max_sample is None:
            return skellam_params(bits=self.bits, dim=self.dim, clip_norm=clip_norm, parties=n,
                                  min_survivors=n_min, noise_multiplier=noise_multiplier,
                                  colluding=self.colluding(n))
        if n > self.max_sample:
            raise PrivacyError(f"{n} parties sampled, above the public bound {self.max_sample} "
                               "the noise scale was chosen for; round refused")
        gamma = self.charged_params(clip_norm=clip_norm, noise_multiplier=noise_multiplier).gamma
        out = SkellamParams(bits=self.bits, dim=self.dim, clip_norm=clip_norm, parties=n,
                            min_survivors=n_min, noise_multiplier=noise_multiplier, gamma=gamma,
                            colluding=self.colluding(n))
        if wraparound_bound(out) > DEFAULT_MAX_WRAPAROUND:
            raise PrivacyError(f"{n} parties at the scale chosen for {self.max_sample} could wrap "
                               "around the ring; round refused")
        return out

    def charged_params(self, *, clip_norm: float, noise_multiplier: float):
        """The parameters every round is charged at (with ``max_sample``): the scale for the
        public bound on the sample, so the charge reveals nothing about the sample's size."""
        if self.max_sample is None:
            raise PrivacyError("charged_params needs max_sample (a public bound on the sample)")
        n = self.max_sample
        from lepton_ray.privacy.skellam import skellam_params

        return skellam_params(bits=self.bits, dim=self.dim, clip_norm=clip_norm, parties=n,
                              min_survivors=self.min_survivors(n), noise_multiplier=noise_multiplier,
                              colluding=self.colluding(n))


def sample_size_bound(n_parties: int, sampling_rate: float, tail: float = 1e-9) -> int:
    """The smallest m with P(Binomial(n_parties, q) > m) <= ``tail``: a public bound on the
    size of a Poisson sample (exact binomial tail, summed in log space)."""
    if not 0 < sampling_rate <= 1 or n_parties < 1:
        raise PrivacyError(f"sample_size_bound needs n >= 1 and q in (0, 1], got {n_parties}, "
                           f"{sampling_rate}")
    if sampling_rate == 1:
        return n_parties
    lq, l1q = math.log(sampling_rate), math.log1p(-sampling_rate)
    log_pmf = [math.lgamma(n_parties + 1) - math.lgamma(k + 1) - math.lgamma(n_parties - k + 1)
               + k * lq + (n_parties - k) * l1q for k in range(n_parties + 1)]
    above = 0.0
    for m in range(n_parties, -1, -1):  # above = P(X > m), growing as m falls
        if above + math.exp(log_pmf[m]) > tail:
            return m
        above += math.exp(log_pmf[m])
    return 0


@dataclass(frozen=True, kw_only=True)
class DpFedAvg:
    sampling_rate: float  # q
    expected_parties: float  # m = q N
    noise_multiplier: float  # total z charged per round
    clip_norm: float  # C this round
    clipping: AdaptiveClipping | None = None
    distributed: DistributedNoise | None = None

    @classmethod
    def create(cls, *, n_parties: int, sampling_rate: float, rounds: int, epsilon: float,
               delta: float, clip_norm: float, noise_multiplier: float | None,
               accountant: AccountantKind, adaptive: bool = False, target_quantile: float = 0.5,
               learning_rate: float = 0.2, count_noise_std: float | None = None,
               distributed: DistributedNoise | None = None) -> "DpFedAvg":
        """Calibrate z for (epsilon, delta) over ``rounds`` rounds if not given; refuse
        settings whose first round alone exceeds the budget."""
        if not 0 < sampling_rate <= 1:
            raise PrivacyError(f"sampling rate q must be in (0, 1], got {sampling_rate}")
        m = sampling_rate * n_parties
        if noise_multiplier is None and distributed is not None:
            from lepton_ray.privacy.skellam import calibrate_skellam

            # at the public bound on the sample when there is one: every round is charged there
            n = distributed.max_sample or max(2, round(m))
            noise_multiplier = calibrate_skellam(
                target_epsilon=epsilon, delta=delta, sampling_rate=sampling_rate, steps=rounds,
                bits=distributed.bits, dim=distributed.dim, clip_norm=clip_norm, parties=n,
                min_survivors=distributed.min_survivors(n),
                amplification=distributed.amplification,
                colluding=distributed.colluding(n)).noise_multiplier
        if distributed is None and accountant is not AccountantKind.RDP:
            raise PrivacyError("privacy.accountant: central noise is a discrete Gaussian, which only "
                               "the RDP accountant covers (dp-accounting's PLD has no "
                               "multi-dimensional discrete Gaussian); use accountant 'rdp'")
        if noise_multiplier is None:
            from lepton_ray.privacy.discrete_gaussian import calibrate_discrete_gaussian

            noise_multiplier = calibrate_discrete_gaussian(
                target_epsilon=epsilon, delta=delta, sampling_rate=sampling_rate, steps=rounds)
        clipping = None
        if adaptive:
            sigma_b = count_noise_std if count_noise_std is not None else max(m / 20.0, 1e-3)
            clipping = AdaptiveClipping(clip_norm=clip_norm, target_quantile=target_quantile,
                                        learning_rate=learning_rate, count_noise_std=sigma_b)
            clipping.delta_noise_multiplier(noise_multiplier)  # PrivacyError if z too small
        return cls(sampling_rate=sampling_rate, expected_parties=m,
                   noise_multiplier=noise_multiplier, clip_norm=clip_norm, clipping=clipping,
                   distributed=distributed)

    @property
    def delta_noise_multiplier(self) -> float:
        if self.clipping is None:
            return self.noise_multiplier
        return self.clipping.delta_noise_multiplier(self.noise_multiplier)

    def event(self, skellam=None) -> Event:
        """The privacy event of one round (what the accountant charges before it runs). With
        distributed noise: the round's Skellam parameters at their minimum survivors, the
        most a round can cost since honest parties refuse to unmask with fewer."""
        if skellam is not None:
            return skellam.event(sampling_probability=self.sampling_rate,
                                 amplification=self.distributed.amplification)
        # central: the discrete Gaussian at the total z (with adaptive clipping z_delta and
        # 2 sigma_b compose to exactly z, see the module docstring)
        return DiscreteGaussian(noise_multiplier=self.noise_multiplier,
                                sampling_probability=self.sampling_rate)

    def noise(self, dim: int) -> CentralNoise:
        return CentralNoise(
            dim=dim,
            delta_multiplier=self.delta_noise_multiplier,
            bits_multiplier=2 * self.clipping.count_noise_std if self.clipping is not None else None,
        )

    def mean(self, weighted_sum: np.ndarray) -> np.ndarray:
        """The fixed-denominator estimate of the mean clipped delta."""
        return weighted_sum / self.expected_parties

    def noised_clipped_count(self, clip_bit_sum: float | None) -> float | None:
        """The released estimate of how many parties were clipped: ``m (1 - b)`` with b the
        noised fraction within C that :meth:`after_round` moves the clip norm by, i.e.
        ``m / 2 - (sum_i (b_i - 1/2) + N_Z)`` in the same (dequantised) units.

        Privacy: a function of the noised bit sum alone, which the round's charged event
        already pays for (the bit-sum Gaussian, 2 sigma_b, composed into z), and of the public
        m = qN; post-processing costs nothing more (Dwork and Roth 2014, Prop. 2.1). It uses
        m, not the number of parties in the sum, which is the secret size of the Poisson
        sample (hence an estimate, not a count: its mean is k + (m - n) / 2 for k clipped of
        n). None without adaptive clipping: no noised clip count exists to release."""
        if self.clipping is None or clip_bit_sum is None:
            return None
        return self.expected_parties / 2 - float(clip_bit_sum)

    def after_round(self, clip_bit_sum: float | None) -> "DpFedAvg":
        """The next round's state: with adaptive clipping, C follows the noised quantile."""
        if self.clipping is None or clip_bit_sum is None:
            return self
        fraction = clip_bit_sum / self.expected_parties + 0.5
        clipping = self.clipping.update(fraction)
        return replace(self, clipping=clipping, clip_norm=clipping.clip_norm)


def dp_fedavg_for_spec(spec, n_params: int) -> DpFedAvg:
    """The job's DP-FedAvg state at round 1, from its spec alone (``JobSpec``) and the
    model's parameter count: the sampling rate, the calibrated noise multiplier and, with
    ``privacy.noise: distributed``, the Skellam setting. Deterministic, so the driver and
    every federation site that accepted the spec compute the same thing: a site checks the
    Skellam parameters of each round's plan against its own (a coordinator cannot ask the
    parties for less noise than the spec promises)."""
    from lepton_ray.config import NoisePlacement, SamplingKind
    from lepton_ray.privacy.accountants import AccountantKind

    p, smp = spec.privacy, spec.sampling
    q = smp.fraction if smp.kind is SamplingKind.POISSON else 1.0
    ac = p.adaptive_clipping
    distributed = None
    if p.noise is NoisePlacement.DISTRIBUTED:
        from lepton_ray.privacy.events import SkellamAmplification

        distributed = DistributedNoise(bits=p.bits, dim=n_params,
                                       min_survivor_fraction=p.min_survivor_fraction,
                                       amplification=SkellamAmplification(p.amplification.value),
                                       colluding_parties=p.colluding_parties,
                                       max_sample=sample_size_bound(spec.parties.count, q))
    return DpFedAvg.create(distributed=distributed, n_parties=spec.parties.count,
                           sampling_rate=q, rounds=spec.rounds, epsilon=p.epsilon,
                           delta=p.delta, clip_norm=p.clip_norm,
                           noise_multiplier=p.noise_multiplier,
                           accountant=AccountantKind(p.accountant.value), adaptive=ac.enabled,
                           target_quantile=ac.target_quantile, learning_rate=ac.learning_rate,
                           count_noise_std=ac.count_noise_std)
