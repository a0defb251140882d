"""One frozen message type per stage and direction: plain, picklable values.

Party -> server: :class:`AdvertiseKeys`, :class:`ShareKeys`, :class:`MaskedInput` (or, from a
host, :class:`MaskedSum` of its parties' inputs), :class:`ConsistencySignature`,
:class:`UnmaskResponse`, each signed by its sender over content and round transcript
(:mod:`lepton_ray.secagg.signing`). Server -> parties: :class:`KeyBroadcast`,
:class:`ShareInbox`, :class:`ConsistencyRequest`, :class:`UnmaskRequest`; server output:
:class:`AggregateResult`. Every message names its job
and round; its stage is its type (``STAGE``), so a message for the wrong stage is rejected by
its type, not by dictionary checks. A PartyHost sends a list of these per stage for all the
parties it hosts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np

from lepton_ray.crypto.envelope import OVERHEAD_BYTES
from lepton_ray.crypto.shamir import SHARE_BYTES
from lepton_ray.secagg.stages import Rejection, Stage

ENVELOPE_BYTES = OVERHEAD_BYTES + 2 * SHARE_BYTES  # a holder's two shares, sealed



@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 1, party -> server: the party's long-term X25519 public key, signed (Ed25519)
    over (job, party, key) with its roster identity key (see :mod:`lepton_ray.secagg.keys`)."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    job_id: str
    round: int
    party: int
    public_key: bytes
    signature: bytes
    issued: int = 0  # when the party's keyring was made, ns (signed)


@dataclass(frozen=True)
class KeyBroadcast:
    """Stage 1, server -> every party: all accepted adverts (each still signed)."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    job_id: str
    round: int
    adverts: tuple[AdvertiseKeys, ...]

    @cached_property
    def by_party(self) -> dict[int, AdvertiseKeys] | None:
        """Adverts by party id, built once and shared by every party of a host; ``None`` if
        the broadcast is malformed (not a tuple of adverts, or one id twice)."""
        if not isinstance(self.adverts, tuple):
            return None
        index: dict[int, AdvertiseKeys] = {}
        for advert in self.adverts:
            if (not isinstance(advert, AdvertiseKeys) or type(advert.party) is not int
                    or advert.party in index):
                return None
            index[advert.party] = advert
        return index


@dataclass(frozen=True)
class ShareKeys:
    """Stage 2, party -> server: one sealed envelope for each live neighbour, holding the
    party's Shamir shares (self-mask seed, recovery key) for it, opaque to the server:
    ``envelopes`` is their concatenation (``ENVELOPE_BYTES`` each) in ``receivers`` order,
    so a host's thousands of envelopes travel as bytes, not as objects. ``recovery``: this
    round's pairwise mask seeds with those neighbours (in id order), sealed under the
    party's fresh recovery key, which the server can rebuild from t shares only if the
    party drops."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    job_id: str
    round: int
    party: int
    receivers: tuple[int, ...]
    envelopes: bytes
    recovery: bytes = b""
    commitments: bytes = b""  # H(self-mask seed) || H(recovery key), lepton_ray.secagg.signing
    signature: bytes = b""  # over signing.share_statement


@dataclass(frozen=True)
class ShareInbox:
    """Stage 2, server -> one party: the envelopes addressed to it, concatenated in
    ``senders`` order. The senders listed here are exactly the neighbours the receiver must
    mask with."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    job_id: str
    round: int
    receiver: int
    senders: tuple[int, ...]
    envelopes: bytes


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 3, party -> server: input + self mask + pairwise masks in Z_{2^b}, plus the
    neighbours whose envelopes failed authentication (its complaints: this party holds no
    share of theirs; nobody is dropped for a complaint), signed over all of it."""

    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    job_id: str
    round: int
    party: int
    vector: np.ndarray
    rejected_senders: tuple[int, ...] = ()
    signature: bytes = b""  # over signing.masked_statement


@dataclass(frozen=True, eq=False)
class MaskedSum:
    """Stage 3, host -> server: the sum in Z_{2^b} of the masked inputs of ``parties`` (all
    hosted by one PartyHost), the same value as the sum of their :class:`MaskedInput`
    vectors, so the server learns less, never more. ``rejected``: (reporter, senders) for
    each party whose inbox held envelopes that failed authentication. The server takes the
    sum whole or not at all: if one of its parties is dropped, all of them are."""

    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    job_id: str
    round: int
    parties: tuple[int, ...]
    vector: np.ndarray
    rejected: tuple[tuple[int, tuple[int, ...]], ...] = ()
    signatures: tuple[bytes, ...] = ()  # one per party, each over signing.masked_statement


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 4a, server -> survivors: the survivor set U3 whose masked inputs are in the sum
    (Bonawitz et al. 2017, §4, round "ConsistencyCheck")."""

    STAGE: ClassVar[Stage] = Stage.CONSISTENCY
    job_id: str
    round: int
    survivors: tuple[int, ...]


@dataclass(frozen=True)
class ConsistencySignature:
    """Stage 4a, survivor -> server: its signature over (transcript, U3). A party signs one
    survivor set per round, ever."""

    STAGE: ClassVar[Stage] = Stage.CONSISTENCY
    job_id: str
    round: int
    party: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4b, server -> survivors: the survivor set (the same U3), who shared keys but is
    not in it (``dropped``; a party recomputes this itself) and the survivors' consistency
    signatures, ``(party, signature)``. A holder reveals nothing unless t of its neighbourhood
    signed this very U3, and then, per party, the share of its self-mask seed (survivor) or of
    its recovery key (dropped), never both."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    job_id: str
    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()

    @cached_property
    def signature_of(self) -> dict[int, bytes] | None:
        """Signatures by party, built once and shared by every party of a host; ``None`` if
        malformed (a party twice, or not (int, bytes) pairs)."""
        if not isinstance(self.signatures, tuple):
            return None
        out: dict[int, bytes] = {}
        for item in self.signatures:
            if (not isinstance(item, tuple) or len(item) != 2 or type(item[0]) is not int
                    or not isinstance(item[1], bytes) or item[0] in out):
                return None
            out[item[0]] = item[1]
        return out



@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, party -> server: its shares of survivors' self-mask seeds (owners in
    ``seed_owners``, shares concatenated in that order, ``SHARE_BYTES`` each) and of dropped
    parties' recovery keys (``recovery_owners`` / ``recovery_shares``, likewise)."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    job_id: str
    round: int
    party: int
    seed_owners: tuple[int, ...]
    seed_shares: bytes
    recovery_owners: tuple[int, ...]
    recovery_shares: bytes
    signature: bytes = b""  # over signing.unmask_statement


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """What the server outputs: the sum in Z_{2^b} of the inputs of ``survivors`` and nothing
    about any single party. ``dropped`` lists every other participant; ``rejections`` every
    rejected message of the round."""

    job_id: str
    round: int
    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    neighbours: int
    threshold: int
    modulus_bits: int
    rejections: tuple[Rejection, ...] = field(default=())


PARTY_MESSAGES = (AdvertiseKeys, ShareKeys, MaskedInput, MaskedSum, ConsistencySignature,
                  UnmaskResponse)
SERVER_MESSAGES = (KeyBroadcast, ShareInbox, ConsistencyRequest, UnmaskRequest)
