"""Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021, "Differentially
Private Learning with Adaptive Clipping"): the clip norm C tracks the gamma-quantile of the
parties' update norms, estimated privately each round.

Per round (their Algorithm 1, with the centred quantile estimate they use with DP-FedAvg):

1. each sampled party i sends, next to its clipped update and inside the same secure sum,
   the centred bit ``b_i - 1/2`` with ``b_i = 1[||Delta_i|| <= C]`` (:meth:`party_bit`);
2. the server noises the sum of bits and forms
   ``b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2``, m = expected parties per round
   (:meth:`AdaptiveClipping.noised_fraction`);
3. geometric update ``C <- C * exp(-eta_C * (b - gamma))`` (:meth:`update`).

Privacy. Adding or removing one party moves the centred bit sum by 1/2, so the count query
is a Gaussian mechanism with noise multiplier 2 sigma_b. Run on the same sample as the
update sum (multiplier z_delta), the pair is one Gaussian mechanism with
``z^-2 = z_delta^-2 + (2 sigma_b)^-2``. To keep the round's total multiplier at the target
z, the update sum uses their noise split

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)      (needs 2 sigma_b > z)

(:func:`split_noise_multiplier`), and the round is charged as
``PoissonSampled(q, Composed(Gaussian(z_delta), Gaussian(2 sigma_b)))``
(:func:`adaptive_clipping_event`), which both accountants price as ``Gaussian(z)`` sampled
at q. The paper suggests sigma_b = m / 20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.events import Composed, Event, Gaussian, PoissonSampled
from lepton_ray.privacy.mechanisms import NormalSource

__all__ = ["AdaptiveClipping", "adaptive_clipping_event", "split_noise_multiplier"]


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def split_noise_multiplier(*, noise_multiplier: float, count_noise_std: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021)."""
    z = _positive("noise_multiplier", noise_multiplier)
    sigma_b = _positive("count_noise_std", count_noise_std)
    if 2 * sigma_b <= z:
        raise PrivacyError(
            f"count_noise_std={sigma_b} is too small for noise_multiplier={z}: adaptive "
            f"clipping needs 2 * count_noise_std > noise_multiplier"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def adaptive_clipping_event(
    *, delta_noise_multiplier: float, count_noise_std: float, sampling_probability: float
) -> Event:
    """The round's event: the update sum (z_delta) and the bit count (2 sigma_b) on one
    Poisson sample with rate q (q = 1: every party, no sampling)."""
    pair = Composed.of(
        Gaussian(noise_multiplier=delta_noise_multiplier),
        Gaussian(noise_multiplier=2 * _positive("count_noise_std", count_noise_std)),
    )
    if sampling_probability == 1:
        return pair
    return PoissonSampled(sampling_probability=sampling_probability, event=pair)


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """Quantile-tracking clip norm state; :meth:`update` returns the next state."""

    clip_norm: float  # C
    target_quantile: float  # gamma in (0, 1)
    learning_rate: float  # eta_C
    count_noise_std: float  # sigma_b

    def __post_init__(self) -> None:
        _positive("clip_norm", self.clip_norm)
        _positive("learning_rate", self.learning_rate)
        _positive("count_noise_std", self.count_noise_std)
        g = self.target_quantile
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < 1:
            raise PrivacyError(f"target_quantile must be in (0, 1), got {g!r}")

    def party_bit(self, update_norm: float) -> float:
        """``b_i - 1/2``: +1/2 if the party's update norm is within C, else -1/2."""
        if not isinstance(update_norm, (int, float)) or not update_norm >= 0:
            raise PrivacyError(f"update_norm must be a number >= 0, got {update_norm!r}")
        return 0.5 if update_norm <= self.clip_norm else -0.5

    def noised_fraction(
        self, *, bit_sum: float, expected_parties: float, rng: NormalSource
    ) -> float:
        """Private estimate of the fraction of parties with norm <= C:
        ``(bit_sum + N(0, sigma_b^2)) / m + 1/2``."""
        m = _positive("expected_parties", expected_parties)
        noise = float(rng.standard_normal(1)[0])
        return (float(bit_sum) + self.count_noise_std * noise) / m + 0.5

    def update(self, noised_fraction: float) -> AdaptiveClipping:
        """Geometric update ``C <- C * exp(-eta_C * (b - gamma))`` (Andrew et al. 2021,
        Alg. 1): too many parties under C (b > gamma) shrinks C, too few grows it."""
        b = noised_fraction
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise PrivacyError(f"noised_fraction must be a finite number, got {b!r}")
        factor = math.exp(-self.learning_rate * (b - self.target_quantile))
        return replace(self, clip_norm=self.clip_norm * factor)

    def delta_noise_multiplier(self, noise_multiplier: float) -> float:
        """The update sum's share of the round's total multiplier z."""
        return split_noise_multiplier(
            noise_multiplier=noise_multiplier, count_noise_std=self.count_noise_std
        )

    def round_event(self, *, noise_multiplier: float, sampling_probability: float) -> Event:
        """The event to charge for one round whose total multiplier is ``noise_multiplier``."""
        return adaptive_clipping_event(
            delta_noise_multiplier=self.delta_noise_multiplier(noise_multiplier),
            count_noise_std=self.count_noise_std,
            sampling_probability=sampling_probability,
        )
