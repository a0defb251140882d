"""Discrete Gaussian (Canonne, Kamath and Steinke 2020): the exact sampler against brute-force
oracles, its RDP against dp-accounting and exact Renyi divergences, and the secret party sample."""

import math
import os

import numpy as np
import pytest

from lepton_ray.config import SamplingKind, SamplingSpec
from lepton_ray.learning.sampling import bernoulli_mask, sample_parties
from lepton_ray.privacy.discrete_gaussian import (
    bernoulli_exp,
    discrete_gaussian_pmf,
    discrete_gaussian_rdp,
    discrete_gaussian_variance,
    ring_sigma,
    sample_discrete_gaussian,
    uniform_below,
)

ORDERS = np.array([1.5, 2.0, 3.0, 4.5, 8.0, 16.0, 32.0, 64.0])


def test_bernoulli_exp_matches_math_exp():
    n = 200_000
    for num, den in [(0, 1), (1, 3), (1, 1), (3, 2), (7, 2)]:
        freq = bernoulli_exp(np.full(n, num), np.full(n, den), os.urandom).mean()
        p = math.exp(-num / den)
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_uniform_below_is_uniform_without_modulo_bias():
    m = 3 * 2**40  # a bound where "word mod m" would be visibly biased on 42 bits
    x = uniform_below(np.full(120_000, m), os.urandom)
    assert x.min() >= 0 and x.max() < m
    counts = np.bincount((x * 3 // m).astype(int), minlength=3)  # thirds: equal under uniformity
    assert np.all(np.abs(counts - 40_000) < 5 * math.sqrt(40_000))


@pytest.mark.parametrize("sigma", [1, 2, 7, 40])
def test_sampler_matches_the_exact_pmf(sigma):
    from scipy import stats

    n = 200_000
    x = sample_discrete_gaussian(n, sigma)
    support = 6 * sigma + 6
    y, p = discrete_gaussian_pmf(sigma, support)  # oracle: brute-force normalisation
    obs = np.array([np.sum(x == v) for v in y])
    keep = p * n >= 5
    exp_ = p[keep] * n
    chi2 = np.sum((obs[keep] - exp_) ** 2 / exp_) + (np.sum(obs[~keep]) - n * p[~keep].sum()) ** 2 \
        / max(n * p[~keep].sum(), 1e-9)
    assert stats.chi2.sf(chi2, keep.sum()) > 1e-4
    tv = 0.5 * np.abs(obs / n - p).sum()
    assert tv < 0.02
    var = discrete_gaussian_variance(sigma)  # exact variance by summation
    assert abs(x.var() / var - 1) < 0.02 and abs(x.mean()) < 5 * math.sqrt(var / n)


def test_sampler_is_fast_and_takes_large_integer_sigma():
    import time

    t = time.perf_counter()
    x = sample_discrete_gaussian(10_000, 2**24)
    assert time.perf_counter() - t < 0.5  # ~0.02 s here; generous for a shared machine
    assert abs(x.std() / 2**24 - 1) < 0.05
    assert 3 <= ring_sigma(1.5, 2.0) <= 4 and ring_sigma(1.0, 2.5) == 3  # rounds up, never down


def test_unsampled_rdp_is_dp_accountings_gaussian():
    """CKS20: N_Z(0, sigma^2)^d with integer L2 sensitivity Delta is (Delta^2 / 2 sigma^2)-zCDP,
    the continuous Gaussian's RDP at z = sigma / Delta."""
    import dp_accounting
    from dp_accounting import rdp

    for z in [0.7, 1.8, 4.0]:
        acc = rdp.RdpAccountant(orders=list(ORDERS))
        acc.compose(dp_accounting.GaussianDpEvent(z))
        np.testing.assert_allclose(discrete_gaussian_rdp(z, 1.0, ORDERS), acc._rdp, rtol=1e-12)


def _exact_1d_divergences(sigma: int, q: float, alpha: int) -> tuple[float, float]:
    """Both Renyi divergences of the 1-D subsampled discrete Gaussian (shift 1), by summation."""
    from scipy.special import logsumexp

    y = np.arange(-40 * sigma - 40, 40 * sigma + 41, dtype=np.float64)
    lp = -y**2 / (2 * sigma**2)
    lp -= logsumexp(lp)
    lp1 = -(y - 1) ** 2 / (2 * sigma**2)
    lp1 -= logsumexp(lp1)  # same normaliser: the shift is an integer
    lmix = np.logaddexp(math.log1p(-q) + lp, math.log(q) + lp1)
    fwd = logsumexp(alpha * lmix + (1 - alpha) * lp) / (alpha - 1)
    rev = logsumexp(alpha * lp + (1 - alpha) * lmix) / (alpha - 1)
    return fwd, rev


@pytest.mark.parametrize("sigma,q", [(1, 0.1), (2, 0.1), (2, 0.5), (5, 0.01)])
def test_sampled_rdp_bounds_the_exact_divergences_in_both_directions(sigma, q):
    bound = discrete_gaussian_rdp(float(sigma), q, np.arange(2.0, 33.0))
    for alpha in range(2, 33, 3):
        fwd, rev = _exact_1d_divergences(sigma, q, alpha)
        assert bound[alpha - 2] >= max(fwd, rev) * (1 - 1e-9)
        assert bound[alpha - 2] <= alpha / (2 * sigma**2) + 1e-12  # never above unsampled


def test_sampled_rdp_never_below_dp_accountings_sampled_gaussian():
    import dp_accounting
    from dp_accounting import rdp

    orders = np.arange(2.0, 65.0)
    for z, q in [(1.0, 0.1), (1.8, 0.1), (4.0, 0.01)]:
        acc = rdp.RdpAccountant(orders=list(orders))
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
        assert np.all(discrete_gaussian_rdp(z, q, orders) >= acc._rdp * (1 - 1e-9))


def test_poisson_mask_rate_is_at_most_q():
    assert not bernoulli_mask(1000, 0.0).any() and bernoulli_mask(10, 1.0).all()
    m = bernoulli_mask(400_000, 0.1)
    assert abs(m.mean() - 0.1) < 5 * math.sqrt(0.09 / 400_000)


def test_party_sample_is_not_reproducible_from_the_spec_seed():
    """Attack (issue 13): the driver sampled with np.random.default_rng([spec.seed, round, 0x5A]),
    so the spec reproduced every round's participants. Now two draws for the same spec and
    round differ and the seed-derived reconstruction no longer matches."""
    spec = SamplingSpec(kind=SamplingKind.POISSON, fraction=0.1)
    seed, n = 0, 1000
    hits = 0
    for r in range(1, 6):
        attacker = np.flatnonzero(np.random.default_rng([seed, r, 0x5A]).random(n) < 0.1)
        first, second = sample_parties(spec, n), sample_parties(spec, n)
        assert not np.array_equal(first, second)
        hits += np.array_equal(attacker, first)
    assert hits == 0
    fixed = SamplingSpec(kind=SamplingKind.FIXED, fraction=0.1)
    a, b = sample_parties(fixed, n), sample_parties(fixed, n)
    assert len(a) == len(b) == 100 and len(set(a)) == 100 and not np.array_equal(a, b)


def test_cli_epsilon_and_calibrate_speak_the_discrete_gaussian(capsys):
    import json

    from lepton_ray.cli import main
    from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon

    common = ["--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "100",
              "--mechanism", "discrete_gaussian", "--json"]
    assert main(["calibrate", "--epsilon", "3", *common]) == 0
    z = json.loads(capsys.readouterr().out)["noise_multiplier"]
    assert main(["epsilon", "--noise-multiplier", str(z), *common]) == 0
    eps = json.loads(capsys.readouterr().out)["epsilon"]
    assert 2.95 < eps <= 3 and eps == discrete_gaussian_epsilon(
        noise_multiplier=z, sampling_rate=0.1, steps=100, delta=1e-5)
    assert main(["epsilon", "--noise-multiplier", "1", *common[:-3], "--accountant", "pld",
                 "--mechanism", "discrete_gaussian"]) != 0


def test_ring_noise_is_integer_and_added_mod_2_to_the_b():
    """Central noise goes into the ring sum as integers: the difference is a discrete Gaussian
    draw of the calibrated integer sigma on the delta block, its own sigma on the bit, and none
    on the weight; wrap-around is modular."""
    from lepton_ray.learning.party_update import UpdateRule, quantization_for, rounding_bound_sq
    from lepton_ray.privacy.dpfedavg import CentralNoise
    from lepton_ray.secagg.quantize import centred_lift

    d = 50_000
    rule = UpdateRule(clip_norm=1.0, weight_cap=None, clip_bit=True)
    quant = quantization_for(n_parties=100, rule=rule, modulus_bits=32, dim=d, scale=1e5)
    bound = rounding_bound_sq(rule, quant, d)
    noise = CentralNoise(dim=d, delta_multiplier=1.5, bits_multiplier=10.0).in_ring(quant, bound)
    assert noise.delta_sigma >= 1.5 * math.sqrt(bound) and noise.delta_sigma >= 1.5 * quant.scale
    assert noise.bits_sigma >= 10.0 * math.ceil(quant.scale / 2)
    ring = np.full(d + 2, 2**32 - 3, dtype=np.uint32)  # -3: noise wraps around zero
    out = noise.add_to(ring)
    diff = centred_lift(out, 32).astype(np.int64) + 3
    assert out.dtype == np.uint32 and diff[d] == 0
    assert abs(diff[:d].std() / noise.delta_sigma - 1) < 0.03
