"""Vectorised local training: many parties that share an architecture train together.

The parties' parameters and optimiser state are stacked along a leading "party" axis, and
one step of every party is one call of ``vmap(grad(loss))`` over ``functional_call``
(torch.func). The result is the same as training the parties one by one with
:func:`lepton_ray.learning.local.train_parties` (same seeds, same batches, same optimiser
arithmetic), up to float summation order; a test checks it.

Unequal local dataset sizes: party ``i`` takes ``epochs * ceil(n_i / B)`` steps. Parties are
sorted by that count, longest first, so the parties still training at step ``t`` are always
a prefix of the stack and a step touches only them: no compute is wasted on finished
parties. A batch shorter than ``B`` (a party's last batch in an epoch) is padded and masked:
the loss is the mean over the real rows only, exactly as in the one-by-one loop.

SGD (with momentum, dampening 0) and Adam follow ``torch.optim``'s update rules.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lepton_ray.config import ModelKind, ModelSpec, OptimizerKind, TrainingSpec
from lepton_ray.learning.local import LocalResult, torch_seed
from lepton_ray.learning.models import build_model

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def vectorise_blocker(model_spec: ModelSpec, training: TrainingSpec, *, dp_sgd: bool = False,
                      sample: np.ndarray | None = None) -> str | None:
    """Why these settings cannot be trained vectorised, or ``None`` when they can. A custom
    model is probed on ``sample`` rows (:func:`lepton_ray.learning.custom.functional_blocker`)."""
    if dp_sgd:
        return "record-level DP-SGD (per-sample clipping, Poisson batches) is not vectorised"
    if training.loop is not None:
        from lepton_ray.learning.custom import show

        return f"training.loop {show(training.loop)} is a user's loop, run as written"
    if model_spec.kind is ModelKind.CUSTOM:
        from lepton_ray.learning.custom import functional_blocker, show

        reason = functional_blocker(build_model(model_spec, 0, 0), sample)
        if reason is not None:
            return f"model.factory {show(model_spec.factory)}: {reason}"
    return None


def schedule(sizes: list[int], seeds: list[int], epochs: int, batch: int) -> np.ndarray:
    """Row indices of every party's batches: ``(k, T_max, B)`` int64, -1 for padding.

    Party ``i``'s order in each epoch is ``torch.randperm(n_i)`` from a generator seeded with
    ``seeds[i]``, drawn epoch after epoch, exactly as the one-by-one loop draws it."""
    steps = [epochs * math.ceil(n / batch) for n in sizes]
    out = np.full((len(sizes), max(steps), batch), -1, dtype=np.int64)
    gen = torch.Generator()
    for i, (n, seed) in enumerate(zip(sizes, seeds)):
        gen.manual_seed(torch_seed(seed))
        per_epoch = math.ceil(n / batch)
        for e in range(epochs):
            out[i, e * per_epoch : (e + 1) * per_epoch].reshape(-1)[:n] = torch.randperm(n, generator=gen).numpy()
    return out


_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """A flat float32 buffer reused across calls in this process: a fresh multi-megabyte
    allocation every round costs more in page faults than the training step itself."""
    buf = _WORKSPACE.get(device)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


@functools.lru_cache(maxsize=8)
def _template(model_spec: ModelSpec, n_features: int, n_classes: int, device: torch.device) -> nn.Module:
    """The architecture ``functional_call`` runs; its own parameter values are never used."""
    return build_model(model_spec, n_features, n_classes).to(device)


def train_parties_vectorised(
    *,
    model_spec: ModelSpec,
    training: TrainingSpec,
    n_features: int,
    n_classes: int,
    global_params: np.ndarray,
    datasets: list[tuple[np.ndarray, np.ndarray]],
    seeds: list[int],
    device: torch.device | str = "cpu",
) -> LocalResult:
    device = torch.device(device)
    k = len(datasets)
    sizes = [len(y) for _, y in datasets]
    B = training.batch_size
    steps = np.array([training.epochs * math.ceil(n / B) for n in sizes])
    order = np.argsort(-steps, kind="stable")  # longest first: active parties form a prefix
    steps_sorted = steps[order]

    model = _template(model_spec, n_features, n_classes, device)
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters() if p.requires_grad])
    start = torch.tensor(np.asarray(global_params, dtype=np.float32), device=device)  # copy: read-only buffer
    chunks = torch.split(start, [math.prod(s) for s in shapes])
    base = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
    # One (k, d) tensor holds every party's parameters; each layer is a view into it, so the
    # optimiser updates it in place and the deltas need no concatenation at the end.
    stacked = _workspace(k * start.numel(), device).view(k, -1)
    stacked.copy_(start.expand(k, -1))
    params = {}
    offset = 0
    for n, shape in zip(names, shapes):
        size = math.prod(shape)
        params[n] = stacked[:, offset : offset + size].view(k, *shape)
        offset += size

    # all rows in one tensor; schedule indices are shifted by each party's offset
    X_all = torch.as_tensor(np.concatenate([np.asarray(X, np.float32) for X, _ in datasets]), device=device)
    y_all = torch.as_tensor(np.concatenate([np.asarray(y, np.int64) for _, y in datasets]), device=device)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sched = schedule([sizes[i] for i in order], [seeds[i] for i in order], training.epochs, B)
    valid = sched >= 0
    rows = np.where(valid, sched + offsets[order][:, None, None], 0)
    rows_t = torch.as_tensor(rows, device=device)
    valid_t = torch.as_tensor(valid, dtype=torch.float32, device=device)
    widths = valid.sum(axis=2)
    per_epoch = torch.as_tensor(steps_sorted // training.epochs, device=device)

    mu = training.proximal_mu
    from lepton_ray.learning.custom import per_example_loss, resolve_loss

    user_loss = resolve_loss(training.loss)

    def loss_fn(p, x, y, w):
        logits = functional_call(model, p, (x,))
        ce = per_example_loss(user_loss, logits, y)  # cross-entropy or training.loss
        loss = (ce * w).sum() / w.sum()
        objective = loss
        if mu > 0:  # FedProx (Li et al. 2020)
            objective = loss + 0.5 * mu * sum(((p[n] - base[n]) ** 2).sum() for n in p)
        return objective, loss

    step_fn = vmap(grad(loss_fn, has_aux=True))
    state = _init_state(params, training)
    last_loss = torch.zeros(k, dtype=torch.float64, device=device)
    last_rows = torch.zeros(k, dtype=torch.float64, device=device)
    for t in range(int(steps_sorted[0]) if k else 0):
        a = int((steps_sorted > t).sum())
        active = {n: v[:a] for n, v in params.items()}
        # pad only to the widest real batch at this step (real rows come first in a batch)
        width = int(widths[:a, t].max())
        idx, w = rows_t[:a, t, :width], valid_t[:a, t, :width]
        grads, losses = step_fn(active, X_all[idx], y_all[idx], w)
        _apply(params, state, grads, a, t, training)
        in_last_epoch = (t // per_epoch[:a]) == training.epochs - 1
        n_rows = w.sum(dim=1).double()
        last_loss[:a] += torch.where(in_last_epoch, losses.double() * n_rows, 0.0)
        last_rows[:a] += torch.where(in_last_epoch, n_rows, 0.0)

    stacked.sub_(start)
    inverse = np.empty(k, dtype=np.int64)
    inverse[order] = np.arange(k)
    deltas = stacked.cpu().numpy()[inverse]
    losses = (last_loss / last_rows.clamp(min=1)).cpu().numpy()[inverse]
    return LocalResult(deltas=np.ascontiguousarray(deltas, dtype=np.float32),
                       examples=np.array(sizes, dtype=np.int64), losses=losses)


def _init_state(params: dict[str, torch.Tensor], training: TrainingSpec) -> dict[str, dict]:
    if training.optimizer is OptimizerKind.ADAM:
        return {"m": {n: torch.zeros_like(v) for n, v in params.items()},
                "v": {n: torch.zeros_like(v) for n, v in params.items()}}
    if training.momentum > 0:
        return {"buf": {n: torch.zeros_like(v) for n, v in params.items()}}
    return {}


@torch.no_grad()
def _apply(params, state, grads, a: int, t: int, training: TrainingSpec) -> None:
    """One optimiser step for the first ``a`` parties (all of them at their step ``t + 1``)."""
    lr = training.lr
    if training.optimizer is OptimizerKind.ADAM:
        b1, b2 = ADAM_BETAS
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        for n, g in grads.items():
            m, v = state["m"][n][:a], state["v"][n][:a]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(ADAM_EPS)
            params[n][:a].addcdiv_(m, denom, value=-lr / bc1)
        return
    if training.momentum > 0:
        for n, g in grads.items():
            buf = state["buf"][n][:a]
            if t == 0:
                buf.copy_(g)
            else:
                buf.mul_(training.momentum).add_(g)
            params[n][:a].add_(buf, alpha=-lr)
        return
    for n, g in grads.items():
        params[n][:a].add_(g, alpha=-lr)
