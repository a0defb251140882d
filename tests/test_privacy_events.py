"""Privacy events: validation naming the bad value, frozen/hashable, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.events import (
    Composed,
    Event,
    Gaussian,
    Laplace,
    PoissonSampled,
    SelfComposed,
    event_from_dict,
)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, "1.0", True, None])
def test_gaussian_and_laplace_reject_bad_noise(bad):
    for cls in (Gaussian, Laplace):
        with pytest.raises(PrivacyError, match="noise_multiplier"):
            cls(noise_multiplier=bad)


@pytest.mark.parametrize("q", [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf])
def test_poisson_sampled_rejects_q_outside_unit_interval(q):
    with pytest.raises(PrivacyError, match="sampling_probability") as err:
        PoissonSampled(sampling_probability=q, event=Gaussian(noise_multiplier=1.0))
    assert repr(q) in str(err.value) or str(q) in str(err.value)


@pytest.mark.parametrize("count", [0, -3, 1.5, True, "2"])
def test_self_composed_rejects_bad_count(count):
    with pytest.raises(PrivacyError, match="count"):
        SelfComposed(event=Gaussian(noise_multiplier=1.0), count=count)


def test_nested_events_must_be_events_and_composed_a_nonempty_tuple():
    with pytest.raises(PrivacyError, match="event"):
        PoissonSampled(sampling_probability=0.5, event={"type": "gaussian"})  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="tuple"):
        Composed(events=[Gaussian(noise_multiplier=1.0)])  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="empty"):
        Composed(events=())
    with pytest.raises(PrivacyError, match=r"events\[1\]"):
        Composed.of(Gaussian(noise_multiplier=1.0), 3)  # type: ignore[arg-type]


def test_events_are_frozen_keyword_only_and_hashable():
    g = Gaussian(noise_multiplier=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.noise_multiplier = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Gaussian(1.0)  # type: ignore[misc]
    assert {g: 1}[Gaussian(noise_multiplier=1.0)] == 1
    q1 = PoissonSampled(sampling_probability=0.1, event=g)
    q2 = PoissonSampled(sampling_probability=0.2, event=g)
    assert q1 != q2


def _leaf() -> st.SearchStrategy[Event]:
    z = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
    return st.one_of(
        st.builds(lambda v: Gaussian(noise_multiplier=v), z),
        st.builds(lambda v: Laplace(noise_multiplier=v), z),
    )


def _extend(children: st.SearchStrategy[Event]) -> st.SearchStrategy[Event]:
    q = st.floats(min_value=1e-6, max_value=1.0, exclude_min=False)
    return st.one_of(
        st.builds(lambda p, e: PoissonSampled(sampling_probability=p, event=e), q, children),
        st.builds(
            lambda e, n: SelfComposed(event=e, count=n),
            children,
            st.integers(min_value=1, max_value=10**6),
        ),
        st.builds(
            lambda es: Composed(events=tuple(es)), st.lists(children, min_size=1, max_size=3)
        ),
    )


events = st.recursive(_leaf(), _extend, max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(events)
def test_json_round_trip_is_exact(event):
    text = json.dumps(event.to_dict(), allow_nan=False)
    back = event_from_dict(json.loads(text))
    assert back == event
    assert hash(back) == hash(event)
    assert Event.from_dict(event.to_dict()) == event


def test_to_dict_shape_is_stable():
    e = SelfComposed(
        event=PoissonSampled(sampling_probability=0.01, event=Gaussian(noise_multiplier=1.1)),
        count=3,
    )
    assert e.to_dict() == {
        "type": "self_composed",
        "event": {
            "type": "poisson_sampled",
            "sampling_probability": 0.01,
            "event": {"type": "gaussian", "noise_multiplier": 1.1},
        },
        "count": 3,
    }


@pytest.mark.parametrize(
    "data, match",
    [
        ({"type": "no_such_mechanism", "mu": 3}, "unknown privacy event type 'no_such_mechanism'"),
        ({"noise_multiplier": 1.0}, "unknown privacy event type None"),
        ({"type": "gaussian"}, "missing field 'noise_multiplier'"),
        ({"type": "gaussian", "noise_multiplier": -1}, "noise_multiplier"),
        ({"type": "composed", "events": {}}, "must be a list"),
        ([1, 2], "JSON object"),
        (
            {
                "type": "poisson_sampled",
                "sampling_probability": 1.5,
                "event": {"type": "gaussian", "noise_multiplier": 1},
            },
            "sampling_probability",
        ),
    ],
)
def test_from_dict_rejects_malformed_input_with_a_clear_message(data, match):
    with pytest.raises(PrivacyError, match=match):
        event_from_dict(data)
