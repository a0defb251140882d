"""Record-level DP-SGD: torch.func per-sample gradients and clipping against a brute-force
per-example autograd loop; conditional rounding to integers within Delta; exact discrete
Gaussian noise on the integer sum (no floating-point noise); empty Poisson batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.discrete_gaussian import discrete_gaussian_variance
from lepton_ray.privacy.dpsgd import (
    clip_per_sample,
    conditional_round_rows,
    dp_sgd_step,
    integer_noise_params,
    os_seeded_generator,
    per_sample_gradients,
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g) * 3.0
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


LOSS = nn.functional.cross_entropy


def brute_force_clipped_sum(model, x, y, clip):
    """The reference: one autograd backward per example, clip, sum."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad()
        LOSS(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(norm)
        scale = min(1.0, clip / float(norm))
        for name, g in grads.items():
            total[name] += g * scale
    return total, torch.stack(norms)


def params_and_buffers(model):
    return (
        {k: v.detach() for k, v in model.named_parameters()},
        {k: v.detach() for k, v in model.named_buffers()},
    )


def test_per_sample_gradients_match_a_per_example_loop():
    model = make_model()
    x, y = data()
    params, buffers = params_and_buffers(model)
    per = per_sample_gradients(model, params, buffers, x, y, LOSS)
    for i in range(x.shape[0]):
        model.zero_grad()
        LOSS(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per[name][i], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_per_sample_clipping_matches_brute_force(clip):
    model = make_model()
    x, y = data()
    params, buffers = params_and_buffers(model)
    clipped, norms = clip_per_sample(per_sample_gradients(model, params, buffers, x, y, LOSS), clip)
    expected, expected_norms = brute_force_clipped_sum(model, x, y, clip)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(clipped[name].sum(0), expected[name], rtol=1e-5, atol=1e-6)
    each = torch.sqrt(sum(g.reshape(x.shape[0], -1).pow(2).sum(1) for g in clipped.values()))
    assert bool((each <= clip).all())


def _ref_params(d: int, clip: float, z: float):
    """Oracle for the public parameters, from the formulas (KLS21 conditional rounding's
    bound at beta = e^-8, c = 32 sqrt(d)), not from the library."""
    c = 32.0 * math.sqrt(d)
    b1 = (c + math.sqrt(d)) ** 2
    b2 = c * c + d / 4 + math.sqrt(2 * 8.0) * (c + math.sqrt(d) / 2)
    bound_sq = math.floor(min(b1, b2))
    return c / clip, bound_sq, math.ceil(z * math.sqrt(bound_sq))


def _flat_per_example(model, x, y, clip):
    """Brute force: one backward per example, clipped (float64), flattened in parameter order."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        LOSS(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.detach().reshape(-1).double() for p in model.parameters()])
        rows.append(g * min(1.0, clip / float(g.norm())))
    return torch.stack(rows)


def test_dp_sgd_step_releases_integers_plus_discrete_gaussian_noise():
    """No floating-point noise: the released sum is an int64 vector, grads are it divided by
    s B, and (noised sum - the per-sample rounded sum, rebuilt by brute force with the same
    rounding uniforms) is integer noise with the discrete Gaussian's variance."""
    model = make_model()
    x, y = data()
    params, buffers = params_and_buffers(model)
    clip, z, expected_batch = 0.5, 1.3, 10.0
    d = sum(p.numel() for p in model.parameters())
    s, bound_sq, sigma = _ref_params(d, clip, z)
    flat = _flat_per_example(model, x, y, clip) * s
    noise = []
    for seed in range(150):
        out = dp_sgd_step(model, params, buffers, x, y, LOSS, clip_norm=clip, noise_multiplier=z,
                          expected_batch_size=expected_batch,
                          generator=torch.Generator().manual_seed(seed))
        assert out.params.norm_bound_sq == bound_sq and out.params.sigma == sigma
        assert out.params.scale == pytest.approx(s, rel=1e-12)
        assert out.noised_sum.dtype == torch.int64
        if out.rounding_attempts != 1:  # a redrawn row: the uniforms below would not match
            continue
        released = torch.cat([out.grads[name].reshape(-1).double() for name in params])
        scaled = released * s * expected_batch  # integral up to float32 rounding of grads
        assert torch.allclose(scaled, out.noised_sum.double(), rtol=1e-6, atol=1e-3)
        gen = torch.Generator().manual_seed(seed)  # the same rounding uniforms, one attempt
        u = torch.rand(flat.shape, generator=gen, dtype=torch.float64)
        rounded = (torch.floor(flat) + (u < flat - torch.floor(flat)).double()).to(torch.int64)
        assert int((rounded * rounded).sum(1).max()) <= bound_sq
        noise.append((out.noised_sum - rounded.sum(0)).numpy())
    noise = np.concatenate(noise)  # (a float-gradient flip of one rounding moves it by 1)
    var = discrete_gaussian_variance(sigma)  # oracle: the pmf summed by brute force
    n = noise.size
    assert abs(noise.var() / var - 1) < 6 * math.sqrt(2 / n)  # ~6 standard errors
    assert abs(noise.mean()) < 6 * math.sqrt(var / n)


def test_empty_batch_releases_pure_discrete_gaussian_noise_of_variance_sigma_squared():
    big = nn.Linear(200, 200)
    bp, bb = params_and_buffers(big)
    d = 200 * 200 + 200
    s, bound_sq, sigma = _ref_params(d, 2.0, 1.5)
    res = dp_sgd_step(big, bp, bb, torch.zeros(0, 200), torch.zeros(0, 200),
                      nn.functional.mse_loss, clip_norm=2.0, noise_multiplier=1.5,
                      expected_batch_size=4.0, generator=os_seeded_generator())
    assert res.per_sample_norms.numel() == 0 and res.clipped_count == 0
    noise = res.noised_sum.numpy()
    assert noise.dtype == np.int64 and res.params.sigma == sigma
    assert sigma >= 1.5 * math.sqrt(bound_sq)  # rounded up: never less noise than z Delta
    # fixed tolerance: the sample variance of 40,200 draws is within 3 % (4 standard errors)
    assert abs(noise.var() / discrete_gaussian_variance(sigma) - 1) < 0.03
    assert abs(noise.var() / sigma**2 - 1) < 0.03
    torch.testing.assert_close(res.grads["weight"].reshape(-1).double(),
                               torch.from_numpy(noise[: 200 * 200]).double() / (s * 4.0),
                               rtol=1e-6, atol=1e-9)


def test_attack_adversarial_gradient_at_the_clip_norm_never_rounds_past_delta():
    """A per-sample gradient of norm exactly C pointed so that every scaled coordinate sits at
    k + 1/2 (the largest rounding variance) and all round the same way together: conditional
    rounding keeps every released row within Delta; plain stochastic rounding does not stay
    within a tighter bound (the retry is what makes the bound hold)."""
    d, clip = 400, 1.0
    scale = 20.5 * math.sqrt(d) / clip  # s C / sqrt(d) = 20.5: every coordinate is k + 1/2
    ip = integer_noise_params(dim=d, clip_norm=clip, noise_multiplier=1.0, scale=scale)
    x = torch.full((4000, d), clip / math.sqrt(d), dtype=torch.float64)
    assert float(x[0].norm()) == pytest.approx(clip, rel=1e-12)
    r, attempts = conditional_round_rows(x * ip.scale, ip.norm_bound_sq, torch.Generator().manual_seed(3))
    assert r.dtype == torch.int64
    assert int((r * r).sum(1).max()) <= ip.norm_bound_sq
    assert ip.sensitivity ** 2 >= ip.norm_bound_sq
    # a bound just above the mean c^2 + d/4: plain rounding exceeds it about half the time,
    # conditional rounding never releases such a row
    tight = int((20.5**2) * d + d / 4)
    gen = torch.Generator().manual_seed(4)
    u = torch.rand((4000, d), generator=gen, dtype=torch.float64)
    plain = (torch.floor(x * scale) + (u < 0.5).double())
    assert int(((plain * plain).sum(1) > tight).sum()) > 1000
    r, attempts = conditional_round_rows(x * scale, tight, torch.Generator().manual_seed(5))
    assert int((r * r).sum(1).max()) <= tight and attempts > 1
    with pytest.raises(PrivacyError, match="conditional rounding failed"):
        conditional_round_rows(x[:2] * scale, 20 * 20 * d - 1,  # below even all-rounded-down
                               torch.Generator().manual_seed(6), max_attempts=5)


def test_a_clipped_dp_sgd_batch_never_exceeds_delta_per_sample():
    """End to end: per-sample gradients far above C (inputs x 10, clip 0.05) are clipped,
    scaled and rounded; each rounded row, rebuilt by brute force with the same uniforms, is
    within Delta, and the noise is what is left (integer)."""
    model = make_model()
    x, y = data(40)
    x = x * 10
    params, buffers = params_and_buffers(model)
    d = sum(p.numel() for p in model.parameters())
    s, bound_sq, _ = _ref_params(d, 0.05, 1.0)
    out = dp_sgd_step(model, params, buffers, x, y, LOSS, clip_norm=0.05,
                      noise_multiplier=1.0, expected_batch_size=40.0,
                      generator=torch.Generator().manual_seed(0))
    assert out.clipped_count == 40 and out.rounding_attempts == 1
    flat = _flat_per_example(model, x, y, 0.05) * s
    u = torch.rand(flat.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rounded = (torch.floor(flat) + (u < flat - torch.floor(flat)).double()).to(torch.int64)
    assert int((rounded * rounded).sum(1).max()) <= bound_sq
    assert float(flat.norm(dim=1).max()) <= 0.05 * s * (1 + 1e-9)


def test_dp_sgd_step_validates():
    model = make_model()
    x, y = data()
    params, buffers = params_and_buffers(model)
    kwargs = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "expected_batch_size": 4.0,
        "generator": torch.Generator(),
    }
    for bad in ({"clip_norm": 0.0}, {"noise_multiplier": -1.0}, {"expected_batch_size": 0.0}):
        with pytest.raises(PrivacyError, match=next(iter(bad))):
            dp_sgd_step(model, params, buffers, x, y, LOSS, **{**kwargs, **bad})
    with pytest.raises(PrivacyError, match="samples"):
        dp_sgd_step(model, params, buffers, x, y[:-1], LOSS, **kwargs)


def test_os_seeded_generators_differ():
    a, b = os_seeded_generator(), os_seeded_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
