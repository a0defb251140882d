"""X25519 key pairs (RFC 7748) and pairwise key derivation.

The Diffie-Hellman output is never used directly: it goes through HKDF with the purpose, the
context (job id), both party ids and both public keys (ordered by party id, so both ends
derive the same key), binding the key to the exact transcript it belongs to. Distinct purposes
give independent keys from one exchange (the channel key and the pairwise mask key of a pair;
see :mod:`lepton_ray.secagg.keys`). No private key is ever revealed by the protocol.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from lepton_ray.crypto.kdf import KeyPurpose, derive_key
from lepton_ray.errors import ProtocolError

X25519_KEY_BYTES = 32


class X25519KeyPair:
    """One X25519 key pair. Not picklable on purpose."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: X25519PrivateKey):
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, entropy: Callable[[int], bytes] = os.urandom) -> X25519KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(entropy(X25519_KEY_BYTES)))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519KeyPair:
        if len(data) != X25519_KEY_BYTES:
            raise ProtocolError(f"X25519 private key must be 32 bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret with ``peer_public``.

        :class:`ProtocolError` if the peer key is malformed or of small order (the shared
        secret would be all zeros, RFC 7748 §6.1).
        """
        if not isinstance(peer_public, bytes) or len(peer_public) != X25519_KEY_BYTES:
            raise ProtocolError("peer X25519 public key must be 32 bytes")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as err:
            raise ProtocolError(f"X25519 exchange failed (small-order peer key?): {err}") from err

    def __reduce__(self):
        raise TypeError("X25519KeyPair holds a private key and is not picklable")


def public_key_of(private_bytes: bytes) -> bytes:
    """The X25519 public key that belongs to ``private_bytes``."""
    return X25519KeyPair.from_private_bytes(private_bytes).public_bytes


def pair_key(shared: bytes, purpose: KeyPurpose, *, own: int, own_public: bytes, peer: int,
             peer_public: bytes, encoded_context: bytes) -> bytes:
    """32-byte key for the pair {own, peer} from their X25519 output ``shared``:
    HKDF(shared, purpose, context, lower id, its key, higher id, its key), so both ends
    agree. ``encoded_context`` is an :func:`encode_fields` output (e.g. of the job id)."""
    if own < peer:
        ordered = (own, own_public, peer, peer_public)
    else:
        ordered = (peer, peer_public, own, own_public)
    return derive_key(shared, purpose, *ordered, encoded_prefix=encoded_context)
