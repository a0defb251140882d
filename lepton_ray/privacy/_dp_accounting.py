"""Lazy, light imports of Google's ``dp_accounting`` (the maths we do not rewrite).

``import dp_accounting`` runs its package ``__init__``, which loads the PLD stack and
``mechanism_calibration`` and with them ``scipy.stats``, ``scipy.optimize`` and
``scipy.signal``: about 1.5-1.9 s on our CI machines. The RDP accountant itself needs only
``numpy``, ``scipy.special`` and ``absl.logging`` (about 0.45 s), and ``lepton-ray epsilon``
must answer in well under a second.

:func:`rdp` therefore loads ``dp_accounting.rdp.rdp_privacy_accountant`` (and the
``dp_event`` / ``privacy_accountant`` modules it needs) *without* running the package
``__init__``: a bare placeholder package with the real ``__path__`` stands in for
``dp_accounting`` while the submodules load, and is removed afterwards. The submodules stay
in ``sys.modules`` under their real names, so a later ``import dp_accounting`` (which
:func:`pld` does) runs the real ``__init__`` and reuses the very same module objects:
``dp_accounting.GaussianDpEvent is dp_event().GaussianDpEvent``. If anything in that
dance fails (a future layout change), we fall back to the plain import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_LOCK = threading.Lock()
_RDP_MODULE = "dp_accounting.rdp.rdp_privacy_accountant"


def _import_without_package_init(name: str) -> types.ModuleType:
    if "dp_accounting" in sys.modules:  # already paid for (or our submodules are loaded)
        return importlib.import_module(name)
    spec = importlib.util.find_spec("dp_accounting")
    if spec is None or spec.submodule_search_locations is None:
        return importlib.import_module(name)
    placeholder = types.ModuleType("dp_accounting")
    placeholder.__path__ = list(spec.submodule_search_locations)
    sys.modules["dp_accounting"] = placeholder
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("dp_accounting") is placeholder:
            del sys.modules["dp_accounting"]


_LOADED: list[Any] = []  # the RDP module once fully imported (set under _LOCK)


def rdp() -> Any:
    """``dp_accounting.rdp.rdp_privacy_accountant`` (fast path, see module docstring).

    Thread-safe: a module sits in ``sys.modules`` while it is still executing, so another
    thread must not take it from there (it saw "partially initialized module ... has no
    attribute 'DEFAULT_RDP_ORDERS'" when two federation sites charged their ledgers at once);
    only a module this function finished importing is handed out."""
    if _LOADED:
        return _LOADED[0]
    with _LOCK:
        if not _LOADED:
            try:
                module = _import_without_package_init(_RDP_MODULE)
            except ImportError:
                raise
            except Exception:  # noqa: BLE001  # pragma: no cover - only if the layout changes
                module = importlib.import_module(_RDP_MODULE)
            _LOADED.append(module)
    return _LOADED[0]


def dp_event() -> Any:
    """``dp_accounting.dp_event`` (loaded together with :func:`rdp`)."""
    rdp()
    return sys.modules["dp_accounting.dp_event"]


def pld() -> Any:
    """``dp_accounting.pld.pld_privacy_accountant`` (plain import; pulls in scipy.stats etc.)."""
    rdp()  # so that dp_event classes are the ones the RDP side already uses
    with _LOCK:
        return importlib.import_module("dp_accounting.pld.pld_privacy_accountant")
