"""HKDF-SHA256 (RFC 5869) with explicit domain separation.

Every derived key names its *purpose* (a :class:`KeyPurpose`) and its *context* (job id,
round, the two parties and their public keys ...) in HKDF's ``info``. Two derivations that
differ in purpose or context therefore give independent keys even from the same Diffie-Hellman
secret: the channel key and the mask key of a pair can never collide, and a key from round r
is useless in round r+1 (Krawczyk 2010, "Cryptographic Extraction and Key Derivation: The
HKDF Scheme", §3 on the role of ``info``).
"""

from __future__ import annotations

from enum import Enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lepton_ray.crypto.encoding import Field, encode_fields

KEY_BYTES = 32


class KeyPurpose(Enum):
    """Domain-separation labels; the value is the label fed to HKDF's ``info``."""

    CHANNEL = b"lepton-ray/v1/secagg/channel-key"
    PAIRWISE_MASK = b"lepton-ray/v1/secagg/pairwise-mask"
    SELF_MASK = b"lepton-ray/v1/secagg/self-mask"
    PUBLIC_RANDOMNESS = b"lepton-ray/v1/public-randomness"
    STOCHASTIC_ROUNDING = b"lepton-ray/v1/quantize/stochastic-rounding"


def derive_key(secret: bytes, purpose: KeyPurpose, *context: Field,
               length: int = KEY_BYTES, encoded_prefix: bytes = b"") -> bytes:
    """HKDF-SHA256(salt=none, ikm=secret, info=purpose || prefix || encode(context)).

    ``encoded_prefix`` must itself be an :func:`encode_fields` output (callers precompute the
    encoding of fields shared by many derivations, e.g. job id and round).
    """
    info = purpose.value + encoded_prefix + encode_fields(*context)
    return HKDF(algorithm=_SHA256, length=length, salt=None, info=info).derive(secret)


_SHA256 = hashes.SHA256()
