"""HKDF-SHA256 (RFC 5869) with explicit domain separation.

Every derived key names its *purpose* (a :class:`KeyPurpose`) and its *context* (job id,
round, the two parties and their public keys ...) in HKDF's ``info``. Two derivations that
differ in purpose or context therefore give independent keys even from the same Diffie-Hellman
secret: the channel key and the mask key of a pair can never collide, and a key from round r
is useless in round r+1 (Krawczyk 2010, "Cryptographic Extraction and Key Derivation: The
HKDF Scheme", §3 on the role of ``info``).
"""

from __future__ import annotations

import hmac
from enum import Enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lepton_ray.crypto.encoding import Field, encode_fields
from lepton_ray.errors import ProtocolError

KEY_BYTES = 32


class KeyPurpose(Enum):
    """Domain-separation labels; the value is the label fed to HKDF's ``info``."""

    CHANNEL = b"lepton-ray/v1/secagg/channel-key"
    PAIRWISE_MASK = b"lepton-ray/v1/secagg/pairwise-mask"
    SELF_MASK = b"lepton-ray/v1/secagg/self-mask"
    PUBLIC_RANDOMNESS = b"lepton-ray/v1/public-randomness"
    STOCHASTIC_ROUNDING = b"lepton-ray/v1/quantize/stochastic-rounding"
    DP_SGD_BATCHES = b"lepton-ray/v1/dp-sgd/poisson-batches"
    IDENTITY = b"lepton-ray/v2/party-identity"


def derive_key(secret: bytes, purpose: KeyPurpose, *context: Field,
               length: int = KEY_BYTES, encoded_prefix: bytes = b"") -> bytes:
    """HKDF-SHA256(salt=none, ikm=secret, info=purpose || prefix || encode(context)).

    ``encoded_prefix`` must itself be an :func:`encode_fields` output (callers precompute the
    encoding of fields shared by many derivations, e.g. job id and round).
    """
    info = purpose.value + encoded_prefix + encode_fields(*context)
    return HKDF(algorithm=_SHA256, length=length, salt=None, info=info).derive(secret)


def expand_key(prk: bytes, purpose: KeyPurpose, encoded_info: bytes = b"") -> bytes:
    """HKDF-Expand (RFC 5869 §2.3) of a uniformly random 32-byte key ``prk`` to one 32-byte
    block: HMAC-SHA256(prk, purpose || info || 0x01). For keys that are already HKDF outputs
    (no second extract needed); one HMAC, about a fifth of a full HKDF's cost."""
    if not isinstance(prk, bytes) or len(prk) != KEY_BYTES:
        raise ProtocolError(f"HKDF-Expand needs a {KEY_BYTES}-byte key")
    return hmac.digest(prk, purpose.value + encoded_info + b"\x01", "sha256")


_SHA256 = hashes.SHA256()
