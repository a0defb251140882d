"""User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"), optionally with adaptive clipping (Andrew et al. 2021), as one small
state object the driver consults each round. Pure: no Ray, no I/O, no torch.

Per round with sampling rate q over N parties (expected m = qN parties):

* each party clips its delta to L2 norm C and weighs 1 (so one party moves the sum by <= C);
* the coordinator adds N(0, (z_delta C)^2) to each coordinate of the sum;
* the server update is sum / m (the fixed-denominator estimator: its sensitivity does not
  depend on how many parties happened to take part);
* the accountant charges ``PoissonSampled(q, Gaussian(z))`` (``Gaussian(z)`` when q = 1).

With adaptive clipping each party also contributes b_i = +-1/2 (its norm within C or not);
the coordinator adds N(0, sigma_b^2) to their sum and the clip norm follows the target
quantile geometrically. The total multiplier z is split so that the round still costs
exactly Gaussian(z): z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import AccountantKind
from lepton_ray.privacy.adaptive_clipping import AdaptiveClipping
from lepton_ray.privacy.events import Event, Gaussian, PoissonSampled, SkellamAmplification

DEFAULT_COLLUDING_FRACTION = 0.1
"""Default share of a round's sampled parties assumed to collude with the server under
distributed noise (``privacy.colluding_parties: null``); see :class:`DistributedNoise`."""


@dataclass(frozen=True)
class CentralNoise:
    """Gaussian noise the coordinator adds to the released sum: std ``delta_std`` on the
    ``dim`` delta coordinates, ``bits_std`` on the adaptive-clipping bit (if any)."""

    dim: int
    delta_std: float
    bits_std: float | None = None


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
    raised to c + 1 if needed (one honest share at least); a round with n <= c cannot run."""

    bits: int
    dim: int
    min_survivor_fraction: float
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE
    colluding_parties: int | None = None

    def colluding(self, n: int) -> int:
        if self.colluding_parties is not None:
            return self.colluding_parties
        return max(1, math.ceil(DEFAULT_COLLUDING_FRACTION * n))

    def min_survivors(self, n: int, threshold: int = 1) -> int:
        return max(threshold, self.colluding(n) + 1,
                   min(n, math.ceil(self.min_survivor_fraction * n)))

    def params(self, *, n: int, threshold: int, clip_norm: float, noise_multiplier: float):
        from lepton_ray.privacy.skellam import skellam_params

        n_min = self.min_survivors(n, threshold)
        if n_min > n:
            raise PrivacyError(
                f"{n} parties sampled cannot carry distributed noise against "
                f"{self.colluding(n)} colluding parties (need at least {n_min}); round refused")
        return skellam_params(bits=self.bits, dim=self.dim, clip_norm=clip_norm, parties=n,
                              min_survivors=n_min, noise_multiplier=noise_multiplier,
                              colluding=self.colluding(n))


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
        from lepton_ray.privacy.calibration import calibrate_noise

        if not 0 < sampling_rate <= 1:
            raise PrivacyError(f"sampling rate q must be in (0, 1], got {sampling_rate}")
        m = sampling_rate * n_parties
        if noise_multiplier is None and distributed is not None:
            from lepton_ray.privacy.skellam import calibrate_skellam

            n = max(2, round(m))
            noise_multiplier = calibrate_skellam(
                target_epsilon=epsilon, delta=delta, sampling_rate=sampling_rate, steps=rounds,
                bits=distributed.bits, dim=distributed.dim, clip_norm=clip_norm, parties=n,
                min_survivors=distributed.min_survivors(n),
                amplification=distributed.amplification,
                colluding=distributed.colluding(n)).noise_multiplier
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise(target_epsilon=epsilon, delta=delta,
                                               sampling_rate=sampling_rate, steps=rounds,
                                               accountant=accountant)
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
        if self.clipping is not None:
            return self.clipping.round_event(noise_multiplier=self.noise_multiplier,
                                             sampling_probability=self.sampling_rate)
        base = Gaussian(noise_multiplier=self.noise_multiplier)
        if self.sampling_rate >= 1.0:
            return base
        return PoissonSampled(sampling_probability=self.sampling_rate, event=base)

    def noise(self, dim: int) -> CentralNoise:
        return CentralNoise(
            dim=dim,
            delta_std=self.delta_noise_multiplier * self.clip_norm,
            bits_std=self.clipping.count_noise_std if self.clipping is not None else None,
        )

    def mean(self, weighted_sum: np.ndarray) -> np.ndarray:
        """The fixed-denominator estimate of the mean clipped delta."""
        return weighted_sum / self.expected_parties

    def after_round(self, clip_bit_sum: float | None) -> "DpFedAvg":
        """The next round's state: with adaptive clipping, C follows the noised quantile."""
        if self.clipping is None or clip_bit_sum is None:
            return self
        fraction = clip_bit_sum / self.expected_parties + 0.5
        clipping = self.clipping.update(fraction)
        return replace(self, clipping=clipping, clip_norm=clipping.clip_norm)
