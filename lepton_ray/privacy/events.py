"""Privacy events: frozen, nestable values describing what a release cost.

An event says *which mechanism ran on which data*, nothing about training. Accountants
(:mod:`lepton_ray.privacy.accountants`) turn events into (epsilon, delta); the ledger
(:mod:`lepton_ray.privacy.ledger`) writes them to disk as JSON, so every event has
:meth:`Event.to_dict` and :func:`event_from_dict`.

The shapes follow Google's ``dp_accounting.dp_event`` (Gaussian, Laplace, PoissonSampled,
SelfComposed, Composed), so that converting one to the other is a walk over the tree.
Noise multipliers are always *relative to the L2 (Gaussian) or L1 (Laplace) sensitivity*:
noise std = noise_multiplier * sensitivity.

Extension point: a new mechanism (e.g. a Skellam event for distributed integer noise) is a
new frozen subclass with a new :class:`EventKind` member; it registers itself for
:func:`event_from_dict` by subclassing, and the RDP accountant learns its maths through
:func:`lepton_ray.privacy.accountants.register_rdp`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from lepton_ray.errors import PrivacyError

__all__ = [
    "Composed",
    "DiscreteGaussian",
    "Event",
    "EventKind",
    "Gaussian",
    "Laplace",
    "PoissonSampled",
    "SelfComposed",
    "Skellam",
    "SkellamAmplification",
    "event_from_dict",
]


class EventKind(enum.Enum):
    """The ``"type"`` tag an event carries in its JSON form."""

    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"
    POISSON_SAMPLED = "poisson_sampled"
    SELF_COMPOSED = "self_composed"
    COMPOSED = "composed"
    SKELLAM = "skellam"
    DISCRETE_GAUSSIAN = "discrete_gaussian"


_EVENT_TYPES: dict[EventKind, type[Event]] = {}


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def _event(name: str, value: object) -> Event:
    if not isinstance(value, Event):
        raise PrivacyError(f"{name} must be a privacy Event, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every privacy event. Subclasses set ``kind`` and implement the dict form."""

    kind: ClassVar[EventKind]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, EventKind):
            _EVENT_TYPES[kind] = cls

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"type": kind.value, ...fields}``; nested events nest."""
        raise NotImplementedError

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        raise NotImplementedError

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Event:
        """Inverse of :meth:`to_dict`; see :func:`event_from_dict`."""
        return event_from_dict(data)


@dataclass(frozen=True, kw_only=True)
class Gaussian(Event):
    """Gaussian mechanism: add N(0, (noise_multiplier * L2 sensitivity)^2) per coordinate
    (Dwork and Roth 2014, Thm A.1; exact profile in Balle and Wang 2018)."""

    kind: ClassVar[EventKind] = EventKind.GAUSSIAN
    noise_multiplier: float

    def __post_init__(self) -> None:
        _positive_finite("Gaussian noise_multiplier", self.noise_multiplier)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind.value, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        return cls(noise_multiplier=fields["noise_multiplier"])


@dataclass(frozen=True, kw_only=True)
class Laplace(Event):
    """Laplace mechanism with scale b = noise_multiplier * L1 sensitivity, i.e.
    (1 / noise_multiplier)-DP (Dwork et al. 2006)."""

    kind: ClassVar[EventKind] = EventKind.LAPLACE
    noise_multiplier: float

    def __post_init__(self) -> None:
        _positive_finite("Laplace noise_multiplier", self.noise_multiplier)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind.value, "noise_multiplier": self.noise_multiplier}

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        return cls(noise_multiplier=fields["noise_multiplier"])


@dataclass(frozen=True, kw_only=True)
class PoissonSampled(Event):
    """``event`` run on a Poisson sample: each record (or party) is included independently
    with probability ``sampling_probability`` in (0, 1] (Abadi et al. 2016; Mironov,
    Talwar and Zhang 2019 for its RDP)."""

    kind: ClassVar[EventKind] = EventKind.POISSON_SAMPLED
    sampling_probability: float
    event: Event

    def __post_init__(self) -> None:
        q = _positive_finite("PoissonSampled sampling_probability", self.sampling_probability)
        if q > 1:
            raise PrivacyError(f"PoissonSampled sampling_probability must be in (0, 1], got {q!r}")
        _event("PoissonSampled event", self.event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind.value,
            "sampling_probability": self.sampling_probability,
            "event": self.event.to_dict(),
        }

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        return cls(
            sampling_probability=fields["sampling_probability"],
            event=event_from_dict(fields["event"]),
        )


@dataclass(frozen=True, kw_only=True)
class SelfComposed(Event):
    """``event`` run ``count`` times (adaptively) on the same data."""

    kind: ClassVar[EventKind] = EventKind.SELF_COMPOSED
    event: Event
    count: int

    def __post_init__(self) -> None:
        _event("SelfComposed event", self.event)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise PrivacyError(f"SelfComposed count must be an integer >= 1, got {self.count!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind.value, "event": self.event.to_dict(), "count": self.count}

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        return cls(event=event_from_dict(fields["event"]), count=fields["count"])


@dataclass(frozen=True, kw_only=True)
class Composed(Event):
    """Several events run (adaptively) on the same data; a non-empty tuple."""

    kind: ClassVar[EventKind] = EventKind.COMPOSED
    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple):
            raise PrivacyError(
                f"Composed events must be a tuple of events, got {type(self.events).__name__}"
            )
        if not self.events:
            raise PrivacyError("Composed events must not be empty")
        for i, e in enumerate(self.events):
            _event(f"Composed events[{i}]", e)

    @classmethod
    def of(cls, *events: Event) -> Composed:
        """``Composed.of(a, b)`` == ``Composed(events=(a, b))``."""
        return cls(events=tuple(events))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind.value, "events": [e.to_dict() for e in self.events]}

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        raw = fields["events"]
        if not isinstance(raw, (list, tuple)):
            raise PrivacyError(f"Composed events must be a list, got {raw!r}")
        return cls(events=tuple(event_from_dict(e) for e in raw))


class SkellamAmplification(enum.Enum):
    """Which bound turns a Poisson-sampled :class:`Skellam` release into RDP (the maths is in
    :mod:`lepton_ray.privacy.skellam`).

    * ``MIXTURE``: joint convexity of exp((alpha - 1) D_alpha) over the two mixtures; sound
      whenever both neighbouring outputs are (1 - q) A + q B and (1 - q) A + q B' with B, B'
      the Skellam pair - in particular for per-party noise shares and zero-out neighbours.

    ``zhu_wang`` (Zhu and Wang 2019, Thm 6, add/remove neighbours) was removed (issue 13): it
    is sound only when the noise in the sum does not depend on whether the party took part,
    and per-party noise shares - the only way Skellam noise is added here - always do. A
    ledger row written with it is re-accounted with ``MIXTURE`` (:meth:`Skellam._from_fields`),
    which can only raise the epsilon replayed; the ledger never lowers what it recorded.
    """

    MIXTURE = "mixture"


@dataclass(frozen=True, kw_only=True)
class Skellam(Event):
    """Skellam mechanism (Agarwal, Kairouz and Liu 2021): add Sk(variance) =
    Poisson(variance / 2) - Poisson(variance / 2) per coordinate to an integer query with L1
    and L2 sensitivities ``l1_sensitivity`` and ``l2_sensitivity`` (all in the scaled integer
    domain), run on a Poisson sample with rate ``sampling_probability`` (1: no sampling),
    amplified by ``amplification``. RDP: :mod:`lepton_ray.privacy.skellam` (import it to
    register the maths with the RDP accountant)."""

    kind: ClassVar[EventKind] = EventKind.SKELLAM
    variance: float
    l1_sensitivity: float
    l2_sensitivity: float
    sampling_probability: float = 1.0
    amplification: SkellamAmplification = SkellamAmplification.MIXTURE

    def __post_init__(self) -> None:
        _positive_finite("Skellam variance", self.variance)
        _positive_finite("Skellam l1_sensitivity", self.l1_sensitivity)
        _positive_finite("Skellam l2_sensitivity", self.l2_sensitivity)
        q = _positive_finite("Skellam sampling_probability", self.sampling_probability)
        if q > 1:
            raise PrivacyError(f"Skellam sampling_probability must be in (0, 1], got {q!r}")
        if not isinstance(self.amplification, SkellamAmplification):
            raise PrivacyError(
                f"Skellam amplification must be a SkellamAmplification, got {self.amplification!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind.value,
            "variance": self.variance,
            "l1_sensitivity": self.l1_sensitivity,
            "l2_sensitivity": self.l2_sensitivity,
            "sampling_probability": self.sampling_probability,
            "amplification": self.amplification.value,
        }

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        if fields["amplification"] == "zhu_wang":  # removed as unsound: re-account soundly
            fields = {**fields, "amplification": SkellamAmplification.MIXTURE.value}
        try:
            amplification = SkellamAmplification(fields["amplification"])
        except ValueError:
            raise PrivacyError(
                f"unknown Skellam amplification {fields['amplification']!r}"
            ) from None
        return cls(
            variance=fields["variance"],
            l1_sensitivity=fields["l1_sensitivity"],
            l2_sensitivity=fields["l2_sensitivity"],
            sampling_probability=fields["sampling_probability"],
            amplification=amplification,
        )


@dataclass(frozen=True, kw_only=True)
class DiscreteGaussian(Event):
    """Discrete Gaussian noise N_Z(0, sigma^2) per coordinate added to an integer query
    (Canonne, Kamath and Steinke 2020) with ``noise_multiplier`` z: 1/z^2 = sum over
    coordinate blocks of (Delta_j / sigma_j)^2, Delta_j the block's L2 sensitivity in integer
    units; run on a Poisson sample with rate ``sampling_probability`` (1: no sampling). RDP:
    :mod:`lepton_ray.privacy.discrete_gaussian` (closed form unsampled; Zhu-Wang sampled)."""

    kind: ClassVar[EventKind] = EventKind.DISCRETE_GAUSSIAN
    noise_multiplier: float
    sampling_probability: float = 1.0

    def __post_init__(self) -> None:
        _positive_finite("DiscreteGaussian noise_multiplier", self.noise_multiplier)
        q = _positive_finite("DiscreteGaussian sampling_probability", self.sampling_probability)
        if q > 1:
            raise PrivacyError(f"DiscreteGaussian sampling_probability must be in (0, 1], got {q!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind.value, "noise_multiplier": self.noise_multiplier,
                "sampling_probability": self.sampling_probability}

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> Event:
        return cls(noise_multiplier=fields["noise_multiplier"],
                   sampling_probability=fields["sampling_probability"])


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from :meth:`Event.to_dict` output (e.g. a ledger line).

    Raises :class:`PrivacyError` naming the problem for an unknown ``type``, a missing
    field, or a value the constructor rejects.
    """
    if not isinstance(data, Mapping):
        raise PrivacyError(f"a privacy event must be a JSON object, got {data!r}")
    tag = data.get("type")
    try:
        kind = EventKind(tag)
    except ValueError:
        raise PrivacyError(f"unknown privacy event type {tag!r}") from None
    cls = _EVENT_TYPES.get(kind)
    if cls is None:
        raise PrivacyError(f"privacy event type {tag!r} has no registered class")
    try:
        return cls._from_fields(data)
    except KeyError as missing:
        raise PrivacyError(f"privacy event {tag!r} is missing field {missing}") from None
