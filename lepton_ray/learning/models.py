"""Models and the flat-vector view of their parameters.

Parameters travel between the server, hosts and the secure-aggregation layer as one
contiguous float32 vector (the order of ``model.parameters()``); this module converts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lepton_ray.config import ModelKind, ModelSpec


def build_model(spec: ModelSpec, n_features: int, n_classes: int, *, seed: int = 0) -> nn.Module:
    """``logistic``: one linear layer (multinomial logistic regression). ``mlp``: linear
    layers of ``spec.hidden`` sizes with ReLU between. Initialised deterministically from
    ``seed`` (torch's default Kaiming-uniform init)."""
    if spec.kind is ModelKind.CUSTOM:  # factory(**kwargs); see lepton_ray.learning.custom
        from lepton_ray.learning.custom import build_custom_model

        return build_custom_model(spec, seed=seed)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sizes = [n_features]
        if spec.kind is ModelKind.MLP:
            sizes += list(spec.hidden)
        sizes.append(n_classes)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


def flat_parameters(model: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.utils.parameters_to_vector(trainable(model)).detach().cpu().numpy().astype(np.float32)


def load_flat(model: nn.Module, vector: np.ndarray) -> nn.Module:
    expected = sum(p.numel() for p in trainable(model))
    if vector.shape != (expected,):
        raise ValueError(f"parameter vector has shape {vector.shape}, model needs ({expected},)")
    # Copy into the existing parameter storage. (torch's vector_to_parameters would make the
    # parameters views of ``vector``, which may be a read-only buffer in Ray's object store.)
    source = torch.from_numpy(np.array(vector, dtype=np.float32, copy=True))
    offset = 0
    with torch.no_grad():
        for p in trainable(model):
            n = p.numel()
            p.copy_(source[offset : offset + n].view_as(p))
            offset += n
    return model


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model))


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters that are trained and travel (``requires_grad``): all of them for the
    built-in models; for a custom model with frozen weights (LoRA adapters on a frozen base)
    only the trainable ones, so only those are aggregated."""
    return [p for p in model.parameters() if p.requires_grad]
