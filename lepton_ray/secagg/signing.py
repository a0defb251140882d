"""What parties sign and commit to in a SecAgg+ round (Bonawitz et al. 2017, §4, the actively
secure variant; Bell et al. 2020, §4).

Every statement starts with a label naming the message and the round transcript
(:attr:`~lepton_ray.secagg.plan.RoundConfig.transcript`), so a signature is valid for one
message kind of one execution of one round and nowhere else. Large content (envelopes,
vectors, shares) enters as its SHA-256, so a signature costs the same for any dimension.

* share message: receivers, envelopes, recovery blob and the two commitments;
* masked input: the parties in the (host's) sum, the vector, and the neighbours whose
  envelopes failed (its complaints);
* consistency: the survivor set U3 the server announced (Bonawitz §4, "ConsistencyCheck");
* unmask response: the owners and bytes of every share revealed.

**Commitments** (verifiable reconstruction): with its share message a party commits to its
self-mask seed b and its recovery key r as H(label, transcript, party, kind, secret). Both are
32 uniformly random bytes, so the hash hides them (random-oracle model) and binds the party
to them: the server checks every secret it rebuilds against it, and a share that leads to
another value is attributed to the holder that signed it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from lepton_ray.crypto.encoding import encode_fields

COMMITMENT_BYTES = 32
_SHARES = b"lepton-ray/v2/secagg/share-keys"
_MASKED = b"lepton-ray/v2/secagg/masked-input"
_CONSISTENCY = b"lepton-ray/v2/secagg/consistency"
_UNMASK = b"lepton-ray/v2/secagg/unmask"
_COMMIT = b"lepton-ray/v2/secagg/commit"
SEED, RECOVERY = b"self-mask-seed", b"recovery-key"


def _h(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _ids(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def commitment(transcript: bytes, party: int, kind: bytes, secret: bytes) -> bytes:
    return _h(_COMMIT, transcript, party.to_bytes(8, "big"), kind, secret)


def share_statement(transcript: bytes, party: int, receivers: Sequence[int], envelopes: bytes,
                    recovery: bytes, commitments: bytes) -> bytes:
    return encode_fields(_SHARES, transcript, party,
                         _h(_ids(receivers), envelopes, recovery, commitments))


def masked_statement(transcript: bytes, parties: Sequence[int], vector: np.ndarray,
                     complaints: Sequence[tuple[int, Sequence[int]]]) -> bytes:
    flat = [x for reporter, senders in complaints for x in (reporter, len(senders), *senders)]
    return encode_fields(_MASKED, transcript,
                         _h(_ids(parties), np.ascontiguousarray(vector).tobytes(), _ids(flat)))


def consistency_statement(transcript: bytes, survivors: Sequence[int]) -> bytes:
    return encode_fields(_CONSISTENCY, transcript, _h(_ids(survivors)))


def unmask_statement(transcript: bytes, party: int, seed_owners: Sequence[int],
                     seed_shares: bytes, recovery_owners: Sequence[int],
                     recovery_shares: bytes) -> bytes:
    return encode_fields(_UNMASK, transcript, party,
                         _h(_ids(seed_owners), seed_shares, _ids(recovery_owners),
                            recovery_shares))
