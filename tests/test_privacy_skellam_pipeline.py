"""The party-side Skellam pipeline and the server's decode: conditional rounding keeps its norm
bound, the summed shares have variance mu, encode -> ring sum -> decode returns the clipped sum
plus noise of the right variance, the wrap-around bound holds empirically, and no randomness
comes from np.random's global state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lepton_ray.crypto.prg import ring_dtype
from lepton_ray.errors import PrivacyError
from lepton_ray.privacy import skellam
from lepton_ray.privacy.mechanisms import clip_to_norm
from lepton_ray.privacy.rotation import rotate, rotation_signs
from lepton_ray.privacy.skellam import (
    SkellamParams,
    conditional_round,
    decode_sum,
    encode_update,
    os_seeded_generator,
    skellam_noise,
    skellam_params,
)

SEED = b"public round seed, 32 bytes long"


def ring_sum(encoded, params: SkellamParams) -> np.ndarray:
    """What SecAgg outputs: the sum of the parties' ring vectors with wrap-around."""
    acc = np.zeros(params.padded_dim, dtype=ring_dtype(params.ring_bits))
    for e in encoded:
        acc += e.values
    return acc


# ------------------------------------------------------------------ conditional rounding


def test_conditional_rounding_always_meets_the_norm_bound():
    p = skellam_params(bits=16, dim=500, clip_norm=1.0, parties=10, min_survivors=10,
                       noise_multiplier=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=p.padded_dim)
        x *= p.gamma * p.clip_norm / np.linalg.norm(x)
        r, attempts = conditional_round(x, p.norm_bound_sq)
        assert r.dtype == np.int64 and attempts >= 1
        assert int(np.dot(r, r)) <= p.norm_bound_sq
        assert np.all(np.abs(r - x) < 1)


def test_conditional_rounding_retries_when_the_bound_is_tight():
    """Bound = the mean squared norm: about half the attempts fail and are redrawn."""
    x = np.full(256, 10.5)  # every coordinate a fair coin between 10 and 11
    mean_sq = int(np.sum(x**2) + 256 / 4)
    attempts = [conditional_round(x, mean_sq)[1] for _ in range(60)]
    assert max(attempts) > 1
    assert all(int(np.dot(r, r)) <= mean_sq for r, _ in
               (conditional_round(x, mean_sq) for _ in range(20)))


def test_mcdiarmid_bound_fails_at_most_beta_of_the_time():
    """Per attempt, ||round(x)||^2 > floor(B^2) with probability <= beta (module docstring),
    checked on the worst case for the variance: all fractional parts 1/2."""
    beta, n = 0.05, 1024
    x = np.full(n, 3.5)
    c = float(np.linalg.norm(x))
    bound = skellam._rounded_norm_bound_sq(c, n, beta)
    fails = sum(int(np.dot(r, r)) > bound for r in
                (np.floor(x).astype(np.int64) + np.random.default_rng(s).integers(0, 2, n)
                 for s in range(2000)))
    assert fails / 2000 <= beta


def test_conditional_rounding_gives_up_loudly():
    with pytest.raises(PrivacyError, match="failed 5 times"):
        conditional_round(np.full(8, 0.5), 0, max_attempts=5)
    with pytest.raises(PrivacyError, match="rounding key"):
        conditional_round(np.ones(4), 10, key=b"short")


def test_conditional_rounding_with_a_key_is_reproducible():
    x = np.linspace(-5, 5, 300) + 0.37
    key = bytes(range(32))
    a, _ = conditional_round(x, 10**9, key=key)
    b, _ = conditional_round(x, 10**9, key=key)
    c, _ = conditional_round(x, 10**9, key=bytes(32))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------ noise


def test_shares_of_n_parties_sum_to_variance_mu():
    """sum of n shares Sk(mu/n) ~ Sk(mu): mean 0, variance mu. Normal CIs with the exact
    moments of the Skellam: Var(sample variance) = (2 mu^2 + mu) / N (4th cumulant = mu)."""
    mu, n, size = 37.5, 25, 40_000
    rng = os_seeded_generator()
    total = sum(skellam_noise(size, mu / n, rng) for _ in range(n))
    assert total.dtype == np.int64
    assert abs(total.mean()) <= 4.5 * math.sqrt(mu / size)
    assert abs(total.var() - mu) <= 4.5 * math.sqrt((2 * mu**2 + mu) / size)


def test_noise_needs_a_numpy_generator_and_leaves_the_global_state_alone():
    for bad in (np.random, np.random.RandomState(0), None, 42):
        with pytest.raises(PrivacyError, match="Generator"):
            skellam_noise(10, 1.0, bad)
    with pytest.raises(PrivacyError, match="MAX_POISSON_MEAN"):
        skellam_noise(10, 4 * skellam.MAX_POISSON_MEAN, os_seeded_generator())
    a = os_seeded_generator().integers(0, 2**63, 4)
    b = os_seeded_generator().integers(0, 2**63, 4)
    assert not np.array_equal(a, b)  # fresh OS seed each time


# ------------------------------------------------------------------ end to end


def clipped_sum(xs: np.ndarray, c: float) -> np.ndarray:
    return np.sum([clip_to_norm(x, c)[0] for x in xs], axis=0)


@pytest.mark.parametrize("bits", [12, 16, 32, 48])
def test_encode_sum_decode_returns_the_clipped_sum_plus_noise_of_variance_mu(bits):
    n, d, c, rounds = 12, 700, 0.8, 6
    p = skellam_params(bits=bits, dim=d, clip_norm=c, parties=n, min_survivors=9,
                       noise_multiplier=0.7)
    assert p.wraparound_probability <= 1e-6
    data = np.random.default_rng(bits)
    residuals, rotated, expected = [], [], []
    for r in range(rounds):
        signs = rotation_signs(SEED, d, r)
        xs = data.normal(size=(n, d)) * data.uniform(0.005, 0.08, size=(n, 1))
        encoded = [encode_update(x, p, signs=signs, rng=os_seeded_generator()) for x in xs]
        assert all(e.values.dtype == ring_dtype(p.ring_bits) for e in encoded)
        assert all(int(e.values.max()) < 2**bits for e in encoded)
        assert any(e.clipped for e in encoded) and not all(e.clipped for e in encoded)
        total = ring_sum(encoded, p)
        out = decode_sum(total, p, signs=signs)
        truth = clipped_sum(xs, c)
        residuals.append((out - truth) * p.gamma)  # noise + rounding, scaled, unrotated
        # the same in the rotated domain, from an independent centred lift mod 2^bits
        low = total.astype(np.uint64) & np.uint64(2**bits - 1)
        lifted = np.array([int(v) - (2**bits if v >= 2 ** (bits - 1) else 0) for v in low],
                          dtype=np.float64)
        rotated.append(lifted - p.gamma * rotate(truth, signs))
        # E(residual^2) per coordinate: the shares' variance plus the rounding variance
        # sum_i f (1 - f) (U is orthogonal, so the average carries over unrotated).
        pre = p.gamma * rotate(np.array([clip_to_norm(x, c)[0] for x in xs]), signs)
        frac = pre - np.floor(pre)
        expected.append(n * p.share_variance + np.mean(np.sum(frac * (1 - frac), axis=0)))
    want = float(np.mean(expected))
    rot = np.concatenate(rotated)
    # no wrap-around: a wrapped coordinate would be off by 2^bits in the rotated domain
    assert np.abs(rot).max() < 2.0 ** (bits - 1)
    assert np.abs(rot).max() < 6 * math.sqrt(want)
    for res in (rot, np.concatenate(residuals)):
        var = float(np.mean(res**2))
        assert abs(var - want) <= 5 * want * math.sqrt(2 / res.size)
        assert abs(float(res.mean())) <= 5 * math.sqrt(want / res.size)


def test_wraparound_bound_holds_empirically():
    """Few bits and a loose target, so that wrap-around does happen: the observed rate of
    rounds with a wrapped coordinate stays below the reported bound (aligned updates, the
    worst case for the signal)."""
    n, d, rounds = 8, 64, 300
    p = skellam_params(bits=8, dim=d, clip_norm=1.0, parties=n, min_survivors=n,
                       noise_multiplier=0.5, max_wraparound=0.5)
    assert 0.2 < p.wraparound_probability <= 0.5
    x = np.ones(d) / math.sqrt(d)
    limit = 2 ** (p.bits - 1)
    wrapped = 0
    for r in range(rounds):
        signs = rotation_signs(SEED, d, r)
        pre = p.gamma * rotate(x, signs)
        ints = [conditional_round(pre, p.norm_bound_sq)[0]
                + skellam_noise(p.padded_dim, p.share_variance, os_seeded_generator())
                for _ in range(n)]
        total = np.sum(ints, axis=0)
        wrapped += bool(np.any((total >= limit) | (total < -limit)))
    assert wrapped / rounds <= p.wraparound_probability + 3 * math.sqrt(0.25 / rounds)


def test_encoding_uses_only_the_generator_it_is_given():
    p = skellam_params(bits=16, dim=100, clip_norm=1.0, parties=5, min_survivors=5,
                       noise_multiplier=1.0)
    signs = rotation_signs(SEED, 100)
    x = np.random.default_rng(3).normal(size=100)
    key = bytes(range(32))
    np.random.seed(1234)
    state = np.random.get_state()
    a = encode_update(x, p, signs=signs, rng=np.random.default_rng(7), rounding_key=key)
    b = encode_update(x, p, signs=signs, rng=np.random.default_rng(7), rounding_key=key)
    c = encode_update(x, p, signs=signs, rng=np.random.default_rng(8), rounding_key=key)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    assert a.rounding_attempts >= 1 and math.isclose(a.norm, float(np.linalg.norm(x)))


def test_encode_and_decode_reject_bad_input():
    p = skellam_params(bits=16, dim=10, clip_norm=1.0, parties=3, min_survivors=2,
                       noise_multiplier=1.0)
    signs = rotation_signs(SEED, 10)
    g = os_seeded_generator()
    with pytest.raises(PrivacyError, match="shape"):
        encode_update(np.ones(11), p, signs=signs, rng=g)
    with pytest.raises(PrivacyError, match="NaN"):
        encode_update(np.full(10, np.nan), p, signs=signs, rng=g)
    with pytest.raises(PrivacyError, match="signs"):
        encode_update(np.ones(10), p, signs=signs[:8], rng=g)
    with pytest.raises(PrivacyError, match="Generator"):
        encode_update(np.ones(10), p, signs=signs, rng=np.random)
    with pytest.raises(PrivacyError, match="ring sum"):
        decode_sum(np.zeros(16, dtype=np.int64), p, signs=signs)
    with pytest.raises(PrivacyError, match="ring sum"):
        decode_sum(np.zeros(8, dtype=np.uint32), p, signs=signs)
    with pytest.raises(PrivacyError, match="Poisson means"):
        SkellamParams(bits=32, dim=10, clip_norm=1.0, parties=3, min_survivors=2,
                      noise_multiplier=1.0, gamma=1e9)


# ------------------------------------------------------------------ colluding parties


def _honest_noise_variance(p: SkellamParams, survivors: int, colluders: int) -> float:
    """The server's attack: ``survivors`` parties send zero updates (so each encoded vector is
    its party's noise share in the ring); ``colluders`` of them hand their vectors to the
    server, which subtracts them from SecAgg's sum. Returns the per-coordinate variance of
    what is left (centred lift mod 2^bits): the noise that still protects anyone."""
    signs = rotation_signs(SEED, p.dim, 0)
    encoded = [encode_update(np.zeros(p.dim), p, signs=signs, rng=os_seeded_generator())
               for _ in range(survivors)]
    total = ring_sum(encoded, p)
    for e in encoded[:colluders]:
        total -= e.values  # wraps in the ring like SecAgg's own arithmetic
    low = total.astype(np.uint64) & np.uint64(2**p.bits - 1)
    lifted = low.astype(np.float64) - np.where(low >= 2 ** (p.bits - 1), 2.0**p.bits, 0.0)
    return float(np.mean(lifted**2))


def test_attack_colluders_subtract_their_shares_below_the_charged_noise():
    """Attack (issue 13, finding 5): shares calibrated as if every survivor were honest
    (colluding=0, what the runtime did) leave n_min - c shares once c colluders subtract
    theirs: the noise protecting an honest party falls to (n_min - c) / n_min of the mu the
    ledger charged. Calibrated for c colluders, what is left still carries mu. Oracle: the
    empirical variance of the honest shares' sum (d = 8192 coordinates, so a 5-sigma band is
    +-8%), against mu = (z Delta_2)^2 the charged event assumes."""
    n, n_min, c, d = 20, 18, 4, 8192
    kw = dict(bits=32, dim=d, clip_norm=1.0, parties=n, min_survivors=n_min, noise_multiplier=0.8)
    band = 5 * math.sqrt(2 / d)
    old = skellam_params(**kw, colluding=0)
    left = _honest_noise_variance(old, n_min, c)
    assert left < old.mu * (1 - band)  # the attack worked: ~14/18 of mu
    assert left == pytest.approx((n_min - c) / n_min * old.mu, rel=band)

    new = skellam_params(**kw, colluding=c)
    # the same target noise (unscaled: gamma moves with the share size), bigger shares
    assert new.central_noise_multiplier == pytest.approx(old.central_noise_multiplier, rel=0.01)
    assert (n_min - c) * new.share_variance >= new.mu  # exactly, by construction
    left = _honest_noise_variance(new, n_min, c)
    assert left >= new.mu * (1 - band)
    assert left == pytest.approx(new.mu, rel=band)
    # and the accountant: the event charged never assumes more noise than the honest shares
    # carry, for every number of survivors the parties accept
    for s in (n_min, n):
        ev = skellam.event_for_survivors(new, s)
        assert ev.variance <= (s - c) * new.share_variance
        assert ev.variance >= new.mu * (1 - 1e-12)


def test_colluders_must_leave_an_honest_share():
    kw = dict(bits=16, dim=100, clip_norm=1.0, parties=10, min_survivors=8, noise_multiplier=1.0)
    skellam_params(**kw, colluding=7)
    for bad in (8, 9, -1, 1.5, True):
        with pytest.raises(PrivacyError, match="colluding"):
            skellam_params(**kw, colluding=bad)


def test_distributed_noise_defaults_to_ten_percent_colluders():
    from lepton_ray.privacy.dpfedavg import DistributedNoise

    dn = DistributedNoise(bits=16, dim=100, min_survivor_fraction=0.9)
    assert [dn.colluding(n) for n in (2, 10, 11, 100, 1000)] == [1, 1, 2, 10, 100]
    assert dn.min_survivors(2) == 2 and dn.min_survivors(100) == 90
    p = dn.params(n=100, threshold=1, clip_norm=1.0, noise_multiplier=1.0)
    assert (p.min_survivors, p.colluding, p.honest_survivors) == (90, 10, 80)
    fixed = DistributedNoise(bits=16, dim=100, min_survivor_fraction=0.5, colluding_parties=6)
    assert fixed.min_survivors(10) == 7  # raised to c + 1: one honest share at least
    with pytest.raises(PrivacyError, match="colluding"):
        fixed.params(n=6, threshold=1, clip_norm=1.0, noise_multiplier=1.0)


def test_attack_the_charged_event_published_the_secret_sample_size():
    """Attack (issue 13): each round's Skellam scale, and so its charged epsilon (the released
    ``epsilon`` column), followed the number of parties sampled, publishing the size of a
    secret Poisson sample. With the public bound every round is charged the same event, and
    the rounds' own parameters keep that scale and at least that honest noise."""
    from lepton_ray.privacy.dpfedavg import DistributedNoise, sample_size_bound
    from lepton_ray.privacy.skellam import event_for_survivors

    old = DistributedNoise(bits=16, dim=100, min_survivor_fraction=0.9)
    events = {n: old.params(n=n, threshold=1, clip_norm=1.0, noise_multiplier=1.0).event(
        sampling_probability=0.1) for n in (80, 100, 120)}
    assert len({(e.l1_sensitivity, e.variance) for e in events.values()}) == 3  # n readable

    bound = sample_size_bound(1000, 0.1)
    dn = DistributedNoise(bits=16, dim=100, min_survivor_fraction=0.9, max_sample=bound)
    charged = dn.charged_params(clip_norm=1.0, noise_multiplier=1.0).event(sampling_probability=0.1)
    for n in (20, 80, 100, 120, bound):
        p = dn.params(n=n, threshold=1, clip_norm=1.0, noise_multiplier=1.0)
        actual = event_for_survivors(p, p.min_survivors, sampling_probability=0.1)
        assert actual.l1_sensitivity == charged.l1_sensitivity
        assert actual.l2_sensitivity == charged.l2_sensitivity
        assert actual.variance >= charged.variance * (1 - 1e-12)
    with pytest.raises(PrivacyError, match="above the public bound"):
        dn.params(n=bound + 1, threshold=1, clip_norm=1.0, noise_multiplier=1.0)


def test_sample_size_bound_is_the_exact_binomial_tail_quantile():
    from scipy.stats import binom

    from lepton_ray.privacy.dpfedavg import sample_size_bound

    for n, q in ((1000, 0.1), (50, 0.5), (10_000, 0.01)):
        m = sample_size_bound(n, q, tail=1e-9)
        assert binom.sf(m, n, q) <= 1e-9 < binom.sf(m - 1, n, q)
    assert sample_size_bound(7, 1.0) == 7
