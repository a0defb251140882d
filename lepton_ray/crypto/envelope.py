"""Sealed envelopes: AES-256-GCM whose associated data binds who, when and what.

Associated data = encode(job id, round, stage, sender, receiver). GCM authenticates it along
with the ciphertext (McGrew & Viega 2004; NIST SP 800-38D), so an envelope that is replayed
into another job, round or stage, or re-addressed to another receiver or attributed to another
sender, fails its tag exactly like a ciphertext with a flipped bit. Nonces are 96 random bits
from the OS; each channel key is used for a handful of envelopes per round, far below the
2**32 random-nonce limit of SP 800-38D §8.3.

Wire format: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lepton_ray.crypto.encoding import encode_fields
from lepton_ray.errors import ProtocolError

NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
_AD_LABEL = b"lepton-ray/v1/envelope"
_INT_TAG = b"i\x00\x00\x00\x08"  # encode_fields' header of an int field
_INT_PAIR = struct.Struct(">5sQ5sQ")
_MAX_ID = 2**64


@dataclass(frozen=True)
class EnvelopeHeader:
    """What an envelope is bound to. ``stage`` is any protocol enum member."""

    job_id: str
    round: int
    stage: Enum
    sender: int
    receiver: int

    def associated_data(self) -> bytes:
        """encode(label, job id, round, stage, sender, receiver)."""
        return _ad_prefix(self.job_id, self.round, self.stage) + _ids(self.sender,
                                                                      self.receiver)


def _ids(sender: int, receiver: int) -> bytes:
    """encode_fields(sender, receiver), without its loop in the common case of two ids."""
    if type(sender) is int and type(receiver) is int and 0 <= min(sender, receiver) \
            and max(sender, receiver) < _MAX_ID:
        return _INT_PAIR.pack(_INT_TAG, sender, _INT_TAG, receiver)
    return encode_fields(sender, receiver)


@lru_cache(maxsize=256)
def _ad_prefix(job_id: str, round_: int, stage: Enum) -> bytes:
    return encode_fields(_AD_LABEL, job_id, round_, f"{type(stage).__name__}.{stage.name}")


def channel_cipher(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise ProtocolError(f"AES-256-GCM needs a 32-byte key, got {len(key)}")
    return AESGCM(key)


def seal(cipher: AESGCM, header: EnvelopeHeader, plaintext: bytes,
         entropy: Callable[[int], bytes] = os.urandom) -> bytes:
    nonce = entropy(NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, plaintext, header.associated_data())


def seal_batch(job_id: str, round_: int, stage: Enum, sender: int, receivers: Sequence[int],
               ciphers: Sequence[AESGCM], plaintexts: Sequence[bytes],
               entropy: Callable[[int], bytes] = os.urandom) -> bytes:
    """:func:`seal` from ``sender`` to each of ``receivers`` (under the matching cipher), the
    envelopes concatenated; one ``entropy`` call draws every nonce."""
    prefix = _ad_prefix(job_id, round_, stage)
    nonces = entropy(NONCE_BYTES * len(receivers))
    out = []
    for i, (receiver, cipher, plaintext) in enumerate(zip(receivers, ciphers, plaintexts,
                                                          strict=True)):
        nonce = nonces[i * NONCE_BYTES:(i + 1) * NONCE_BYTES]
        out.append(nonce)
        out.append(cipher.encrypt(nonce, plaintext, prefix + _ids(sender, receiver)))
    return b"".join(out)


def open_batch(job_id: str, round_: int, stage: Enum, senders: Sequence[int], receiver: int,
               ciphers: Sequence[AESGCM | None], envelopes: bytes,
               size: int) -> list[bytes | None]:
    """:func:`open_envelope` of each ``size``-byte envelope of ``envelopes`` (one per sender,
    in order): its plaintext, or ``None`` where the tag fails (or the cipher is ``None``)."""
    if size < OVERHEAD_BYTES or len(envelopes) != size * len(senders):
        raise ProtocolError(f"expected {len(senders)} envelopes of {size} bytes, got "
                            f"{len(envelopes)} bytes")
    prefix = _ad_prefix(job_id, round_, stage)
    out: list[bytes | None] = []
    for i, (sender, cipher) in enumerate(zip(senders, ciphers, strict=True)):
        start = i * size
        if cipher is None:  # the caller has no key for this sender
            out.append(None)
            continue
        try:
            out.append(cipher.decrypt(envelopes[start:start + NONCE_BYTES],
                                      envelopes[start + NONCE_BYTES:start + size],
                                      prefix + _ids(sender, receiver)))
        except InvalidTag:
            out.append(None)
    return out


def open_envelope(cipher: AESGCM, header: EnvelopeHeader, envelope: bytes) -> bytes:
    """Decrypt and authenticate; :class:`ProtocolError` if anything was altered."""
    if not isinstance(envelope, bytes) or len(envelope) < OVERHEAD_BYTES:
        raise ProtocolError(f"envelope from party {header.sender} is too short to be valid")
    try:
        return cipher.decrypt(envelope[:NONCE_BYTES], envelope[NONCE_BYTES:],
                              header.associated_data())
    except InvalidTag as err:
        raise ProtocolError(
            f"envelope from party {header.sender} to party {header.receiver} failed its "
            f"AES-GCM tag (tampered, replayed from another round/stage, or wrong key)") from err
