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
from collections.abc import Callable
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
        prefix = _ad_prefix(self.job_id, self.round, self.stage)
        sender, receiver = self.sender, self.receiver
        if type(sender) is int and type(receiver) is int and 0 <= min(sender, receiver) \
                and max(sender, receiver) < _MAX_ID:  # the common case, without the loop
            return prefix + _INT_PAIR.pack(_INT_TAG, sender, _INT_TAG, receiver)
        return prefix + encode_fields(sender, receiver)


@lru_cache(maxsize=256)
def _ad_prefix(job_id: str, round_: int, stage: Enum) -> bytes:
    return encode_fields(_AD_LABEL, job_id, round_, f"{type(stage).__name__}.{stage.name}")


def channel_cipher(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise ProtocolError(f"AES-256-GCM needs a 32-byte key, got {len(key)}")
    return AESGCM(key)


def seal(cipher: AESGCM, header: EnvelopeHeader, plaintext: bytes,
         entropy: Callable[[int], bytes] = os.urandom, *, nonce: bytes | None = None) -> bytes:
    """Encrypt and bind to ``header``. The nonce is 12 bytes from ``entropy``, or ``nonce``
    when the caller drew many at once (they must be fresh random bytes too)."""
    if nonce is None:
        nonce = entropy(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise ProtocolError(f"an envelope nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
    return nonce + cipher.encrypt(nonce, plaintext, header.associated_data())


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
