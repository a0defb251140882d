"""The server side of SecAgg+ as a state machine (what the SmpcCoordinator actor runs).

One method per stage, each taking *all* messages that arrived for that stage (a party absent
from the list never answered: it dropped out) and returning what goes back to the parties:

    collect_adverts([AdvertiseKeys])  -> KeyBroadcast
    route_shares([ShareKeys])         -> {party: ShareInbox}
    collect_masked([MaskedInput | MaskedSum]) -> ConsistencyRequest (the survivor set U3)
    collect_consistency([ConsistencySignature]) -> UnmaskRequest (U3 and its signatures)
    finish([UnmaskResponse])          -> AggregateResult   (only the sum)

Every message is checked (type = stage, job, round, roster, signature, sizes, duplicates);
a rejected message is recorded in :attr:`SecAggServer.rejections` and its sender is treated
as dropped, which the protocol tolerates like any dropout. When fewer than t parties remain,
or some secret the sum needs has fewer than t live holders, the round raises
:class:`ThresholdError` *before* the unmask request goes out if that is already known, so no
share is released for a round that cannot finish.

**One bad party hurts only itself.** A complaint ("this sender's envelope did not open")
drops nobody: the reporter just does not count as a holder of that sender's shares. A party
left with fewer than t usable holders of its self-mask seed is taken out of the sum before
the survivor set is fixed. Every secret the server rebuilds is checked against the owner's
commitment (:mod:`lepton_ray.secagg.signing`); on a mismatch the server finds t shares that
do match, checks every other share against the polynomial they fix, names each holder whose
share is off (with its signature over the response as evidence), ignores all its shares and
goes on. Only a shortage of honest shares aborts a round, and an abort releases nothing.

Security (Bonawitz et al. 2017, Thm 6.3; Bell et al. 2020, Thm 3.6): the server sees masked
inputs, each hidden by its self mask and by pairwise masks with its neighbours; it asks, for
each party, for shares of *either* its self-mask seed (its masked input is in the sum) *or*
its recovery key (it dropped; the key opens that party's sealed pairwise seeds of this round,
see :mod:`lepton_ray.secagg.keys`), never both, so it can strip the masks of the sum and of
nothing smaller (for a connected graph of survivors).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np

from lepton_ray.crypto.envelope import OVERHEAD_BYTES, channel_cipher, open_envelope
from lepton_ray.crypto.identity import SignatureVerifier
from lepton_ray.crypto.prg import MaskExpander
from lepton_ray.crypto.shamir import LIMBS, PRIME, SHARE_BYTES, combine_checked, evaluate_shares
from lepton_ray.errors import ProtocolError, ThresholdError
from lepton_ray.secagg import signing
from lepton_ray.secagg.checks import check_header, check_sender, is_int
from lepton_ray.secagg.keys import advert_transcript, self_mask_key
from lepton_ray.secagg.messages import (
    ENVELOPE_BYTES,
    AdvertiseKeys,
    AggregateResult,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedInput,
    MaskedSum,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from lepton_ray.secagg.party import SEED_BYTES, recovery_header
from lepton_ray.secagg.plan import RoundConfig
from lepton_ray.secagg.stages import Rejection, RejectionReason, Stage

KEY_BYTES = 32
SIGNATURE_BYTES = 64
_SUBSET_TRIES = 256  # t-subsets tried per secret whose first t shares miss its commitment


class SecAggServer:
    """Server state machine for one round; see the module docstring."""

    def __init__(self, config: RoundConfig, *, verifier: SignatureVerifier | None = None,
                 expander: MaskExpander | None = None):
        self.config = config
        self._verifier = verifier if verifier is not None else SignatureVerifier()
        self._expander = expander
        self._next: Stage | None = Stage.ADVERTISE_KEYS
        self._rejections: list[Rejection] = []
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._live: dict[int, tuple[int, ...]] = {}  # live neighbours, once adverts are in
        self._shared: frozenset[int] = frozenset()
        self._survivors: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._survivor_set: frozenset[int] = frozenset()
        self._dropped_set: frozenset[int] = frozenset()
        self._partners: dict[int, tuple[int, ...]] = {}
        self._not_holding: dict[int, set[int]] = {}
        self._recovery: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # blob, seeds' owners
        self._commitments: dict[int, bytes] = {}  # party -> H(seed) || H(recovery key)
        self._share_signatures: dict[int, bytes] = {}  # evidence against a bad blob
        self._singles: dict[int, MaskedInput] = {}
        self._sums: list[MaskedSum] = []
        self._cheaters: set[int] = set()
        self._sum: np.ndarray | None = None

    @property
    def rejections(self) -> tuple[Rejection, ...]:
        return tuple(self._rejections)

    @property
    def stage(self) -> Stage | None:
        """The stage the server expects next (``None`` once finished or aborted)."""
        return self._next

    # -- stage 1 ------------------------------------------------------------------------
    def collect_adverts(self, messages: Iterable[object]) -> KeyBroadcast:
        stage = self._begin(Stage.ADVERTISE_KEYS)
        accepted = self._accept(messages, AdvertiseKeys, stage, self.config.participants,
                                self._check_advert)
        self._require(len(accepted), stage, "parties advertised keys")
        self._adverts = accepted
        self._next = Stage.SHARE_KEYS
        return KeyBroadcast(self.config.job_id, self.config.round,
                            tuple(accepted[p] for p in sorted(accepted)))

    def _check_advert(self, msg: AdvertiseKeys) -> Rejection | None:
        stage = Stage.ADVERTISE_KEYS
        if not isinstance(msg.public_key, bytes) or len(msg.public_key) != KEY_BYTES:
            return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                             f"public_key must be {KEY_BYTES} bytes")
        if not isinstance(msg.signature, bytes):
            return Rejection(msg.party, stage, RejectionReason.BAD_SIGNATURE, "unsigned advert")
        if not is_int(msg.issued):
            return Rejection(msg.party, stage, RejectionReason.MALFORMED, "issued must be an int")
        transcript = advert_transcript(job_id=msg.job_id, party=msg.party,
                                       public_key=msg.public_key, issued=msg.issued)
        if not self._verifier.verify(self.config.roster.public_key(msg.party), transcript,
                                     msg.signature):
            return Rejection(msg.party, stage, RejectionReason.BAD_SIGNATURE,
                             f"advert signature does not verify under party {msg.party}'s "
                             "roster key")
        return None

    # -- stage 2 ------------------------------------------------------------------------
    def route_shares(self, messages: Iterable[object]) -> dict[int, ShareInbox]:
        stage = self._begin(Stage.SHARE_KEYS)
        accepted = self._accept(messages, ShareKeys, stage, self._adverts, self._check_shares)
        self._require(len(accepted), stage, "parties shared keys")
        self._shared = frozenset(accepted)
        self._recovery = {p: (msg.recovery, self._live_neighbours(p))
                          for p, msg in accepted.items()}
        self._commitments = {p: msg.commitments for p, msg in accepted.items()}
        self._share_signatures = {p: msg.signature for p, msg in accepted.items()}
        self._next = Stage.MASKED_INPUT
        return self._inboxes([accepted[p] for p in sorted(accepted)])

    def _inboxes(self, messages: list[ShareKeys]) -> dict[int, ShareInbox]:
        """Every accepted party's inbox: the envelopes addressed to it by accepted senders,
        in sender order. One stable sort of all envelopes by receiver, then one slice each."""
        job, rnd = self.config.job_id, self.config.round
        receivers = np.fromiter(itertools.chain.from_iterable(m.receivers for m in messages),
                                dtype=np.int64)
        senders = np.repeat([m.party for m in messages], [len(m.receivers) for m in messages])
        sealed = np.frombuffer(b"".join(m.envelopes for m in messages),
                               dtype=np.uint8).reshape(-1, ENVELOPE_BYTES)
        owners = np.array([m.party for m in messages], dtype=np.int64)  # sorted
        keep = np.isin(receivers, owners)  # envelopes for a party that dropped stay here
        order = np.flatnonzero(keep)[np.argsort(receivers[keep], kind="stable")]
        by_receiver, senders, sealed = receivers[order], senders[order], sealed[order]
        first = np.searchsorted(by_receiver, owners, side="left")
        last = np.searchsorted(by_receiver, owners, side="right")
        return {p: ShareInbox(job, rnd, p, tuple(senders[a:b].tolist()), sealed[a:b].tobytes())
                for p, a, b in zip(owners.tolist(), first.tolist(), last.tolist())}

    def _check_shares(self, msg: ShareKeys) -> Rejection | None:
        stage = Stage.SHARE_KEYS
        receivers = msg.receivers
        if (not isinstance(receivers, tuple) or not all(is_int(r) for r in receivers)
                or not isinstance(msg.envelopes, bytes)
                or len(msg.envelopes) != ENVELOPE_BYTES * len(receivers)):
            return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                             f"envelopes must be {ENVELOPE_BYTES} bytes each, one per receiver")
        expected = set(self._live_neighbours(msg.party))
        if len(receivers) != len(set(receivers)) or set(receivers) != expected:
            return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                             f"envelopes addressed to {sorted(set(receivers))[:8]}..., expected "
                             f"exactly the {len(expected)} live neighbours")
        want = OVERHEAD_BYTES + SEED_BYTES * len(expected)
        if not isinstance(msg.recovery, bytes) or len(msg.recovery) != want:
            return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                             f"recovery must be a {want}-byte sealed blob of "
                             f"{len(expected)} pair seeds")
        if (not isinstance(msg.commitments, bytes)
                or len(msg.commitments) != 2 * signing.COMMITMENT_BYTES):
            return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                             f"commitments must be {2 * signing.COMMITMENT_BYTES} bytes")
        if not isinstance(msg.signature, bytes) or len(msg.signature) != SIGNATURE_BYTES:
            return Rejection(msg.party, stage, RejectionReason.BAD_SIGNATURE,
                             "share message is not signed")
        return None

    def _live_neighbours(self, party: int) -> tuple[int, ...]:
        """``party``'s neighbours that advertised keys, in id order: the holders of its shares
        and, in the same order, the owners of the pair seeds in its recovery blob."""
        live = self._live.get(party)
        if live is None:  # the adverts are fixed once stage 1 is over: compute once
            live = self._live[party] = tuple(sorted(
                j for j in self.config.graph.neighbours_of(party) if j in self._adverts))
        return live

    # -- stage 3 ------------------------------------------------------------------------
    def collect_masked(self, messages: Iterable[object]) -> ConsistencyRequest:
        """Masked inputs, one per party (:class:`MaskedInput`) or summed per host
        (:class:`MaskedSum`); a sum is taken whole or not at all. Returns the survivor set
        for the consistency check."""
        stage = self._begin(Stage.MASKED_INPUT)
        messages = list(messages)
        duplicated: set[int] = set()
        singles = self._accept([m for m in messages if not isinstance(m, MaskedSum)],
                               MaskedInput, stage, self._shared, self._check_masked, duplicated)
        sums = self._accept_sums([m for m in messages if isinstance(m, MaskedSum)], singles,
                                 duplicated)
        reports = {p: m.rejected_senders for p, m in singles.items()}
        for msg in sums:
            reports.update(msg.rejected)
        for reporter in sorted(reports):
            for sender in reports[reporter]:
                self._not_holding.setdefault(sender, set()).add(reporter)
                self._rejections.append(Rejection(
                    sender, Stage.SHARE_KEYS, RejectionReason.TAMPERED,
                    f"party {reporter} reports its envelope did not open; party {reporter} "
                    "does not count as a holder of its shares (nobody is dropped for a "
                    "complaint)"))
        graph, t = self.config.graph, self.config.threshold
        # A survivor needs t usable holders of its self-mask seed (itself and live neighbours
        # that did not complain about it); one without them leaves the sum, with the whole
        # host sum it is in, which may leave others short: repeat until stable.
        while True:
            alive = set(singles) | {p for msg in sums for p in msg.parties}
            short = [p for p in sorted(alive) if self._usable_holders(p, alive, own=True) < t]
            if not short:
                break
            for p in short:
                self._rejections.append(Rejection(
                    p, stage, RejectionReason.LATE,
                    f"only {self._usable_holders(p, alive, own=True)} usable holders of its "
                    f"self-mask seed (threshold {t}): its masked input is left out"))
                singles.pop(p, None)
            sums = [msg for msg in sums if not set(short).intersection(msg.parties)]
        survivors = tuple(sorted(alive))
        dropped = tuple(sorted(self._shared - alive))
        self._require(len(survivors), stage, "masked inputs were accepted")
        for party in dropped:
            partners = tuple(j for j in graph.neighbours_of(party) if j in alive)
            if not partners:
                continue
            holders = self._usable_holders(party, alive, own=False)
            if holders < t:
                self._abort(f"dropped party {party} has {holders} live holders of its "
                            f"recovery key, threshold is {t}")
            self._partners[party] = partners
        self._singles, self._sums = singles, sums
        self._survivors, self._dropped = survivors, dropped
        self._survivor_set, self._dropped_set = frozenset(survivors), frozenset(dropped)
        self._next = Stage.CONSISTENCY
        return ConsistencyRequest(self.config.job_id, self.config.round, survivors)

    def _usable_holders(self, party: int, alive: set[int], *, own: bool) -> int:
        """Live holders of ``party``'s shares that can open them (they did not complain about
        its envelope), counting ``party`` itself if ``own``."""
        bad = self._not_holding.get(party, ())
        return int(own) + sum(1 for j in self.config.graph.neighbours_of(party)
                              if j in alive and j not in bad)

    # -- stage 4a -----------------------------------------------------------------------
    def collect_consistency(self, messages: Iterable[object]) -> UnmaskRequest:
        """The survivors' signatures over U3, forwarded as they are: every holder verifies
        those of its own neighbourhood and counts t before it reveals anything."""
        stage = self._begin(Stage.CONSISTENCY)
        accepted = self._accept(messages, ConsistencySignature, stage, self._survivor_set,
                                self._check_consistency)
        self._require(len(accepted), stage, "survivors signed the survivor set")
        total = np.zeros(self.config.dim, dtype=self.config.dtype)
        for vector in [self._singles[p].vector for p in self._survivors if p in self._singles
                       ] + [msg.vector for msg in self._sums]:
            np.add(total, vector, out=total)
        self._sum = total
        self._singles, self._sums = {}, []
        self._next = Stage.UNMASK
        return UnmaskRequest(self.config.job_id, self.config.round, self._survivors,
                             self._dropped,
                             tuple((p, accepted[p].signature) for p in sorted(accepted)))

    def _check_consistency(self, msg: ConsistencySignature) -> Rejection | None:
        if not isinstance(msg.signature, bytes) or len(msg.signature) != SIGNATURE_BYTES:
            return Rejection(msg.party, Stage.CONSISTENCY, RejectionReason.BAD_SIGNATURE,
                             f"signature must be {SIGNATURE_BYTES} bytes")
        return None

    def _accept_sums(self, messages: list, singles: dict[int, MaskedInput],
                     duplicated: set[int]) -> list[MaskedSum]:
        """The well-formed sums; a party claimed twice (by two sums, by a sum and a single
        input, or by two single inputs: ``duplicated``) makes every message claiming it
        rejected, as in :meth:`_accept`."""
        stage, valid = Stage.MASKED_INPUT, []
        for msg in messages:
            rejection = check_header(msg, MaskedSum, self.config, stage) or self._check_sum(msg)
            if rejection is not None:
                self._rejections.append(rejection)
            else:
                valid.append(msg)
        claims: dict[int, int] = dict.fromkeys(singles, 1)
        claims.update(dict.fromkeys(duplicated, 2))
        for msg in valid:
            for p in msg.parties:
                claims[p] = claims.get(p, 0) + 1
        twice = {p for p, n in claims.items() if n > 1}
        for p in sorted(twice - duplicated):  # _accept has recorded the others
            singles.pop(p, None)
            self._rejections.append(Rejection(
                p, stage, RejectionReason.DUPLICATE_PARTY,
                f"{claims[p]} masked inputs or sums claim party {p}; all are rejected"))
        return [msg for msg in valid if not twice.intersection(msg.parties)]

    def _check_sum(self, msg: MaskedSum) -> Rejection | None:
        stage, config = Stage.MASKED_INPUT, self.config
        parties = msg.parties
        if (not isinstance(parties, tuple) or not parties
                or not all(is_int(p) for p in parties) or len(set(parties)) != len(parties)):
            return Rejection(-1, stage, RejectionReason.MALFORMED,
                             "a masked sum must name distinct party ids")
        for p in parties:
            rejection = check_sender(p, config, stage, self._shared)
            if rejection is not None:
                return rejection
        problem = self._vector_problem(msg.vector)
        if problem:
            return Rejection(parties[0], stage, RejectionReason.MALFORMED, f"masked sum {problem}")
        members = set(parties)
        if not isinstance(msg.rejected, tuple):
            return Rejection(parties[0], stage, RejectionReason.MALFORMED, "rejected: not a tuple")
        reporters = set()
        for entry in msg.rejected:
            if not (type(entry) is tuple and len(entry) == 2 and is_int(entry[0])
                    and entry[0] in members and entry[0] not in reporters
                    and self._reports_neighbours(entry[0], entry[1])):
                return Rejection(parties[0], stage, RejectionReason.MALFORMED,
                                 "rejected must pair a party of the sum with distinct "
                                 "neighbours that shared keys")
            reporters.add(entry[0])
        return None

    def _check_masked(self, msg: MaskedInput) -> Rejection | None:
        stage = Stage.MASKED_INPUT
        problem = self._vector_problem(msg.vector)
        if problem:
            return Rejection(msg.party, stage, RejectionReason.MALFORMED, f"vector {problem}")
        if not self._reports_neighbours(msg.party, msg.rejected_senders):
            return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                             "rejected_senders must list distinct neighbours that shared keys")
        return None

    def _vector_problem(self, vector: object) -> str | None:
        """What is wrong with a masked vector (its type, dtype or shape), or ``None``."""
        config = self.config
        if (isinstance(vector, np.ndarray) and vector.dtype == config.dtype
                and vector.shape == (config.dim,)):
            return None
        got = (f"{vector.dtype} {vector.shape}" if isinstance(vector, np.ndarray)
               else type(vector).__name__)
        return f"must be {config.dtype} of shape ({config.dim},), got {got}"

    def _reports_neighbours(self, reporter: int, reported: object) -> bool:
        """Is ``reported`` a tuple of distinct neighbours of ``reporter`` that shared keys
        (the senders whose envelopes it could not open)?"""
        if not isinstance(reported, tuple):
            return False
        partners = set(self.config.graph.neighbours_of(reporter)) & self._shared
        return (all(is_int(j) and j in partners for j in reported)
                and len(set(reported)) == len(reported))

    # -- stage 4b -----------------------------------------------------------------------
    def finish(self, messages: Iterable[object]) -> AggregateResult:
        stage = self._begin(Stage.UNMASK)
        survivors = self._survivor_set
        accepted = self._accept(messages, UnmaskResponse, stage, survivors, self._check_unmask)
        self._require(len(accepted), stage, "survivors sent their shares")
        config = self.config
        holders = [accepted[h] for h in sorted(accepted)]
        try:
            seeds = self._rebuild(holders, "seed", list(self._survivors),
                                  "survivor {owner}'s self-mask seed")
            keys = self._rebuild(holders, "recovery", sorted(self._partners),
                                 "dropped party {owner}'s recovery key")
            pair_seeds = {p: self._open_recovery(p, key) for p, key in keys.items()}
        except ProtocolError:
            self._next = None
            self._sum = None
            raise
        expander = self._expander or MaskExpander(config.dim, config.dtype)
        total = self._sum
        if total is None:  # cannot happen: _begin(UNMASK) implies collect_consistency ran
            raise ProtocolError("server has no masked sum to unmask")
        transcript = config.transcript
        for party, seed in seeds.items():
            expander.subtract(total, self_mask_key(seed, transcript=transcript, party=party))
        for party, seeds_of in pair_seeds.items():
            for peer in self._partners[party]:
                # the survivor `peer` added the pair mask if peer < party, else subtracted it
                (expander.subtract if peer < party else expander.add)(total, seeds_of[peer])
        self._next = None
        self._sum = None
        everyone = set(config.participants)
        return AggregateResult(
            job_id=config.job_id, round=config.round, total=total, survivors=self._survivors,
            dropped=tuple(sorted(everyone - survivors)), neighbours=config.neighbours,
            threshold=config.threshold, modulus_bits=config.modulus_bits,
            rejections=self.rejections)

    def _open_recovery(self, party: int, key: bytes) -> dict[int, bytes]:
        """The pair seeds a dropped party sealed under its recovery key ``key`` (rebuilt from
        t shares); :class:`ProtocolError` if the blob does not open (a corrupt share)."""
        blob, owners = self._recovery[party]
        try:
            plain = open_envelope(channel_cipher(key), recovery_header(self.config, party), blob)
        except ProtocolError:
            # the key matches party's own commitment, so party sealed a blob that does not
            # open under it: party cheated (its signed share message is the evidence)
            sig = self._share_signatures.get(party, b"")
            self._rejections.append(Rejection(
                party, Stage.SHARE_KEYS, RejectionReason.BAD_SHARE,
                "its sealed pair seeds do not open under the recovery key it committed to "
                f"(signed share message {sig[:8].hex()}...)"))
            self._abort(f"dropped party {party}'s recovery blob does not open under its own "
                        "committed key; its pairwise masks cannot be removed")
        return {j: plain[i * SEED_BYTES:(i + 1) * SEED_BYTES] for i, j in enumerate(owners)}

    def _check_unmask(self, msg: UnmaskResponse) -> Rejection | None:
        stage, graph = Stage.UNMASK, self.config.graph
        survivors, dropped = self._survivor_set, self._dropped_set
        neighbours = graph.neighbours_of(msg.party)
        may_seed = {j for j in neighbours if j in survivors}
        may_seed.add(msg.party)
        may_key = {j for j in neighbours if j in dropped
                   and msg.party not in self._not_holding.get(j, ())}
        for name, owners, shares, allowed in (
                ("seed", msg.seed_owners, msg.seed_shares, may_seed),
                ("recovery", msg.recovery_owners, msg.recovery_shares, may_key)):
            if (not isinstance(owners, tuple) or not isinstance(shares, bytes)
                    or len(shares) != SHARE_BYTES * len(owners)):
                return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                                 f"{name}_shares must be {SHARE_BYTES} bytes per owner")
            if (not all(type(j) is int for j in owners) or len(set(owners)) != len(owners)
                    or not allowed.issuperset(owners)):
                return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                                 f"{name}_owners: {str(owners)[:40]} are not parties this party "
                                 "may send shares of (or one owner twice)")
            if shares and np.frombuffer(shares, dtype="<u4").max() >= PRIME:
                return Rejection(msg.party, stage, RejectionReason.MALFORMED,
                                 f"{name}_shares: a limb is not an element of GF(2**31 - 1)")
        return None

    def _rebuild(self, responses: list[UnmaskResponse], kind: str, owners: list[int],
                 what: str) -> dict[int, bytes]:
        """Each of ``owners``' secrets (``kind``: "seed" or "recovery") from the shares in
        ``responses``, checked against the owner's commitment. Fast path: the first t shares
        of every owner, one numpy gather and one batch Lagrange interpolation for the round.
        An owner whose result misses its commitment goes through :meth:`_robust_rebuild`,
        which names and excludes the holders whose shares are wrong."""
        if not owners:
            return {}
        t, graph = self.config.threshold, self.config.graph
        responses = [m for m in responses if m.party not in self._cheaters]
        listed = [getattr(m, f"{kind}_owners") for m in responses]
        sizes = [len(o) for o in listed]
        owner_of = np.fromiter(itertools.chain.from_iterable(listed), dtype=np.int64)
        holder_of = np.repeat([m.party for m in responses], sizes).astype(np.int64)
        x_of = np.repeat([graph.x_coordinate(m.party) for m in responses], sizes)
        shares = np.frombuffer(b"".join(getattr(m, f"{kind}_shares") for m in responses),
                               dtype="<u4").reshape(-1, LIMBS)
        order = np.argsort(owner_of, kind="stable")  # by owner, holders in id order
        wanted = np.asarray(owners, dtype=np.int64)
        first = np.searchsorted(owner_of[order], wanted, side="left")
        count = np.searchsorted(owner_of[order], wanted, side="right") - first
        if (count < t).any():
            i = int(np.flatnonzero(count < t)[0])
            self._abort(f"only {int(count[i])} shares of {what.format(owner=owners[i])} "
                        f"arrived, threshold is {t}")
        pick = order[first[:, None] + np.arange(t)]
        secrets, ok = combine_checked(x_of[pick], shares[pick])
        label = signing.SEED if kind == "seed" else signing.RECOVERY
        out: dict[int, bytes] = {}
        for i, (p, row, fine) in enumerate(zip(owners, secrets, ok)):
            secret = row.tobytes()
            if fine and self._matches(p, label, secret):
                out[p] = secret
                continue
            rows = order[first[i]:first[i] + count[i]]
            mine = [(int(holder_of[r]), int(x_of[r]), shares[r]) for r in rows]
            out[p] = self._robust_rebuild(p, label, mine, responses, what.format(owner=p))
        return out

    def _matches(self, owner: int, label: bytes, secret: bytes) -> bool:
        commitments = self._commitments.get(owner, b"")
        half = signing.COMMITMENT_BYTES
        expected = commitments[:half] if label == signing.SEED else commitments[half:]
        return signing.commitment(self.config.transcript, owner, label, secret) == expected

    def _robust_rebuild(self, owner: int, label: bytes, shares, responses, what: str) -> bytes:
        """Find t shares of ``owner``'s secret that rebuild its commitment, then check every
        other share against the polynomial they fix: a holder whose share is off is named
        (:attr:`RejectionReason.BAD_SHARE`, with its signature) and all its shares are
        ignored from here on. Aborts only if no t shares match (too few honest ones)."""
        import itertools as it
        import random

        t = self.config.threshold
        shares = [s for s in shares if s[0] not in self._cheaters]
        m = len(shares)
        if m < t:  # cheaters named while rebuilding other secrets held shares of this one
            self._abort(f"only {m} shares of {what} remain from holders not caught cheating, "
                        f"threshold is {t}")
        # leave-one-out over the first t + 1 first (one bad share), then public random subsets
        candidates = it.chain(
            (tuple(i for i in range(t + 1) if i != skip) for skip in range(t + 1) if m > t),
            (tuple(sorted(random.Random(f"{owner}/{n}").sample(range(m), t)))
             for n in range(_SUBSET_TRIES)))
        found = None
        for subset in candidates:
            xs = np.array([[shares[i][1] for i in subset]], dtype=np.int64)
            ys = np.stack([shares[i][2] for i in subset])[None]
            secret, ok = combine_checked(xs, ys)
            if ok[0] and self._matches(owner, label, secret[0].tobytes()):
                found = (subset, secret[0].tobytes())
                break
        if found is None:
            self._abort(f"no {t} shares of {what} match its commitment: too few honest holders")
        subset, secret = found
        xs = [shares[i][1] for i in subset]
        ys = np.stack([shares[i][2] for i in subset])
        by_holder = {msg.party: msg for msg in responses}
        for holder, x, share in shares:
            if (evaluate_shares(xs, ys, x) != share).any():
                self._cheaters.add(holder)
                msg = by_holder.get(holder)
                evidence = self._evidence(msg)
                self._rejections.append(Rejection(
                    holder, Stage.UNMASK, RejectionReason.BAD_SHARE,
                    f"its share of {what} is not on the committed polynomial; {evidence}; "
                    "all its shares are ignored"))
        return secret

    def _evidence(self, msg: UnmaskResponse | None) -> str:
        """The holder's signature over its response, checked: what makes a named cheater
        attributable (and not a message someone else forged in its name)."""
        if msg is None:
            return "no response on record"
        statement = signing.unmask_statement(self.config.transcript, msg.party, msg.seed_owners,
                                             msg.seed_shares, msg.recovery_owners,
                                             msg.recovery_shares)
        key = self.config.roster.public_key(msg.party)
        if self._verifier.verify(key, statement, msg.signature):
            return f"its signed response ({msg.signature[:8].hex()}...) is the evidence"
        return "its response carries no valid signature (forged or tampered in transit)"

    # -- helpers ------------------------------------------------------------------------
    def _begin(self, stage: Stage) -> Stage:
        if self._next is not stage:
            at = self._next.value if self._next else "finished/aborted"
            raise ProtocolError(f"server of round {self.config.round} is at stage {at}, "
                                f"cannot run {stage.value}")
        return stage

    def _accept(self, messages: Iterable[object], expected: type, stage: Stage,
                senders: Iterable[int], check: Callable[[object], Rejection | None],
                duplicated: set[int] | None = None) -> dict[int, object]:
        """The messages that pass ``check``, by party; a party with two or more passing
        messages gets none accepted (and is added to ``duplicated`` if given)."""
        allowed = set(senders)
        candidates: dict[int, list] = {}
        for msg in messages:
            rejection = check_header(msg, expected, self.config, stage)
            if rejection is None:
                rejection = check_sender(msg.party, self.config, stage, allowed)
            if rejection is None:
                try:
                    rejection = check(msg)
                except ProtocolError as err:  # e.g. a field that cannot be encoded
                    rejection = Rejection(msg.party, stage, RejectionReason.MALFORMED, str(err))
            if rejection is not None:
                self._rejections.append(rejection)
                continue
            candidates.setdefault(msg.party, []).append(msg)
        accepted = {}
        for party, copies in candidates.items():
            if len(copies) > 1:  # replayed or forged copies: keep what the party signed
                copies = self._genuine(copies)
            if len(copies) == 1:
                accepted[party] = copies[0]
            else:
                if duplicated is not None:
                    duplicated.add(party)
                self._rejections.append(Rejection(
                    party, stage, RejectionReason.DUPLICATE_PARTY,
                    f"{len(copies)} messages claim party {party}; the server cannot tell which "
                    "is genuine, so all are rejected and the party is dropped"))
        return accepted

    def _genuine(self, copies: list) -> list:
        """Of several messages claiming one party, those it really sent: only these are
        signature-checked (one party, rarely), so a forged or replayed copy cannot knock out
        the genuine one. Identical copies count once; of validly signed adverts the latest
        keyring wins (an old advert replayed after a host restart). Two different validly
        signed messages are the party's own equivocation: all are rejected."""
        unique: list = []
        for msg in copies:
            if not any(msg is u or (type(msg) is not MaskedInput and msg == u) for u in unique):
                unique.append(msg)
        signed = [m for m in unique if self._signed_by_sender(m)]
        if signed and isinstance(signed[0], AdvertiseKeys):
            latest = max(m.issued for m in signed)
            signed = [m for m in signed if m.issued == latest]
        return signed

    def _signed_by_sender(self, msg) -> bool:
        c, key = self.config, self.config.roster.public_key(msg.party)
        if isinstance(msg, AdvertiseKeys):
            return self._check_advert(msg) is None
        if isinstance(msg, ShareKeys):
            statement = signing.share_statement(c.transcript, msg.party, msg.receivers,
                                                msg.envelopes, msg.recovery, msg.commitments)
        elif isinstance(msg, MaskedInput):
            complaints = ((msg.party, msg.rejected_senders),) if msg.rejected_senders else ()
            statement = signing.masked_statement(c.transcript, (msg.party,), msg.vector,
                                                 complaints)
        elif isinstance(msg, ConsistencySignature):
            statement = signing.consistency_statement(c.transcript, self._survivors)
        elif isinstance(msg, UnmaskResponse):
            statement = signing.unmask_statement(c.transcript, msg.party, msg.seed_owners,
                                                 msg.seed_shares, msg.recovery_owners,
                                                 msg.recovery_shares)
        else:
            return False
        return self._verifier.verify(key, statement, msg.signature)

    def _require(self, count: int, stage: Stage, what: str) -> None:
        if count < self.config.threshold:
            self._abort(f"only {count} {what} at {stage.value}, threshold is "
                        f"{self.config.threshold}")

    def _abort(self, why: str) -> None:
        self._next = None
        self._sum = None
        raise ThresholdError(f"round {self.config.round} of job {self.config.job_id!r} aborted, "
                             f"nothing released: {why}")

