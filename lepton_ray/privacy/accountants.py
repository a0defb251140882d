"""Privacy accountants: compose :mod:`~lepton_ray.privacy.events`, report (epsilon, delta).

Two implementations share one small interface (:class:`Accountant`), and both delegate the
maths of every event Google's ``dp_accounting`` supports to it (our events are converted to
``dp_accounting.dp_event`` values); we do not rewrite that maths. Both use the
add-or-remove-one neighbouring relation (a record, or a party, is present or absent).

* :class:`RdpAccountant` - Renyi DP (Mironov 2017), sampled Gaussian RDP of Mironov, Talwar
  and Zhang 2019, computed by ``dp_accounting.rdp.rdp_privacy_accountant`` (0.6.0):

  - order grid (dp_accounting's ``DEFAULT_RDP_ORDERS``): alpha in
    {1.1, 1.2, ..., 10.9} U {11, 12, ..., 63} U {128, 256, 512, 1024} (156 orders);
  - RDP -> (epsilon, delta): for each order alpha > 1.01,
    ``eps(alpha) = rdp(alpha) + log1p(-1/alpha) - log(delta * alpha) / (alpha - 1)``
    (Canonne, Kamath and Steinke 2020, Prop. 12 of arXiv:2004.00010 v4; Asoodeh et al.
    2020, eq. 20 of arXiv:2001.05990), plus the KL-divergence shortcut ``eps = 0`` when
    ``delta^2 + expm1(-rdp) > 0``; epsilon is the minimum over orders, floored at 0.
    ``delta(eps)`` uses the same proposition. This is tighter than the classic
    ``rdp - log(delta)/(alpha-1)`` of Mironov 2017, Prop. 3 (e.g. 7.33 vs 8.07 for
    q=0.04, z=1.5, T=2250, delta=1e-5).

  Composition is exact addition of RDP curves, so the accountant holds one RDP vector.
  Events dp_accounting does not know (our own integer mechanisms) get their RDP curve from
  a function registered with :func:`register_rdp` - the extension point.

* :class:`PldAccountant` - privacy loss distributions (Koskela et al. 2020; Meiser and
  Mohammadi 2018; Doroshenko et al. 2022 "connect the dots"), via
  ``dp_accounting.pld.PLDAccountant`` with ``value_discretization_interval = 1e-4``
  (dp_accounting's default). PLD results are pessimistic upper bounds; at 1e-4 they are
  within 0.05 % of the converged value (checked against 1e-5 for q=0.04, z=1.5, T=2250 and
  q=1e-3, z=1, T=30000), while 1e-3 can be 5 % loose. A 1e-4 epsilon costs 0.2-0.7 s.
  The accountant keeps a multiset of events (event -> count) and builds the PLD lazily as
  the composition of ``SelfComposed(event, count)``; repeated rounds therefore cost one
  FFT self-composition, not one convolution per round.

Every ``compose`` dry-runs first (:meth:`Accountant.can_compose`), so an unsupported event
raises :class:`PrivacyError` and changes nothing. :meth:`Accountant.composed` returns a new
accountant and leaves this one untouched: the ledger uses it to check a budget before it
writes anything.
"""

from __future__ import annotations

import abc
import enum
import logging
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy import _dp_accounting
from lepton_ray.privacy.events import (
    Composed,
    Event,
    Gaussian,
    Laplace,
    PoissonSampled,
    SelfComposed,
)

__all__ = [
    "DEFAULT_PLD_DISCRETIZATION",
    "Accountant",
    "AccountantKind",
    "PldAccountant",
    "RdpAccountant",
    "RdpFunction",
    "make_accountant",
    "register_rdp",
    "to_dp_event",
]

DEFAULT_PLD_DISCRETIZATION = 1e-4

RdpFunction = Callable[[Event, np.ndarray], np.ndarray]
"""``f(event, orders) -> rdp``: the RDP curve of one run of ``event`` at each order."""

_RDP_FUNCTIONS: dict[type[Event], RdpFunction] = {}


class AccountantKind(enum.Enum):
    RDP = "rdp"
    PLD = "pld"


def register_rdp(event_type: type[Event], fn: RdpFunction) -> None:
    """Teach :class:`RdpAccountant` an event type dp_accounting does not support.

    ``fn(event, orders)`` must return a non-negative float array, the same shape as
    ``orders``, holding an *upper bound* on the RDP of one run of ``event`` at each order.
    Registered functions take precedence over dp_accounting for that exact type.
    """
    if not (isinstance(event_type, type) and issubclass(event_type, Event)):
        raise PrivacyError(f"register_rdp needs an Event subclass, got {event_type!r}")
    _RDP_FUNCTIONS[event_type] = fn
    _rdp_curve.cache_clear()


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_epsilon(epsilon: float) -> float:
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(epsilon)
        or epsilon < 0
    ):
        raise PrivacyError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return float(epsilon)


def _effective_gaussian(event: Event) -> float | None:
    """Noise multiplier of a tree of Gaussians on the same (sampled) data, or None.

    Gaussian mechanisms with multipliers z_i on one sample compose to a single Gaussian
    mechanism with z = (sum z_i^-2)^(-1/2): rescale each query to unit noise and the joint
    L2 sensitivity is sqrt(sum z_i^-2). (dp_accounting's RDP does the same internally.)
    """
    if isinstance(event, Gaussian):
        return event.noise_multiplier
    if isinstance(event, SelfComposed):
        inner = _effective_gaussian(event.event)
        return None if inner is None else inner / math.sqrt(event.count)
    if isinstance(event, Composed):
        parts = [_effective_gaussian(e) for e in event.events]
        if any(p is None for p in parts):
            return None
        return sum(p**-2 for p in parts) ** -0.5  # type: ignore[operator]
    return None


def to_dp_event(event: Event) -> Any | None:
    """Our event as a ``dp_accounting.dp_event.DpEvent``, or None if it has no counterpart.

    A Poisson-sampled tree of Gaussians becomes a Poisson-sampled single Gaussian (see
    :func:`_effective_gaussian`), which both dp_accounting accountants support.
    """
    dpe = _dp_accounting.dp_event()
    if isinstance(event, Gaussian):
        return dpe.GaussianDpEvent(event.noise_multiplier)
    if isinstance(event, Laplace):
        return dpe.LaplaceDpEvent(event.noise_multiplier)
    if isinstance(event, SelfComposed):
        inner = to_dp_event(event.event)
        return None if inner is None else dpe.SelfComposedDpEvent(inner, event.count)
    if isinstance(event, Composed):
        parts = [to_dp_event(e) for e in event.events]
        return None if any(p is None for p in parts) else dpe.ComposedDpEvent(parts)
    if isinstance(event, PoissonSampled):
        z = _effective_gaussian(event.event)
        inner = dpe.GaussianDpEvent(z) if z is not None else to_dp_event(event.event)
        return (
            None if inner is None else dpe.PoissonSampledDpEvent(event.sampling_probability, inner)
        )
    return None


class Accountant(abc.ABC):
    """What the ledger, the runtime and the CLI rely on; both accountants pass one shared
    contract test suite (tests/test_privacy_accountants.py)."""

    kind: AccountantKind

    @abc.abstractmethod
    def can_compose(self, event: Event) -> bool:
        """Whether :meth:`compose` would accept ``event``; never changes state."""

    @abc.abstractmethod
    def composed(self, event: Event) -> Accountant:
        """A new accountant holding everything this one holds plus ``event``; this one is
        unchanged. Raises :class:`PrivacyError` for an unsupported event."""

    @abc.abstractmethod
    def _adopt(self, other: Accountant) -> None:
        """Take over ``other``'s state (same concrete type)."""

    def compose(self, event: Event) -> None:
        """Account for one more ``event``. Dry-runs first: on an unsupported event this
        raises :class:`PrivacyError` and the accountant is unchanged."""
        self._adopt(self.composed(event))

    @abc.abstractmethod
    def epsilon(self, delta: float) -> float:
        """Smallest epsilon this accountant can certify at ``delta`` (0 when empty)."""

    @abc.abstractmethod
    def delta(self, epsilon: float) -> float:
        """Smallest delta this accountant can certify at ``epsilon``."""

    def _unsupported(self, event: Event) -> PrivacyError:
        return PrivacyError(
            f"the {self.kind.value.upper()} accountant cannot account for event {event!r}"
        )


# --------------------------------------------------------------------------------- RDP


def _check_rdp(curve: np.ndarray, orders: tuple[float, ...], what: str) -> None:
    """Refuse an RDP curve with NaN or negative values: a valid RDP bound is in [0, inf]
    (inf: no bound at that order). dp_accounting's conversion drops such orders silently
    (``compute_epsilon`` with all-NaN or all-negative RDP returns epsilon 0), so one bad
    value would certify a budget that was never checked."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.shape != (len(orders),):
        raise PrivacyError(f"{what}: RDP curve has shape {curve.shape}, need ({len(orders)},)")
    bad = np.isnan(curve) | (curve < 0)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise PrivacyError(
            f"{what}: RDP is {curve[i]!r} at order {orders[i]:g} ({int(bad.sum())} of "
            f"{len(orders)} orders NaN or negative); refusing to account with it"
        )


@lru_cache(maxsize=512)
def _rdp_curve(event: Event, orders: tuple[float, ...]) -> np.ndarray | None:
    """RDP of one run of ``event`` at ``orders`` (read-only array), or None if unsupported.
    Raises :class:`PrivacyError` for NaN or negative values (:func:`_check_rdp`), whatever
    computed them: a registered function, dp_accounting, or a composition."""
    fn = _RDP_FUNCTIONS.get(type(event))
    if fn is not None:
        curve = np.asarray(fn(event, np.asarray(orders, dtype=np.float64)), dtype=np.float64)
        _check_rdp(curve, orders, f"registered RDP function for {type(event).__name__}")
    elif isinstance(event, SelfComposed):
        inner = _rdp_curve(event.event, orders)
        curve = None if inner is None else event.count * inner
    elif isinstance(event, Composed):
        parts = [_rdp_curve(e, orders) for e in event.events]
        curve = None if any(p is None for p in parts) else np.sum(parts, axis=0)
    else:
        dp = to_dp_event(event)
        if dp is None:
            return None
        inner = _dp_accounting.rdp().RdpAccountant(orders=list(orders))
        if not inner.supports(dp):
            return None
        with _unconverged_orders():
            inner.compose(dp)
        curve = inner.rdp
    if curve is not None:
        curve = np.array(curve, dtype=np.float64)
        _check_rdp(curve, orders, f"event {event!r}")
        curve.flags.writeable = False
    return curve


_CONVERGENCE_NOTICE = "_compute_log_a_frac failed to converge"
_UNCONVERGED: set[float] = set()  # orders dp-accounting excluded in this process
_REPORTED: set[tuple[float, ...]] = set()
log = logging.getLogger("lepton_ray.privacy")


class _DropConvergenceNotice(logging.Filter):
    """Holds back dp-accounting's "failed to converge ... Excluding this order" warning and
    remembers the order. Excluding an order only removes a candidate from the minimum over
    orders, so epsilon can only be over-estimated (never under); it matters only when the
    excluded order is at the optimum, which :func:`_report_if_optimum_excluded` says once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_CONVERGENCE_NOTICE):
            alpha = record.args[-1] if isinstance(record.args, tuple) and record.args else None
            if isinstance(alpha, (int, float)):
                _UNCONVERGED.add(float(alpha))
            return False
        return True


class _unconverged_orders:
    """Scoped to one call into dp-accounting: the filter sits on its ``absl`` logger only
    while we compose, so no other absl message (and no other caller) is silenced."""

    def __enter__(self):
        self._filter = _DropConvergenceNotice()
        logging.getLogger("absl").addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger("absl").removeFilter(self._filter)


def _report_if_optimum_excluded(orders, rdp, best, eps: float, delta: float) -> None:
    """Say once if an order dp-accounting could not compute sits next to the optimal order
    (the true optimum may be there, and epsilon is then loose: an over-estimate)."""
    if not _UNCONVERGED or best is None or not math.isfinite(eps):
        return
    i = orders.index(float(best)) if float(best) in orders else None
    if i is None:
        return
    near = [orders[j] for j in (i - 1, i + 1)
            if 0 <= j < len(orders) and not math.isfinite(rdp[j]) and orders[j] in _UNCONVERGED]
    key = tuple(near)
    if near and key not in _REPORTED:
        _REPORTED.add(key)
        log.warning("RDP order(s) %s next to the optimal order %g could not be computed "
                    "(dp-accounting's series did not converge) and were left out: epsilon "
                    "%.4g at delta %g may be over-estimated (never under)",
                    ", ".join(f"{a:g}" for a in near), float(best), eps, delta)


class RdpAccountant(Accountant):
    """Renyi-DP accountant (see the module docstring for orders and conversion)."""

    kind = AccountantKind.RDP

    def __init__(self, *, orders: tuple[float, ...] | None = None) -> None:
        if orders is None:
            orders = tuple(float(a) for a in _dp_accounting.rdp().DEFAULT_RDP_ORDERS)
        orders = tuple(float(a) for a in orders)
        if not orders or any(not math.isfinite(a) or a <= 1 for a in orders):
            raise PrivacyError(f"RDP orders must be finite and > 1, got {orders!r}")
        self._orders = orders
        self._rdp = np.zeros(len(orders), dtype=np.float64)

    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    @property
    def rdp(self) -> np.ndarray:
        """A copy of the accumulated RDP curve (one value per order)."""
        return self._rdp.copy()

    def can_compose(self, event: Event) -> bool:
        return _rdp_curve(event, self._orders) is not None

    def composed(self, event: Event) -> RdpAccountant:
        curve = _rdp_curve(event, self._orders)
        if curve is None:
            raise self._unsupported(event)
        new = RdpAccountant(orders=self._orders)
        new._rdp = self._rdp + curve
        return new

    def _adopt(self, other: Accountant) -> None:
        if not isinstance(other, RdpAccountant):  # pragma: no cover - internal misuse
            raise TypeError(type(other))
        self._rdp = other._rdp

    def epsilon(self, delta: float) -> float:
        delta = _check_delta(delta)
        _check_rdp(self._rdp, self._orders, "composed RDP")
        eps, best = _dp_accounting.rdp().compute_epsilon(self._orders, self._rdp, delta)
        _report_if_optimum_excluded(self._orders, self._rdp, best, float(eps), delta)
        return float(eps)

    def delta(self, epsilon: float) -> float:
        epsilon = _check_epsilon(epsilon)
        _check_rdp(self._rdp, self._orders, "composed RDP")
        d, _ = _dp_accounting.rdp().compute_delta(self._orders, self._rdp, epsilon)
        return float(d)


# --------------------------------------------------------------------------------- PLD


class PldAccountant(Accountant):
    """Privacy-loss-distribution accountant (see the module docstring)."""

    kind = AccountantKind.PLD

    def __init__(self, *, value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION):
        v = value_discretization_interval
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise PrivacyError(f"value_discretization_interval must be in (0, 1), got {v!r}")
        self._interval = float(v)
        self._counts: dict[Event, int] = {}
        self._inner: Any | None = None  # dp_accounting PLDAccountant, built lazily

    @property
    def value_discretization_interval(self) -> float:
        return self._interval

    def _dp_accountant(self) -> Any:
        return _dp_accounting.pld().PLDAccountant(value_discretization_interval=self._interval)

    def can_compose(self, event: Event) -> bool:
        dp = to_dp_event(event)
        return dp is not None and bool(self._dp_accountant().supports(dp))

    def composed(self, event: Event) -> PldAccountant:
        if not self.can_compose(event):
            raise self._unsupported(event)
        new = PldAccountant(value_discretization_interval=self._interval)
        new._counts = dict(self._counts)
        new._counts[event] = new._counts.get(event, 0) + 1
        return new

    def _adopt(self, other: Accountant) -> None:
        if not isinstance(other, PldAccountant):  # pragma: no cover - internal misuse
            raise TypeError(type(other))
        self._counts = other._counts
        self._inner = other._inner

    def _built(self) -> Any:
        if self._inner is None:
            inner = self._dp_accountant()
            dpe = _dp_accounting.dp_event()
            for event, count in self._counts.items():
                dp = to_dp_event(event)
                inner.compose(dp if count == 1 else dpe.SelfComposedDpEvent(dp, count))
            self._inner = inner
        return self._inner

    def epsilon(self, delta: float) -> float:
        delta = _check_delta(delta)
        if not self._counts:
            return 0.0
        return float(self._built().get_epsilon(delta))

    def delta(self, epsilon: float) -> float:
        epsilon = _check_epsilon(epsilon)
        if not self._counts:
            return 0.0
        return float(min(1.0, self._built().get_delta(epsilon)))


def make_accountant(kind: AccountantKind) -> Accountant:
    """A fresh accountant of ``kind`` with our default settings."""
    if kind is AccountantKind.RDP:
        return RdpAccountant()
    if kind is AccountantKind.PLD:
        return PldAccountant()
    raise PrivacyError(f"unknown accountant kind {kind!r}")
