"""Record-level DP-SGD: torch.func per-sample gradients and clipping against a brute-force
per-example autograd loop; noise scale; empty Poisson batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lepton_ray.errors import PrivacyError
from lepton_ray.privacy.dpsgd import (
    clip_per_sample,
    dp_sgd_step,
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


def test_dp_sgd_step_adds_z_c_noise_and_divides_by_the_expected_batch():
    model = make_model()
    x, y = data()
    params, buffers = params_and_buffers(model)
    clip, z, expected_batch = 0.5, 1.3, 10.0
    clipped_sum, _ = brute_force_clipped_sum(model, x, y, clip)
    gen = torch.Generator().manual_seed(1234)
    out = dp_sgd_step(
        model,
        params,
        buffers,
        x,
        y,
        LOSS,
        clip_norm=clip,
        noise_multiplier=z,
        expected_batch_size=expected_batch,
        generator=gen,
    )
    # The same generator state reproduces the noise: grads * B - sum == z * C * N(0, 1).
    gen2 = torch.Generator().manual_seed(1234)
    for name, s in clipped_sum.items():
        noise = torch.randn(s.shape, generator=gen2)
        torch.testing.assert_close(
            out.grads[name], (s + z * clip * noise) / expected_batch, rtol=1e-5, atol=1e-6
        )
    assert out.clipped_count == int((out.per_sample_norms > clip).sum())
    # the noise std over many coordinates
    big = nn.Linear(200, 200)
    bp, bb = params_and_buffers(big)
    res = dp_sgd_step(
        big,
        bp,
        bb,
        torch.zeros(0, 200),
        torch.zeros(0, 200),
        nn.functional.mse_loss,
        clip_norm=2.0,
        noise_multiplier=1.5,
        expected_batch_size=4.0,
        generator=os_seeded_generator(),
    )
    # an empty Poisson batch still releases pure noise: std = z * C / B
    assert float(res.grads["weight"].std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.03)
    assert res.per_sample_norms.numel() == 0 and res.clipped_count == 0


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
