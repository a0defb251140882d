"""compute_epsilon / calibrate_noise: never overshoot, tight to 1 %, clear errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.accountants import AccountantKind
from lepton_ray.privacy.calibration import (
    CALIBRATION_TOLERANCE,
    calibrate_noise,
    compute_epsilon,
    record_level_epsilon,
    record_level_event,
    sampled_gaussian_event,
)
from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon
from lepton_ray.privacy.events import DiscreteGaussian, Gaussian, PoissonSampled, SelfComposed


def _eps(z: float, q: float, steps: int, delta: float, kind=AccountantKind.RDP) -> float:
    return compute_epsilon(
        sampling_rate=q, noise_multiplier=z, steps=steps, delta=delta, accountant=kind
    )


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.floats(min_value=0.3, max_value=12.0),
    q=st.sampled_from([0.001, 0.01, 0.05, 0.2, 1.0]),
    steps=st.integers(min_value=1, max_value=3000),
    delta=st.sampled_from([1e-7, 1e-5, 1e-3]),
)
def test_calibrated_noise_never_overshoots_and_is_within_one_percent(target, q, steps, delta):
    z = calibrate_noise(target_epsilon=target, delta=delta, sampling_rate=q, steps=steps)
    assert _eps(z, q, steps, delta) <= target  # never overshoot
    # smallest: 1 % less noise already breaks the target
    assert _eps(z / 1.01, q, steps, delta) > target


def test_calibration_with_pld_never_overshoots():
    target, q, steps, delta = 0.5, 0.05, 20, 1e-5
    z = calibrate_noise(
        target_epsilon=target,
        delta=delta,
        sampling_rate=q,
        steps=steps,
        accountant=AccountantKind.PLD,
    )
    assert _eps(z, q, steps, delta, AccountantKind.PLD) <= target
    assert _eps(z / (1 + 2 * CALIBRATION_TOLERANCE), q, steps, delta, AccountantKind.PLD) > target
    # PLD is tighter, so it needs less noise than RDP for the same target.
    assert z < calibrate_noise(target_epsilon=target, delta=delta, sampling_rate=q, steps=steps)


def test_calibration_round_trips_a_published_setting():
    # TF-Privacy: z=1.3 gives 0.72422 for n=60000, batch 150, 15 epochs, delta=1e-5.
    z = calibrate_noise(target_epsilon=0.72422, delta=1e-5, sampling_rate=150 / 60000, steps=6000)
    assert z == pytest.approx(1.3, rel=CALIBRATION_TOLERANCE)
    assert z >= 1.3 * (1 - 1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sampling_rate": 0.0}, "sampling_probability"),
        ({"sampling_rate": 1.5}, "sampling_probability"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"target_epsilon": 1e-4, "sampling_rate": 1.0, "steps": 10**6}, "not reachable"),
        ({"target_epsilon": 1e6, "sampling_rate": 1.0, "steps": 1}, "too loose"),
    ],
)
def test_impossible_or_bad_calibration_requests_raise_privacy_error(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sampling_rate": 0.01, "steps": 100}
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=match):
        calibrate_noise(**args)


def test_compute_epsilon_validates_and_builds_the_sampled_gaussian_workload():
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        compute_epsilon(sampling_rate=0.1, noise_multiplier=0.0, steps=10, delta=1e-5)
    with pytest.raises(PrivacyError, match="steps"):
        compute_epsilon(sampling_rate=0.1, noise_multiplier=1.0, steps=0, delta=1e-5)
    assert sampled_gaussian_event(sampling_rate=0.1, noise_multiplier=1.0, steps=3) == SelfComposed(
        event=PoissonSampled(sampling_probability=0.1, event=Gaussian(noise_multiplier=1.0)),
        count=3,
    )
    assert sampled_gaussian_event(sampling_rate=1, noise_multiplier=2.0, steps=1) == Gaussian(
        noise_multiplier=2.0
    )
    # More steps, less noise, more sampling: each costs privacy.
    base = _eps(1.0, 0.01, 100, 1e-5)
    assert _eps(1.0, 0.01, 200, 1e-5) > base
    assert _eps(0.9, 0.01, 100, 1e-5) > base
    assert _eps(1.0, 0.02, 100, 1e-5) > base


def _pld_1d_discrete_gaussian(sigma: int, sensitivity: int, q: float, steps: int, delta: float):
    """Independent oracle (dp-accounting): the exact epsilon (PLD, pessimistic to ~1e-4) of a
    1-D instance of the mechanism - N_Z(0, sigma^2) on an integer query of sensitivity
    ``sensitivity``, Poisson-sampled at q, ``steps`` times. The d-dimensional mechanism
    contains this instance (a rounded gradient (Delta, 0, ..., 0)), so a sound bound at
    z = sigma / sensitivity is never below it."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    dist = pld.from_discrete_gaussian_mechanism(sigma, sensitivity=sensitivity,
                                                sampling_prob=q)
    return dist.self_compose(steps).get_epsilon_for_delta(delta)


def test_record_level_epsilon_uses_batch_over_n_and_ceil_steps():
    event = record_level_event(n_local=1000, batch_size=64, epochs=3, noise_multiplier=1.1)
    assert event == SelfComposed(  # the sampled discrete Gaussian central DP uses, per step
        event=DiscreteGaussian(noise_multiplier=1.1, sampling_probability=0.064),
        count=3 * 16,  # ceil(1000 / 64) = 16
    )
    eps = record_level_epsilon(
        n_local=1000, batch_size=64, epochs=3, noise_multiplier=1.1, delta=1e-5
    )
    assert eps == pytest.approx(discrete_gaussian_epsilon(
        noise_multiplier=1.1, sampling_rate=0.064, steps=48, delta=1e-5), rel=1e-12)
    # oracles: never below the exact 1-D discrete Gaussian (sigma 110, sensitivity 100), and
    # within 25 % of the continuous sampled Gaussian (dp-accounting RDP) it replaces
    assert eps >= _pld_1d_discrete_gaussian(110, 100, 0.064, 48, 1e-5)
    assert _eps(1.1, 0.064, 48, 1e-5) <= eps <= 1.25 * _eps(1.1, 0.064, 48, 1e-5)
    with pytest.raises(PrivacyError, match="batch_size"):
        record_level_event(n_local=10, batch_size=11, epochs=1, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="epochs"):
        record_level_event(n_local=10, batch_size=5, epochs=0, noise_multiplier=1.0)


def test_record_level_epsilon_refuses_pld_by_name():
    from lepton_ray.privacy.calibration import record_level_epsilon_over_rounds

    kw = dict(n_local=300, batch_size=32, epochs=1, noise_multiplier=1.1, delta=1e-5,
              accountant=AccountantKind.PLD)
    for call in (lambda: record_level_epsilon(**kw),
                 lambda: record_level_epsilon_over_rounds(rounds=2, **kw)):
        with pytest.raises(PrivacyError, match="discrete Gaussian.*only the RDP accountant"):
            call()


def test_record_level_epsilon_over_rounds_composes_the_one_round_event():
    from lepton_ray.privacy.calibration import record_level_epsilon_over_rounds

    kw = dict(n_local=300, batch_size=32, epochs=2, noise_multiplier=1.1, delta=1e-5)
    assert record_level_epsilon_over_rounds(rounds=0, **kw) == 0.0
    # oracle: 5 rounds x 2 epochs x ceil(300/32) sampled discrete Gaussian steps at q = 32/300
    assert record_level_epsilon_over_rounds(rounds=5, **kw) == pytest.approx(
        discrete_gaussian_epsilon(sampling_rate=32 / 300, noise_multiplier=1.1, steps=5 * 2 * 10,
                                  delta=1e-5), rel=1e-9)
    # a batch larger than the party is capped at its size (q = 1): unsampled, the discrete
    # Gaussian's RDP is the Gaussian's (CKS20), so dp-accounting's Gaussian is the oracle
    assert record_level_epsilon_over_rounds(**dict(kw, n_local=20), rounds=1) == pytest.approx(
        compute_epsilon(sampling_rate=1.0, noise_multiplier=1.1, steps=2, delta=1e-5), rel=1e-9)


@pytest.mark.parametrize("n_local,shown", [(144, 8.958), (143, 9.017)])
def test_readme_digits_party_record_level_epsilon(n_local, shown):
    """README: digits parties (144 or 143 examples, batch 32, 1 epoch, z = 1.1, delta 1e-5)
    after 7 rounds of DP-SGD, as the hosts logged them in a real run. Oracles (dp-accounting):
    at q = 32/n the binding bound is the forward divergence, which for the discrete Gaussian
    is exactly the continuous sampled Gaussian's (integer shifts), so the epsilon equals
    dp-accounting's RDP sampled Gaussian; and it is never below the exact 1-D discrete
    Gaussian instance (PLD, sigma 110 on sensitivity 100)."""
    from lepton_ray.privacy.calibration import record_level_epsilon_over_rounds

    eps = record_level_epsilon_over_rounds(n_local=n_local, rounds=7, batch_size=32, epochs=1,
                                           noise_multiplier=1.1, delta=1e-5)
    assert round(eps, 3) == shown
    steps = 7 * math.ceil(n_local / 32)
    assert eps == pytest.approx(_eps(1.1, 32 / n_local, steps, 1e-5), rel=1e-6)
    assert eps >= _pld_1d_discrete_gaussian(110, 100, 32 / n_local, steps, 1e-5)
