"""Per-round X25519 key pairs (RFC 7748) and pairwise key derivation.

Each party makes two fresh key pairs per round (Bonawitz et al. 2017, §4 round 0): one for
the *channel* (encrypting Shamir shares to a neighbour) and one for the *masks* (the pairwise
masks that cancel in the sum). They must differ: the mask private key of a party that drops
out is reconstructed by the server, and if it were also the channel key the server could then
decrypt every share that party exchanged, including shares of its neighbours' self-mask seeds.

The Diffie-Hellman output is never used directly: it goes through HKDF with the purpose, job,
round, both party ids and both public keys (ordered by party id, so both ends derive the same
key), binding the key to the exact transcript it belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from lepton_ray.crypto.encoding import encode_fields
from lepton_ray.crypto.kdf import KeyPurpose, derive_key
from lepton_ray.errors import ProtocolError

X25519_KEY_BYTES = 32


class RoundKeyPair:
    """One X25519 key pair, valid for one round. Not picklable on purpose."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: X25519PrivateKey):
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, entropy: Callable[[int], bytes] = os.urandom) -> RoundKeyPair:
        return cls(X25519PrivateKey.from_private_bytes(entropy(X25519_KEY_BYTES)))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> RoundKeyPair:
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
        raise TypeError("RoundKeyPair holds a private key and is not picklable")


def public_key_of(private_bytes: bytes) -> bytes:
    """The X25519 public key that belongs to ``private_bytes`` (used to check a reconstruction)."""
    return RoundKeyPair.from_private_bytes(private_bytes).public_bytes


def pair_key(keys: RoundKeyPair, purpose: KeyPurpose, *, job_id: str, round_: int,
             own: int, peer: int, peer_public: bytes, encoded_context: bytes | None = None
             ) -> bytes:
    """32-byte key for the pair {own, peer}: HKDF(X25519(own, peer), purpose, transcript)
    with transcript = (job id, round, lower id, its key, higher id, its key), so both ends
    agree. ``encoded_context`` may carry ``encode_fields(job_id, round_)`` precomputed.
    """
    shared = keys.exchange(peer_public)
    if own < peer:
        ordered = (own, keys.public_bytes, peer, peer_public)
    else:
        ordered = (peer, peer_public, own, keys.public_bytes)
    prefix = encode_fields(job_id, round_) if encoded_context is None else encoded_context
    return derive_key(shared, purpose, *ordered, encoded_prefix=prefix)
