"""Lepton-Ray: privacy-preserving federated learning on Ray.

``import lepton_ray`` is light: it loads neither Ray nor torch. Only :func:`run` (and the CLI)
reach the Ray runtime in ``actors/``, lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lepton_ray.errors import (
    BudgetExhaustedError,
    ConfigError,
    DataError,
    LeptonError,
    PrivacyError,
    ProtocolError,
    ThresholdError,
)

if TYPE_CHECKING:  # pragma: no cover
    from lepton_ray.result import RunResult

__version__ = "0.1.0"

__all__ = [
    "BudgetExhaustedError",
    "ConfigError",
    "DataError",
    "LeptonError",
    "PrivacyError",
    "ProtocolError",
    "ThresholdError",
    "load_spec",
    "run",
]


def load_spec(spec_or_path: Any, **overrides: Any):
    """Load and validate a job spec from a path, a dict or a ``JobSpec``; see :func:`run`."""
    from lepton_ray.config import load_spec as _load

    return _load(spec_or_path, **overrides)


def run(spec_or_path: Any, *, overwrite: bool = False, resume: Any = None,
        discard_privacy_ledger: bool = False, model: Any = None, data: Any = None,
        **overrides: Any) -> "RunResult":
    """Run a federated job on Ray (an embedded local Ray unless one is already initialised).

    ``spec_or_path`` is a YAML path, a dict with the same sections as the YAML (missing
    fields take their defaults) or a ``JobSpec``. ``overrides`` replace spec fields:
    ``rounds=5``, ``training__lr=0.05`` (``__`` for a dot), or a nested dict
    ``training={"lr": 0.05}``. Returns a :class:`RunResult` with ``history`` (a DataFrame),
    ``summary``, ``model`` and ``predict(X)``. An output directory that already holds a
    job's outputs is refused unless ``overwrite=True``; its privacy ledger is kept (refused)
    unless ``discard_privacy_ledger=True`` too. ``resume=OUT`` continues the job
    whose checkpoint is in ``OUT`` (as ``lepton-ray simulate SPEC --resume OUT``); a job
    that already finished is returned as it is, with no file changed.

    ``model`` (a callable returning a ``torch.nn.Module``) and ``data`` (a callable returning
    ``(X, y)`` or ``{"parties": [...], "test": ...}``) stand in for ``model.factory`` and
    ``data.loader`` (kinds set to ``custom``; ``model.kwargs`` / ``data.kwargs`` still apply),
    for notebooks: they are pickled by value (cloudpickle) to reach Ray's workers.
    """
    if resume is not None:
        overrides["output__dir"] = str(resume)
    # a mapping (model={"kind": "logistic"}) is a section override, as before; a callable
    # is a factory / loader
    for name, value in (("model", model), ("data", data)):
        if value is None:
            continue
        if not callable(value):
            overrides[name] = value
            continue
        from lepton_ray.learning.custom import register

        if name == "model":
            overrides["model__kind"] = "custom"
            overrides["model__factory"] = register(value)
        else:
            overrides["data__source"] = "custom"
            overrides["data__loader"] = register(value)
    spec = load_spec(spec_or_path, **overrides)
    from actors.driver import run_job  # lazy: the only door from the library to Ray

    return run_job(spec, overwrite=overwrite, resume=resume is not None,
                   discard_privacy_ledger=discard_privacy_ledger)
