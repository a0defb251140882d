"""Distributed DP inside secure aggregation: the Skellam mechanism, pure numpy.

Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning" (NeurIPS; arXiv:2110.04995), on the pipeline of Kairouz, Liu and Steinke 2021
("The Distributed Discrete Gaussian Mechanism ...", ICML; KLS21 below). Each party adds its share
of *integer* noise before SecAgg; the server only ever sees the sum, which carries the noise
of all survivors. Skellam noise is closed under addition (Sk(a) + Sk(b) = Sk(a + b)), so n
shares of variance mu / n sum to exactly Sk(mu), and integers go through the ring without any
float leakage (Mironov 2012).

Party side (:func:`encode_update`), with ``params = skellam_params(...)``:

1. clip to L2 norm C (:func:`~lepton_ray.privacy.mechanisms.clip_to_norm`);
2. rotate: zero-pad to n = 2^ceil(log2 d) and apply U = H D / sqrt(n) with PUBLIC signs D
   (:mod:`~lepton_ray.privacy.rotation`): norm preserved, spikes flattened;
3. scale by gamma (``params.gamma``; the scale s of Agarwal et al., 1/gamma in KLS21's notation);
4. *conditional* stochastic rounding: round x -> floor(x) + Bernoulli(frac(x)) (AES-CTR
   randomness, :func:`~lepton_ray.secagg.quantize.stochastic_round`) and retry until
   ||round(x)||^2 <= floor(B^2), with (KLS21's conditional randomized rounding)

       B = min( c + sqrt(n),  sqrt(c^2 + n/4 + sqrt(2 ln(1/beta)) (c + sqrt(n)/2)) ),  c = gamma C.

   The first term holds always (each coordinate moves by < 1). The second holds with
   probability >= 1 - beta per attempt: E||x~||^2 <= ||x||^2 + n/4 and, by McDiarmid
   (coordinate i changes ||x~||^2 by |2 floor(x_i) + 1| <= 2|x_i| + 1, and
   sum (2|x_i| + 1)^2 <= (2c + sqrt n)^2), the excess over the mean is at most
   sqrt(ln(1/beta)/2) (2c + sqrt n) with that probability.
   The retry makes the bound *deterministic*: it is the L2 sensitivity Delta_2 of a party's
   contribution, and Delta_1 <= min(sqrt(n) Delta_2, Delta_2^2) for an integer vector
   (|v_i| <= v_i^2). Retries use fresh randomness, are capped (``max_attempts``), and a party
   that exhausts them raises :class:`PrivacyError` instead of sending anything;
5. add Sk(mu / h) per coordinate, h = n_min - c the honest survivors (n_min =
   ``params.min_survivors``, c = ``params.colluding``): Poisson(mu/(2 h)) - Poisson(mu/(2 h))
   from a numpy ``Generator`` the caller passes in - in production :func:`os_seeded_generator` (PCG64DXSM seeded with 256 bits of ``os.urandom``), never
   ``np.random``'s global state;
6. map to Z_{2^b}: two's complement (:func:`~lepton_ray.secagg.quantize.to_ring` into the
   32- or 64-bit SecAgg ring), reduced mod 2^b. Since 2^b divides 2^32 (2^64), a sum taken
   mod 2^32 and then reduced mod 2^b is the sum mod 2^b: SecAgg's ring needs no change.

Server side (:func:`decode_sum`): reduce mod 2^b, centred lift to [-2^(b-1), 2^(b-1)), divide
by gamma, inverse rotation U^T, drop the padding.

Why the noise generator need not be AES-CTR: each share is hidden by SecAgg's one-time pads;
what anyone sees is the sum of >= n_min shares plus data. PCG64DXSM carries no cryptographic
claim (unlike :class:`~lepton_ray.privacy.mechanisms.SecureNormalSource`), but with a fresh
256-bit OS seed per party and round and only aggregates observable, no state-recovery attack
is known. numpy's Poisson sampler (PTRS for large means) is exact up to floating point, which
stays negligible only for moderate means: shares are capped at :data:`MAX_POISSON_MEAN`.

RDP (:func:`skellam_rdp`): the multi-dimensional bound of Agarwal et al. 2021 (arXiv:2110.04995,
Sec. 3; Thm 3.5 in our issue), as the authors' ``distributed_dp`` accounting code implements it
and as tests/test_privacy_skellam.py checks against exact Renyi divergences: adding Sk(mu) to
an integer query with sensitivities Delta_1, Delta_2 is (alpha, eps(alpha))-RDP for every
integer alpha > 1 with

    eps(alpha) <= alpha Delta_2^2 / (2 mu)
                  + min( ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),  3 Delta_1 / (2 mu) ).

The first term is the Gaussian mechanism's; the min is the price of the discrete noise. Other
orders use the chord between neighbouring integers ((alpha - 1) D_alpha is a log-MGF, convex in
alpha), and eps(2) below 2.

Poisson sampling of parties (:func:`subsampled_rdp`) - read this before changing a default.
With per-party noise shares the *number of shares* in the sum depends on who took part. Under
add/remove neighbours the two outputs then differ in variance as well as in mean (in d
dimensions the noise energy estimates the number of shares to about sqrt(2/d) relative), so
the shift-only Skellam bound - and with it Zhu and Wang's add/remove amplification - does not
apply as such. We therefore account, by default, with zero-out neighbours (Kairouz et al. 2021,
"Practical and Private (Deep) Learning without Sampling or Shuffling"): the neighbour replaces
a party's update by zero, the party still takes part and adds its share. Conditioned on the
other parties (joint quasi-convexity), the two outputs are (1 - q) A + q B and (1 - q) A + q B'
(sampling and dropouts independent of the data)
with B, B' a Skellam pair shifted by the party's rounded vector, whose variance includes the
party's own share: survivors * mu / n_min >= mu. Joint convexity of exp((alpha - 1) D_alpha)
gives :attr:`~lepton_ray.privacy.events.SkellamAmplification.MIXTURE`:

    eps'(alpha) <= log(1 - q + q exp((alpha - 1) eps(alpha))) / (alpha - 1)   (<= eps(alpha)).

It is sound but amplifies little once (alpha - 1) eps(alpha) >~ 1. It is non-decreasing in q
and equals eps(alpha) at q = 1.

Removed (issue 13): the tighter general bound of Zhu and Wang 2019 ("Poisson Subsampled Renyi
Differential Privacy", ICML, Thm 6), which the authors' distributed_dp code applies. It is
sound for add/remove neighbours only when the noise protecting a party does not depend on its
participation (central noise, or a fixed noise count); with per-party shares - the only way
noise is added here - the count of shares reveals participation, so it does not apply.

Colluding parties (``colluding_parties`` c): a party that colludes with the server knows its
own share and subtracts it, so only the *honest* survivors' shares protect anyone. Shares are
calibrated so that n_min - c of them alone carry mu: share variance mu / (n_min - c), and
:func:`event_for_survivors` counts only s - c shares for s survivors. (The target of the
neighbouring relation is honest by definition: it is the party being protected, and its own
share is among the n_min - c.)

Dropouts: shares are calibrated for the fewest survivors the SecAgg threshold lets through
(``min_survivors``), so any released round carries variance >= mu; :func:`event_for_survivors`
gives the event for the noise really added (s * mu / n_min). The write-ahead charge made before
a round must use ``params.event(...)`` (variance mu), valid for every s >= n_min.

Wrap-around (:func:`wraparound_bound`): the lift is exact unless a coordinate of the integer sum
leaves [-2^(b-1), 2^(b-1)). Per rotated coordinate the sum is S + E + N: S = gamma (U sum x_i)_j
is a Rademacher sum with variance proxy gamma^2 (n C)^2 / n_pad (worst case: all updates
aligned), E the rounding errors (|E| < n; or proxy n/4 by Hoeffding, times (1 - beta)^-n for the
conditioning), N ~ Sk(n mu / n_min) with log-MGF mu' (cosh t - 1). A Chernoff bound per tail,
times 2 n_pad (union bound), is reported as ``wraparound_probability``. :func:`skellam_params`
picks the largest gamma whose bound is <= ``max_wraparound`` (default 1e-6 per round), or -
with ``k_stddevs`` - the paper's recipe: k standard deviations of the summed signal, rounding
and noise fill 2^(b-1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import RdpAccountant, register_rdp
from lepton_ray.privacy.calibration import compute_epsilon
from lepton_ray.privacy.events import Event, SelfComposed, Skellam, SkellamAmplification
from lepton_ray.privacy.mechanisms import clip_to_norm
from lepton_ray.privacy.rotation import padded_dim, rotate, unrotate

__all__ = [
    "CALIBRATION_TOLERANCE",
    "DEFAULT_BETA",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_WRAPAROUND",
    "MAX_POISSON_MEAN",
    "EncodedUpdate",
    "SkellamParams",
    "calibrate_skellam",
    "conditional_round",
    "decode_sum",
    "encode_update",
    "event_for_survivors",
    "gaussian_equivalent_epsilon",
    "os_seeded_generator",
    "skellam_epsilon",
    "skellam_event",
    "skellam_noise",
    "skellam_params",
    "rounded_norm_bound_sq",
    "skellam_rdp",
    "subsampled_rdp",
    "wraparound_bound",
]

DEFAULT_BETA = math.exp(-0.5)
"""Per-attempt failure probability of the rounding norm bound (the value of KLS21's and
Agarwal et al.'s experiments): at most 1/(1 - beta) ~ 2.5 attempts expected, usually 1."""

DEFAULT_MAX_ATTEMPTS = 200
"""Cap on rounding retries: all fail with probability <= beta^200 < 1e-43."""

DEFAULT_MAX_WRAPAROUND = 1e-6
"""Default bound on the probability that any coordinate of a round's sum wraps around."""

CALIBRATION_TOLERANCE = 0.005
""":func:`calibrate_skellam` returns z at most 0.5 % above the smallest z meeting the target."""

_MIN_BITS, _MAX_BITS = 2, 64
_ROUNDING_LABEL = "lepton-ray/skellam/conditional-rounding"
_Z_MIN, _Z_MAX = 1e-3, 1e4

MAX_POISSON_MEAN = 2.0**26
"""Largest Poisson mean a party's share may need (share variance <= 2^27). numpy's sampler
(PTRS, Hoermann 1993) evaluates log-pmf terms of size lambda log(lambda) in double precision,
so its output drifts from the Poisson law as lambda grows (measured: Skellam variance exact to
0.1 % at 1e12, 50 % too large at 4e15). At 2^26 the rounding is ~1e-7 of the log-pmf. The
cap only limits the scale gamma, and a larger gamma buys nothing once the noise dwarfs the
rounding error (mu >> parties / 4)."""


# ----------------------------------------------------------------------------- checks


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def _integer(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PrivacyError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise PrivacyError(f"{name} must be {rng}, got {value!r}")
    return int(value)


def _probability(name: str, value: object, *, allow_one: bool) -> float:
    p = _positive(name, value)
    if p > 1 or (p == 1 and not allow_one):
        raise PrivacyError(f"{name} must be in (0, {'1]' if allow_one else '1)'}, got {value!r}")
    return p


# ----------------------------------------------------------------------------- RDP


def _cgf_interpolate(
    orders: np.ndarray, at_integers: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """RDP upper bounds at arbitrary orders > 1 from upper bounds at integer orders >= 2.

    (alpha - 1) D_alpha(P||Q) = log E_Q[(P/Q)^alpha] is convex in alpha (a log-MGF), so between
    integers a < alpha < a + 1 it lies below the chord through the integer bounds:
    (alpha-1) eps(alpha) <= (a+1-alpha)(a-1) eps(a) + (alpha-a) a eps(a+1). For alpha < 2 the
    chord from (1, 0) gives eps(alpha) <= eps(2)."""
    a = np.asarray(orders, dtype=np.float64)
    if a.ndim != 1 or np.any(~np.isfinite(a)) or np.any(a <= 1):
        raise PrivacyError(f"RDP orders must be finite and > 1, got {orders!r}")
    lo = np.maximum(np.floor(a), 2.0)
    hi = np.maximum(np.ceil(a), 2.0)
    ks = np.unique(np.concatenate([lo, hi]))
    vals = np.asarray(at_integers(ks), dtype=np.float64)
    v_lo = vals[np.searchsorted(ks, lo)]
    v_hi = vals[np.searchsorted(ks, hi)]
    with np.errstate(invalid="ignore", divide="ignore"):
        chord = ((a - lo) * (hi - 1) * v_hi + (hi - a) * (lo - 1) * v_lo) / (a - 1)
    return np.where(hi == lo, v_hi, chord)


def skellam_rdp(
    orders: np.ndarray, *, variance: float, l1_sensitivity: float, l2_sensitivity: float
) -> np.ndarray:
    """Agarwal, Kairouz and Liu 2021 (the multi-dimensional Skellam bound): RDP of
    Sk(variance) added to a query with the given (scaled, integer-domain) sensitivities, for
    integer orders a >= 2

        eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)),

    and at other orders > 1 by :func:`_cgf_interpolate` (convexity of the log-MGF)."""
    mu = _positive("Skellam variance", variance)
    d1 = _positive("l1_sensitivity", l1_sensitivity)
    d2 = _positive("l2_sensitivity", l2_sensitivity)

    def at(a: np.ndarray) -> np.ndarray:
        surcharge = np.minimum(((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
        return a * d2**2 / (2 * mu) + surcharge

    return _cgf_interpolate(orders, at)


def _mixture_bound(a: np.ndarray, eps: np.ndarray, q: float) -> np.ndarray:
    """log(1 - q + q e^{(a-1) eps}) / (a - 1): joint convexity of exp((a-1) D_a)."""
    return np.logaddexp(math.log1p(-q), math.log(q) + (a - 1) * eps) / (a - 1)


def subsampled_rdp(
    orders: np.ndarray,
    base: Callable[[np.ndarray], np.ndarray],
    *,
    sampling_probability: float,
    amplification: SkellamAmplification,
) -> np.ndarray:
    """RDP at ``orders`` of a mechanism run on a Poisson sample with rate q; ``base(k)`` must
    return RDP upper bounds of the unsampled mechanism at integer orders k >= 2 (float array).
    See the module docstring for why ``MIXTURE`` is the only amplification. At integer orders
    the result is min(base, MIXTURE), elsewhere :func:`_cgf_interpolate`. It never exceeds the
    unsampled bound, equals it at q = 1 and is non-decreasing in q."""
    q = _probability("sampling_probability", sampling_probability, allow_one=True)
    if not isinstance(amplification, SkellamAmplification):
        raise PrivacyError(f"amplification must be a SkellamAmplification, got {amplification!r}")

    def at(ks: np.ndarray) -> np.ndarray:
        eps = np.asarray(base(ks), dtype=np.float64)
        if q == 1.0:
            return eps
        return np.minimum(eps, _mixture_bound(ks, eps, q))

    return _cgf_interpolate(orders, at)


def _skellam_event_rdp(event: Event, orders: np.ndarray) -> np.ndarray:
    if not isinstance(event, Skellam):  # pragma: no cover - registered for Skellam only
        raise PrivacyError(f"not a Skellam event: {event!r}")

    def base(a: np.ndarray) -> np.ndarray:
        return skellam_rdp(
            a,
            variance=event.variance,
            l1_sensitivity=event.l1_sensitivity,
            l2_sensitivity=event.l2_sensitivity,
        )

    return subsampled_rdp(
        orders,
        base,
        sampling_probability=event.sampling_probability,
        amplification=event.amplification,
    )


register_rdp(Skellam, _skellam_event_rdp)


# ----------------------------------------------------------------------------- parameters


def _rounded_norm_bound_sq(c: float, n: int, beta: float) -> int:
    """floor(B^2), B the conditional-rounding bound of the module docstring (c = gamma C)."""
    b1 = (c + math.sqrt(n)) ** 2
    b2 = c * c + n / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(n) / 2)
    return max(1, math.floor(min(b1, b2)))


def _log_tail(level: float, subgauss: float, skellam_var: float) -> float:
    """min_t log E exp(t (Y - level)) for log E e^{tY} <= t^2 subgauss / 2 + var (cosh t - 1):
    a Chernoff bound on log P(Y >= level), Y sub-Gaussian plus Skellam. Any t > 0 gives a
    valid bound, so the search (bisection on the increasing derivative) affects only
    tightness, never soundness."""
    if level <= 0:
        return 0.0
    if subgauss <= 0 and skellam_var <= 0:
        return -math.inf

    def deriv(t: float) -> float:
        return -level + t * subgauss + skellam_var * math.sinh(t)

    hi = math.inf
    if subgauss > 0:
        hi = level / subgauss
    if skellam_var > 0:
        hi = min(hi, math.asinh(level / skellam_var))
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if deriv(mid) > 0:
            hi = mid
        else:
            lo = mid
    t = 0.5 * (lo + hi)
    value = -t * level + t * t * subgauss / 2 + skellam_var * (math.cosh(t) - 1)
    return min(0.0, value)


def rounded_norm_bound_sq(c: float, n: int, beta: float) -> int:
    """floor(B^2) of KLS21's conditional rounding for a vector of norm <= c in n dimensions,
    per-attempt failure probability <= beta (the module docstring's B)."""
    return _rounded_norm_bound_sq(c, n, beta)


def _l2_from_norm_sq(norm_sq: int) -> float:
    return math.nextafter(math.sqrt(norm_sq), math.inf)


def _share_variance(noise_multiplier: float, norm_sq: int, honest: int) -> float:
    """(z Delta_2)^2 / h: one party's share when h honest shares must carry mu (h = 1: the
    whole mu)."""
    return (noise_multiplier * _l2_from_norm_sq(norm_sq)) ** 2 / honest


@dataclass(frozen=True, kw_only=True)
class SkellamParams:
    """What every party and the server of a round share (all public). Primary fields are
    stored; everything derived (sensitivities, variances, wrap-around) is computed from them,
    so a hand-built instance can never carry inconsistent privacy numbers.

    ``noise_multiplier`` z is Gaussian-equivalent relative to the *scaled, rounded* L2
    sensitivity: the summed noise has variance mu = (z Delta_2)^2 (scaled domain) when
    ``min_survivors`` parties survive, ``colluding`` of them with the server (who subtract
    their own shares); each party adds mu / (min_survivors - colluding).
    """

    bits: int
    dim: int
    clip_norm: float
    parties: int
    min_survivors: int
    noise_multiplier: float
    gamma: float
    beta: float = DEFAULT_BETA
    colluding: int = 0

    def __post_init__(self) -> None:
        _integer("bits", self.bits, _MIN_BITS, _MAX_BITS)
        padded_dim(self.dim)
        _positive("clip_norm", self.clip_norm)
        _integer("parties", self.parties, 1)
        _integer("min_survivors", self.min_survivors, 1, self.parties)
        if isinstance(self.colluding, bool) or not isinstance(self.colluding, (int, np.integer)) \
                or not 0 <= self.colluding < self.min_survivors:
            raise PrivacyError(
                f"colluding parties must be an integer in [0, min_survivors={self.min_survivors})"
                f", got {self.colluding!r}: at least one honest survivor's share must remain")
        _positive("noise_multiplier", self.noise_multiplier)
        _positive("gamma", self.gamma)
        _probability("beta", self.beta, allow_one=False)
        if self.share_variance / 2 > MAX_POISSON_MEAN:
            raise PrivacyError(
                f"gamma={self.gamma:g} needs Poisson means {self.share_variance / 2:.4g} > "
                f"{MAX_POISSON_MEAN:g} per party share, beyond what the sampler draws exactly; "
                f"use a smaller gamma"
            )

    @property
    def padded_dim(self) -> int:
        """n = 2^ceil(log2 dim): the length parties send."""
        return padded_dim(self.dim)

    @property
    def ring_bits(self) -> int:
        """The SecAgg ring (32 or 64 bits) that carries Z_{2^bits}."""
        return 32 if self.bits <= 32 else 64

    @property
    def norm_bound_sq(self) -> int:
        """floor(B^2): conditional rounding guarantees ||rounded||^2 <= this integer."""
        return _rounded_norm_bound_sq(self.gamma * self.clip_norm, self.padded_dim, self.beta)

    @property
    def l2_sensitivity(self) -> float:
        """Delta_2 = sqrt(floor(B^2)), rounded up to the next float."""
        return _l2_from_norm_sq(self.norm_bound_sq)

    @property
    def l1_sensitivity(self) -> float:
        """Delta_1 = min(floor(sqrt(n floor(B^2))), floor(B^2)) (integer vector, Cauchy-Schwarz)."""
        m = self.norm_bound_sq
        return float(min(math.isqrt(self.padded_dim * m), m))

    @property
    def mu(self) -> float:
        """The target: variance of the summed noise per coordinate that the honest shares
        alone carry when exactly ``min_survivors`` survive."""
        return _share_variance(self.noise_multiplier, self.norm_bound_sq, 1)

    @property
    def honest_survivors(self) -> int:
        """h = min_survivors - colluding: the fewest shares nobody but their party knows."""
        return self.min_survivors - self.colluding

    @property
    def share_variance(self) -> float:
        """Variance of one party's Skellam share: mu / (min_survivors - colluding)."""
        return _share_variance(self.noise_multiplier, self.norm_bound_sq, self.honest_survivors)

    @property
    def central_noise_multiplier(self) -> float:
        """The Gaussian noise multiplier with the same total variance in the unscaled domain:
        sqrt(mu) / (gamma C) (> z: rounding inflates the sensitivity)."""
        return math.sqrt(self.mu) / (self.gamma * self.clip_norm)

    @cached_property
    def wraparound_probability(self) -> float:
        """Upper bound on P(some coordinate of a round's sum wraps), :func:`wraparound_bound`."""
        return wraparound_bound(self)

    @property
    def k_stddevs(self) -> float:
        """2^(b-1) over the standard deviation of a summed coordinate (worst case): the k of
        the paper's recipe that this gamma corresponds to."""
        return 2.0 ** (self.bits - 1) / math.sqrt(_summed_variance(self, self.gamma))

    def event(
        self,
        *,
        sampling_probability: float = 1.0,
        amplification: SkellamAmplification = SkellamAmplification.MIXTURE,
    ) -> Skellam:
        """The event of one round in which at least ``min_survivors`` parties survive
        (variance mu): what the write-ahead charge uses."""
        return event_for_survivors(
            self,
            self.min_survivors,
            sampling_probability=sampling_probability,
            amplification=amplification,
        )


def _summed_variance(p: SkellamParams, gamma: float) -> float:
    """Per-coordinate variance of a summed coordinate, worst case: gamma^2 (n C)^2 / n_pad +
    n / 4 + n * share (all ``parties`` in the sum, all aligned)."""
    m = _rounded_norm_bound_sq(gamma * p.clip_norm, p.padded_dim, p.beta)
    share = _share_variance(p.noise_multiplier, m, p.honest_survivors)
    signal = (gamma * p.parties * p.clip_norm) ** 2 / p.padded_dim
    return signal + p.parties / 4 + p.parties * share


def wraparound_bound(params: SkellamParams) -> float:
    """Upper bound on the probability that any coordinate of the summed integer vector leaves
    [-2^(b-1), 2^(b-1)) (module docstring): 2 n_pad exp(Chernoff), the better of
    (a) |rounding| < parties deterministically and (b) rounding as sub-Gaussian with proxy
    parties/4 times (1 - beta)^-parties for the conditioning. At most 1."""
    p = params
    n_pad, n = p.padded_dim, p.parties
    level = 2.0 ** (p.bits - 1)
    signal = (p.gamma * n * p.clip_norm) ** 2 / n_pad
    noise = n * p.share_variance
    log_union = math.log(2 * n_pad)
    a = _log_tail(level - n, signal, noise)
    b = _log_tail(level, signal + n / 4, noise) - n * math.log1p(-p.beta)
    return float(min(1.0, math.exp(min(0.0, log_union + min(a, b)))))


def skellam_params(
    *,
    bits: int,
    dim: int,
    clip_norm: float,
    parties: int,
    min_survivors: int,
    noise_multiplier: float,
    beta: float = DEFAULT_BETA,
    max_wraparound: float = DEFAULT_MAX_WRAPAROUND,
    k_stddevs: float | None = None,
    colluding: int = 0,
) -> SkellamParams:
    """Choose the scale gamma for Z_{2^bits}, ``parties`` (the most that can enter one sum)
    and noise calibrated for ``min_survivors``.

    Default: the largest gamma whose :func:`wraparound_bound` is <= ``max_wraparound`` (the
    bound grows with gamma: signal, and noise through Delta_2, both grow). With ``k_stddevs``:
    the papers' recipe instead, k sqrt(summed variance) = 2^(bits-1) (the authors' code uses
    k = 3 for Skellam, 4 for the discrete Gaussian) - the reported wrap-around bound may then
    be large (it is a union bound over all coordinates).
    Raises :class:`PrivacyError` if even a vanishing gamma cannot meet the constraint (the
    rounding and noise floor alone fill the ring: more bits or less noise needed).
    """
    def at(gamma: float) -> SkellamParams:
        return SkellamParams(
            bits=bits, dim=dim, clip_norm=clip_norm, parties=parties,
            min_survivors=min_survivors, noise_multiplier=noise_multiplier, gamma=gamma,
            beta=beta, colluding=colluding,
        )

    tiny = at(1e-9 / _positive("clip_norm", clip_norm))  # validates everything else too

    def exact_noise(g: float) -> bool:
        m = _rounded_norm_bound_sq(g * tiny.clip_norm, tiny.padded_dim, tiny.beta)
        return _share_variance(noise_multiplier, m, tiny.honest_survivors) / 2 <= MAX_POISSON_MEAN

    if k_stddevs is None:
        target = _probability("max_wraparound", max_wraparound, allow_one=False)

        def ok(g: float) -> bool:
            return exact_noise(g) and wraparound_bound(at(g)) <= target
    else:
        k = _positive("k_stddevs", k_stddevs)
        limit = (2.0 ** (bits - 1) / k) ** 2

        def ok(g: float) -> bool:
            return exact_noise(g) and _summed_variance(tiny, g) <= limit

    lo = tiny.gamma
    if not ok(lo):
        raise PrivacyError(
            f"bits={bits} cannot hold {parties} parties' rounding and noise (z={noise_multiplier}, "
            f"dim={dim}) even at a vanishing scale without wrap-around; use more bits, fewer "
            f"parties per round or less noise"
        )
    hi = 2.0 ** (bits - 1) / clip_norm
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return at(lo)


def event_for_survivors(
    params: SkellamParams,
    survivors: int,
    *,
    sampling_probability: float = 1.0,
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE,
) -> Skellam:
    """The event for the noise that protects a party when ``survivors`` parties' shares are in
    the sum: only the ``survivors - colluding`` shares the server cannot subtract count, so
    variance (s - c) * mu / (n_min - c) >= mu. Fewer than ``min_survivors`` is refused (the
    round must abort: its noise would be below what was calibrated)."""
    if not isinstance(params, SkellamParams):
        raise PrivacyError(f"params must be SkellamParams, got {params!r}")
    s = _integer("survivors", survivors, params.min_survivors, params.parties)
    return Skellam(
        # one float step down: never more variance than the s - c honest shares really carry
        variance=math.nextafter((s - params.colluding) * params.share_variance, 0.0),
        l1_sensitivity=params.l1_sensitivity,
        l2_sensitivity=params.l2_sensitivity,
        sampling_probability=sampling_probability,
        amplification=amplification,
    )


# ----------------------------------------------------------------------------- epsilon / CLI


def skellam_event(
    params: SkellamParams,
    *,
    sampling_rate: float,
    steps: int,
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE,
) -> Event:
    """``steps`` rounds of ``params.event(...)``: ``SelfComposed(Skellam, steps)``."""
    steps = _integer("steps", steps, 1)
    one = params.event(sampling_probability=sampling_rate, amplification=amplification)
    return one if steps == 1 else SelfComposed(event=one, count=steps)


def skellam_epsilon(
    *,
    sampling_rate: float,
    steps: int,
    delta: float,
    bits: int,
    dim: int,
    clip_norm: float,
    parties: int,
    min_survivors: int,
    noise_multiplier: float,
    beta: float = DEFAULT_BETA,
    max_wraparound: float = DEFAULT_MAX_WRAPAROUND,
    k_stddevs: float | None = None,
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE,
    colluding: int = 0,
) -> float:
    """Epsilon at ``delta`` (RDP accountant) after ``steps`` rounds of the distributed Skellam
    mechanism with the parameters :func:`skellam_params` chooses."""
    params = skellam_params(
        bits=bits, dim=dim, clip_norm=clip_norm, parties=parties, min_survivors=min_survivors,
        noise_multiplier=noise_multiplier, beta=beta, max_wraparound=max_wraparound,
        k_stddevs=k_stddevs, colluding=colluding,
    )
    return _rdp_epsilon(params, sampling_rate=sampling_rate, steps=steps, delta=delta,
                        amplification=amplification)


def _rdp_epsilon(params: SkellamParams, *, sampling_rate: float, steps: int, delta: float,
                 amplification: SkellamAmplification) -> float:
    event = skellam_event(params, sampling_rate=sampling_rate, steps=steps,
                          amplification=amplification)
    return RdpAccountant().composed(event).epsilon(delta)


def gaussian_equivalent_epsilon(
    params: SkellamParams, *, sampling_rate: float, steps: int, delta: float
) -> float:
    """Epsilon of Poisson-sampled *central* Gaussian noise with the same total variance
    (noise multiplier ``params.central_noise_multiplier``): the baseline Skellam is compared
    with."""
    return compute_epsilon(
        sampling_rate=sampling_rate,
        noise_multiplier=params.central_noise_multiplier,
        steps=steps,
        delta=delta,
    )


def calibrate_skellam(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    bits: int,
    dim: int,
    clip_norm: float,
    parties: int,
    min_survivors: int,
    beta: float = DEFAULT_BETA,
    max_wraparound: float = DEFAULT_MAX_WRAPAROUND,
    k_stddevs: float | None = None,
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE,
    colluding: int = 0,
) -> SkellamParams:
    """The parameters with the smallest noise multiplier z (to :data:`CALIBRATION_TOLERANCE`)
    whose :func:`skellam_epsilon` does not exceed ``target_epsilon``; never overshoots.

    Bisection on log z keeping eps(hi) <= target < eps(lo) for *evaluated* points, so the
    returned z's epsilon is one that was computed and is <= target, whatever the shape of
    eps(z) (gamma moves with z). Raises :class:`PrivacyError` when no z in [1e-3, 1e4] meets
    the target within the bit budget.
    """
    target = _positive("target_epsilon", target_epsilon)
    _integer("steps", steps, 1)
    _probability("sampling_rate", sampling_rate, allow_one=True)
    _probability("delta", delta, allow_one=False)
    cache: dict[float, tuple[float, SkellamParams | None]] = {}

    def eps(z: float) -> float:
        if z not in cache:
            try:
                p = skellam_params(
                    bits=bits, dim=dim, clip_norm=clip_norm, parties=parties,
                    min_survivors=min_survivors, noise_multiplier=z, beta=beta,
                    max_wraparound=max_wraparound, k_stddevs=k_stddevs, colluding=colluding,
                )
            except PrivacyError:
                cache[z] = (math.inf, None)  # too much noise for the ring: treat as failing
            else:
                cache[z] = (_rdp_epsilon(p, sampling_rate=sampling_rate, steps=steps,
                                         delta=delta, amplification=amplification), p)
        return cache[z][0]

    lo = hi = 1.0
    if eps(hi) <= target:
        while True:
            lo = hi / 2
            if lo < _Z_MIN:
                raise PrivacyError(f"target_epsilon={target} is met even by z={_Z_MIN}; "
                                   f"too loose to calibrate")
            if eps(lo) > target:
                break
            hi = lo
    else:
        while True:
            lo, hi = hi, hi * 2
            if hi > _Z_MAX:
                raise PrivacyError(
                    f"target_epsilon={target} at delta={delta} is not reachable with z <= "
                    f"{_Z_MAX:g} within {bits} bits (q={sampling_rate}, steps={steps})")
            if eps(hi) <= target:
                break
    while hi / lo > 1 + CALIBRATION_TOLERANCE:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    params = cache[hi][1]
    if params is None:  # pragma: no cover - eps(hi) <= target implies params exist
        raise PrivacyError("calibration failed")
    return params


# ----------------------------------------------------------------------------- pipeline


def os_seeded_generator() -> np.random.Generator:
    """A numpy Generator (PCG64DXSM) seeded with 256 bits from ``os.urandom``: the noise
    source for :func:`encode_update` in production (one per party and round; never logged)."""
    seed = np.random.SeedSequence(int.from_bytes(os.urandom(32), "little"))
    return np.random.Generator(np.random.PCG64DXSM(seed))


def _generator(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise PrivacyError(
            f"rng must be a numpy Generator seeded from the OS (os_seeded_generator()), "
            f"got {rng!r}"
        )
    return rng


def skellam_noise(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` i.i.d. Sk(variance) = Poisson(variance/2) - Poisson(variance/2), int64."""
    size = _integer("size", size, 0)
    lam = _positive("Skellam variance", variance) / 2
    if lam > MAX_POISSON_MEAN:
        raise PrivacyError(f"Skellam variance {variance:.4g} exceeds 2 * MAX_POISSON_MEAN")
    g = _generator(rng)
    return g.poisson(lam, size).astype(np.int64) - g.poisson(lam, size).astype(np.int64)


def _norm_sq_at_most(r: np.ndarray, bound_sq: int) -> bool:
    """Exact test ||r||^2 <= bound_sq for an int64 vector."""
    if r.size == 0:
        return True
    peak = int(np.max(np.abs(r)))
    if peak * peak * r.size < 2**63:
        return int(np.dot(r, r)) <= bound_sq
    rf = r.astype(np.float64)
    s = float(np.dot(rf, rf))
    slack = s * r.size * 2.0**-50
    if s + slack <= bound_sq:
        return True
    if s - slack > bound_sq:
        return False
    return sum(int(v) * int(v) for v in r.tolist()) <= bound_sq  # pragma: no cover


def conditional_round(
    values: np.ndarray,
    norm_bound_sq: int,
    *,
    key: bytes | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> tuple[np.ndarray, int]:
    """Stochastic rounding retried until ||rounded||^2 <= ``norm_bound_sq``; returns
    (int64 vector, attempts used). Attempt i uses AES-CTR randomness keyed by
    HKDF(key, STOCHASTIC_ROUNDING, label, i) (``key=None``: fresh OS randomness every attempt).
    Raises :class:`PrivacyError` after ``max_attempts`` failures - nothing is released."""
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key  # cryptography: loaded on use
    from lepton_ray.secagg.quantize import stochastic_round

    bound = _integer("norm_bound_sq", norm_bound_sq, 0)
    attempts = _integer("max_attempts", max_attempts, 1)
    if key is not None and (not isinstance(key, bytes) or len(key) != 32):
        raise PrivacyError("rounding key must be 32 secret bytes or None")
    for attempt in range(1, attempts + 1):
        k = None if key is None else derive_key(key, KeyPurpose.STOCHASTIC_ROUNDING,
                                                _ROUNDING_LABEL, attempt)
        rounded = stochastic_round(values, k)
        if _norm_sq_at_most(rounded, bound):
            return rounded, attempt
    raise PrivacyError(
        f"conditional rounding failed {attempts} times: the rounded vector's squared norm "
        f"kept exceeding {bound}; the scaled input is longer than the parameters allow"
    )


@dataclass(frozen=True, eq=False)
class EncodedUpdate:
    """A party's Skellam-noised update in Z_{2^bits}, stored in the SecAgg ring dtype (values
    < 2^bits), with its pre-clipping norm, whether it was clipped, and rounding attempts."""

    values: np.ndarray
    norm: float
    clipped: bool
    rounding_attempts: int


def encode_update(
    update: np.ndarray,
    params: SkellamParams,
    *,
    signs: np.ndarray,
    rng: np.random.Generator,
    rounding_key: bytes | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> EncodedUpdate:
    """Party side: clip, rotate (``signs`` = :func:`~lepton_ray.privacy.rotation.
    rotation_signs` of the round's public seed), scale by gamma, conditionally round, add
    this party's Sk(mu / min_survivors) share drawn from ``rng``, map to Z_{2^bits}."""
    from lepton_ray.secagg.quantize import to_ring

    if not isinstance(params, SkellamParams):
        raise PrivacyError(f"params must be SkellamParams, got {params!r}")
    rng = _generator(rng)
    x = np.asarray(update)
    if x.shape != (params.dim,):
        raise PrivacyError(f"update must have shape ({params.dim},), got {x.shape}")
    if np.asarray(signs).shape != (params.padded_dim,):
        raise PrivacyError(f"signs must have shape ({params.padded_dim},), got "
                           f"{np.asarray(signs).shape}")
    clipped, was_clipped = clip_to_norm(x, params.clip_norm)
    norm = float(np.linalg.norm(x.astype(np.float64)))
    scaled = rotate(clipped, signs)
    scaled *= params.gamma
    rounded, attempts = conditional_round(scaled, params.norm_bound_sq, key=rounding_key,
                                          max_attempts=max_attempts)
    noised = rounded + skellam_noise(params.padded_dim, params.share_variance, rng)
    ring = to_ring(noised, params.ring_bits)
    if params.bits < params.ring_bits:
        ring &= ring.dtype.type((1 << params.bits) - 1)
    return EncodedUpdate(ring, norm, was_clipped, attempts)


def decode_sum(ring_sum: np.ndarray, params: SkellamParams, *, signs: np.ndarray) -> np.ndarray:
    """Server side: the float sum (clipped updates + noise / gamma) from the SecAgg sum in the
    ring: reduce mod 2^bits, centred lift, divide by gamma, inverse rotation, unpad."""
    from lepton_ray.crypto.prg import ring_dtype
    from lepton_ray.secagg.quantize import centred_lift

    if not isinstance(params, SkellamParams):
        raise PrivacyError(f"params must be SkellamParams, got {params!r}")
    dtype = ring_dtype(params.ring_bits)
    arr = np.asarray(ring_sum)
    if arr.shape != (params.padded_dim,) or arr.dtype != dtype:
        raise PrivacyError(f"ring sum must be {dtype} of shape ({params.padded_dim},), got "
                           f"{arr.dtype} {arr.shape}")
    if params.bits == params.ring_bits:
        lifted = centred_lift(arr, params.ring_bits)
    else:
        low = (arr & dtype.type((1 << params.bits) - 1)).astype(np.int64)
        lifted = np.where(low >= (1 << (params.bits - 1)), low - (1 << params.bits), low)
    return unrotate(lifted.astype(np.float64) / params.gamma, signs, params.dim)
