"""Record-level DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
Algorithm 1) with torch.func per-sample gradients and *integer* noise. Imports torch: import
this module only where local training runs (``import lepton_ray.privacy`` does not load it).

One step on a Poisson-sampled batch (rate q = expected_batch_size / n_local), d parameters:

    g_i   = grad_theta loss(f_theta(x_i), y_i)                 per sample (vmap of grad)
    g_i  <- g_i * min(1, C / ||g_i||_2)                       norm over all parameters
    r_i   = condround(s g_i)  in Z^d, ||r_i||_2 <= Delta       public scale s, bound Delta
    g     = (sum_i r_i + N_Z(0, sigma^2)^d) / (s * expected_batch_size),  sigma = ceil(z Delta)

No floating-point value ever carries noise: the noise is an exact discrete Gaussian
(Canonne, Kamath and Steinke 2020, :mod:`lepton_ray.privacy.discrete_gaussian`: integer
arithmetic, ``os.urandom`` bits) added to an integer sum, so the floating-point attacks on
``torch.randn``-style samplers (Mironov 2012, "On Significance of the Least Significant Bits
for Differential Privacy"; Jin et al. 2022) have nothing to read in the low-order bits. The
division by s and by the batch size is post-processing of the integer release.

Conditional rounding (Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian
Mechanism", KLS21): each sample's scaled clipped gradient (norm <= c = s C) is rounded
coordinate-wise to floor(x) + Bernoulli(frac(x)) and redrawn, row by row, until its squared
norm is <= floor(Delta^2) = :func:`~lepton_ray.privacy.skellam.rounded_norm_bound_sq`
(c, d, beta) - the bound the Skellam and central paths use, at beta = e^-8 per attempt. The
retry makes ||r_i|| <= Delta *deterministic*: adding or removing one record changes the
integer sum by one vector of norm <= Delta, whatever the rounding randomness, so Delta is the
L2 sensitivity the noise is calibrated to (sigma = ceil(z Delta) >= z Delta, so the accounted
multiplier z = sigma/Delta is never optimistic). A row that fails
:data:`MAX_ROUNDING_ATTEMPTS` times raises :class:`PrivacyError`; nothing is released.

Scale: s = :data:`SCALE_PER_SQRT_DIM` sqrt(d) / C, so c = 32 sqrt(d) and Delta / c =
sqrt(1 + 1/4096 + ~4/(32 sqrt d)) - 1 < 0.5 % for d >= 1000 (rounding costs almost no noise),
and every integer stays far inside int64 (||r_i||^2 <= (c + sqrt d)^2 = 1089 d).

Randomness: the noise, which must be secret, comes from ``os.urandom`` through the exact
sampler. The rounding uniforms come from the ``torch.Generator`` passed in (fast, on the
training device; seed it with :func:`os_seeded_generator`, never from a fixed seed). The norm
bound holds for every rounding draw; the analysis couples the draws of neighbouring datasets
(D and D plus one record x): the uniforms are i.i.d. per row, so each record of D may be given
the same draw in both runs, and then the two integer sums differ by r_x alone, ||r_x|| <=
Delta. Both outputs are mixtures, over the same draws, of discrete Gaussians whose centres
differ by at most Delta, and joint convexity of exp((alpha - 1) D_alpha) bounds the mixture by
the worst draw. This needs the draws independent of the noise and unseen by the adversary (a
party's generator never leaves it); their cryptographic strength is not relied on.

Dividing by the *expected* batch size, not the realised one, keeps the released average a
post-processing of the integer sum: the realised size depends on whether a record was sampled.
Privacy of the whole run: ``record_level_epsilon`` in :mod:`lepton_ray.privacy.calibration`
(torch-free, for the CLI): a Poisson-sampled :class:`~lepton_ray.privacy.events.
DiscreteGaussian` per step at multiplier z, composed over the steps.

Models must not mix samples in the forward pass (no BatchNorm: use GroupNorm/LayerNorm),
or per-sample gradients stop being per-sample (the same restriction as Opacus).
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
    "DPSGD_ROUNDING_BETA",
    "MAX_ROUNDING_ATTEMPTS",
    "SCALE_PER_SQRT_DIM",
    "DpSgdGradients",
    "IntegerNoiseParams",
    "clip_per_sample",
    "conditional_round_rows",
    "dp_sgd_step",
    "integer_noise_params",
    "os_seeded_generator",
    "per_sample_gradients",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RandBytes = Callable[[int], bytes]

_CLIP_SAFETY = 1.0 - 1e-6
"""Clipped gradients are scaled by C/||g|| * (1 - 1e-6) so float32 rounding cannot leave
their norm above C."""

SCALE_PER_SQRT_DIM = 32.0
"""s C / sqrt(d): the scaled clip norm c in units of sqrt(d) (module docstring)."""

DPSGD_ROUNDING_BETA = math.exp(-8.0)
"""Per-attempt failure probability of conditional rounding's bound (as the central path's
``ROUNDING_BETA``): a row is redrawn about once in 3000."""

MAX_ROUNDING_ATTEMPTS = 200


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise PrivacyError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def os_seeded_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 63 bits from ``os.urandom``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


@dataclass(frozen=True, kw_only=True)
class IntegerNoiseParams:
    """The public parameters of one step's integer mechanism: scale s, floor(Delta^2) (the
    conditional-rounding bound, integer units), Delta (a float >= sqrt(norm_bound_sq)) and
    the discrete Gaussian's integer sigma = ceil(z Delta)."""

    dim: int
    scale: float
    norm_bound_sq: int
    sensitivity: float
    sigma: int

    @property
    def effective_noise_multiplier(self) -> float:
        """sigma / Delta >= z: what the noise actually buys (the accountant charges z)."""
        return self.sigma / self.sensitivity


def integer_noise_params(*, dim: int, clip_norm: float, noise_multiplier: float,
                         scale: float | None = None) -> IntegerNoiseParams:
    """s (default :data:`SCALE_PER_SQRT_DIM` sqrt(d) / C), floor(Delta^2) of KLS21's conditional
    rounding for norm s C in d dimensions at :data:`DPSGD_ROUNDING_BETA`, and
    sigma = :func:`~lepton_ray.privacy.discrete_gaussian.ring_sigma` (z, Delta)."""
    from lepton_ray.privacy.discrete_gaussian import ring_sigma
    from lepton_ray.privacy.skellam import rounded_norm_bound_sq

    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise PrivacyError(f"dim must be an integer >= 1, got {dim!r}")
    c = _positive("clip_norm", clip_norm)
    z = _positive("noise_multiplier", noise_multiplier)
    s = SCALE_PER_SQRT_DIM * math.sqrt(dim) / c if scale is None else _positive("scale", scale)
    bound_sq = rounded_norm_bound_sq(s * c, dim, DPSGD_ROUNDING_BETA)
    delta = math.nextafter(math.sqrt(bound_sq), math.inf)
    return IntegerNoiseParams(dim=dim, scale=s, norm_bound_sq=bound_sq, sensitivity=delta,
                              sigma=ring_sigma(z, delta))


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


def conditional_round_rows(
    x: torch.Tensor, norm_bound_sq: int, generator: torch.Generator,
    *, max_attempts: int = MAX_ROUNDING_ATTEMPTS,
) -> tuple[torch.Tensor, int]:
    """KLS21 conditional stochastic rounding of each row of ``x`` ([B, d]; float64):
    floor(x) + [u < frac(x)],
    u uniform from ``generator``, rows redrawn until ||r||^2 <= ``norm_bound_sq`` (exact
    int64 arithmetic). Returns (int64 [B, d], the most attempts any row needed); raises
    :class:`PrivacyError` when a row fails ``max_attempts`` times."""
    if x.dim() != 2:
        raise PrivacyError(f"conditional_round_rows takes a [B, d] tensor, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise PrivacyError("values to round contain NaN or inf")
    rows, d = x.shape
    # ||r||^2 <= (||x|| + sqrt d)^2: refuse inputs whose squares could overflow int64
    if rows and float((x.norm(dim=1).max() + math.sqrt(d)) ** 2) >= 2.0**62:
        raise PrivacyError("values to round are too large for exact int64 norms")
    low = torch.floor(x)
    frac = x - low
    low = low.to(torch.int64)
    u = torch.rand((rows, d), generator=generator, dtype=torch.float64, device=x.device)
    out = low + (u < frac).to(torch.int64)  # first attempt on every row, without gathers
    todo = torch.nonzero((out * out).sum(dim=1) > int(norm_bound_sq)).flatten()
    for attempt in range(2, max_attempts + 1):
        if todo.numel() == 0:
            return out, attempt - 1
        u = torch.rand((todo.numel(), d), generator=generator, dtype=torch.float64,
                       device=x.device)
        r = low[todo] + (u < frac[todo]).to(torch.int64)
        ok = (r * r).sum(dim=1) <= int(norm_bound_sq)
        out[todo[ok]] = r[ok]
        todo = todo[~ok]
    if todo.numel() == 0:
        return out, max_attempts
    raise PrivacyError(
        f"conditional rounding failed {max_attempts} times for {todo.numel()} sample(s): the "
        f"rounded squared norm kept exceeding {norm_bound_sq}; nothing is released")


@dataclass(frozen=True, kw_only=True)
class DpSgdGradients:
    """One noised step: ``grads`` to apply, plus per-sample norms (before clipping) for
    diagnostics - never release the norms themselves. ``noised_sum`` is the integer release
    (int64, parameters flattened in ``grads`` order): grads = noised_sum / (s B)."""

    grads: dict[str, torch.Tensor]
    per_sample_norms: torch.Tensor
    clipped_count: int
    noised_sum: torch.Tensor
    params: IntegerNoiseParams
    rounding_attempts: int


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
    noise_bytes: RandBytes = os.urandom,
    scale: float | None = None,
) -> DpSgdGradients:
    """Per-sample clip to ``clip_norm``, scale by s and conditionally round to integers
    (``generator``: the rounding uniforms), sum, add N_Z(0, sigma^2) per coordinate from the
    exact sampler (``noise_bytes``: a CSPRNG, ``os.urandom``), divide by s and by
    ``expected_batch_size`` (q * n_local under Poisson sampling). An empty batch still gets
    its noise. See the module docstring for why this is (record-level) DP."""
    from lepton_ray.privacy.discrete_gaussian import sample_discrete_gaussian

    c = _positive("clip_norm", clip_norm)
    z = _positive("noise_multiplier", noise_multiplier)
    denom = _positive("expected_batch_size", expected_batch_size)
    if x.shape[0] != y.shape[0]:
        raise PrivacyError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    names = list(params)
    shapes = {name: params[name].shape for name in names}
    sizes = [params[name].numel() for name in names]
    dim = sum(sizes)
    ip = integer_noise_params(dim=dim, clip_norm=c, noise_multiplier=z, scale=scale)
    first = params[names[0]]
    attempts = 0
    if x.shape[0] > 0:
        clipped, norms = clip_per_sample(
            per_sample_gradients(model, params, buffers, x, y, loss_fn), c
        )
        batch = x.shape[0]
        flat = torch.cat([clipped[name].detach().reshape(batch, -1).to(torch.float64)
                          for name in names], dim=1)
        rounded, attempts = conditional_round_rows(flat * ip.scale, ip.norm_bound_sq, generator)
        summed = rounded.sum(dim=0)
    else:
        summed = torch.zeros(dim, dtype=torch.int64, device=first.device)
        norms = torch.zeros(0)
    noise = torch.from_numpy(sample_discrete_gaussian(dim, ip.sigma, noise_bytes))
    noised = summed + noise.to(summed.device)
    released = noised.to(torch.float64) / (ip.scale * denom)
    grads = {name: part.reshape(shapes[name]).to(dtype=params[name].dtype)
             for name, part in zip(names, torch.split(released, sizes))}
    return DpSgdGradients(
        grads=grads, per_sample_norms=norms.detach(), clipped_count=int((norms > c).sum()),
        noised_sum=noised, params=ip, rounding_attempts=attempts,
    )
