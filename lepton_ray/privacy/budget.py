"""A job's (epsilon, delta) privacy budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lepton_ray.errors import PrivacyError

__all__ = ["PrivacyBudget"]


@dataclass(frozen=True, kw_only=True)
class PrivacyBudget:
    """Total (epsilon, delta) a job may spend: charges are refused once the composed
    epsilon at this ``delta`` would exceed ``epsilon``."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        e, d = self.epsilon, self.delta
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e <= 0:
            raise PrivacyError(f"budget epsilon must be positive and finite, got {e!r}")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
            raise PrivacyError(f"budget delta must be in (0, 1), got {d!r}")
