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

Not yet wired into the round (``evaluation: {federated: true}``): the runtime is to append
these as extra coordinates of the secure sum, on the mechanism of
``lepton_ray.learning.party_update.UpdateRule`` extras (being reworked on the release branch).
"""

from __future__ import annotations

import numpy as np


def stats_width(n_classes: int) -> int:
    return 3 + 3 * n_classes


def party_eval_stats(model, X: np.ndarray, y: np.ndarray, n_classes: int, loss=None) -> np.ndarray:
    """One party's evaluation vector (float64) of the model on its ``(X, y)``; ``loss`` is a
    ``training.loss``-style per-example loss (cross-entropy when ``None``)."""
    import torch

    from lepton_ray.learning.custom import per_example_loss

    out = np.zeros(stats_width(n_classes), dtype=np.float64)
    if len(y) == 0:
        return out
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(X, dtype=np.float32)))
        y_t = torch.as_tensor(np.asarray(y, dtype=np.int64))
        losses = per_example_loss(loss, logits, y_t)
    pred = logits.argmax(dim=1).numpy()
    y = np.asarray(y, dtype=np.int64)
    C = n_classes
    out[0] = float(losses.double().sum())
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
        "fed_f1": float(f1.mean()),
        "fed_examples": int(round(n)),
    }
