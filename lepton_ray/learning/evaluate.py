"""Server-side evaluation on the held-out test split, with scikit-learn's metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Cross-entropy loss, accuracy, and macro precision, recall and F1."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if len(y) == 0:  # no server-side test set (custom per-party data without "test")
        return {k: float("nan") for k in ("test_loss", "test_accuracy", "test_precision",
                                          "test_recall", "test_f1")}
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X, dtype=torch.float32))
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(y, dtype=torch.int64)))
    pred = logits.argmax(dim=1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, average="macro", labels=np.arange(n_classes), zero_division=0
    )
    return {
        "test_loss": loss,
        "test_accuracy": float(accuracy_score(y, pred)),
        "test_precision": float(precision),
        "test_recall": float(recall),
        "test_f1": float(f1),
    }
