"""The keys of one round, derived identically by a party and (for dropped parties) the server.

* channel key  (i, j): HKDF(X25519(c_i, c_j), CHANNEL, job, round, ids, keys) -> AES-256-GCM
* pairwise mask seed (i, j): HKDF(X25519(s_i, s_j), PAIRWISE_MASK, job, round, ids, keys);
  party i adds PRG(seed) when i < j and subtracts it when i > j, so the pair cancels in the
  sum (Bonawitz et al. 2017, §3: p_{u,v} = Delta_{u,v} PRG(s_{u,v}))
* self mask seed b_i: 32 bytes from the OS; the mask is PRG(HKDF(b_i, SELF_MASK, job, round,
  i)) and keeps x_i hidden even if i's pairwise masks are removed because the server wrongly
  believed i dropped (Bonawitz et al. 2017, §3 "double masking").
"""

from __future__ import annotations

from functools import lru_cache

from lepton_ray.crypto.agreement import RoundKeyPair, pair_key
from lepton_ray.crypto.encoding import encode_fields
from lepton_ray.crypto.kdf import KeyPurpose, derive_key


def channel_key(keys: RoundKeyPair, *, job_id: str, round_: int, own: int, peer: int,
                peer_public: bytes) -> bytes:
    return pair_key(keys, KeyPurpose.CHANNEL, job_id=job_id, round_=round_, own=own, peer=peer,
                    peer_public=peer_public, encoded_context=_context(job_id, round_))


def pairwise_mask_seed(keys: RoundKeyPair, *, job_id: str, round_: int, own: int, peer: int,
                       peer_public: bytes) -> bytes:
    return pair_key(keys, KeyPurpose.PAIRWISE_MASK, job_id=job_id, round_=round_, own=own,
                    peer=peer, peer_public=peer_public, encoded_context=_context(job_id, round_))


def self_mask_key(seed: bytes, *, job_id: str, round_: int, party: int) -> bytes:
    return derive_key(seed, KeyPurpose.SELF_MASK, party, encoded_prefix=_context(job_id, round_))


@lru_cache(maxsize=64)
def _context(job_id: str, round_: int) -> bytes:
    return encode_fields(job_id, round_)


_ADVERT_LABEL = b"lepton-ray/v1/secagg/advertise-keys"


def advert_transcript(*, job_id: str, round_: int, party: int, channel_key: bytes,
                      mask_key: bytes) -> bytes:
    """The bytes a party signs in its key advert: both keys bound to job, round and id, so an
    advert cannot be replayed into another round or claimed by another party."""
    return encode_fields(_ADVERT_LABEL, job_id, round_, party, channel_key, mask_key)
