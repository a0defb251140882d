"""Checks shared by the party and server state machines: is this message for this job,
round and stage, and is its sender someone we expect? Each returns a :class:`Rejection` or
``None``; the server records rejections, a party raises them as :class:`ProtocolError`."""

from __future__ import annotations

from collections.abc import Collection

from lepton_ray.secagg.plan import RoundConfig
from lepton_ray.secagg.stages import Rejection, RejectionReason, Stage


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def claimed_party(message: object) -> int:
    """The party id a message claims (sender, else receiver), or -1."""
    for name in ("party", "receiver"):
        value = getattr(message, name, None)
        if is_int(value):
            return value
    return -1


def check_header(message: object, expected: type, config: RoundConfig,
                 stage: Stage) -> Rejection | None:
    """Type (= stage), job id and round of ``message``."""
    party = claimed_party(message)
    if not isinstance(message, expected):
        its_stage = getattr(type(message), "STAGE", None)
        reason = (RejectionReason.LATE
                  if isinstance(its_stage, Stage) and its_stage.order < stage.order
                  else RejectionReason.WRONG_STAGE)
        return Rejection(party, stage, reason,
                         f"got {type(message).__name__}, expected {expected.__name__}")
    job_id = getattr(message, "job_id", None)
    if job_id != config.job_id:
        return Rejection(party, stage, RejectionReason.WRONG_JOB,
                         f"job {job_id!r}, this is job {config.job_id!r}")
    round_ = getattr(message, "round", None)
    if not is_int(round_):
        return Rejection(party, stage, RejectionReason.MALFORMED, f"round {round_!r}")
    if round_ < config.round:
        return Rejection(party, stage, RejectionReason.REPLAYED,
                         f"message of round {round_} received in round {config.round}")
    if round_ > config.round:
        return Rejection(party, stage, RejectionReason.WRONG_ROUND,
                         f"message of round {round_} received in round {config.round}")
    return None


def check_sender(party: object, config: RoundConfig, stage: Stage,
                 expected: Collection[int]) -> Rejection | None:
    """``party`` is in the roster, selected for the round and still in the protocol."""
    if not is_int(party) or party not in config.roster or party not in config.graph:
        return Rejection(claimed_party_value(party), stage, RejectionReason.NOT_IN_ROSTER,
                         f"party {party!r} is not a participant of round {config.round}")
    if party not in expected:
        return Rejection(party, stage, RejectionReason.LATE,
                         f"party {party} dropped out before {stage.value}")
    return None


def claimed_party_value(party: object) -> int:
    return party if is_int(party) else -1
