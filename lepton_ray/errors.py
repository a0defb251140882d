"""One small hierarchy for every error Lepton-Ray raises on purpose.

Callers catch :class:`LeptonError` to tell "the user or a peer gave us something wrong"
apart from bugs. The CLI turns any ``LeptonError`` into a one-paragraph message and exit
code 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class LeptonError(Exception):
    """Root of every error Lepton-Ray raises deliberately."""


class ConfigError(LeptonError):
    """A job spec (or an override) is invalid. Carries every problem found, each with its
    field path, so the user fixes them all in one pass."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = tuple(problems)
        self.source = source
        head = f"invalid job spec {source}" if source else "invalid job spec"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}: {len(self.problems)} problem(s)\n{lines}")


class DataError(LeptonError):
    """A data source cannot be read or does not have the shape the spec says it has."""


class ProtocolError(LeptonError):
    """A secure-aggregation message was rejected (wrong round, stage, sender, signature,
    tag, replay). The party that sent it is treated as dropped."""


class ThresholdError(LeptonError):
    """Too few parties remain at some stage of secure aggregation to reconstruct the sum."""


class PrivacyError(LeptonError):
    """Bad privacy parameters or an event an accountant cannot account for."""


class BudgetExhaustedError(PrivacyError):
    """Charging an event would take the job past its (epsilon, delta) budget."""


class ResumeError(LeptonError):
    """A job cannot be resumed from the given output directory."""


class LedgerLockedError(LeptonError):
    """Another process holds a privacy ledger's exclusive lock (a job still running on the
    same output directory); the message names its pid."""


class FederationError(LeptonError):
    """A federation file, startup kit, site policy or wire message is invalid, or a peer
    failed mutual authentication. The message names the file, field or peer."""


def user_message(exc: BaseException) -> str:
    """The text to show a user. An error raised inside a Ray task or actor reaches the driver
    wrapped (``RayTaskError``, also an instance of the original class); show the original."""
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc)
