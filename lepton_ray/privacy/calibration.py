"""DP-SGD / DP-FedAvg epsilon and noise calibration: what ``lepton-ray epsilon`` calls.

The reference workload is ``steps`` Poisson-sampled Gaussian releases with sampling rate q and
noise multiplier z: ``SelfComposed(PoissonSampled(q, Gaussian(z)), steps)`` (Abadi et al. 2016).
Record-level DP-SGD as :mod:`lepton_ray.privacy.dpsgd` runs it adds *discrete* Gaussian noise
to conditionally rounded integer gradients, so its event (:func:`record_level_event`) is
``SelfComposed(DiscreteGaussian(z, q), steps)`` (RDP only: dp-accounting has no PLD for a
multi-dimensional discrete Gaussian).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import AccountantKind, make_accountant
from lepton_ray.privacy.events import (
    DiscreteGaussian,
    Event,
    Gaussian,
    PoissonSampled,
    SelfComposed,
)

__all__ = [
    "CALIBRATION_TOLERANCE",
    "calibrate_noise",
    "compute_epsilon",
    "record_level_epsilon",
    "record_level_epsilon_over_rounds",
    "record_level_event",
    "sampled_gaussian_event",
]

CALIBRATION_TOLERANCE = 0.002
"""Relative width of the final bisection bracket: the returned z is at most 0.2 % above the
smallest z that meets the target (on the accountant's own epsilon)."""

_Z_MIN = 1e-3
_Z_MAX = 1e6


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def sampled_gaussian_event(*, sampling_rate: float, noise_multiplier: float, steps: int) -> Event:
    """``SelfComposed(PoissonSampled(q, Gaussian(z)), steps)``; q = 1 means no sampling."""
    steps = _check_steps(steps)
    step: Event = Gaussian(noise_multiplier=noise_multiplier)
    if sampling_rate != 1:
        step = PoissonSampled(sampling_probability=sampling_rate, event=step)
    return step if steps == 1 else SelfComposed(event=step, count=steps)


def compute_epsilon(
    *,
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = AccountantKind.RDP,
) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-sampled Gaussian releases.

    >>> round(compute_epsilon(sampling_rate=0.04, noise_multiplier=1.5, steps=2250,
    ...                       delta=1e-5), 3)
    7.329
    """
    event = sampled_gaussian_event(
        sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps
    )
    return make_accountant(accountant).composed(event).epsilon(delta)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: AccountantKind = AccountantKind.RDP,
) -> float:
    """Smallest noise multiplier z (to :data:`CALIBRATION_TOLERANCE`) whose epsilon does not
    exceed ``target_epsilon`` - it never overshoots: ``compute_epsilon(z) <= target``.

    Epsilon decreases monotonically in z, so we bracket the answer by doubling/halving from
    z = 1, then narrow it on log z (:func:`_narrow`) keeping the invariant
    eps(hi) <= target < eps(lo), and return ``hi``. Raises :class:`PrivacyError` if the
    target needs z > 1e6 (too small for this delta) or is met even by z = 1e-3 (too loose
    to calibrate).
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, (int, float))
        or not math.isfinite(target_epsilon)
        or target_epsilon <= 0
    ):
        raise PrivacyError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
    _check_steps(steps)
    # Validate q and delta once, with clear messages, before the search.
    PoissonSampled(sampling_probability=sampling_rate, event=Gaussian(noise_multiplier=1.0))
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")

    def eps(z: float) -> float:
        return compute_epsilon(
            sampling_rate=sampling_rate,
            noise_multiplier=z,
            steps=steps,
            delta=delta,
            accountant=accountant,
        )

    lo = hi = 1.0
    e_lo = e_hi = eps(1.0)
    if e_hi <= target_epsilon:
        while True:  # shrink lo until it fails the target
            lo = hi / 2
            if lo < _Z_MIN:
                raise PrivacyError(
                    f"target_epsilon={target_epsilon} is met even by noise multiplier "
                    f"{_Z_MIN}; the target is too loose to calibrate"
                )
            e_lo = eps(lo)
            if e_lo > target_epsilon:
                break
            hi, e_hi = lo, e_lo
    else:
        while True:  # grow hi until it meets the target
            lo, e_lo = hi, e_hi
            hi = hi * 2
            if hi > _Z_MAX:
                raise PrivacyError(
                    f"target_epsilon={target_epsilon} at delta={delta} is not reachable with a "
                    f"noise multiplier up to {_Z_MAX:g} (q={sampling_rate}, steps={steps})"
                )
            e_hi = eps(hi)
            if e_hi <= target_epsilon:
                break
    return _narrow(eps, target_epsilon, lo, e_lo, hi, e_hi)


def _narrow(
    eps: Callable[[float], float], target: float, lo: float, e_lo: float, hi: float, e_hi: float
) -> float:
    """Shrink the bracket eps(hi) <= target < eps(lo) to hi / lo <= 1 + tolerance; return hi.

    log epsilon is nearly linear in log z, so each step is an Illinois (modified regula
    falsi) step on f(log z) = log(eps / target), aimed 0.3 tolerance past the estimated root
    towards the end that did not move last, so that the bracket closes from both sides. A
    point outside the inner 98 % of the bracket, a non-finite or zero epsilon, or any step
    after the eighth falls back to bisection. Every point evaluated moves one end, so the
    invariant - and never overshooting - holds throughout.
    """
    offset = 0.3 * math.log1p(CALIBRATION_TOLERANCE)
    f_lo = math.log(e_lo / target) if math.isfinite(e_lo) else math.inf
    f_hi = math.log(e_hi / target) if e_hi > 0 else -math.inf
    last_moved = 0  # +1: hi moved last, -1: lo moved last
    for step in itertools.count():
        if hi / lo <= 1 + CALIBRATION_TOLERANCE:
            return hi
        a, b = math.log(lo), math.log(hi)
        x = 0.5 * (a + b)
        if step < 8 and math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo > f_hi:
            root = a + (b - a) * f_lo / (f_lo - f_hi)
            guess = root - offset if last_moved > 0 else root + offset
            if a + 0.01 * (b - a) < guess < b - 0.01 * (b - a):
                x = guess
        z = math.exp(x)
        e = eps(z)
        f = math.log(e / target) if 0 < e < math.inf else (math.inf if e > 0 else -math.inf)
        if e <= target:
            hi = z
            f_hi = f
            if last_moved > 0:
                f_lo /= 2  # Illinois: the stale end's weight halves
            last_moved = 1
        else:
            lo = z
            f_lo = f
            if last_moved < 0:
                f_hi /= 2
            last_moved = -1
    raise AssertionError("unreachable")  # pragma: no cover


def _record_level_accountant(accountant: AccountantKind) -> AccountantKind:
    if accountant is not AccountantKind.RDP:
        raise PrivacyError(
            f"record-level DP-SGD adds a multi-dimensional discrete Gaussian (integer noise), "
            f"which only the RDP accountant covers (dp-accounting has no PLD for it); got "
            f"accountant {getattr(accountant, 'value', accountant)!r}, use 'rdp'")
    return accountant


def record_level_event(
    *, n_local: int, batch_size: int, epochs: int, noise_multiplier: float
) -> Event:
    """A party's record-level DP-SGD event (:mod:`lepton_ray.privacy.dpsgd`): per step the
    Poisson-sampled discrete Gaussian ``DiscreteGaussian(z, q)``, q = batch_size / n_local,
    composed over steps = epochs * ceil(n_local / batch_size). Each step adds N_Z(0, sigma^2)
    with sigma = ceil(z Delta) >= z Delta to integers of L2 sensitivity Delta, so charging z
    is never optimistic (the exact multiplier sigma / Delta is at least z)."""
    for name, value in (("n_local", n_local), ("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrivacyError(f"{name} must be an integer >= 1, got {value!r}")
    if batch_size > n_local:
        raise PrivacyError(f"batch_size={batch_size} exceeds the party's n_local={n_local}")
    step = DiscreteGaussian(noise_multiplier=noise_multiplier,
                            sampling_probability=batch_size / n_local)
    steps = epochs * math.ceil(n_local / batch_size)
    return step if steps == 1 else SelfComposed(event=step, count=steps)


def record_level_epsilon(
    *,
    n_local: int,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    delta: float,
    accountant: AccountantKind = AccountantKind.RDP,
) -> float:
    """Record-level epsilon at ``delta`` of one party's local DP-SGD run (RDP only)."""
    kind = _record_level_accountant(accountant)
    event = record_level_event(
        n_local=n_local, batch_size=batch_size, epochs=epochs, noise_multiplier=noise_multiplier
    )
    return make_accountant(kind).composed(event).epsilon(delta)


def record_level_epsilon_over_rounds(
    *,
    n_local: int,
    rounds: int,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    delta: float,
    accountant: AccountantKind = AccountantKind.RDP,
) -> float:
    """Record-level epsilon at ``delta`` of a party that ran local DP-SGD in ``rounds``
    rounds: its one-round event (:func:`record_level_event`, with the batch capped at
    ``n_local``) composed ``rounds`` times (0 rounds: epsilon 0). ``rounds`` is how often the
    party took part, so the result is the party's own to know (its host reports it to it).
    RDP only (a PLD accountant raises :class:`PrivacyError`)."""
    kind = _record_level_accountant(accountant)
    if rounds <= 0:
        return 0.0
    one = record_level_event(n_local=n_local, batch_size=min(batch_size, n_local), epochs=epochs,
                             noise_multiplier=noise_multiplier)
    event = one if rounds == 1 else SelfComposed(event=one, count=int(rounds))
    return make_accountant(kind).composed(event).epsilon(delta)
