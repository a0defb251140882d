"""Federated evaluation statistics: what each party computes on its own held-out rows, laid
out as one vector so the parties' vectors can be added up by the secure sum.

Layout (length ``3 + 3C``): ``[loss_sum, correct, examples, TP_0..TP_{C-1},
FP_0..FP_{C-1}, FN_0..FN_{C-1}]``. Every entry is a sum over the party's rows, so the sum of
the parties' vectors is the same vector for the union of their rows, and the metrics computed
from it (:func:`metrics_from_sum`) equal a brute-force evaluation of all the rows at once:
accuracy = correct / examples, loss = loss_sum / examples, macro F1 = the mean over classes of
2TP / (2TP + FP + FN) (classes with no support and no prediction count as 0, as in
scikit-learn's ``zero_division=0``). No single party's statistics need to leave it: only the
sum is released, like the model update.

In a round (``evaluation: {federated: true}``) these vectors ride as extra coordinates of the
parties' update vectors (``lepton_ray.learning.party_update.UpdateRule.eval_classes``): the
counts as exact integers (in ring units under secure aggregation, so the sum is exact), the
loss sum scaled into [0, 1] by the public bound ``rows x LOSS_BOUND``. The coordinator and the
driver see only the round's totals. Each party's held-out rows come from :func:`holdout_split`.
"""

from __future__ import annotations

import numpy as np


def stats_width(n_classes: int) -> int:
    return 3 + 3 * n_classes


def party_eval_stats(model, X: np.ndarray, y: np.ndarray, n_classes: int, loss=None, *,
                     device="cpu", batch_size: int = 4096) -> np.ndarray:
    """One party's evaluation vector (float64) of the model on its ``(X, y)``; ``loss`` is a
    ``training.loss``-style per-example loss (cross-entropy when ``None``). The model is put in
    eval mode (BatchNorm uses its running statistics) and run in batches on ``device``."""
    import torch

    from lepton_ray.learning.custom import per_example_loss

    out = np.zeros(stats_width(n_classes), dtype=np.float64)
    if len(y) == 0:
        return out
    model.eval()
    preds, loss_sum = [], 0.0
    with torch.no_grad():
        for b in range(0, len(y), batch_size):
            xb = torch.tensor(np.asarray(X[b: b + batch_size], dtype=np.float32), device=device)
            yb = torch.tensor(np.asarray(y[b: b + batch_size], dtype=np.int64), device=device)
            logits = model(xb)
            loss_sum += float(per_example_loss(loss, logits, yb).double().sum())
            preds.append(logits.argmax(dim=1).cpu().numpy())
    pred = np.concatenate(preds)
    y = np.asarray(y, dtype=np.int64)
    C = n_classes
    out[0] = loss_sum
    out[1] = float((pred == y).sum())
    out[2] = float(len(y))
    hit = pred == y
    out[3: 3 + C] = np.bincount(y[hit], minlength=C)[:C]
    out[3 + C: 3 + 2 * C] = np.bincount(pred[~hit], minlength=C)[:C]
    out[3 + 2 * C: 3 + 3 * C] = np.bincount(y[~hit], minlength=C)[:C]
    return out


def metrics_from_sum(total: np.ndarray, n_classes: int) -> dict[str, float]:
    """``fed_loss``, ``fed_accuracy``, ``fed_f1`` (macro) and ``fed_examples`` from the summed
    vector."""
    C = n_classes
    n = float(total[2])
    tp, fp, fn = total[3: 3 + C], total[3 + C: 3 + 2 * C], total[3 + 2 * C: 3 + 3 * C]
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(C), where=denom > 0)
    return {
        "fed_loss": float(total[0] / n) if n else float("nan"),
        "fed_accuracy": float(total[1] / n) if n else float("nan"),
        "fed_f1": float(f1.mean()) if n else float("nan"),
        "fed_examples": int(round(n)),
    }


def holdout_rows(n: int, fraction: float) -> int:
    """How many of a party's ``n`` rows are held out: floor(n * fraction)."""
    return int(np.floor(n * fraction))


def holdout_split(X: np.ndarray, y: np.ndarray, fraction: float, seed: int, party: int):
    """``((X_train, y_train), (X_eval, y_eval))``: ``holdout_rows(len(y), fraction)`` of the
    party's rows, chosen by a permutation from the public ``(seed, party)`` (the data split is
    public by design, like the partition; nothing secret depends on it), held out for
    federated evaluation. The party trains on the rest."""
    n = len(y)
    k = holdout_rows(n, fraction)
    order = np.random.default_rng([int(seed), int(party), 0xE7A1]).permutation(n)
    ev, tr = np.sort(order[:k]), np.sort(order[k:])
    return (X[tr], y[tr]), (X[ev], y[ev])


def check_holdout(sizes, fraction: float) -> int:
    """The largest held-out split over parties of ``sizes`` rows (the public bound the loss
    coordinate is scaled by), or a ``DataError`` naming every party whose held-out split
    would be empty or leave it no training row."""
    from lepton_ray.errors import DataError

    rows = [holdout_rows(int(n), fraction) for n in sizes]
    empty = [(p, int(n)) for p, (n, k) in enumerate(zip(sizes, rows)) if k < 1 or k >= n]
    if empty:
        shown = "; ".join(f"party {p} has {n} row(s)" for p, n in empty[:5])
        more = f" (and {len(empty) - 5} more)" if len(empty) > 5 else ""
        need = int(np.ceil(1 / fraction))
        raise DataError(
            f"evaluation.holdout: {fraction:g} of a party's rows leaves an empty held-out split "
            f"for federated evaluation unless the party has at least {need} rows; {shown}{more}. "
            "Raise evaluation.holdout, use fewer parties, or set evaluation.federated: false")
    return max(rows) if rows else 0


def choose_evaluators(n_sampled: int, fraction: float, randbytes=None) -> np.ndarray:
    """Which of a round's ``n_sampled`` sampled parties evaluate (indices into the sample):
    all at ``fraction`` 1, else a uniform ``max(1, round(fraction * n))``-subset drawn from the
    OS CSPRNG (:func:`lepton_ray.learning.sampling.sample_parties`, ``fixed``)."""
    import os

    from lepton_ray.config import SamplingKind, SamplingSpec
    from lepton_ray.learning.sampling import sample_parties

    if fraction >= 1:
        return np.arange(n_sampled)
    return sample_parties(SamplingSpec(kind=SamplingKind.FIXED, fraction=fraction, min_parties=1),
                          n_sampled, randbytes or os.urandom)
