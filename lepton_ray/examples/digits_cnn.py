"""A small CNN on scikit-learn's 8x8 digits as images (1 x 8 x 8): ``jobs/digits_cnn.yaml``.

``cnn`` is a ``model.factory``; ``digits_images`` a ``data.loader`` returning one pool, which
``data.partition`` (Dirichlet) spreads over the parties. ``cnn_batchnorm`` is the same net
with BatchNorm (not functional-safe: trained one party at a time)."""

from __future__ import annotations

import numpy as np
from torch import nn


def cnn(channels: int = 16, hidden: int = 64, n_classes: int = 10, batchnorm: bool = False) -> nn.Module:
    """conv3x3(1->c) ReLU, conv3x3(c->2c) ReLU, maxpool 2 (8x8 -> 4x4), linear(32c -> hidden)
    ReLU, linear(hidden -> classes)."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), norm(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, hidden), nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def cnn_batchnorm(**kwargs) -> nn.Module:
    return cnn(batchnorm=True, **kwargs)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as ``(N, 1, 8, 8)`` float images (pixel values 0..16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:, None, :, :].astype(np.float32), d.target.astype(np.int64)
