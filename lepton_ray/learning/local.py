"""Local training: one party's epochs of SGD/Adam on its own rows, returning a delta.

A call trains a batch of parties one after another on the same device; each party starts
from the same global parameters with a fresh optimiser (stateless parties, as in FedAvg,
McMahan et al. 2017) and its own shuffling seed, so results do not depend on which host or
in which order a party is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lepton_ray.config import ModelSpec, OptimizerKind, TrainingSpec
from lepton_ray.learning.models import build_model, load_flat, trainable


@dataclass(frozen=True)
class LocalResult:
    deltas: np.ndarray  # (k, d) float32: local parameters minus global parameters
    examples: np.ndarray  # (k,) int64: rows each party trained on
    losses: np.ndarray  # (k,) float64: mean training loss over the last epoch
    # (k, 3 + 3C) float64: federated evaluation of the global model (fed_eval); None: none
    evals: np.ndarray | None = None


def party_seed() -> int:
    """A party's secret training seed for one round: 256 bits from ``os.urandom``, drawn by
    its host (per party, per round), never derived from the spec, never logged. Public seeds
    let anyone re-run a round and reproduce a party's delta (issue 14) and, with DP-SGD, its
    Poisson batches (issue 13)."""
    import os

    return int.from_bytes(os.urandom(32), "little")


def public_party_seed(job_seed: int, round_: int, party: int) -> int:
    """The public seed ``training.deterministic_seeds`` selects (reproducible non-private runs
    and tests; refused with DP): anyone with the spec can recompute it."""
    return int(np.random.SeedSequence([job_seed, round_, party, 0x7A1]).generate_state(1)[0])


def torch_seed(seed: int) -> int:
    """The 64 bits of ``seed`` that seed a ``torch.Generator`` for shuffling (non-DP
    training). Mersenne Twister is not cryptographic, but nothing DP relies on the shuffle:
    record-level DP-SGD draws its batches from :func:`dp_batch_stream` instead, and the
    seed's 64 secret bits keep the order unpredictable to anyone who sees only the spec."""
    return seed & ((1 << 64) - 1)


def dp_batch_stream(seed: int):
    """DP-SGD's batch randomness: an AES-256-CTR keystream keyed by HKDF of the secret
    256-bit seed (a cryptographic PRG; the Poisson batch membership that DP-SGD's
    amplification relies on is unpredictable without the seed)."""
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key
    from lepton_ray.crypto.prg import _encryptor

    enc = _encryptor(derive_key(seed.to_bytes(32, "little"), KeyPurpose.DP_SGD_BATCHES))
    return lambda n: enc.update(bytes(n))


def train_parties(
    *,
    model_spec: ModelSpec,
    training: TrainingSpec,
    n_features: int,
    n_classes: int,
    global_params: np.ndarray,
    datasets: list[tuple[np.ndarray, np.ndarray]],
    seeds: list[int],
    device: torch.device | str = "cpu",
    dp_sgd=None,
) -> LocalResult:
    """Train each party from ``global_params``. With ``dp_sgd`` (a ``DpSgdSpec``) every step
    is record-level DP-SGD (Abadi et al. 2016): a Poisson batch with rate B/n, per-sample
    clipping, conditional rounding and exact discrete Gaussian noise (see
    :mod:`lepton_ray.privacy.dpsgd`)."""
    device = torch.device(device)
    model = build_model(model_spec, n_features, n_classes).to(device)
    start = torch.tensor(np.asarray(global_params, dtype=np.float32), device=device)
    deltas = np.empty((len(datasets), start.numel()), dtype=np.float32)
    examples = np.empty(len(datasets), dtype=np.int64)
    losses = np.empty(len(datasets), dtype=np.float64)
    for i, ((X, y), seed) in enumerate(zip(datasets, seeds)):
        load_flat(model, global_params)
        if training.loop is not None:  # a user's whole loop (lepton_ray.learning.custom)
            from lepton_ray.learning.custom import train_with_loop

            losses[i] = train_with_loop(model, start, X, y, training, seed, device)
        elif dp_sgd is not None:
            losses[i] = _train_one_dp(model, X, y, training, dp_sgd, seed, device)
        else:
            losses[i] = _train_one(model, start, X, y, training, seed, device)
        with torch.no_grad():
            local = torch.nn.utils.parameters_to_vector(trainable(model))
            deltas[i] = (local - start).cpu().numpy()
        examples[i] = len(y)
    return LocalResult(deltas=deltas, examples=examples, losses=losses)


def _train_one(model: nn.Module, start: torch.Tensor, X, y, training: TrainingSpec, seed: int,
               device: torch.device) -> float:
    X_t = torch.tensor(np.asarray(X, dtype=np.float32), device=device)  # copy: Ray buffers are read-only
    y_t = torch.tensor(np.asarray(y, dtype=np.int64), device=device)
    params = trainable(model)
    if training.optimizer is OptimizerKind.SGD:
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=training.lr, momentum=training.momentum)
    else:
        opt = torch.optim.Adam(params, lr=training.lr)
    gen = torch.Generator().manual_seed(torch_seed(seed))
    n = len(y_t)
    mu = training.proximal_mu
    anchors = _split_like(start, params) if mu > 0 else None
    from lepton_ray.learning.custom import per_example_loss, resolve_loss

    user_loss = resolve_loss(training.loss)

    def loss_fn(logits, targets):  # cross-entropy, or training.loss (mean over the batch)
        return per_example_loss(user_loss, logits, targets).mean()

    last = 0.0
    for _ in range(training.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        total, count = 0.0, 0
        for b in range(0, n, training.batch_size):
            idx = order[b : b + training.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X_t[idx]), y_t[idx])
            objective = loss
            if anchors is not None:
                # FedProx (Li et al. 2020): (mu/2) ||w - w_global||^2
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                objective = loss + 0.5 * mu * prox
            objective.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


def _split_like(vector: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(vector[offset : offset + p.numel()].view_as(p).detach())
        offset += p.numel()
    return out


def _train_one_dp(model: nn.Module, X, y, training: TrainingSpec, dp, seed: int,
                  device: torch.device) -> float:
    """DP-SGD: ``epochs * ceil(n / B)`` steps, each on a Poisson batch (every row with
    probability q' = floor(q 2^64)/2^64 <= q = B / n, as the accountant assumes), per-sample
    clipped, conditionally rounded to integers and noised with an exact discrete Gaussian
    (:func:`~lepton_ray.privacy.dpsgd.dp_sgd_step`). Batch membership comes from an AES-CTR
    stream keyed by the party's secret seed (:func:`dp_batch_stream`); the noise from
    ``os.urandom`` (exact integer sampler); the rounding uniforms from an OS-seeded generator."""
    from lepton_ray.privacy.dpsgd import dp_sgd_step, os_seeded_generator

    X_t = torch.tensor(np.asarray(X, dtype=np.float32), device=device)
    y_t = torch.tensor(np.asarray(y, dtype=np.int64), device=device)
    n = len(y_t)
    q = min(1.0, training.batch_size / n)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if training.optimizer is OptimizerKind.SGD:
        opt: torch.optim.Optimizer = torch.optim.SGD(params.values(), lr=training.lr, momentum=training.momentum)
    else:
        opt = torch.optim.Adam(params.values(), lr=training.lr)
    from lepton_ray.learning.sampling import bernoulli_mask

    batches = dp_batch_stream(seed)  # Poisson membership from AES-CTR, not torch's MT
    rounding = os_seeded_generator(device)  # the noise itself: os.urandom, in dp_sgd_step
    from lepton_ray.learning.custom import per_example_loss, resolve_loss

    user_loss = resolve_loss(training.loss)

    def loss_fn(logits, targets):  # cross-entropy, or training.loss, per sample under vmap
        return per_example_loss(user_loss, logits, targets).mean()

    steps = training.epochs * -(-n // training.batch_size)
    total, count = 0.0, 0
    for _ in range(steps):
        mask = torch.from_numpy(bernoulli_mask(n, q, batches))
        idx = torch.nonzero(mask).flatten().to(device)
        step = dp_sgd_step(model, {k: v.detach() for k, v in params.items()}, {},
                           X_t[idx], y_t[idx], loss_fn, clip_norm=dp.clip_norm,
                           noise_multiplier=dp.noise_multiplier, expected_batch_size=q * n,
                           generator=rounding)
        opt.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.grad = step.grads[name]
        opt.step()
        if len(idx):
            with torch.no_grad():
                total += float(loss_fn(model(X_t[idx]), y_t[idx])) * len(idx)
            count += len(idx)
    return total / max(count, 1)
