"""The GPU-allocated training task.

A host trains the parties it was asked to train in one Ray task that requests
``training.gpus_per_party`` GPUs (fractional allowed, so several hosts share a GPU). When
the task holds a GPU fraction, torch's caching allocator is capped to that fraction of the
device so one task cannot starve its neighbours. ``device: auto`` falls back to the CPU when
CUDA is absent; ``device: cuda`` without CUDA is an error.
"""

from __future__ import annotations

import numpy as np
import ray

from lepton_ray.config import Device, JobSpec
from lepton_ray.errors import LeptonError


def resolve_device(requested: Device, gpu_fraction: float):
    import torch

    if requested is Device.CPU:
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available() and len(ray.get_gpu_ids()) > 0
    if requested is Device.CUDA and not has_cuda:
        raise LeptonError(
            "training.device: 'cuda' but this training task has no CUDA device "
            f"(torch.cuda.is_available()={torch.cuda.is_available()}, Ray GPU ids={ray.get_gpu_ids()}); "
            "set training.gpus_per_party > 0 on a GPU node, or use device 'auto'"
        )
    if not has_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    if 0 < gpu_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(gpu_fraction, device)
    return device


_SAID: set[str] = set()


def choose_trainer(spec: JobSpec, sample=None):
    """The vectorised trainer when the spec allows it, else the one-by-one loop (and say
    why, once per process). ``sample``: a few feature rows to probe a custom model with."""
    from lepton_ray.learning.local import train_parties
    from lepton_ray.learning.vectorised import train_parties_vectorised, vectorise_blocker

    if not spec.training.vectorised:
        return train_parties
    reason = vectorise_blocker(spec.model, spec.training, dp_sgd=spec.privacy.dp_sgd.enabled,
                               sample=sample)
    if reason is None:
        return train_parties_vectorised
    if reason not in _SAID:
        _SAID.add(reason)
        print(f"training one party at a time: {reason}", flush=True)
    return train_parties


@ray.remote
def train_task(spec: JobSpec, n_features: int, n_classes: int, params: np.ndarray,
               datasets: list, picks: list[int], seeds: list[int], *, fold=None, ring=None,
               eval_data: list | None = None, evaluate: tuple[int, ...] = ()):
    """Train ``datasets[i]`` for ``i`` in ``picks``. Returns ``(result, device)``.
    ``eval_data`` (federated evaluation): the host's parties' held-out ``(X, y)``, aligned
    with ``datasets``; the picks at positions ``evaluate`` first evaluate the global model on
    theirs (:func:`lepton_ray.learning.fed_eval.party_eval_stats`), and every pick gets an
    evaluation vector (zeros for the others) that rides in its update vector. With
    ``fold`` (an ``UpdateRule``; the plaintext path) the result is ``(PartialSum, clipped,
    losses, examples, bad)``: the parties' update vectors (with their loss and clip-flag
    coordinates when ``fold.stats``) summed here, so the per-party deltas never leave the
    task; the other values stay on the host. Otherwise it is the ``LocalResult`` with every party's delta."""
    import torch

    from lepton_ray.learning.aggregation import PartialSum
    from lepton_ray.learning.party_update import fold as fold_updates

    torch.set_num_threads(1)
    # the GPU share Ray really assigned to this task (a deployed party may override the spec)
    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    device = resolve_device(spec.training.device, share)
    evals = None
    if eval_data is not None:
        evals = _evaluate_global(spec, n_features, n_classes, params, eval_data, picks, evaluate,
                                 device)
    train = choose_trainer(spec, sample=datasets[picks[0]][0][:4] if picks else None)
    result = train(
        model_spec=spec.model,
        training=spec.training,
        n_features=n_features,
        n_classes=n_classes,
        global_params=params,
        datasets=[datasets[i] for i in picks],
        seeds=seeds,
        device=device,
        **({"dp_sgd": spec.privacy.dp_sgd} if spec.privacy.dp_sgd.enabled else {}),
    )
    if fold is not None and ring is not None:
        # central DP: conditionally rounded into the ring and summed there (mod 2^b)
        from lepton_ray.learning.party_update import encode_ring_batch

        quant, bound = ring
        batch = encode_ring_batch(result.deltas, result.examples, fold, quant, norm_bound_sq=bound,
                                  losses=result.losses if fold.stats else None, evals=evals)
        bad = list(batch.bad)
        good = np.setdiff1d(np.arange(len(picks)), bad)
        total = batch.rings[good].sum(axis=0, dtype=batch.rings.dtype)
        partial = PartialSum(total=total, parties=int(good.size))
        return (partial, int(batch.clipped[good].sum()), result.losses[good], result.examples[good],
                bad), _where(device)
    if fold is not None:
        # a party whose training diverged (NaN/inf delta) drops out; the others are folded
        finite = np.isfinite(result.deltas).all(axis=1)
        total, clipped = fold_updates(result.deltas[finite], result.examples[finite], fold,
                                      result.losses[finite] if fold.stats else None,
                                      evals[finite] if evals is not None else None)
        partial = PartialSum(total=total, parties=int(finite.sum()))
        bad = [picks_i for picks_i, ok in enumerate(finite) if not ok]
        return (partial, clipped, result.losses[finite], result.examples[finite], bad), _where(device)
    if evals is not None:
        import dataclasses

        result = dataclasses.replace(result, evals=evals)
    return result, _where(device)


def _evaluate_global(spec: JobSpec, n_features: int, n_classes: int, params: np.ndarray,
                     eval_data: list, picks: list[int], evaluate, device) -> np.ndarray:
    """``(len(picks), 3 + 3C)``: the evaluation vector of the global model on the held-out rows
    of each pick at a position in ``evaluate``; zeros for the others."""
    from lepton_ray.learning.custom import resolve_loss
    from lepton_ray.learning.fed_eval import party_eval_stats, stats_width
    from lepton_ray.learning.models import build_model, load_flat

    out = np.zeros((len(picks), stats_width(n_classes)), dtype=np.float64)
    if not len(evaluate):
        return out
    model = load_flat(build_model(spec.model, n_features, n_classes, seed=spec.seed), params).to(device)
    loss = resolve_loss(spec.training.loss)
    for j in evaluate:
        X, y = eval_data[picks[j]]
        out[j] = party_eval_stats(model, X, y, n_classes, loss, device=device)
    return out


def _where(device) -> str:
    """``device@node`` of this task, for the placement record."""
    return f"{device}@{ray.get_runtime_context().get_node_id()}"
