"""The stages of a SecAgg+ round and the reasons a message can be rejected.

Stages follow Bonawitz et al. 2017 (CCS, Fig. 4) as adapted to a sparse graph by Bell et al.
2020 (CCS, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", §3):
advertise keys -> share keys -> masked input -> consistency check (Bonawitz §4: every survivor
signs the survivor set) -> unmask (-> the server outputs the sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lepton_ray.errors import ConfigError, ProtocolError


class Stage(Enum):
    """A protocol stage; the value is its name in configs and dropout maps."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"

    @property
    def order(self) -> int:
        return _ORDER[self]

    @classmethod
    def parse(cls, value: Stage | str) -> Stage:
        """A :class:`Stage` from itself or its value; :class:`ConfigError` naming bad input."""
        if isinstance(value, Stage):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ConfigError([f"stage: unknown stage {value!r} (expected one of {names})"]
                              ) from None


_ORDER = {stage: i for i, stage in enumerate(Stage)}


class RejectionReason(Enum):
    """Why a message was rejected; the value is the human-readable explanation."""

    WRONG_STAGE = "message type belongs to another stage"
    LATE = "message for a stage that has closed, or from a party that already dropped out"
    WRONG_JOB = "message for another job"
    REPLAYED = "message from an earlier round (replay)"
    WRONG_ROUND = "message for another (future) round"
    NOT_IN_ROSTER = "sender is not in the roster or was not selected for this round"
    BAD_SIGNATURE = "signature missing or invalid under the sender's roster key"
    TAMPERED = "authenticated decryption failed (AES-GCM tag)"
    DUPLICATE_PARTY = "more than one message with this party id in one stage"
    MALFORMED = "message content has the wrong type, size, shape, dtype or recipients"
    BAD_SHARE = "a revealed share does not lie on the owner's committed secret (cheater)"
    IMPERSONATION = "message for a party that its sender does not host"


@dataclass(frozen=True)
class Rejection:
    """A rejected message: the claimed sender (-1 if none could be read), the stage it was
    rejected at, why, and the details. The sender is treated as dropped."""

    party: int
    stage: Stage
    reason: RejectionReason
    detail: str

    def error(self) -> ProtocolError:
        """The :class:`ProtocolError` this rejection stands for."""
        return ProtocolError(str(self))

    def __str__(self) -> str:
        return (f"party {self.party} at {self.stage.value}: {self.reason.name} "
                f"({self.reason.value}): {self.detail}")
