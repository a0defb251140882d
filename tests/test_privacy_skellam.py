"""Skellam accounting: the RDP bound of Agarwal, Kairouz and Liu 2021 and both Poisson-sampling
bounds checked against an INDEPENDENT numeric oracle - Renyi divergences summed over the
support, with the Skellam pmf built as the convolution of two Poisson pmfs (scipy.stats), no
Bessel functions and none of our code - plus dp_accounting's exact sampled-Gaussian RDP; the
event's contract (JSON, accountants); parameter choice; calibration never overshooting."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy import _dp_accounting, skellam
from lepton_ray.privacy.accountants import PldAccountant, RdpAccountant
from lepton_ray.privacy.calibration import compute_epsilon
from lepton_ray.privacy.events import (
    SelfComposed,
    Skellam,
    SkellamAmplification,
    event_from_dict,
)
from lepton_ray.privacy.skellam import (
    SkellamParams,
    calibrate_skellam,
    event_for_survivors,
    skellam_epsilon,
    skellam_params,
    skellam_rdp,
    subsampled_rdp,
)

MIX = SkellamAmplification.MIXTURE


# ------------------------------------------------------------------ the oracle


@lru_cache(maxsize=32)
def skellam_logpmf(variance: float, half_width: int) -> np.ndarray:
    """log P(Sk(variance) = k), k = -half_width..half_width, as the convolution
    sum_j Pois(j + |k|; variance/2) Pois(j; variance/2) (log-space)."""
    lam = variance / 2
    j = np.arange(int(lam + 25 * math.sqrt(lam) + 100) + 1)
    k = np.arange(half_width + 1)
    terms = stats.poisson.logpmf(j[None, :] + k[:, None], lam) + stats.poisson.logpmf(j, lam)
    pos = special.logsumexp(terms, axis=1)
    return np.concatenate([pos[:0:-1], pos])


def support(variance: float, shift: int, alpha: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Grid wide enough that the divergence sums have converged (the peak of
    P^a Q^(1-a) sits within |shift| * alpha of the bulk)."""
    width = int(abs(shift) + 25 * math.sqrt(variance) + 5 * abs(shift) * alpha + 150)
    logpmf = skellam_logpmf(variance, width + abs(shift))
    k = np.arange(-width, width + 1)
    return k, logpmf, width + abs(shift)


def renyi(logp: np.ndarray, logq: np.ndarray, alpha: float) -> float:
    return float(special.logsumexp(alpha * logp + (1 - alpha) * logq)) / (alpha - 1)


def exact_skellam_divergence(variance: float, shift: int, alpha: float) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)) (symmetric in the sign of the shift)."""
    k, logpmf, off = support(variance, shift, alpha)
    return renyi(logpmf[k - shift + off], logpmf[k + off], alpha)


def exact_sampled_divergence(variance: float, shift: int, alpha: float, q: float) -> float:
    """max of D_alpha((1-q)Q + qP || Q) and D_alpha(Q || (1-q)Q + qP), P = Q + shift."""
    k, logpmf, off = support(variance, shift, alpha)
    lq, lp = logpmf[k + off], logpmf[k - shift + off]
    lm = np.logaddexp(math.log1p(-q) + lq, math.log(q) + lp)
    return max(renyi(lm, lq, alpha), renyi(lq, lm, alpha))


def test_oracle_agrees_with_scipy_skellam():
    mu = 7.0
    lp = skellam_logpmf(mu, 60)
    ks = np.arange(-20, 21)
    np.testing.assert_allclose(lp[ks + 60], stats.skellam.logpmf(ks, mu / 2, mu / 2), atol=1e-9)
    assert math.isclose(float(np.exp(special.logsumexp(lp))), 1.0, rel_tol=1e-12)


# ------------------------------------------------------------------ the Skellam RDP bound

GRID = [(mu, shift) for mu in (0.5, 3.0, 10.0, 60.0, 400.0) for shift in (1, 2, 5)]
ORDERS = np.array([2.0, 3.0, 4.5, 8.0, 16.0, 32.0])


@pytest.mark.parametrize("mu,shift", GRID)
def test_rdp_bound_dominates_the_exact_1d_divergence(mu, shift):
    bound = skellam_rdp(ORDERS, variance=mu, l1_sensitivity=shift, l2_sensitivity=shift)
    for a, b in zip(ORDERS, bound, strict=True):
        exact = exact_skellam_divergence(mu, shift, a)
        assert b >= exact * (1 - 1e-9), (mu, shift, a, b, exact)
        if mu >= max(10, 2 * shift**2):  # the regime that matters: not absurdly loose
            assert b <= 3.0 * exact, (mu, shift, a, b, exact)
        if mu >= max(50, 10 * shift**2) and a <= 16:
            assert b <= 1.1 * exact, (mu, shift, a, b, exact)


@pytest.mark.parametrize("mu,shift", [(20.0, (2, 1)), (20.0, (3, -2)), (50.0, (1, 1)),
                                      (5.0, (1, -1))])
def test_rdp_bound_dominates_a_2d_product(mu, shift):
    """2-D Sk(mu)^2: the divergence of a product is the sum of the coordinates'."""
    a, b = shift
    d2, d1 = math.hypot(a, b), abs(a) + abs(b)
    bound = skellam_rdp(ORDERS, variance=mu, l1_sensitivity=d1, l2_sensitivity=d2)
    for alpha, value in zip(ORDERS, bound, strict=True):
        exact = exact_skellam_divergence(mu, a, alpha) + exact_skellam_divergence(mu, b, alpha)
        assert exact <= value <= 3.0 * exact


def test_rdp_bound_reduces_to_gaussian_for_large_variance():
    mu, d2, orders = 1e8, 30.0, np.array([2.0, 3.0, 7.0, 64.0])
    got = skellam_rdp(orders, variance=mu, l1_sensitivity=d2 * 10, l2_sensitivity=d2)
    np.testing.assert_allclose(got, orders * d2**2 / (2 * mu), rtol=1e-5)


def test_rdp_rejects_bad_inputs():
    with pytest.raises(PrivacyError, match="variance"):
        skellam_rdp(ORDERS, variance=0.0, l1_sensitivity=1, l2_sensitivity=1)
    with pytest.raises(PrivacyError, match="orders"):
        skellam_rdp(np.array([1.0]), variance=1.0, l1_sensitivity=1, l2_sensitivity=1)


# ------------------------------------------------------------------ Poisson sampling


def base_fn(mu: float, shift: float):
    return lambda a: skellam_rdp(a, variance=mu, l1_sensitivity=shift, l2_sensitivity=shift)


@pytest.mark.parametrize("mu,shift", [(2.0, 1), (10.0, 1), (10.0, 3), (100.0, 3)])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_sampled_bounds_dominate_exact_mixture_divergences(mu, shift, q):
    orders = np.array([2.0, 3.0, 6.0, 20.0])
    for amp in (MIX,):
        bound = subsampled_rdp(orders, base_fn(mu, shift), sampling_probability=q,
                               amplification=amp)
        for a, b in zip(orders, bound, strict=True):
            exact = exact_sampled_divergence(mu, shift, a, q)
            assert b >= exact * (1 - 1e-9), (amp, mu, shift, q, a, b, exact)


def test_mixture_bound_covers_the_zero_out_structure_of_per_party_noise():
    """Per-party shares, zero-out neighbours, conditioned on k other survivors: outputs
    (1-q) Sk(k m) + q (Sk((k+1) m) + x) vs (1-q) Sk(k m) + q Sk((k+1) m)."""
    k_others, m, shift, q = 3, 4.0, 2, 0.2
    for alpha in (2.0, 4.0, 10.0):
        ks, lp_a, off_a = support(k_others * m, shift, alpha)
        _, lp_b, off_b = support((k_others + 1) * m, shift, alpha)
        la = lp_a[ks + off_a]
        b0, b1 = lp_b[ks + off_b], lp_b[ks - shift + off_b]
        left = np.logaddexp(math.log1p(-q) + la, math.log(q) + b1)
        right = np.logaddexp(math.log1p(-q) + la, math.log(q) + b0)
        exact = max(renyi(left, right, alpha), renyi(right, left, alpha))
        bound = subsampled_rdp(np.array([alpha]), base_fn((k_others + 1) * m, shift),
                               sampling_probability=q, amplification=MIX)[0]
        assert exact <= bound


DEFAULT_ORDERS = np.array(RdpAccountant().orders)


@settings(max_examples=40, deadline=None)
@given(
    mu=st.floats(0.5, 1e6),
    d2=st.floats(1.0, 300.0),
    q1=st.floats(1e-4, 1.0),
    q2=st.floats(1e-4, 1.0),
    amp=st.sampled_from([MIX]),
)
def test_amplification_is_monotone_in_q_and_exact_at_one(mu, d2, q1, q2, amp):
    lo, hi = sorted((q1, q2))
    base = base_fn(mu, d2)
    unsampled = skellam_rdp(DEFAULT_ORDERS, variance=mu, l1_sensitivity=d2, l2_sensitivity=d2)
    r_lo = subsampled_rdp(DEFAULT_ORDERS, base, sampling_probability=lo, amplification=amp)
    r_hi = subsampled_rdp(DEFAULT_ORDERS, base, sampling_probability=hi, amplification=amp)
    r_one = subsampled_rdp(DEFAULT_ORDERS, base, sampling_probability=1.0, amplification=amp)
    assert np.all(r_lo <= r_hi * (1 + 1e-12) + 1e-300)
    assert np.all(r_hi <= unsampled * (1 + 1e-12))
    np.testing.assert_array_equal(r_one, unsampled)


# ------------------------------------------------------------------ the event


def test_event_round_trips_through_json_and_validates():
    ev = Skellam(variance=1e6, l1_sensitivity=3e4, l2_sensitivity=1e3,
                 sampling_probability=0.1, amplification=MIX)
    data = ev.to_dict()
    assert data["type"] == "skellam" and data["amplification"] == "mixture"
    assert event_from_dict(data) == ev
    # a ledger row written with the removed, unsound zhu_wang is re-accounted soundly
    assert event_from_dict(data | {"amplification": "zhu_wang"}) == ev
    nested = SelfComposed(event=ev, count=5)
    assert event_from_dict(nested.to_dict()) == nested
    assert Skellam(variance=1, l1_sensitivity=1, l2_sensitivity=1).amplification is MIX
    for bad in ({"variance": 0}, {"l1_sensitivity": -1}, {"l2_sensitivity": math.inf},
                {"sampling_probability": 1.5}, {"amplification": "zhu_wang"}):
        fields = {"variance": 1.0, "l1_sensitivity": 1.0, "l2_sensitivity": 1.0} | bad
        with pytest.raises(PrivacyError):
            Skellam(**fields)
    with pytest.raises(PrivacyError, match="amplification"):
        event_from_dict(data | {"amplification": "nope"})
    with pytest.raises(PrivacyError, match="missing field"):
        event_from_dict({k: v for k, v in data.items() if k != "variance"})


def test_rdp_accountant_composes_skellam_and_pld_refuses_it():
    ev = Skellam(variance=4e4, l1_sensitivity=2e3, l2_sensitivity=100.0)
    acc = RdpAccountant()
    acc.compose(SelfComposed(event=ev, count=10))
    expected = 10 * skellam_rdp(DEFAULT_ORDERS, variance=4e4, l1_sensitivity=2e3,
                                l2_sensitivity=100.0)
    np.testing.assert_allclose(acc.rdp, expected, rtol=1e-12)
    gaussian = compute_epsilon(sampling_rate=1.0, noise_multiplier=2.0, steps=10, delta=1e-5)
    assert gaussian <= acc.epsilon(1e-5) <= 1.05 * gaussian  # z = sqrt(mu) / D2 = 2
    assert not PldAccountant().can_compose(ev)


# ------------------------------------------------------------------ parameters

BASE = {"dim": 10_000, "clip_norm": 1.0, "parties": 100, "min_survivors": 100,
        "noise_multiplier": 1.0}


@pytest.mark.parametrize("bits", [12, 16, 20, 32])
def test_params_take_the_largest_scale_within_the_wraparound_target(bits):
    p = skellam_params(bits=bits, **BASE)
    assert p.wraparound_probability <= skellam.DEFAULT_MAX_WRAPAROUND
    try:
        bigger = SkellamParams(**(BASE | {"bits": bits, "gamma": p.gamma * 1.001}))
    except PrivacyError as e:  # 32 bits: gamma is capped by the exact-sampling limit instead
        assert "Poisson means" in str(e) and bits == 32
    else:
        assert bigger.wraparound_probability > skellam.DEFAULT_MAX_WRAPAROUND
    assert p.l2_sensitivity >= p.gamma * p.clip_norm
    assert p.l2_sensitivity**2 >= p.norm_bound_sq
    assert p.l1_sensitivity <= math.sqrt(p.padded_dim) * p.l2_sensitivity
    assert p.l1_sensitivity <= p.norm_bound_sq
    assert math.isclose(p.mu, (p.noise_multiplier * p.l2_sensitivity) ** 2)
    assert math.isclose(p.share_variance * p.min_survivors, p.mu)
    assert p.central_noise_multiplier >= p.noise_multiplier


def test_more_bits_buy_more_scale_and_the_paper_recipe_is_available():
    gammas = [skellam_params(bits=b, **BASE).gamma for b in (12, 14, 16)]
    assert gammas[0] < gammas[1] < gammas[2]
    k3 = skellam_params(bits=16, k_stddevs=3.0, **BASE)
    assert math.isclose(k3.k_stddevs, 3.0, rel_tol=1e-6)
    assert k3.gamma > skellam_params(bits=16, **BASE).gamma  # and its wrap bound is large
    assert k3.wraparound_probability > 1e-3


def test_params_refuse_a_ring_too_small_and_bad_values():
    with pytest.raises(PrivacyError, match="bits=4"):
        skellam_params(bits=4, **BASE)
    for bad, match in (({"bits": 65}, "bits"), ({"min_survivors": 101}, "min_survivors"),
                       ({"noise_multiplier": 0.0}, "noise_multiplier"),
                       ({"dim": 0}, "dimension"), ({"clip_norm": -1.0}, "clip_norm")):
        with pytest.raises(PrivacyError, match=match):
            skellam_params(**({"bits": 16} | BASE | bad))
    with pytest.raises(PrivacyError, match="max_wraparound"):
        skellam_params(bits=16, max_wraparound=0.0, **BASE)


def test_events_for_survivors_carry_the_noise_really_added():
    p = skellam_params(bits=16, **(BASE | {"parties": 120, "min_survivors": 80}))
    assert p.event() == event_for_survivors(p, 80)
    assert p.event().variance <= p.mu
    ev = event_for_survivors(p, 110, sampling_probability=0.1, amplification=MIX)
    assert ev.variance <= 110 * p.share_variance and math.isclose(ev.variance, 110 / 80 * p.mu)
    assert (ev.l1_sensitivity, ev.l2_sensitivity) == (p.l1_sensitivity, p.l2_sensitivity)
    assert (ev.sampling_probability, ev.amplification) == (0.1, MIX)
    for bad in (79, 121):
        with pytest.raises(PrivacyError, match="survivors"):
            event_for_survivors(p, bad)
    eps = [RdpAccountant().composed(event_for_survivors(p, s)).epsilon(1e-5)
           for s in (80, 100, 120)]
    assert eps[0] > eps[1] > eps[2]


# ------------------------------------------------------------------ epsilon and calibration


def test_skellam_epsilon_is_no_smaller_than_the_gaussian_with_its_multiplier():
    """Unsampled, Skellam's RDP is the Gaussian's plus a surcharge: eps >= the Gaussian
    mechanism's with z = sqrt(mu) / Delta_2, and close to it when mu is large."""
    for bits in (16, 24):
        eps = skellam_epsilon(sampling_rate=1.0, steps=3, delta=1e-5, bits=bits,
                              **(BASE | {"noise_multiplier": 5.0}))
        gauss = compute_epsilon(sampling_rate=1.0, noise_multiplier=5.0, steps=3, delta=1e-5)
        assert gauss <= eps <= 1.01 * gauss


def test_skellam_epsilon_grows_with_sampling_rate_and_steps():
    kw = {"delta": 1e-5, "bits": 16, **BASE}
    e = {(q, t): skellam_epsilon(sampling_rate=q, steps=t, amplification=MIX, **kw)
         for q in (0.05, 0.2) for t in (10, 100)}
    assert e[(0.05, 10)] < e[(0.2, 10)] < e[(0.2, 100)]
    assert e[(0.05, 10)] < e[(0.05, 100)] < e[(0.2, 100)]


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(0.5, 20.0),
    q=st.sampled_from([0.01, 0.1, 1.0]),
    steps=st.integers(1, 200),
    amp=st.sampled_from([MIX]),
)
def test_calibration_never_overshoots_and_is_tight(target, q, steps, amp):
    kw = {"delta": 1e-5, "sampling_rate": q, "steps": steps, "bits": 20, "dim": 1000,
          "clip_norm": 0.5, "parties": 50, "min_survivors": 40, "amplification": amp}
    try:
        p = calibrate_skellam(target_epsilon=target, **kw)
    except PrivacyError:  # target needs z outside [1e-3, 1e4]: refused, never wrong
        return
    eps = skellam_epsilon(noise_multiplier=p.noise_multiplier, **kw)
    assert eps <= target
    looser = skellam_epsilon(noise_multiplier=p.noise_multiplier / 1.01, **kw)
    assert looser > target


def test_calibration_refuses_targets_it_cannot_meet():
    with pytest.raises(PrivacyError, match="not reachable"):
        calibrate_skellam(target_epsilon=1e-4, delta=1e-5, sampling_rate=1.0, steps=100,
                          bits=12, dim=10_000, clip_norm=1.0, parties=100, min_survivors=100)
    with pytest.raises(PrivacyError, match="target_epsilon"):
        calibrate_skellam(target_epsilon=0.0, delta=1e-5, sampling_rate=1.0, steps=1,
                          bits=16, dim=10, clip_norm=1.0, parties=1, min_survivors=1)
