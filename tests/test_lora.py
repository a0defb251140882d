"""LoRA example: only the adapters (and the classifier head) travel and are trained."""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
    reason="LoRA example needs the lora extra (pip install -e '.[lora]')")

E = "lepton_ray.examples.text_lora"


def _spec(**over):
    from lepton_ray.config import load_spec

    return load_spec({"model": {"kind": "custom", "factory": f"{E}:lora_bert"},
                      "data": {"source": "custom", "loader": f"{E}:synthetic_text", "kwargs": {"n": 200},
                               "standardize": False},
                      "parties": {"count": 4}, "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 16}},
                     **over)


def test_only_adapter_parameters_travel_and_the_base_is_the_same_everywhere():
    import torch

    from lepton_ray.learning.data import load_federated
    from lepton_ray.learning.local import train_parties
    from lepton_ray.learning.models import build_model, flat_parameters, load_flat, n_parameters
    from lepton_ray.learning.vectorised import train_parties_vectorised

    spec = _spec()
    data = load_federated(spec.data, 4, 0)
    a, b = build_model(spec.model, 16, 2, seed=0), build_model(spec.model, 16, 2, seed=7)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)  # frozen base identical on every node
    adapter = sum(p.numel() for n, p in a.named_parameters() if "lora_" in n or "modules_to_save" in n)
    total = sum(p.numel() for p in a.parameters())
    assert n_parameters(a) == adapter == flat_parameters(a).size and adapter < total / 20
    kw = dict(model_spec=spec.model, training=spec.training, n_features=16, n_classes=2,
              global_params=flat_parameters(a), datasets=list(data.parties), seeds=[1, 2, 3, 4])
    one, vec = train_parties(**kw), train_parties_vectorised(**kw)
    assert one.deltas.shape == (4, adapter) and np.abs(one.deltas).max() > 1e-3
    np.testing.assert_allclose(vec.deltas, one.deltas, atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in a.named_parameters() if not p.requires_grad}
    load_flat(a, flat_parameters(a) + one.deltas[0])
    assert all(torch.equal(p, frozen[n]) for n, p in a.named_parameters() if not p.requires_grad)
