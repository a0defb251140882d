"""Cryptographic building blocks for Lepton-Ray, all on the ``cryptography`` package.

* :mod:`.identity`  - Ed25519 party identities, the roster, memoised verification
* :mod:`.agreement` - per-round X25519 key pairs and HKDF'd pairwise keys
* :mod:`.kdf`       - HKDF-SHA256 with domain separation (:class:`KeyPurpose`)
* :mod:`.envelope`  - AES-256-GCM envelopes bound to job, round, stage, sender, receiver
* :mod:`.prg`       - AES-256-CTR keystream -> ring elements / floats / public integers
* :mod:`.shamir`    - Shamir t-of-n sharing of 32-byte secrets, 30-bit limbs over GF(2**31 - 1),
  vectorised over many secrets
* :mod:`.at_rest`   - AES-256-GCM files at rest (checkpoints, models) and key loading; the one
  module here that does file I/O

No home-made ciphers; secrets come from ``os.urandom`` or from an AES-CTR stream under a key
derived from OS randomness. Pure: no Ray, and no I/O outside at_rest.
"""

from lepton_ray.crypto.agreement import X25519KeyPair, pair_key, public_key_of
from lepton_ray.crypto.encoding import encode_fields
from lepton_ray.crypto.envelope import EnvelopeHeader, channel_cipher, open_envelope, seal
from lepton_ray.crypto.identity import IdentityKey, Roster, SignatureVerifier
from lepton_ray.crypto.kdf import KeyPurpose, derive_key
from lepton_ray.crypto.prg import (
    MaskExpander,
    PublicRandom,
    keystream,
    ring_dtype,
    uniform_floats,
)
from lepton_ray.crypto.shamir import (
    PRIME,
    combine_secrets,
    combine_shares,
    interpolate_at,
    split_secret,
    split_secrets,
)

__all__ = [
    "PRIME",
    "EnvelopeHeader",
    "IdentityKey",
    "KeyPurpose",
    "MaskExpander",
    "PublicRandom",
    "Roster",
    "SignatureVerifier",
    "X25519KeyPair",
    "channel_cipher",
    "combine_secrets",
    "combine_shares",
    "derive_key",
    "encode_fields",
    "interpolate_at",
    "keystream",
    "open_envelope",
    "pair_key",
    "public_key_of",
    "ring_dtype",
    "seal",
    "split_secret",
    "split_secrets",
    "uniform_floats",
]
