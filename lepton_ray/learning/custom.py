"""Bring your own model, data, loss and training loop.

A spec names user code as ``"package.module:function"`` (``model.factory``, ``data.loader``,
``training.loss``, ``training.loop``); the module must be importable on every node (the
working directory of a Ray job, an installed package, or a ``--path`` on ``sys.path``), or,
from Python, the callable is passed directly (``lepton_ray.run(spec, model=fn, data=fn)``,
see :func:`register`). Every problem is reported as an error naming the reference.

Functional safety. Vectorised training (:mod:`lepton_ray.learning.vectorised`) runs one
architecture with a stack of parameter sets through ``torch.func.functional_call``: that is
only the same computation as training each party alone when ``forward`` is a pure function
of (parameters, input). A module that mutates its buffers in ``forward`` (BatchNorm's running
statistics, a step counter) is not; :func:`functional_blocker` detects it by running a
training-mode forward on a few sample rows and comparing every buffer before and after, and
such a model is trained one party at a time. Its buffers are not parameters: they do not
travel in the flat vector, are not aggregated, and stay at their initial values in the global
model (BatchNorm in eval mode then normalises with mean 0, variance 1).

Data. A loader returns one pool ``(X, y)`` (any feature shape, e.g. ``N x C x H x W``;
``data.partition`` and ``data.test_fraction`` then apply as for built-in sources) or a
mapping ``{"parties": [(X_1, y_1), ...], "test": (X_t, y_t)}`` (``"test"`` optional).
Labels must be integers ``0..C-1`` (C = the largest label + 1 over every split); features
must be finite real numbers of one shape. ``data.standardize`` on custom data standardises
every feature element separately (for images: per pixel and channel) with the mean and
standard deviation of the training rows, exactly what it does to a tabular column; constant
elements keep scale 1. Turn it off for data the loader has already normalised.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lepton_ray.errors import ConfigError, DataError

PYTHON_PREFIX = "__python__:"
_DECODED: dict[str, Callable] = {}


def register(fn: Callable) -> str:
    """A reference for a Python callable (``lepton_ray.run(spec, model=fn, data=fn)``): the
    callable pickled by value with cloudpickle, base64 in the string, so Ray workers (and a
    resumed job) rebuild it without importing the notebook it was defined in. Only for code
    you trust: resolving the reference runs the pickle."""
    import base64

    try:
        import cloudpickle
    except ImportError:  # Ray vendors it
        from ray import cloudpickle  # type: ignore[no-redef]
    blob = base64.b64encode(cloudpickle.dumps(fn)).decode("ascii")
    ref = f"{PYTHON_PREFIX}{getattr(fn, '__name__', 'callable')}:{blob}"
    _DECODED[ref] = fn
    return ref


def registered(ref: str) -> bool:
    """Whether ``ref`` is a pickled callable this process made with :func:`register` (the
    only ones a spec may carry: anything else would unpickle foreign code)."""
    return ref in _DECODED


def show(ref: str | None) -> str:
    """A reference for messages: a pickled Python callable by its name only."""
    if ref and ref.startswith(PYTHON_PREFIX):
        return f"<python callable {ref.split(':')[1]}>"
    return str(ref)


def resolve(ref: str, field: str) -> Callable:
    """The callable ``"package.module:function"`` names; :class:`ConfigError` naming ``field``
    and ``ref`` when it cannot be imported or is not callable."""
    if ref.startswith(PYTHON_PREFIX):
        if ref not in _DECODED:
            import base64
            import pickle

            _DECODED[ref] = pickle.loads(base64.b64decode(ref.rsplit(":", 1)[1]))
        return _DECODED[ref]
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing to import
        raise ConfigError([f"{field}: cannot import module '{module_name}' of {ref!r}: "
                           f"{type(exc).__name__}: {exc} (is it installed or on sys.path on "
                           f"every node?)"]) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError([f"{field}: module '{module_name}' has no attribute '{attr}' ({ref!r})"])
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError([f"{field}: {ref!r} is a {type(obj).__name__}, not a callable"])
    return obj


# --------------------------------------------------------------------------- models


def build_custom_model(model_spec, *, seed: int = 0):
    """``factory(**kwargs)`` with torch's RNG seeded with 0, whatever ``seed`` (the job's seed,
    ignored here): training tasks rebuild the model on every node, and frozen weights and
    buffers, which do not travel, must be identical everywhere. (Vary the init through your
    own kwargs.) Checked to be an ``nn.Module`` with at least one trainable floating parameter."""
    seed = 0
    import torch
    from torch import nn

    fn = resolve(model_spec.factory, "model.factory")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = fn(**dict(model_spec.kwargs))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError([f"model.factory: {show(model_spec.factory)}(**{dict(model_spec.kwargs)}) "
                           f"failed: {type(exc).__name__}: {exc}"]) from None
    finally:
        torch.random.set_rng_state(gen_state)
    if not isinstance(model, nn.Module):
        raise ConfigError([f"model.factory: {show(model_spec.factory)} returned a "
                           f"{type(model).__name__}, not a torch.nn.Module"])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError([f"model.factory: {show(model_spec.factory)} built a module with no "
                           f"trainable parameters"])
    if any(not p.is_floating_point() for p in params):
        raise ConfigError([f"model.factory: {show(model_spec.factory)} has non-floating parameters"])
    return model.float()


def check_model_output(model, factory: str, sample: np.ndarray, n_classes: int) -> None:
    """The model maps ``(b, *feature_shape)`` to ``(b, n_classes)`` logits, or a clear error
    naming the factory."""
    import torch

    x = torch.as_tensor(np.asarray(sample, dtype=np.float32))
    probe = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as exc:
        raise ConfigError([f"model.factory: {show(factory)} cannot take input of shape "
                           f"{tuple(x.shape)} (batch x the data's feature shape): "
                           f"{type(exc).__name__}: {exc}"]) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], n_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError([f"model.factory: {show(factory)} outputs {shape} for input "
                           f"{tuple(x.shape)}; the data has {n_classes} classes, so the output "
                           f"must be logits of shape ({x.shape[0]}, {n_classes})"])


def functional_blocker(model, sample: np.ndarray | None) -> str | None:
    """Why ``model`` is not functional-safe (its ``forward`` mutates a buffer), or ``None``.

    Runs one training-mode forward on a copy with ``sample`` rows and compares every buffer;
    without a sample (or when the forward fails on it) any BatchNorm-like module that tracks
    running statistics counts as mutating."""
    import torch

    probe = copy.deepcopy(model).train()
    names = [n for n, _ in probe.named_buffers()]
    if not names:
        return None
    if sample is not None and len(sample) >= 2:
        before = {n: b.detach().clone() for n, b in probe.named_buffers()}
        try:
            with torch.no_grad():
                probe(torch.tensor(np.asarray(sample[:4], dtype=np.float32)))
            changed = [n for n, b in probe.named_buffers() if not torch.equal(before[n], b)]
        except Exception:
            changed = None
        if changed is not None:
            if not changed:
                return None
            return (f"the model mutates buffers in forward ({', '.join(changed[:3])}"
                    f"{', ...' if len(changed) > 3 else ''}), e.g. BatchNorm running statistics, "
                    f"so torch.func cannot vectorise it")
    tracking = [n for n, m in probe.named_modules() if getattr(m, "track_running_stats", False)]
    if tracking:
        return (f"the model has modules tracking running statistics ({', '.join(tracking[:3])}), "
                f"so torch.func cannot vectorise it")
    return None


# --------------------------------------------------------------------------- losses, loops


def resolve_loss(ref: str | None):
    """``(logits, targets) -> per-example losses (b,)``; ``None``: cross-entropy."""
    if ref is None:
        return None
    return resolve(ref, "training.loss")


def per_example_loss(loss, logits, targets):
    """Cross-entropy (``loss is None``) or the user's loss, as a ``(b,)`` tensor; a user loss
    that returns anything else is an error naming it (a mean cannot be re-weighted when a
    batch is padded, nor clipped per sample for DP-SGD)."""
    from torch import nn

    if loss is None:
        return nn.functional.cross_entropy(logits, targets, reduction="none")
    out = loss(logits, targets)
    if getattr(out, "shape", None) != targets.shape[:1]:
        raise ConfigError([f"training.loss: must return one loss per example, shape "
                           f"({targets.shape[0]},), got {tuple(getattr(out, 'shape', ()))}"])
    return out


# --------------------------------------------------------------------------- data


def load_custom(spec) -> tuple[Any, Any]:
    """Call ``data.loader(**data.kwargs)``; returns ``(pool, None)`` for one pool ``(X, y)``
    or ``(parties, test)`` for the per-party form, each validated (:func:`check_arrays`)."""
    fn = resolve(spec.loader, "data.loader")
    try:
        got = fn(**dict(spec.kwargs))
    except (ConfigError, DataError):
        raise
    except Exception as exc:
        raise DataError(f"data.loader: {show(spec.loader)}(**{dict(spec.kwargs)}) failed: "
                        f"{type(exc).__name__}: {exc}") from None
    where = f"data.loader {show(spec.loader)}"
    if isinstance(got, Mapping):
        unknown = set(got) - {"parties", "test"}
        if "parties" not in got or unknown:
            raise DataError(f"{where}: a mapping must have key 'parties' (and optionally "
                            f"'test'), got keys {sorted(map(str, got))}")
        parties = got["parties"]
        if not isinstance(parties, (list, tuple)) or not parties:
            raise DataError(f"{where}: 'parties' must be a non-empty list of (X, y)")
        checked = [check_arrays(p, f"{where} parties[{i}]") for i, p in enumerate(parties)]
        test = got.get("test")
        test = check_arrays(test, f"{where} test") if test is not None else None
        shapes = {X.shape[1:] for X, _ in checked} | ({test[0].shape[1:]} if test else set())
        if len(shapes) > 1:
            raise DataError(f"{where}: parties (and test) have different feature shapes "
                            f"{sorted(shapes)}")
        return checked, test
    return check_arrays(got, where), None


def check_arrays(pair, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` as float64 features of shape ``(n, *feature_shape)`` and int64 labels
    ``(n,)`` >= 0; shapes, dtypes, NaN/inf and label values checked with clear errors."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise DataError(f"{where}: expected a pair (X, y), got {type(pair).__name__}")
    X, y = (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for v in pair)
    if X.dtype.kind not in "biuf":
        raise DataError(f"{where}: X must be numeric, got dtype {X.dtype}")
    if X.ndim < 2:
        raise DataError(f"{where}: X must have shape (n, *feature_shape), got {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"{where}: y must have shape ({len(X)},) to match X {X.shape}, got {y.shape}")
    if len(y) == 0:
        raise DataError(f"{where}: no rows")
    X = X.astype(np.float64)
    bad = ~np.isfinite(X.reshape(len(X), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: NaN or inf features in rows {np.flatnonzero(bad)[:5].tolist()}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise DataError(f"{where}: labels must be integers 0..C-1, got non-integer values")
    elif y.dtype.kind not in "biu":
        raise DataError(f"{where}: labels must be integers 0..C-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{where}: labels must be integers 0..C-1, got {int(y.min())}")
    return X, y


def standardisation(X: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean and scale over the rows (see the module docstring)."""
    if not enabled:
        return np.zeros(X.shape[1:]), np.ones(X.shape[1:])
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale


def load_custom_federated(spec, n_parties: int, seed: int):
    """``data.source: custom`` as a :class:`~lepton_ray.learning.data.FederatedData`: a pool is
    split into test and training rows and partitioned like a built-in source; the per-party
    form is used as given (without ``"test"`` the server has no test set: its metrics are
    NaN)."""
    from sklearn.model_selection import train_test_split

    from lepton_ray.config import PartitionKind
    from lepton_ray.learning.data import FederatedData
    from lepton_ray.learning.partition import partition_dirichlet, partition_iid

    parties, test = load_custom(spec)
    if test is None and isinstance(parties, tuple):  # one pool
        X, y = parties
        idx = np.arange(len(y))
        stratify = y if np.min(np.bincount(y)) >= 2 else None
        train_idx, test_idx = train_test_split(idx, test_size=spec.test_fraction,
                                               random_state=seed, stratify=stratify)
        if len(train_idx) < n_parties:
            raise DataError(f"parties.count: {n_parties} parties but only {len(train_idx)} "
                            f"training rows from data.loader {show(spec.loader)}")
        n_classes = int(y.max()) + 1
        mean, scale = standardisation(X[train_idx], spec.standardize)
        X_train, y_train = (X[train_idx] - mean) / scale, y[train_idx]
        rng = np.random.default_rng([seed, 0xDA7A])
        if spec.partition.kind is PartitionKind.DIRICHLET:
            shards = partition_dirichlet(y_train, n_parties, spec.partition.alpha, rng,
                                         min_size=spec.partition.min_size)
        else:
            shards = partition_iid(len(y_train), n_parties, rng)
        pairs = [(X_train[s], y_train[s]) for s in shards]
        X_test, y_test = (X[test_idx] - mean) / scale, y[test_idx]
    else:
        if len(parties) != n_parties:
            raise DataError(f"parties.count: is {n_parties} but data.loader {show(spec.loader)} "
                            f"returned {len(parties)} parties")
        n_classes = int(max(int(y.max()) for _, y in parties + ([test] if test else []))) + 1
        mean, scale = standardisation(np.concatenate([X for X, _ in parties]), spec.standardize)
        pairs = [((X - mean) / scale, y) for X, y in parties]
        if test is not None:
            X_test, y_test = (test[0] - mean) / scale, test[1]
        else:
            X_test = np.zeros((0, *parties[0][0].shape[1:]))
            y_test = np.zeros(0, dtype=np.int64)
    if n_classes < 2:
        raise DataError(f"data.loader {show(spec.loader)}: labels have a single class; need >= 2")
    shape = pairs[0][0].shape[1:]
    return FederatedData(
        parties=tuple(pairs),
        X_test=np.asarray(X_test, dtype=np.float32),
        y_test=np.asarray(y_test, dtype=np.int64),
        classes=np.arange(n_classes),
        feature_names=tuple(f"x{i}" for i in range(int(np.prod(shape)))),
        mean=mean,
        scale=scale,
    )


class PartyLoader:
    """One party's rows as shuffled ``(x, y)`` batches; every ``for`` over it is one epoch
    with a fresh permutation. (Not a ``torch.utils.data.DataLoader``: its iterator draws an
    extra number from the generator, so the order would differ from the built-in loop.)"""

    def __init__(self, X, y, batch_size: int, seed: int):
        import torch

        from lepton_ray.learning.local import torch_seed

        self.X, self.y, self.batch_size = X, y, batch_size
        self.generator = torch.Generator().manual_seed(torch_seed(seed))

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        import torch

        order = torch.randperm(len(self.y), generator=self.generator).to(self.X.device)
        for b in range(0, len(order), self.batch_size):
            idx = order[b: b + self.batch_size]
            yield self.X[idx], self.y[idx]


def train_with_loop(model, start, X, y, training, seed: int, device) -> float:
    """Run ``training.loop(model=, loader=, training=, device=)`` on one party's rows.

    The loader (:class:`PartyLoader`) yields the party's ``(x, y)`` batches of
    ``training.batch_size`` in the order the built-in loop uses (one ``randperm`` per pass from
    a generator seeded with the party's training seed). FedProx (``training.proximal_mu``, Li et al. 2020) still applies: a gradient hook
    on every parameter adds ``mu * (w - w_global)``, the gradient of the proximal term
    ``(mu/2) ||w - w_global||^2``, to whatever gradient the user's loop computes with
    ``backward()``. Returns the loop's ``"loss"`` if its dict has one, else the mean loss
    (cross-entropy or ``training.loss``) over the party's rows after training."""
    import torch

    fn = resolve(training.loop, "training.loop")
    X_t = torch.tensor(np.asarray(X, dtype=np.float32), device=device)
    y_t = torch.tensor(np.asarray(y, dtype=np.int64), device=device)
    loader = PartyLoader(X_t, y_t, training.batch_size, seed)
    hooks = []
    if training.proximal_mu > 0:
        mu, offset = training.proximal_mu, 0
        for p in [q for q in model.parameters() if q.requires_grad]:
            anchor = start[offset: offset + p.numel()].view_as(p).detach()
            offset += p.numel()
            hooks.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    model.train()
    try:
        out = fn(model=model, loader=loader, training=training, device=device)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(out, Mapping) and "loss" in out:
        return float(out["loss"])
    if out is not None and not isinstance(out, Mapping):
        raise ConfigError([f"training.loop: {show(training.loop)} must return None or a dict of "
                           f"metrics, got {type(out).__name__}"])
    loss = resolve_loss(training.loss)
    with torch.no_grad():
        return float(per_example_loss(loss, model(X_t), y_t).mean())


def validate(spec, data, model) -> str:
    """Checks a custom model against the data before any party trains (output shape, DP-SGD
    on a non-functional model) and returns the training path: ``"vectorised"`` or
    ``"one party at a time: <why>"`` (printed once by the driver, kept in ``summary.json``)."""
    from lepton_ray.config import ModelKind
    from lepton_ray.learning.vectorised import vectorise_blocker

    sample = data.X_test[:4] if len(data.X_test) >= 2 else data.parties[0][0][:4] if data.parties else None
    if spec.model.kind is ModelKind.CUSTOM and sample is not None:
        check_model_output(model, spec.model.factory, sample, data.n_classes)
        if spec.privacy.dp_sgd.enabled and functional_blocker(model, sample):
            raise ConfigError([f"privacy.dp_sgd: model.factory {show(spec.model.factory)} mutates "
                               f"buffers in forward (e.g. BatchNorm); per-sample gradients are "
                               f"undefined for it. Use GroupNorm/LayerNorm, or drop dp_sgd"])
    if not spec.training.vectorised:
        return "one party at a time: training.vectorised is false"
    reason = vectorise_blocker(spec.model, spec.training, dp_sgd=spec.privacy.dp_sgd.enabled,
                               sample=sample)
    return "vectorised" if reason is None else f"one party at a time: {reason}"
