"""SecAgg+ key material: long-term pair secrets set up once, fresh seeds every round.

Multi-round key schedule (set up once, mask every round; cf. Ma et al. 2023, "Flamingo:
Multi-Round Single-Server Secure Aggregation with Applications to Private Federated
Learning", IEEE S&P, §4, which also derives each round's pairwise masks from pairwise secrets
agreed once):

* each party holds one long-term X25519 key pair, advertised with an Ed25519 signature by its
  roster identity over (job, party, key). The advert does not change between rounds, so
  hosts and the server verify it once (memoised), not every round;
* for each neighbour pair {i, j} both ends derive, once for as long as both keys live,
  ``HKDF(X25519(a_i, A_j), purpose, job, lower id, its key, higher id, its key)`` for two
  purposes: the *channel* key (AES-256-GCM envelopes; the associated data binds job, round,
  stage, sender and receiver) and the pair's *mask* key ``m_ij``;
* every round, the pairwise mask seed is ``s_ij = HKDF-Expand(m_ij, transcript)`` (the round
  transcript of :mod:`lepton_ray.secagg.plan`: job, round, nonce, roster, graph, t) and
  party i adds PRG(s_ij) when i < j and subtracts it when i > j, so the pair cancels in the
  sum (Bonawitz et al. 2017, §3: p_{u,v} = Delta_{u,v} PRG(s_{u,v}));
* self mask seed b_i: 32 fresh OS bytes per round; the mask is PRG(HKDF(b_i, SELF_MASK,
  transcript, i)) and keeps x_i hidden even if i's pairwise masks are removed because the server
  wrongly believed i dropped (Bonawitz et al. 2017, §3, "double masking").

**Dropout recovery.** Bonawitz et al. share a party's per-round mask *private key*, so that
the server can recompute a dropped party's pairwise masks; with long-term keys that would
reveal the masks of every round. Here each round party i draws a fresh 32-byte *recovery key*
r_i, sends the server ``AES-GCM_{r_i}(s_ij for its live neighbours j)`` with its shares, and
Shamir-shares r_i (with b_i) to its neighbours. If i drops, t holders' shares give r_i, which
opens exactly this round's pair seeds of i: the seeds of other rounds are independent PRF
outputs and the long-term keys are never revealed, so nothing needs replacing afterwards. The
server obtains, per party and round, the shares of b_i *or* of r_i, never both (the
Bonawitz rule, checked by every holder), and a corrupt share is caught by the GCM tag.

**Never twice.** Every per-round derivation takes the round's transcript, which holds a public
nonce fresh for each execution. On top of that a party takes part in a given (job, round) at
most once, for the whole job (:class:`ParticipationLog`, persisted when the host has a file
for it): a server that re-runs a round, replays the victim's first-run envelopes and declares
it dropped gets nothing, because the victim never starts the second execution.

A round then costs a party no key agreement, key generation or signature except for pairs it
has not met before (a new neighbour set, a restarted host's new keys).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lepton_ray.crypto.agreement import X25519KeyPair, pair_key
from lepton_ray.crypto.encoding import encode_fields
from lepton_ray.crypto.identity import IdentityKey, SignatureVerifier
from lepton_ray.crypto.kdf import KeyPurpose, derive_key, expand_key
from lepton_ray.errors import ProtocolError

NONCE_BYTES = 16


class PairSecrets:
    """What one neighbour pair shares for as long as both long-term keys live."""

    __slots__ = ("_last", "channel", "mask_key")

    def __init__(self, channel: AESGCM, mask_key: bytes):
        self.channel = channel
        self.mask_key = mask_key
        self._last: tuple[bytes, bytes] | None = None

    def round_seed(self, transcript: bytes) -> bytes:
        """:func:`pairwise_mask_seed` of this pair, remembered for the latest round, so the
        second end of a co-hosted pair does not derive it again."""
        last = self._last
        if last is not None and last[0] == transcript:
            return last[1]
        seed = pairwise_mask_seed(self.mask_key, transcript)
        self._last = (transcript, seed)
        return seed

    def __reduce__(self):
        raise TypeError("PairSecrets holds secret keys and is not picklable")


def pairwise_mask_seed(mask_key: bytes, transcript: bytes) -> bytes:
    """This round's seed s_ij of the pair whose mask key is ``mask_key`` (both ends agree)."""
    return expand_key(mask_key, KeyPurpose.PAIRWISE_MASK, _context(transcript))


def self_mask_key(seed: bytes, *, transcript: bytes, party: int) -> bytes:
    return derive_key(seed, KeyPurpose.SELF_MASK, party, encoded_prefix=_context(transcript))


@lru_cache(maxsize=64)
def _context(transcript: bytes) -> bytes:
    return encode_fields(transcript)


_ADVERT_LABEL = b"lepton-ray/v2/secagg/advertise-key"


def advert_transcript(*, job_id: str, party: int, public_key: bytes, issued: int = 0) -> bytes:
    """The bytes a party signs in its key advert: its long-term key bound to job and party id,
    so the advert cannot be claimed by another party or carried into another job, and the
    time its keyring was made (``issued``, ns): of two validly signed adverts of one party the
    server keeps the later one, so replaying an advert of a restarted host's old key cannot
    knock the party out."""
    return encode_fields(_ADVERT_LABEL, job_id, party, public_key, issued)


class PartyKeyring:
    """One host's long-term SecAgg+ key material, shared by every party it hosts (one host is
    one trust domain, like :class:`SignatureVerifier`'s memo): each party's X25519 key pair and
    signed advert, the pair secrets derived so far (one key agreement per pair, not one per
    end: a pair of co-hosted parties agrees once), and the :class:`ParticipationLog` of the
    rounds its parties took part in.

    Not picklable: it never leaves the host process. A restarted host starts a new keyring,
    hence new keys, and its neighbours derive new pair secrets on first contact.
    """

    def __init__(self, entropy: Callable[[int], bytes] = os.urandom, *,
                 max_pairs: int = 1 << 19, participation: ParticipationLog | None = None):
        self._entropy = entropy
        self.participation = participation if participation is not None else ParticipationLog()
        self._keys: dict[int, X25519KeyPair] = {}
        self._signed: dict[tuple[str, int], bytes] = {}
        self._pairs: dict[tuple, PairSecrets] = {}
        # The advert objects of the current broadcast that passed a party's checks (key size,
        # signature for this job): the other parties of the host reading the same object skip
        # the checks. Keyed by (job, party); another broadcast's advert is another object.
        self.checked_adverts: dict[tuple[str, int], object] = {}
        self._max_pairs = max_pairs
        self.verifier = SignatureVerifier()
        self.issued = time.time_ns()  # when these keys were made (signed in every advert)
        self._survivor_views: list = []
        self._checked_plan: object = None
        self._checked_pins: object = None
        self.agreements = 0  # X25519 exchanges done (a test and benchmark figure)

    def public_key(self, party: int) -> bytes:
        return self._key_pair(party).public_bytes

    def _key_pair(self, party: int) -> X25519KeyPair:
        keys = self._keys.get(party)
        if keys is None:
            keys = self._keys[party] = X25519KeyPair.generate(self._entropy)
        return keys

    def signature(self, job_id: str, party: int, identity: IdentityKey) -> bytes:
        """The party's signature on its advert for ``job_id`` (signed once, then reused)."""
        sig = self._signed.get((job_id, party))
        if sig is None:
            sig = identity.sign(advert_transcript(job_id=job_id, party=party,
                                                  public_key=self.public_key(party),
                                                  issued=self.issued))
            self._signed[(job_id, party)] = sig
        return sig

    def check_plan(self, config, pins=None) -> None:
        """:meth:`JobPins.check` of ``config`` (the job's pins, or the plan's own job, roster
        and seed), once per plan object: every party of the host reads the same plan."""
        if self._checked_plan is config and self._checked_pins is pins:
            return
        from lepton_ray.secagg.plan import JobPins

        (pins if pins is not None else JobPins.of(config)).check(config)
        self._checked_plan, self._checked_pins = config, pins

    def survivor_view(self, survivors: object, config) -> tuple[frozenset, bytes, str | None]:
        """``(set, signed statement, problem)`` of a survivor list, computed once per list
        object and shared by every party of the host (each would otherwise spend O(n) on
        it: O(n^2) per host at 10,000 parties). ``problem`` names what is malformed."""
        last = self._survivor_views
        for obj, cfg, view in last:
            if obj is survivors and cfg is config:
                return view
        from lepton_ray.secagg.checks import is_int
        from lepton_ray.secagg.signing import consistency_statement

        problem, alive, statement = None, frozenset(), b""
        if not isinstance(survivors, tuple) or not all(is_int(p) for p in survivors):
            problem = "survivors must be a tuple of party ids"
        elif any(a >= b for a, b in zip(survivors, survivors[1:])):
            problem = "survivors must be a sorted tuple of distinct party ids"
        else:
            alive = frozenset(survivors)
            if not all(p in config.graph for p in survivors):
                problem = "survivors name non-participants"
            else:
                statement = consistency_statement(config.transcript, survivors)
        view = (alive, statement, problem)
        self._survivor_views = [(survivors, config, view)] + last[:1]
        return view

    def pair(self, job_id: str, own: int, peer: int, peer_public: bytes) -> PairSecrets:
        """The secrets of the pair {own, peer}, derived on first use and cached."""
        own_public = self.public_key(own)
        lo, hi = (own, own_public), (peer, peer_public)
        if peer < own:
            lo, hi = hi, lo
        cache_key = (job_id, *lo, *hi)
        found = self._pairs.get(cache_key)
        if found is not None:
            return found
        keys = self._key_pair(own)
        shared = keys.exchange(peer_public)
        self.agreements += 1
        context = encode_fields(job_id)
        channel = pair_key(shared, KeyPurpose.CHANNEL, own=own, own_public=own_public,
                           peer=peer, peer_public=peer_public, encoded_context=context)
        mask = pair_key(shared, KeyPurpose.PAIRWISE_MASK, own=own, own_public=own_public,
                        peer=peer, peer_public=peer_public, encoded_context=context)
        if len(self._pairs) >= self._max_pairs:  # bounded: evict all, re-derive on demand
            self._pairs.clear()
        secrets = self._pairs[cache_key] = PairSecrets(AESGCM(channel), mask)
        return secrets

    def __reduce__(self):
        raise TypeError("PartyKeyring holds private keys and is not picklable")


class ParticipationLog:
    """The (job, round)s each party took part in, for the whole job: a party never starts a
    second execution of a round (see the module docstring). Compact: per job and round, the
    set of party ids; on disk (``path``), one JSON line per claim with the ids as ranges,
    appended and fsynced *before* the parties' first message of the round leaves the host, so
    a host that crashes and restarts still refuses. A torn last line (a crash mid-write) is
    ignored: its parties had not yet said anything."""

    def __init__(self, path: str | os.PathLike | None = None):
        self._rounds: dict[tuple[str, int], set[int]] = {}
        self.path = path
        if path is not None and os.path.exists(path):
            import json

            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        ids = {p for a, b in rec["parties"] for p in range(int(a), int(b) + 1)}
                        self._rounds.setdefault((str(rec["job"]), int(rec["round"])),
                                                set()).update(ids)
                    except (ValueError, KeyError, TypeError):
                        continue

    def took_part(self, job_id: str, round_: int, party: int) -> bool:
        return party in self._rounds.get((job_id, round_), ())

    def claim(self, job_id: str, round_: int, parties) -> list[int]:
        """Record that ``parties`` start (job, round); returns those that already did (they
        must not take part). Written to disk, if the log has a file, before returning."""
        seen = self._rounds.setdefault((job_id, round_), set())
        again = sorted(p for p in parties if p in seen)
        fresh = sorted(set(parties) - seen)
        if fresh and self.path is not None:
            import json

            line = json.dumps({"job": job_id, "round": round_, "parties": _ranges(fresh)})
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        seen.update(fresh)
        return again


def _ranges(ids: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in ids:
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return out
