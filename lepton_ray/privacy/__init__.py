"""Differential privacy for Lepton-Ray: pure, Ray-free, torch-free at import.

* :mod:`~lepton_ray.privacy.events` - privacy events (frozen, nestable, JSON round-trip)
* :mod:`~lepton_ray.privacy.accountants` - RDP and PLD accountants over Google's
  dp_accounting, one interface, ``register_rdp`` for our own mechanisms
* :mod:`~lepton_ray.privacy.calibration` - ``compute_epsilon``, ``calibrate_noise``,
  record-level epsilon of local DP-SGD
* :mod:`~lepton_ray.privacy.budget`, :mod:`~lepton_ray.privacy.ledger` - the (epsilon, delta)
  budget and its fsynced write-ahead ledger
* :mod:`~lepton_ray.privacy.mechanisms` - clip at the party, Gaussian noise on the aggregate,
  AES-CTR normal source
* :mod:`~lepton_ray.privacy.adaptive_clipping` - quantile-tracking clip norm (Andrew et al.)
* :mod:`~lepton_ray.privacy.skellam`, :mod:`~lepton_ray.privacy.rotation` - distributed DP
  inside secure aggregation (Skellam mechanism, Agarwal et al. 2021); importing this package
  registers the Skellam RDP with the accountant, so ledgers holding Skellam charges replay
* :mod:`~lepton_ray.privacy.dpsgd` - per-sample DP-SGD with torch.func; **not** imported
  here (it loads torch): ``from lepton_ray.privacy.dpsgd import dp_sgd_step``

dp_accounting is imported lazily, on the first epsilon computed.
"""

from __future__ import annotations

from lepton_ray.privacy.accountants import (
    Accountant,
    AccountantKind,
    PldAccountant,
    RdpAccountant,
    make_accountant,
    register_rdp,
)
from lepton_ray.privacy.adaptive_clipping import (
    AdaptiveClipping,
    adaptive_clipping_event,
    split_noise_multiplier,
)
from lepton_ray.privacy import skellam as _skellam  # noqa: F401  registers the Skellam RDP
from lepton_ray.privacy import discrete_gaussian as _discrete_gaussian  # noqa: F401  its RDP
from lepton_ray.privacy.budget import PrivacyBudget
from lepton_ray.privacy.calibration import (
    calibrate_noise,
    compute_epsilon,
    record_level_epsilon,
    record_level_event,
    sampled_gaussian_event,
)
from lepton_ray.privacy.events import (
    Composed,
    Event,
    EventKind,
    Gaussian,
    Laplace,
    PoissonSampled,
    SelfComposed,
    event_from_dict,
)
from lepton_ray.privacy.ledger import Ledger, LedgerLock, LedgerRow, discard_ledger, read_ledger
from lepton_ray.privacy.mechanisms import (
    NormalSource,
    SecureNormalSource,
    add_gaussian_noise,
    clip_to_norm,
)

__all__ = [
    "Accountant",
    "AccountantKind",
    "AdaptiveClipping",
    "Composed",
    "Event",
    "EventKind",
    "Gaussian",
    "Laplace",
    "Ledger",
    "LedgerLock",
    "LedgerRow",
    "NormalSource",
    "PldAccountant",
    "PoissonSampled",
    "PrivacyBudget",
    "RdpAccountant",
    "SecureNormalSource",
    "SelfComposed",
    "adaptive_clipping_event",
    "add_gaussian_noise",
    "calibrate_noise",
    "clip_to_norm",
    "compute_epsilon",
    "discard_ledger",
    "event_from_dict",
    "make_accountant",
    "read_ledger",
    "record_level_epsilon",
    "record_level_event",
    "register_rdp",
    "sampled_gaussian_event",
    "split_noise_multiplier",
]
