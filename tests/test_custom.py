"""Bring your own model, data, loss and loop (lepton_ray.learning.custom); no Ray here
except the one end-to-end test marked ``ray``."""

import sys
import textwrap

import numpy as np
import pytest
import torch

from lepton_ray.config import load_spec
from lepton_ray.errors import ConfigError, DataError
from lepton_ray.learning.custom import functional_blocker, validate
from lepton_ray.learning.data import load_federated
from lepton_ray.learning.local import train_parties
from lepton_ray.learning.models import build_model, flat_parameters
from lepton_ray.learning.vectorised import train_parties_vectorised

EX = "lepton_ray.examples.digits_cnn"

USER_MODULE = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    def tiny(n_in=8, n_classes=3):
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_classes))

    def not_a_module():
        return 42

    def pool(n=120, bad=None):
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n, 2, 4)).astype(np.float32)
        y = (X.reshape(n, -1).sum(axis=1) > 0).astype(np.int64) + (X[:, 0, 0] > 1)
        if bad == "nan":
            X[5, 1, 2] = np.nan
        if bad == "negative":
            y[3] = -1
        if bad == "float_labels":
            y = y + 0.5
        if bad == "short_y":
            y = y[:-1]
        return X, y

    def per_party(k=4):
        X, y = pool(160)
        return {"parties": [(X[i::k], y[i::k]) for i in range(k)], "test": (X[:20], y[:20])}

    def ce(logits, targets):  # same as the built-in loss, per example
        return nn.functional.cross_entropy(logits, targets, reduction="none")

    def mean_loss(logits, targets):
        return nn.functional.cross_entropy(logits, targets)

    def sgd_loop(model, loader, training, device):
        opt = torch.optim.SGD(model.parameters(), lr=training.lr)
        for _ in range(training.epochs):
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return {"steps": 1}
''')


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "byo_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "byo_user_pkg.mod"
    for name in [m for m in sys.modules if m.startswith("byo_user_pkg")]:
        del sys.modules[name]


def spec_for(model_factory, loader, **over):
    raw = {"model": {"kind": "custom", "factory": model_factory},
           "data": {"source": "custom", "loader": loader}, "parties": {"count": 4}}
    return load_spec(raw, **over)


# --------------------------------------------------------------------------- config


def test_config_requires_and_checks_references():
    with pytest.raises(ConfigError) as e:
        load_spec({"model": {"kind": "custom"}, "data": {"source": "custom", "loader": "nocolon"},
                   "training": {"loss": "a.b:"}})
    text = str(e.value)
    assert "model.factory: required for kind 'custom'" in text
    assert "data.loader: expected \"package.module:function\", got 'nocolon'" in text
    assert "training.loss: expected" in text
    spec = load_spec({"model": {"kind": "custom", "factory": "a.b:c", "kwargs": {"k": [1, 2]}}})
    assert load_spec(spec.to_dict()) == spec and hash(spec.model) == hash(load_spec(spec.to_dict()).model)


def test_dp_sgd_with_a_custom_loop_is_refused():
    with pytest.raises(ConfigError, match="training.loop: record-level DP-SGD"):
        load_spec({"training": {"loop": "a.b:c"}, "privacy": {"dp_sgd": {"noise_multiplier": 1.0}}})


# --------------------------------------------------------------------------- models


def test_unimportable_factory_is_named(user_pkg):
    spec = spec_for("no_such_pkg.mod:fn", f"{user_pkg}:pool")
    with pytest.raises(ConfigError, match="model.factory: cannot import module 'no_such_pkg.mod' of 'no_such_pkg.mod:fn'"):
        build_model(spec.model, 8, 3)
    spec = spec_for(f"{user_pkg}:missing", f"{user_pkg}:pool")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        build_model(spec.model, 8, 3)


def test_factory_not_returning_a_module_is_named(user_pkg):
    spec = spec_for(f"{user_pkg}:not_a_module", f"{user_pkg}:pool")
    with pytest.raises(ConfigError, match=r"not_a_module returned a int, not a torch.nn.Module"):
        build_model(spec.model, 8, 3)


def test_output_shape_mismatch_is_named(user_pkg):
    spec = load_spec({"model": {"kind": "custom", "factory": f"{user_pkg}:tiny", "kwargs": {"n_classes": 5}},
                      "data": {"source": "custom", "loader": f"{user_pkg}:pool"}, "parties": {"count": 4}})
    data = load_federated(spec.data, 4, 0)
    model = build_model(spec.model, data.n_features, data.n_classes)
    with pytest.raises(ConfigError, match=r"model.factory: .*:tiny outputs \(4, 5\).*3 classes"):
        validate(spec, data, model)
    spec = load_spec(spec.to_dict(), model__kwargs={"n_in": 7})
    with pytest.raises(ConfigError, match=r"tiny cannot take input of shape \(4, 2, 4\)"):
        validate(spec, data, build_model(spec.model, 8, 3))


def _cnn_job(factory="cnn", optimizer="sgd"):
    spec = load_spec({"model": {"kind": "custom", "factory": f"{EX}:{factory}", "kwargs": {"channels": 4}},
                      "data": {"source": "custom", "loader": f"{EX}:digits_images",
                               "partition": {"kind": "dirichlet", "alpha": 0.3}},
                      "parties": {"count": 8},
                      "training": {"optimizer": optimizer, "lr": 0.05, "momentum": 0.9, "epochs": 2,
                                   "batch_size": 16, "proximal_mu": 0.1}})
    data = load_federated(spec.data, 8, 0)
    return spec, data


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cnn_vectorised_equals_one_by_one(optimizer):
    spec, data = _cnn_job(optimizer=optimizer)
    model = build_model(spec.model, data.n_features, data.n_classes, seed=0)
    assert validate(spec, data, model) == "vectorised"
    kw = dict(model_spec=spec.model, training=spec.training, n_features=data.n_features,
              n_classes=data.n_classes, global_params=flat_parameters(model),
              datasets=list(data.parties), seeds=list(range(8)))
    one, vec = train_parties(**kw), train_parties_vectorised(**kw)
    assert np.abs(one.deltas).max() > 1e-2  # it trained
    # SGD (momentum, FedProx): 1e-5. Adam divides by sqrt(v) + eps, which turns float32
    # summation-order differences in near-zero gradients (ReLU/max-pool ties) into
    # visible steps; there 1e-4 (measured max 6.7e-5 over 74k coordinates).
    tol = 1e-5 if optimizer == "sgd" else 1e-4
    np.testing.assert_allclose(vec.deltas, one.deltas, atol=tol)
    np.testing.assert_allclose(vec.losses, one.losses, rtol=1e-4)


def test_batchnorm_model_falls_back_and_says_why():
    from actors.training import choose_trainer

    spec, data = _cnn_job("cnn_batchnorm")
    model = build_model(spec.model, data.n_features, data.n_classes)
    path = validate(spec, data, model)
    assert path.startswith("one party at a time: model.factory") and "mutates buffers" in path
    assert "running_mean" in path
    assert choose_trainer(spec, sample=data.X_test[:4]) is train_parties
    assert functional_blocker(build_model(_cnn_job()[0].model, 0, 0), data.X_test[:4]) is None
    with pytest.raises(ConfigError, match="privacy.dp_sgd: model.factory .* mutates buffers"):
        validate(load_spec(spec.to_dict(), privacy__dp_sgd__noise_multiplier=1.0), data, model)


# --------------------------------------------------------------------------- data


def test_custom_pool_is_split_and_partitioned(user_pkg):
    spec = spec_for(f"{user_pkg}:tiny", f"{user_pkg}:pool")
    data = load_federated(spec.data, 4, 0)
    assert data.feature_shape == (2, 4) and data.n_classes == 3
    assert sum(len(y) for _, y in data.parties) + len(data.y_test) == 120
    X = np.concatenate([X for X, _ in data.parties])
    np.testing.assert_allclose(X.mean(axis=0), 0, atol=1e-9)  # per-element standardisation
    np.testing.assert_allclose(X.std(axis=0), 1, atol=1e-9)


def test_custom_per_party_form(user_pkg):
    spec = spec_for(f"{user_pkg}:tiny", f"{user_pkg}:per_party")
    data = load_federated(spec.data, 4, 0)
    assert [len(y) for _, y in data.parties] == [40] * 4 and len(data.y_test) == 20
    with pytest.raises(DataError, match="parties.count: is 5 but data.loader .* returned 4 parties"):
        load_federated(spec.data, 5, 0)


@pytest.mark.parametrize("bad, message", [
    ("nan", r"NaN or inf features in rows \[5\]"),
    ("negative", "labels must be integers 0..C-1, got -1"),
    ("float_labels", "non-integer values"),
    ("short_y", r"y must have shape \(120,\)"),
])
def test_custom_data_errors_are_clear(user_pkg, bad, message):
    spec = load_spec({"data": {"source": "custom", "loader": f"{user_pkg}:pool", "kwargs": {"bad": bad}}})
    with pytest.raises(DataError, match=f"data.loader {user_pkg}:pool.*{message}"):
        load_federated(spec.data, 4, 0)


# --------------------------------------------------------------------------- loss, loop


def _tiny(user_pkg, **training):
    spec = load_spec({"model": {"kind": "custom", "factory": f"{user_pkg}:tiny"},
                      "data": {"source": "custom", "loader": f"{user_pkg}:pool"},
                      "parties": {"count": 4}, "training": {"lr": 0.1, "epochs": 2, "batch_size": 8, **training}})
    data = load_federated(spec.data, 4, 0)
    params = flat_parameters(build_model(spec.model, 8, 3, seed=1))
    kw = dict(n_features=8, n_classes=3, global_params=params, datasets=list(data.parties), seeds=[1, 2, 3, 4])
    return spec, kw


def test_custom_loss_equal_to_cross_entropy_gives_the_builtin_deltas(user_pkg):
    spec, kw = _tiny(user_pkg)
    builtin = train_parties(model_spec=spec.model, training=spec.training, **kw)
    spec2, _ = _tiny(user_pkg, loss=f"{user_pkg}:ce")
    for train in (train_parties, train_parties_vectorised):
        custom = train(model_spec=spec2.model, training=spec2.training, **kw)
        np.testing.assert_allclose(custom.deltas, builtin.deltas, atol=1e-6)
    spec3, _ = _tiny(user_pkg, loss=f"{user_pkg}:mean_loss")
    with pytest.raises(ConfigError, match="training.loss: must return one loss per example"):
        train_parties(model_spec=spec3.model, training=spec3.training, **kw)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_custom_loop_with_fedprox_hook_matches_builtin_fedprox(user_pkg, mu):
    """Oracle: the built-in loop adds (mu/2)||w - w_g||^2 to the objective; the user's loop
    knows nothing of FedProx and gets it through gradient hooks. Same order (the loader's
    generator draws the same randperm as the built-in loop), same SGD."""
    spec, kw = _tiny(user_pkg, proximal_mu=mu)
    builtin = train_parties(model_spec=spec.model, training=spec.training, **kw)
    spec2, _ = _tiny(user_pkg, proximal_mu=mu, loop=f"{user_pkg}:sgd_loop")
    loop = train_parties(model_spec=spec2.model, training=spec2.training, **kw)
    np.testing.assert_allclose(loop.deltas, builtin.deltas, atol=1e-6)
    assert np.isfinite(loop.losses).all()


@pytest.fixture
def worker_pkg(monkeypatch):
    """The user module in a temporary package at the repository root: the working directory
    Ray's local workers import from (as a job's working dir is on a cluster)."""
    import os
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = f"byo_user_pkg_{os.getpid()}"
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    yield f"{name}.mod"
    shutil.rmtree(pkg)


@pytest.mark.ray
def test_custom_everything_runs_under_simulate_with_secagg_plus(worker_pkg, ray_session, tmp_path):
    import lepton_ray

    user_pkg = worker_pkg

    r = lepton_ray.run({
        "rounds": 2, "parties": {"count": 4},
        "model": {"kind": "custom", "factory": f"{user_pkg}:tiny"},
        "data": {"source": "custom", "loader": f"{user_pkg}:pool"},
        "training": {"loss": f"{user_pkg}:ce", "loop": f"{user_pkg}:sgd_loop", "lr": 0.1},
        "secure_aggregation": {"mode": "secagg+"},
        "output": {"dir": str(tmp_path / "o"), "progress": False},
    })
    assert r.summary["status"] == "completed" and r.summary["secure_aggregation"] == "secagg+"
    assert r.summary["training_path"].startswith("one party at a time: training.loop")
    assert len(r.history) == 2 and np.isfinite(r.history["test_accuracy"]).all()
    assert r.predict(np.zeros((3, 2, 4))).shape == (3,)


# --------------------------------------------------------------------------- Python API


def test_python_callables_round_trip_by_value():
    from lepton_ray.learning.custom import PYTHON_PREFIX, _DECODED, register, resolve

    scale = 3

    def factory(n=2):  # a closure, as defined in a notebook cell
        return torch.nn.Linear(n, scale)

    ref = register(factory)
    assert ref.startswith(PYTHON_PREFIX + "factory:")
    _DECODED.clear()  # as in a fresh Ray worker: rebuilt from the pickle in the string
    assert resolve(ref, "model.factory")().out_features == 3
    spec = load_spec({"model": {"kind": "custom", "factory": register(lambda: 42)}})
    with pytest.raises(ConfigError, match=r"model.factory: <python callable <lambda>> returned a int"):
        build_model(spec.model, 1, 1)


@pytest.mark.ray
def test_run_takes_a_model_and_a_data_callable(ray_session, tmp_path):
    import lepton_ray

    def data():
        rng = np.random.default_rng(1)
        X = rng.normal(size=(200, 1, 3, 3)).astype(np.float32)
        return X, (X[:, 0, 1, 1] > 0).astype(np.int64)

    def model(width=4):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, 2))

    r = lepton_ray.run({"rounds": 3, "parties": {"count": 4}, "training": {"lr": 0.3},
                        "output": {"dir": str(tmp_path / "o"), "progress": False}},
                       model=model, data=data, model__kwargs={"width": 8})
    assert r.summary["status"] == "completed" and r.summary["training_path"] == "vectorised"
    assert r.history["test_accuracy"].iloc[-1] > 0.65  # chance is about 0.5
    assert r.predict(np.zeros((2, 1, 3, 3))).shape == (2,)


class _Payload:
    """A pickle that runs code when loaded: what a foreign spec could carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_attack_a_spec_file_cannot_carry_a_pickled_callable(tmp_path):
    """Attack: a spec (file, stored spec, job offer) naming ``__python__:...`` made the loader
    unpickle it, running foreign code. Only callables this process registered through
    lepton_ray.run are accepted now; the payload never runs."""
    import base64
    import pickle

    from lepton_ray.config import load_spec
    from lepton_ray.errors import ConfigError
    from lepton_ray.learning.custom import register, resolve

    marker = tmp_path / "pwned"
    ref = "__python__:f:" + base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    spec = {"name": "t", "data": {"source": "digits"}, "parties": {"count": 4},
            "model": {"kind": "custom", "factory": ref}}
    with pytest.raises(ConfigError, match="model.factory: a pickled Python callable is accepted only"):
        load_spec(spec)
    assert not marker.exists()
    own = register(_tiny_factory)  # this process's own callable: accepted
    load_spec(dict(spec, model={"kind": "custom", "factory": own}))
    assert resolve(own, "model.factory") is _tiny_factory


def _tiny_factory():
    import torch

    return torch.nn.Linear(64, 10)
