"""The party side of SecAgg+ as a state machine (what a PartyHost drives for each party).

A party object lives for one round. Its methods must be called in order, once each:

    advertise()                      -> AdvertiseKeys   (long-term X25519 key, Ed25519-signed)
    share_keys(KeyBroadcast)         -> ShareKeys       (Shamir shares, sealed per neighbour,
                                                         and the sealed recovery blob)
    masked_input(ShareInbox, vector) -> MaskedInput     (x + self mask + pairwise masks)
    consistency(ConsistencyRequest)  -> ConsistencySignature (signs the survivor set, once)
    unmask(UnmaskRequest)            -> UnmaskResponse  (shares the server may have)

A bad server message raises :class:`ProtocolError` and the party aborts (it behaves as a
dropout, which the protocol survives); too few live neighbours raises :class:`ThresholdError`
for the same effect. A neighbour envelope that fails its GCM tag is not fatal: it is recorded
in :attr:`SecAggParty.rejections` and reported to the server, which then drops its sender.

Security reasoning against a malicious server (Bonawitz et al. 2017, §4 and Thm 6.5; Bell et
al. 2020, §4; the key schedule and its recovery key are in :mod:`lepton_ray.secagg.keys`):
* the round plan is checked against the job's pins before anything is sent
  (:class:`~lepton_ray.secagg.plan.JobPins`): the graph is rebuilt from the job's graph seed,
  the roster is the pinned one, t satisfies 2t > k + 1 + c; and the party takes part in a
  (job, round) at most once for the whole job (:class:`~lepton_ray.secagg.keys.ParticipationLog`);
* adverts are signed with the roster identity key and checked here, so the server cannot
  substitute keys and read the shares;
* shares travel sealed under a key only the two parties can derive (AES-GCM, associated data
  binding the round transcript, stage, sender, receiver), so nothing of another execution of
  the round (or another roster, graph or t) opens;
* every message the party sends is signed over its content and the transcript, and its
  share message commits to its two secrets (:mod:`lepton_ray.secagg.signing`);
* consistency check: the party signs one survivor set per round, and reveals shares only for
  that set and only if at least t members of its neighbourhood signed the same set;
* it never reveals both the self-mask-seed share and the recovery-key share of one party,
  and never its own recovery-key share; which one it reveals follows from the signed survivor
  set and from who shared keys with it, never from a list the server supplies;
* the party refuses to mask (or to unmask) when fewer than t of its neighbourhood are alive,
  so its input is never protected by fewer masks than the threshold assumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

import numpy as np

from lepton_ray.crypto.envelope import (
    EnvelopeHeader,
    channel_cipher,
    open_batch,
    seal,
    seal_batch,
)
from lepton_ray.crypto.identity import IdentityKey
from lepton_ray.crypto.prg import MaskExpander
from lepton_ray.crypto.shamir import SHARE_BYTES, split_secrets
from lepton_ray.errors import ConfigError, DataError, ProtocolError, ThresholdError
from lepton_ray.secagg.checks import check_header, is_int
from lepton_ray.secagg import signing
from lepton_ray.secagg.keys import (
    PartyKeyring,
    advert_transcript,
    self_mask_key,
)
from lepton_ray.secagg.messages import (
    ENVELOPE_BYTES,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedInput,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from lepton_ray.secagg.plan import JobPins, RoundConfig
from lepton_ray.secagg.stages import Rejection, RejectionReason, Stage

SEED_BYTES = 32


class SecAggParty:
    """One party's side of one round; see the module docstring.

    ``keyring`` holds the party's long-term key and pair secrets and is shared by all parties
    of a host across rounds (with the memoised signature checks); ``expander`` (reused mask
    buffers) may be shared too. ``entropy`` supplies every per-round secret (self-mask seed,
    recovery key, Shamir coefficients, envelope nonces); it defaults to ``os.urandom`` and
    should only ever be replaced by a deterministic source in tests.

    ``pins``: the job's fixed parameters the plan is checked against (default: the plan's own
    job, roster and graph seed, so the graph and t are still rebuilt and checked). ``claimed``:
    the host has already recorded this party's (job, round) in the keyring's participation log
    (one write for all its parties); otherwise the party records it here.
    """

    def __init__(self, *, party: int, identity: IdentityKey, config: RoundConfig,
                 keyring: PartyKeyring | None = None,
                 expander: MaskExpander | None = None,
                 entropy: Callable[[int], bytes] = os.urandom,
                 pins: JobPins | None = None, claimed: bool = False):
        if party not in config.graph:
            raise ConfigError([(f"secagg.party: party {party!r} is not a participant of round "
                               f"{config.round}")])
        if identity.public_bytes != config.roster.public_key(party):
            raise ConfigError([(f"secagg.party: the identity key given for party {party} is not "
                               "its roster key")])
        self.party = party
        self.config = config
        self._identity = identity
        self._keyring = keyring if keyring is not None else PartyKeyring(entropy)
        self._keyring.check_plan(config, pins)
        if not claimed and self._keyring.participation.claim(config.job_id, config.round,
                                                             [party]):
            raise ProtocolError(f"party {party} already took part in round {config.round} of "
                                f"job {config.job_id!r}: it never runs a round twice")
        self._expander = expander
        self._entropy = entropy
        self._self_seed = entropy(SEED_BYTES)
        self._recovery_key = entropy(SEED_BYTES)
        self._next: Stage | None = Stage.ADVERTISE_KEYS
        self._rejections: list[Rejection] = []
        self._advert: AdvertiseKeys | None = None
        self._live: dict[int, AdvertiseKeys] = {}
        self._seeds: dict[int, bytes] = {}
        self._partners: tuple[int, ...] = ()
        self._inbox_open = False
        self._holders: list[int] | None = None
        self._held: dict[int, tuple[bytes, bytes]] = {}
        self._survivors: bytes | None = None  # the statement of the one U3 this party signed

    @property
    def rejections(self) -> tuple[Rejection, ...]:
        """Neighbour messages this party rejected (currently: envelopes failing their tag)."""
        return tuple(self._rejections)

    @property
    def stage(self) -> Stage | None:
        """The stage this party expects next (``None`` once finished or aborted)."""
        return self._next

    # -- stage 1 ------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        self._begin(Stage.ADVERTISE_KEYS)
        c, ring = self.config, self._keyring
        self._advert = AdvertiseKeys(c.job_id, c.round, self.party, ring.public_key(self.party),
                                     ring.signature(c.job_id, self.party, self._identity),
                                     ring.issued)
        self._next = Stage.SHARE_KEYS
        return self._advert

    # -- stage 2 ------------------------------------------------------------------------
    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        holders = self.share_holders(broadcast)
        xs = np.array([[self.config.graph.x_coordinate(h) for h in holders]] * 2)
        shares = split_secrets(self.secrets(), threshold=self.config.threshold, xs=xs,
                               entropy=self._entropy)
        return self.seal_shares(holders, shares)

    def share_holders(self, broadcast: KeyBroadcast) -> list[int]:
        """First half of :meth:`share_keys`: check the broadcast and return who will hold
        this party's shares (its live neighbours and itself, in id order). A
        :class:`~lepton_ray.secagg.cohort.PartyCohort` then shares every party's
        :meth:`secrets` in one batch and hands each its rows for :meth:`seal_shares`."""
        stage = self._begin(Stage.SHARE_KEYS)
        c = self.config
        self._raise(check_header(broadcast, KeyBroadcast, c, stage))
        seen = broadcast.by_party
        if seen is None:
            self._fail(stage, RejectionReason.MALFORMED,
                       "broadcast is not a tuple of adverts with distinct party ids")
        if seen.get(self.party) != self._advert:
            self._fail(stage, RejectionReason.MALFORMED,
                       "the broadcast does not carry this party's own advert unchanged")
        live: dict[int, AdvertiseKeys] = {}
        checked = self._keyring.checked_adverts
        for j in c.graph.neighbours_of(self.party):
            advert = seen.get(j)
            if advert is None:
                continue  # j dropped before advertising
            if checked.get((c.job_id, j)) is advert:  # this very advert passed the checks below
                live[j] = advert
                continue
            if not (isinstance(advert.public_key, bytes) and len(advert.public_key) == 32):
                self._fail(stage, RejectionReason.MALFORMED, f"party {j}'s advert key")
            # The transcript is rebuilt from *our* job id, so a verified signature also
            # proves the key is j's key for this job.
            transcript = advert_transcript(job_id=c.job_id, party=j,
                                           public_key=advert.public_key,
                                           issued=advert.issued)
            if not self._keyring.verifier.verify(c.roster.public_key(j), transcript,
                                                 advert.signature):
                self._raise(check_header(advert, AdvertiseKeys, c, Stage.ADVERTISE_KEYS))
                self._fail(stage, RejectionReason.BAD_SIGNATURE,
                           f"party {j}'s advert is not signed by its roster key")
            checked[(c.job_id, j)] = advert
            live[j] = advert
        holders = sorted([*live, self.party])
        if len(holders) < c.threshold:
            raise ThresholdError(f"party {self.party}: only {len(holders)} live holders in its "
                                 f"neighbourhood, threshold is {c.threshold}")
        self._live = live
        self._holders = holders
        return holders

    def secrets(self) -> np.ndarray:
        """This round's two shared secrets, self-mask seed and recovery key, as (2, 32)."""
        return np.frombuffer(self._self_seed + self._recovery_key, np.uint8).reshape(2, -1)

    def seal_shares(self, holders: list[int], shares: np.ndarray) -> ShareKeys:
        """Second half of :meth:`share_keys`: ``shares`` (2, len(holders), LIMBS) are the
        shares of :meth:`secrets` for ``holders``; seal each holder's pair under the pair's
        channel key, and this round's pair seeds under the recovery key."""
        if (self._next is not None or holders != self._holders
                or shares.shape[:2] != (2, len(holders))):
            raise ProtocolError(f"party {self.party}: seal_shares needs share_holders first "
                                "and one share of each secret per holder")
        self._holders = None
        c = self.config
        seeds, keys = (row.astype("<u4", copy=False).tobytes() for row in shares)
        receivers, channels, plaintexts = [], [], []
        for i, holder in enumerate(holders):
            seed_share = seeds[i * SHARE_BYTES:(i + 1) * SHARE_BYTES]
            key_share = keys[i * SHARE_BYTES:(i + 1) * SHARE_BYTES]
            if holder == self.party:
                self._held[holder] = (seed_share, key_share)
                continue
            pair = self._keyring.pair(c.job_id, self.party, holder, self._live[holder].public_key)
            self._seeds[holder] = pair.round_seed(c.transcript)
            receivers.append(holder)
            channels.append(pair.channel)
            plaintexts.append(seed_share + key_share)
        envelopes = seal_batch(c.transcript_id, c.round, Stage.SHARE_KEYS, self.party, receivers,
                               channels, plaintexts, self._entropy)
        recovery = seal(channel_cipher(self._recovery_key), recovery_header(c, self.party),
                        b"".join(self._seeds[j] for j in sorted(self._live)), self._entropy)
        commitments = (signing.commitment(c.transcript, self.party, signing.SEED, self._self_seed)
                       + signing.commitment(c.transcript, self.party, signing.RECOVERY,
                                            self._recovery_key))
        receivers_t = tuple(receivers)
        signature = self._identity.sign(signing.share_statement(
            c.transcript, self.party, receivers_t, envelopes, recovery, commitments))
        self._next = Stage.MASKED_INPUT
        return ShareKeys(c.job_id, c.round, self.party, receivers_t, envelopes, recovery,
                         commitments, signature)

    # -- stage 3 ------------------------------------------------------------------------
    def masked_input(self, inbox: ShareInbox, vector: np.ndarray) -> MaskedInput:
        self.open_inbox(inbox, vector)
        masked = vector.copy()
        rejected = self.mask_into(masked, self._expander or MaskExpander(self.config.dim,
                                                                          self.config.dtype))
        c = self.config
        signature = self.sign_masked((self.party,), masked,
                                     ((self.party, rejected),) if rejected else ())
        return MaskedInput(c.job_id, c.round, self.party, masked, rejected, signature)

    def sign_masked(self, parties: tuple[int, ...], vector: np.ndarray,
                    complaints: tuple, statement: bytes | None = None) -> bytes:
        """This party's signature over a masked input or a host's masked sum that holds it
        (``statement``: that message's :func:`signing.masked_statement`, if the host already
        computed it once for all the parties of its sum)."""
        if statement is None:
            statement = signing.masked_statement(self.config.transcript, parties, vector,
                                                 complaints)
        return self._identity.sign(statement)

    def open_inbox(self, inbox: ShareInbox, vector: np.ndarray) -> tuple[int, ...]:
        """First half of :meth:`masked_input`: check ``vector`` and the inbox, keep the
        shares it holds for its neighbours and return the partners it must mask with."""
        c = self.config
        if (not isinstance(vector, np.ndarray) or vector.shape != (c.dim,)
                or vector.dtype != c.dtype):
            got = (f"{vector.dtype} of shape {vector.shape}" if isinstance(vector, np.ndarray)
                   else type(vector).__name__)
            raise DataError(f"party {self.party}: input must be a {c.dtype} vector of shape "
                            f"({c.dim},) (ring elements of Z_2^{c.modulus_bits}), got {got}")
        stage = self._begin(Stage.MASKED_INPUT)
        self._raise(check_header(inbox, ShareInbox, c, stage))
        senders, envelopes = inbox.senders, inbox.envelopes
        if (inbox.receiver != self.party or not isinstance(senders, tuple)
                or not isinstance(envelopes, bytes)
                or len(envelopes) != ENVELOPE_BYTES * len(senders)):
            self._fail(stage, RejectionReason.MALFORMED,
                       f"inbox must hold {ENVELOPE_BYTES}-byte envelopes addressed to party "
                       f"{self.party}, one per sender")
        if (not all(is_int(j) and j in self._live for j in senders)
                or len(set(senders)) != len(senders)):
            self._fail(stage, RejectionReason.MALFORMED,
                       "inbox holds an envelope not from a distinct live neighbour")
        channels = []
        for sender in senders:
            try:
                channels.append(self._keyring.pair(c.job_id, self.party, sender,
                                                   self._live[sender].public_key).channel)
            except ProtocolError as err:  # e.g. a small-order key: nothing to open with
                channels.append(None)
                self._reject(sender, str(err))
        plains = open_batch(c.transcript_id, c.round, Stage.SHARE_KEYS, senders, self.party,
                            channels, envelopes, ENVELOPE_BYTES)
        for sender, channel, plain in zip(senders, channels, plains):
            if plain is not None:
                self._held[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
            elif channel is not None:
                self._reject(sender, f"envelope from party {sender} to party {self.party} "
                             "failed its AES-GCM tag (tampered, replayed from another "
                             "round/stage, or wrong key)")
        # Mask with every neighbour the server routed, readable or not: the server knows
        # exactly this set and strips the masks of any sender it later drops.
        partners = tuple(sorted(senders))
        if len(partners) + 1 < c.threshold:
            raise ThresholdError(f"party {self.party}: only {len(partners)} neighbours shared "
                                 f"keys, threshold is {c.threshold}; not sending a weakly "
                                 "masked input")
        self._partners = partners
        self._inbox_open = True
        return partners

    def mask_into(self, acc: np.ndarray, expander: MaskExpander,
                  skip: Collection[int] = ()) -> tuple[int, ...]:
        """Second half of :meth:`masked_input`: add this party's self mask and its pairwise
        masks to ``acc`` (which holds its input, or a sum of inputs), except the masks with
        the partners in ``skip``: a cohort passes the partners whose input goes into the same
        sum, as their +mask and -mask cancel. Returns the senders whose envelopes failed."""
        if self._next is not None or not self._inbox_open:
            raise ProtocolError(f"party {self.party}: mask_into needs open_inbox first")
        self._inbox_open = False
        c = self.config
        expander.add(acc, self_mask_key(self._self_seed, transcript=c.transcript,
                                        party=self.party))
        for j in self._partners:
            if j not in skip:
                (expander.add if self.party < j else expander.subtract)(acc, self._seeds[j])
        self._seeds.clear()
        self._next = Stage.CONSISTENCY
        return tuple(sorted(r.party for r in self._rejections
                            if r.stage is Stage.SHARE_KEYS))

    # -- stage 4a -----------------------------------------------------------------------
    def consistency(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Sign the survivor set U3, once: it must name this party, only participants, and
        leave this party at least t live members of its neighbourhood (itself included)."""
        stage = self._begin(Stage.CONSISTENCY)
        c = self.config
        self._raise(check_header(request, ConsistencyRequest, c, stage))
        alive, statement, problem = self._keyring.survivor_view(request.survivors, c)
        if problem:
            self._fail(stage, RejectionReason.MALFORMED, problem)
        if self.party not in alive:
            self._fail(stage, RejectionReason.LATE,
                       f"party {self.party} is not listed as a survivor")
        neighbours = c.graph.neighbours_of(self.party)
        partners = set(self._partners)
        if any(j in alive and j not in partners for j in neighbours):
            self._fail(stage, RejectionReason.MALFORMED,
                       "survivors name neighbours that never shared keys with this party")
        live = 1 + sum(1 for j in neighbours if j in alive)
        if live < c.threshold:
            raise ThresholdError(f"party {self.party}: only {live} of its neighbourhood "
                                 f"survived, threshold is {c.threshold}")
        self._survivors = statement
        self._next = Stage.UNMASK
        return ConsistencySignature(c.job_id, c.round, self.party, self._identity.sign(statement))

    # -- stage 4b -----------------------------------------------------------------------
    @property
    def signed_statement(self) -> bytes | None:
        """The consistency statement this party signed (``None`` before it signed one)."""
        return self._survivors

    def unmask(self, request: UnmaskRequest, co_signed: Collection[int] = ()) -> UnmaskResponse:
        """Reveal shares for the survivor set this party signed, once at least t of its
        neighbourhood (itself included) signed the same set. ``co_signed``: parties of this
        party's own host known to have signed that very statement (one trust domain: the host
        counts them without verifying their signatures); the others' signatures are verified,
        stopping as soon as t are counted."""
        stage = self._begin(Stage.UNMASK)
        c = self.config
        self._raise(check_header(request, UnmaskRequest, c, stage))
        alive, statement, problem = self._keyring.survivor_view(request.survivors, c)
        if problem or statement != self._survivors:
            self._fail(stage, RejectionReason.MALFORMED,
                       "the survivor set differs from the one this party signed")
        signatures = request.signature_of
        if signatures is None:
            self._fail(stage, RejectionReason.MALFORMED,
                       "signatures must be distinct (party, bytes) pairs")
        verify, roster = self._keyring.verifier.verify, c.roster
        others = [j for j in c.graph.neighbours_of(self.party) if j in alive]
        signed = 1 + sum(1 for j in others if j in co_signed)
        for j in others:
            if signed >= c.threshold:
                break
            if (j not in co_signed and j in signatures
                    and verify(roster.public_key(j), statement, signatures[j])):
                signed += 1
        if signed < c.threshold:
            raise ThresholdError(f"party {self.party}: only {signed} of its neighbourhood "
                                 f"signed the survivor set, threshold is {c.threshold}; "
                                 "revealing nothing")
        seed_owners, seed_out, key_owners, key_out = [], [], [], []
        for owner, (seed_share, key_share) in sorted(self._held.items()):
            if owner in alive:
                seed_owners.append(owner)
                seed_out.append(seed_share)
            elif owner != self.party:  # shared keys with this party, not in the sum: dropped
                key_owners.append(owner)
                key_out.append(key_share)
        self._held.clear()
        self._next = None
        seeds, keys = b"".join(seed_out), b"".join(key_out)
        seed_owners_t, key_owners_t = tuple(seed_owners), tuple(key_owners)
        signature = self._identity.sign(signing.unmask_statement(
            c.transcript, self.party, seed_owners_t, seeds, key_owners_t, keys))
        return UnmaskResponse(c.job_id, c.round, self.party, seed_owners_t, seeds,
                              key_owners_t, keys, signature)

    # -- helpers ------------------------------------------------------------------------
    def _reject(self, sender: int, why: str) -> None:
        """A neighbour's envelope this party cannot read: reported, not fatal."""
        self._rejections.append(Rejection(sender, Stage.SHARE_KEYS, RejectionReason.TAMPERED,
                                          why))

    def _begin(self, stage: Stage) -> Stage:
        if self._next is not stage:
            at = self._next.value if self._next else "finished/aborted"
            raise ProtocolError(f"party {self.party} is at stage {at}, cannot run "
                                f"{stage.value}")
        self._next = None  # restored on success; an exception leaves the party aborted
        return stage

    def _raise(self, rejection: Rejection | None) -> None:
        if rejection is not None:
            raise rejection.error()

    def _fail(self, stage: Stage, reason: RejectionReason, detail: str) -> None:
        raise Rejection(self.party, stage, reason,
                        f"rejected the server's message: {detail}").error()


def recovery_header(config: RoundConfig, party: int) -> EnvelopeHeader:
    """What a party's recovery blob is bound to: the round transcript, and sender = receiver =
    the party itself (no channel envelope is ever addressed to its own sender)."""
    return EnvelopeHeader(config.transcript_id, config.round, Stage.SHARE_KEYS, party, party)
