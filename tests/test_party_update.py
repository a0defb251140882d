"""The per-party aggregation vector and DP-FedAvg's per-round decisions (pure, no Ray)."""

import math

import numpy as np
import pytest

from lepton_ray.errors import ConfigError, DataError, PrivacyError
from lepton_ray.learning.party_update import (
    Aggregate,
    UpdateRule,
    encode_float,
    encode_ring_batch,
    fold,
    quantization_for,
    ring_to_float,
)
from lepton_ray.privacy.accountants import AccountantKind
from lepton_ray.privacy.calibration import compute_epsilon
from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_epsilon
from lepton_ray.privacy.dpfedavg import DpFedAvg
from lepton_ray.privacy.events import DiscreteGaussian
from lepton_ray.privacy.events import Gaussian, PoissonSampled

rng = np.random.default_rng(0)


def test_vector_layout_weights_clip_and_bit():
    delta = np.array([3.0, 4.0])  # norm 5
    vec, clipped = encode_float(delta, 10, UpdateRule(clip_norm=1.0, weight_cap=20.0, clip_bit=True))
    assert clipped
    np.testing.assert_allclose(vec, [0.5 * 0.6, 0.5 * 0.8, 0.5, -0.5])
    vec, clipped = encode_float(delta, 50, UpdateRule(clip_norm=10.0, weight_cap=20.0, clip_bit=True))
    assert not clipped
    np.testing.assert_allclose(vec, [3.0, 4.0, 1.0, 0.5])  # weight capped at 1
    vec, _ = encode_float(delta, 50, UpdateRule(clip_norm=None, weight_cap=None))
    np.testing.assert_allclose(vec, [3.0, 4.0, 1.0])


def test_non_finite_update_is_a_clear_error():
    with pytest.raises(DataError, match="non-finite value nan at index 1"):
        encode_float(np.array([0.0, np.nan]), 1, UpdateRule(clip_norm=None))
    with pytest.raises(DataError, match="non-finite"):
        encode_float(np.array([np.inf, 0.0]), 1, UpdateRule(clip_norm=1.0))


def test_ring_sum_decodes_to_the_float_sum():
    rule = UpdateRule(clip_norm=2.0, weight_cap=100.0, clip_bit=True)
    deltas = rng.normal(size=(20, 50)) * 0.3
    examples = rng.integers(1, 150, 20)
    quant = quantization_for(n_parties=20, rule=rule, modulus_bits=32, dim=50)
    rings = encode_ring_batch(deltas, examples, rule, quant).rings
    ring = (rings.astype(np.uint64).sum(axis=0) % 2**32).astype(np.uint32)
    expected, clipped = fold(deltas, examples, rule)
    got = ring_to_float(ring, quant)
    np.testing.assert_allclose(got, expected, atol=20 / quant.scale)  # one rounding step per party
    agg = Aggregate.split(got, 50, rule)
    assert agg.clip_bits == pytest.approx(expected[-1], abs=1e-3)


def _reference_rounding(values: np.ndarray, key: bytes, modulus_bits: int) -> np.ndarray:
    """Brute-force oracle for encode_ring_batch's rounding: floor(x + r/2^32 + 1/2) element by
    element with Python integers, r the signed 32-bit keystream word of the same key."""
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key
    from lepton_ray.crypto.prg import keystream

    flat = values.reshape(-1)
    words = np.frombuffer(keystream(derive_key(key, KeyPurpose.STOCHASTIC_ROUNDING), 4 * flat.size),
                          dtype="<i4")
    out = [math.floor(float(x) + int(r) / 2**32 + 0.5) % 2**modulus_bits for x, r in zip(flat, words)]
    return np.array(out, dtype=np.uint64).reshape(values.shape)


@pytest.mark.parametrize("bits", [32, 64])
def test_batch_encoding_matches_the_float_vectors_and_a_brute_force_rounding(bits):
    rule = UpdateRule(clip_norm=2.0, weight_cap=100.0, clip_bit=True)
    deltas = (rng.normal(size=(7, 40)) * np.array([[0.1], [1.0], [3.0], [0.0], [0.5], [2.5], [0.01]]))
    deltas = deltas.astype(np.float32)
    examples = rng.integers(1, 150, 7)
    quant = quantization_for(n_parties=7, rule=rule, modulus_bits=bits, dim=40)
    key = bytes(range(32))
    batch = encode_ring_batch(deltas, examples, rule, quant, key=key)
    floats = np.array([encode_float(d, int(n), rule)[0] for d, n in zip(deltas, examples)])
    flags = [encode_float(d, int(n), rule)[1] for d, n in zip(deltas, examples)]
    assert batch.rings.dtype == np.dtype(f"<u{bits // 8}") and batch.rings.shape == (7, 42)
    assert batch.clipped.tolist() == flags and batch.bad == ()
    # the oracle rounds the very same scaled floats the per-party encoder would produce
    scaled = floats * quant.scale
    want = _reference_rounding(scaled, key, bits)
    if bits == 32:
        assert np.array_equal(batch.rings.astype(np.uint64), want)
    else:  # |x| ~ 1e17: past 2^53 the scaled floats themselves differ by an ulp or so
        gap = (batch.rings - want).view(np.int64).astype(float)
        assert np.all(np.abs(gap) <= np.maximum(1.0, np.abs(scaled) * 2.0**-50))
    # and every coordinate is within one rounding step of the float vector
    lifted = ring_to_float(batch.rings, quant)
    assert np.abs(lifted - floats).max() <= 1.0 / quant.scale + 1e-15
    # a reused output buffer (stale contents) receives exactly the same rings
    out = np.full_like(batch.rings, 7)
    again = encode_ring_batch(deltas, examples, rule, quant, key=key, out=out)
    assert again.rings is out and np.array_equal(out, batch.rings)
    with pytest.raises(DataError, match="out must be"):
        encode_ring_batch(deltas, examples, rule, quant, key=key, out=out[:, :-1])


def test_batch_encoding_is_unbiased_and_flags_diverged_rows():
    rule = UpdateRule(clip_norm=None, weight_cap=None)
    quant = quantization_for(n_parties=2, rule=UpdateRule(clip_norm=1.0), modulus_bits=32, dim=3, scale=1.0)
    deltas = np.array([[0.25, -0.75, 0.5], [np.nan, 1.0, 2.0]], dtype=np.float32)
    draws = np.array([encode_ring_batch(deltas, [1, 1], rule, quant).rings[0] for _ in range(4000)])
    signed = draws.view(np.int32).astype(float)
    np.testing.assert_allclose(signed.mean(axis=0)[:3], [0.25, -0.75, 0.5], atol=0.03)
    assert set(np.unique(signed[:, 0])) == {0.0, 1.0} and set(np.unique(signed[:, 1])) == {-1.0, 0.0}
    batch = encode_ring_batch(deltas, [1, 1], rule, quant)
    assert batch.bad == (1,) and not batch.rings[1].any() and not batch.clipped[1]


def test_fixed_scale_that_can_overflow_is_rejected():
    rule = UpdateRule(clip_norm=10.0, weight_cap=1.0)
    with pytest.raises(ConfigError, match="overflow"):
        quantization_for(n_parties=1000, rule=rule, modulus_bits=32, dim=10, scale=1e6)
    q = quantization_for(n_parties=1000, rule=rule, modulus_bits=32, dim=10)
    # the automatic scale leaves room for 1000 parties at the bound: n (C' s + 1) < 2^31
    assert 1000 * (rule.norm_bound * q.scale + 1) < 2**31


def test_dpfedavg_event_noise_and_fixed_denominator():
    dp = DpFedAvg.create(n_parties=100, sampling_rate=0.1, rounds=10, epsilon=5, delta=1e-5,
                         clip_norm=0.5, noise_multiplier=1.2, accountant=AccountantKind.RDP)
    assert dp.event() == DiscreteGaussian(noise_multiplier=1.2, sampling_probability=0.1)
    noise = dp.noise(7)
    assert noise.dim == 7 and noise.delta_multiplier == 1.2 and noise.bits_multiplier is None
    np.testing.assert_allclose(dp.mean(np.full(3, 20.0)), np.full(3, 2.0))  # / (q N) = 10
    assert dp.after_round(None) is dp


def test_dpfedavg_calibrates_within_the_budget():
    dp = DpFedAvg.create(n_parties=1000, sampling_rate=0.05, rounds=200, epsilon=3, delta=1e-5,
                         clip_norm=1.0, noise_multiplier=None, accountant=AccountantKind.RDP)
    eps = discrete_gaussian_epsilon(sampling_rate=0.05, noise_multiplier=dp.noise_multiplier,
                                    steps=200, delta=1e-5)
    assert eps <= 3 and eps > 2.9
    # never cheaper than the continuous sampled Gaussian (dp-accounting) at the same z
    assert compute_epsilon(sampling_rate=0.05, noise_multiplier=dp.noise_multiplier, steps=200,
                           delta=1e-5) <= eps


def test_adaptive_clipping_split_and_update_direction():
    dp = DpFedAvg.create(n_parties=100, sampling_rate=1.0, rounds=10, epsilon=5, delta=1e-5,
                         clip_norm=1.0, noise_multiplier=1.0, accountant=AccountantKind.RDP,
                         adaptive=True, target_quantile=0.5, learning_rate=0.2, count_noise_std=5.0)
    # Andrew et al. 2021: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)
    assert dp.delta_noise_multiplier == pytest.approx((1.0 - (2 * 5.0) ** -2) ** -0.5)
    assert dp.noise(4).bits_multiplier == 10.0
    grown = dp.after_round(-50.0)  # every party clipped: fraction 0 < 0.5 -> C grows
    shrunk = dp.after_round(50.0)  # none clipped: fraction 1 > 0.5 -> C shrinks
    assert grown.clip_norm == pytest.approx(math.exp(0.2 * 0.5))
    assert shrunk.clip_norm == pytest.approx(math.exp(-0.2 * 0.5))
    with pytest.raises(PrivacyError, match="count_noise_std"):
        DpFedAvg.create(n_parties=100, sampling_rate=1.0, rounds=10, epsilon=5, delta=1e-5,
                        clip_norm=1.0, noise_multiplier=1.0, accountant=AccountantKind.RDP,
                        adaptive=True, count_noise_std=0.1)


def test_audit_log_survives_a_torn_last_line_and_flags_corruption(tmp_path):
    from lepton_ray.errors import LeptonError
    from lepton_ray.outputs import AuditLog, read_audit

    log = AuditLog(tmp_path / "audit.jsonl")
    log.write("job_start", job="x")
    log.write("round", round=1)
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"event": "round", "rou')  # a crash mid-write
    assert [e["event"] for e in read_audit(tmp_path)] == ["job_start", "round"]
    text = (tmp_path / "audit.jsonl").read_text().splitlines()
    (tmp_path / "audit.jsonl").write_text("\n".join([text[0], "garbage", text[1]]) + "\n")
    with pytest.raises(LeptonError, match="line 2 is not valid JSON"):
        read_audit(tmp_path)


def test_history_truncation_on_resume(tmp_path):
    from lepton_ray.outputs import HistoryWriter, read_history, truncate_history

    h = HistoryWriter(tmp_path / "history.csv")
    for r in (1, 2, 3):
        h.write({"round": r, "status": "ok"})
    with open(tmp_path / "history.csv", "a") as f:
        f.write("4,o")  # torn row
    assert truncate_history(tmp_path, 2) == 2
    assert read_history(tmp_path)["round"].tolist() == [1, 2]


@pytest.mark.parametrize("rule", [UpdateRule(clip_norm=None, weight_cap=30.0),
                                  UpdateRule(clip_norm=0.8, weight_cap=None, clip_bit=True),
                                  UpdateRule(clip_norm=2.0, weight_cap=50.0)])
def test_fold_equals_the_sum_of_encoded_vectors(rule):
    deltas = (rng.normal(size=(300, 20)) * rng.uniform(0.1, 1.0, size=(300, 1))).astype(np.float32)
    examples = rng.integers(1, 80, 300)
    total, clipped = fold(deltas, examples, rule)
    encoded = [encode_float(d, int(n), rule) for d, n in zip(deltas, examples)]
    np.testing.assert_allclose(total, np.sum([v for v, _ in encoded], axis=0), rtol=1e-9, atol=1e-9)
    assert clipped == sum(c for _, c in encoded)
    with pytest.raises(DataError, match="party 7 .* non-finite value inf at index 3"):
        bad = deltas.copy()
        bad[7, 3] = np.inf
        fold(bad, examples, rule)


def test_conditional_rounding_bounds_the_ring_norm_at_5000_parties_1e7_coordinates():
    """Attack (issue 13, finding 4): plain stochastic rounding lets a clipped update's rounded
    norm exceed C s (here by ~+15 %: sqrt(d) / s against C), so noise calibrated to C s
    under-protects. With ``norm_bound_sq`` the rounded delta block always fits the KLS21 bound,
    which is within 0.5 % of C s, and the accounting uses that bound."""
    from lepton_ray.learning.party_update import encode_ring_batch, rounding_bound_sq

    d, C = 10_000_000, 0.1
    rule = UpdateRule(clip_norm=C, weight_cap=None)
    quant = quantization_for(n_parties=5000, rule=rule, modulus_bits=32, dim=d)
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((1, d)).astype(np.float32)
    delta *= 2 * C / np.linalg.norm(delta)  # clipped to C by the encoder
    bound = rounding_bound_sq(rule, quant, d)
    cs = C * quant.scale
    assert math.sqrt(bound) <= cs * 1.005

    def norm(batch):
        v = batch.rings[0, :d].view(np.int32).astype(np.float64)
        return math.sqrt(float(v @ v))

    plain = norm(encode_ring_batch(delta, np.ones(1), rule, quant))
    assert plain > cs  # the attack: unconditioned rounding leaves the sensitivity C s behind
    x = delta[0].astype(np.float64) * (C / np.linalg.norm(delta[0].astype(np.float64))) * quant.scale
    away = np.where(x > 0, np.ceil(x), np.floor(x))  # in the rounding's support (P > 0)
    assert np.linalg.norm(away) > cs * 1.05  # ... and its worst case (the true sensitivity) by 5 %+
    held = encode_ring_batch(delta, np.ones(1), rule, quant, norm_bound_sq=bound)
    assert held.bad == () and norm(held) ** 2 <= bound


def test_conditional_rounding_retries_until_the_bound_holds():
    from lepton_ray.learning.party_update import encode_ring_batch
    from lepton_ray.secagg.quantize import QuantizationSpec

    rule = UpdateRule(clip_norm=2.0, weight_cap=None)
    quant = QuantizationSpec(clip_norm=rule.norm_bound, scale=4.0, modulus_bits=32)
    delta = np.full((50, 40), 0.5 / 4.0, dtype=np.float32)  # x_i = 1/2: each rounds to 0 or 1
    out = encode_ring_batch(delta, np.ones(50), rule, quant, norm_bound_sq=20)
    ints = out.rings[:, :40].view(np.int32).astype(np.int64)
    sq = (ints * ints).sum(axis=1)
    assert out.bad == () and sq.max() <= 20  # unconditioned, about half the rows exceed 20
    plain = encode_ring_batch(delta, np.ones(50), rule, quant).rings[:, :40].view(np.int32)
    assert ((plain.astype(np.int64) ** 2).sum(axis=1) > 20).sum() > 5


# ---------------------------------------------------------------- host statistics in the sum
def _stats_oracle(deltas, examples, losses, rule):
    """Brute force, party by party: the totals a host's statistics should sum to."""
    loss_sum = clipped = weight = 0.0
    for d, n, loss in zip(deltas, examples, losses):
        w = min(float(n), rule.weight_cap) / rule.weight_cap
        weight += w
        loss_sum += w * min(max(float(loss), 0.0), rule.loss_bound)
        clipped += float(np.linalg.norm(d.astype(np.float64)) > rule.clip_norm)
    return weight, loss_sum, clipped


@pytest.mark.parametrize("path", ["fold", "ring32", "ring64", "float"])
def test_host_statistics_recovered_from_the_sum_equal_the_direct_totals(path):
    rule = UpdateRule(clip_norm=1.0, weight_cap=120.0, stats=True)
    k, d = 40, 30
    deltas = (rng.normal(size=(k, d)) * rng.uniform(0.05, 0.5, size=(k, 1))).astype(np.float32)
    examples = rng.integers(1, 200, k)  # some above the cap W = 120
    losses = rng.uniform(0.0, 3.0, k)
    losses[3], losses[5] = 500.0, -1.0  # clamped to [0, L]
    weight, loss_sum, clipped = _stats_oracle(deltas, examples, losses, rule)
    assert 0 < clipped < k  # the test exercises both flags
    if path == "fold":
        total, _ = fold(deltas, examples, rule, losses)
        tol = 1e-9
    elif path == "float":
        total = np.sum([encode_float(dl, int(n), rule, loss)[0]
                        for dl, n, loss in zip(deltas, examples, losses)], axis=0)
        tol = 1e-9
    else:
        bits = 32 if path == "ring32" else 64
        quant = quantization_for(n_parties=k, rule=rule, modulus_bits=bits, dim=d)
        rings = encode_ring_batch(deltas, examples, rule, quant, losses=losses).rings
        ring = rings.astype(np.uint64).sum(axis=0, dtype=np.uint64)
        if bits == 32:
            ring = (ring % 2**32).astype(np.uint32)
        total = ring_to_float(ring, quant)
        tol = k / quant.scale  # one rounding step per party and coordinate
    agg = Aggregate.split(total, d, rule)
    assert agg.weight == pytest.approx(weight, abs=tol)
    assert agg.loss_sum == pytest.approx(loss_sum, abs=tol * rule.loss_bound)
    assert agg.clipped_count == clipped
    assert agg.mean_loss == pytest.approx(loss_sum / weight, rel=1e-3)


def test_mean_loss_equals_fedavg_example_weighted_loss():
    """Without DP and with the default cap (largest party), the loss from the sum is exactly the
    example-weighted mean the hosts used to report: sum n_i loss_i / sum n_i."""
    examples = rng.integers(1, 90, 12)
    losses = rng.uniform(0.1, 2.5, 12)
    rule = UpdateRule(clip_norm=None, weight_cap=float(examples.max()), stats=True)
    total, _ = fold(rng.normal(size=(12, 5)), examples, rule, losses)
    assert Aggregate.split(total, 5, rule).mean_loss == pytest.approx(
        float(np.average(losses, weights=examples)), rel=1e-12)


def test_statistics_keep_every_vector_within_the_norm_bound():
    rule = UpdateRule(clip_norm=0.5, weight_cap=10.0, clip_bit=True, stats=True)
    assert rule.width(7) == 7 + 1 + 3
    for _ in range(200):
        delta = rng.normal(size=7) * rng.uniform(0.01, 10)
        vec, _ = encode_float(delta, int(rng.integers(1, 50)), rule, float(rng.uniform(-5, 1e4)))
        assert np.linalg.norm(vec) <= rule.norm_bound + 1e-12
    # the worst case reaches it: clipped, full weight, loss at the bound, bit -1/2, flag 1
    vec, _ = encode_float(np.full(7, 9.0), 10, rule, 1e9)
    assert np.linalg.norm(vec) == pytest.approx(rule.norm_bound)
    with pytest.raises(ValueError, match="losses"):
        fold(np.zeros((2, 7)), [1, 1], rule)
