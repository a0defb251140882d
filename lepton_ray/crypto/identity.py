"""Long-term party identities (Ed25519, RFC 8032) and the job's roster of admitted keys.

The roster is the public list of identity keys admitted to a job; a party's id is its index
in the roster. Parties sign their per-round key adverts with their identity key, so a
server (or a network attacker) cannot substitute its own Diffie-Hellman keys for a party's:
this is the signature step of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS, §4 round 0-1 in the actively secure variant).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from lepton_ray.errors import ConfigError, ProtocolError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityKey:
    """A party's Ed25519 signing key. Never leaves the party's process (not picklable)."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, entropy: Callable[[int], bytes] = os.urandom) -> IdentityKey:
        """A fresh key from 32 bytes of ``entropy`` (the OS by default)."""
        return cls(Ed25519PrivateKey.from_private_bytes(entropy(32)))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> IdentityKey:
        if len(data) != 32:
            raise ConfigError([f"identity key: expected 32 private-key bytes, got {len(data)}"])
        return cls(Ed25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        """Raw private bytes, for the party's own key store only."""
        return self._private.private_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __reduce__(self):  # refuse to pickle a private key by accident
        raise TypeError("IdentityKey holds a private key and is not picklable")


@dataclass(frozen=True)
class Roster:
    """The job's admitted identity public keys; party id = index in ``public_keys``."""

    def __getstate__(self) -> dict:
        """Only the fields travel: cached hashes are always recomputed by the receiver."""
        return {f: self.__dict__[f] for f in self.__dataclass_fields__}

    public_keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        problems = [
            f"roster[{i}]: expected a {PUBLIC_KEY_BYTES}-byte Ed25519 public key, got "
            f"{type(k).__name__} of length {len(k) if isinstance(k, bytes) else '?'}"
            for i, k in enumerate(self.public_keys)
            if not isinstance(k, bytes) or len(k) != PUBLIC_KEY_BYTES
        ]
        if not problems and len(set(self.public_keys)) != len(self.public_keys):
            problems.append("roster: the same public key is admitted twice")
        if problems:
            raise ConfigError(problems)

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the roster (label, count, every key in order): what a job pins."""
        h = hashlib.sha256(b"lepton-ray/v2/roster")
        h.update(len(self.public_keys).to_bytes(8, "big"))
        for key in self.public_keys:
            h.update(key)
        return h.digest()

    @classmethod
    def of(cls, identities: Iterable[IdentityKey]) -> Roster:
        return cls(tuple(identity.public_bytes for identity in identities))

    def __len__(self) -> int:
        return len(self.public_keys)

    def __contains__(self, party: object) -> bool:
        return isinstance(party, int) and not isinstance(party, bool) and (
            0 <= party < len(self.public_keys))

    def public_key(self, party: int) -> bytes:
        """The identity key of ``party``; :class:`ProtocolError` if it is not in the roster."""
        if party not in self:
            raise ProtocolError(f"party {party!r} is not in the roster of {len(self)} parties")
        return self.public_keys[party]


class SignatureVerifier:
    """Ed25519 verification, memoised on (public key, message, signature).

    Verification is a pure function, so a host that runs many parties can verify each key
    advert once and let every party it hosts reuse the answer: the security is exactly that
    of each party verifying on its own (one host = one trust domain), at 1/k of the cost.
    """

    def __init__(self, max_entries: int = 1 << 16):
        self._max_entries = max_entries
        self._seen: dict[tuple[bytes, bytes, bytes], bool] = {}
        self._keys: dict[bytes, Ed25519PublicKey] = {}

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return False
        cache_key = (public_key, message, signature)
        known = self._seen.get(cache_key)
        if known is not None:
            return known
        key = self._keys.get(public_key)
        if key is None:
            key = Ed25519PublicKey.from_public_bytes(public_key)
            self._keys[public_key] = key
        try:
            key.verify(signature, message)
            ok = True
        except InvalidSignature:
            ok = False
        if len(self._seen) >= self._max_entries:
            self._seen.clear()
        self._seen[cache_key] = ok
        return ok
