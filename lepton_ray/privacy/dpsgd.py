"""Record-level DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
Algorithm 1) with torch.func per-sample gradients. Imports torch: import this module only
where local training runs (``import lepton_ray.privacy`` does not load it).

One step on a Poisson-sampled batch (rate q = expected_batch_size / n_local):

    g_i   = grad_theta loss(f_theta(x_i), y_i)                 per sample (vmap of grad)
    g_i  <- g_i * min(1, C / ||g_i||_2)                       norm over all parameters
    g     = (sum_i g_i + N(0, (z C)^2 I)) / expected_batch_size

Dividing by the *expected* batch size, not the realised one, keeps the sensitivity of the
released average at C / expected_batch_size: the realised size itself depends on whether a
record was sampled. Privacy of the whole run: ``record_level_epsilon`` in
:mod:`lepton_ray.privacy.calibration` (torch-free, for the CLI).

Models must not mix samples in the forward pass (no BatchNorm: use GroupNorm/LayerNorm),
or per-sample gradients stop being per-sample (the same restriction as Opacus).

Noise: a ``torch.Generator`` is passed in (fast, on the training device). Seed it with
:func:`os_seeded_generator` (64 bits from ``os.urandom``), never from a fixed or global
seed: whoever can reproduce the noise can remove it. torch's generators are not
cryptographic; for the noise that leaves the party, the central or distributed noise on the
aggregate (:mod:`lepton_ray.privacy.mechanisms`) uses AES-CTR.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from lepton_ray.errors import PrivacyError

__all__ = [
    "DpSgdGradients",
    "clip_per_sample",
    "dp_sgd_step",
    "os_seeded_generator",
    "per_sample_gradients",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_CLIP_SAFETY = 1.0 - 1e-6
"""Clipped gradients are scaled by C/||g|| * (1 - 1e-6) so float32 rounding cannot leave
their norm above C."""


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def os_seeded_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 64 bits from ``os.urandom``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def per_sample_gradients(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """``{name: [B, *param.shape]}``: the gradient of each sample's own loss
    (``functional_call`` + ``vmap(grad(...))``; ``loss_fn(out, target)`` is called on a
    batch of one and must return a scalar)."""

    def sample_loss(
        p: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        xi: torch.Tensor,
        yi: torch.Tensor,
    ) -> torch.Tensor:
        out = functional_call(model, (dict(p), dict(b)), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    compute = vmap(grad(sample_loss), in_dims=(None, None, 0, 0), randomness="different")
    return compute(dict(params), dict(buffers), x, y)


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each sample's gradient (all parameters together) to L2 norm <= ``clip_norm``.
    Returns the clipped per-sample gradients and the per-sample norms before clipping."""
    c = _positive("clip_norm", clip_norm)
    first = next(iter(grads.values()))
    batch = first.shape[0]
    sq = torch.zeros(batch, dtype=first.dtype, device=first.device)
    for g in grads.values():
        sq = sq + g.reshape(batch, -1).pow(2).sum(dim=1)
    norms = sq.sqrt()
    if not bool(torch.isfinite(norms).all()):
        raise PrivacyError("per-sample gradients contain NaN or inf")
    factor = torch.where(norms > c, (c / norms) * _CLIP_SAFETY, torch.ones_like(norms))
    clipped = {
        name: g * factor.reshape((batch,) + (1,) * (g.dim() - 1)) for name, g in grads.items()
    }
    return clipped, norms


@dataclass(frozen=True, kw_only=True)
class DpSgdGradients:
    """One noised step: ``grads`` to apply, plus per-sample norms (before clipping) for
    diagnostics - never release the norms themselves."""

    grads: dict[str, torch.Tensor]
    per_sample_norms: torch.Tensor
    clipped_count: int


def dp_sgd_step(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> DpSgdGradients:
    """Per-sample clip to ``clip_norm``, sum, add N(0, (noise_multiplier * clip_norm)^2)
    per coordinate, divide by ``expected_batch_size`` (q * n_local under Poisson sampling;
    the batch size for fixed-size batches). An empty batch still gets its noise."""
    c = _positive("clip_norm", clip_norm)
    z = _positive("noise_multiplier", noise_multiplier)
    denom = _positive("expected_batch_size", expected_batch_size)
    if x.shape[0] != y.shape[0]:
        raise PrivacyError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] > 0:
        clipped, norms = clip_per_sample(
            per_sample_gradients(model, params, buffers, x, y, loss_fn), c
        )
        summed = {name: g.sum(dim=0) for name, g in clipped.items()}
    else:
        summed = {name: torch.zeros_like(p) for name, p in params.items()}
        norms = torch.zeros(0)
    noisy = {}
    for name, s in summed.items():
        noise = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
        noisy[name] = (s.detach() + (z * c) * noise) / denom
    return DpSgdGradients(
        grads=noisy, per_sample_norms=norms.detach(), clipped_count=int((norms > c).sum())
    )
