"""The parties one host runs in a round, driven through SecAgg+ together.

Every party is still its own :class:`~lepton_ray.secagg.party.SecAggParty` state machine with
its own checks; the cohort only batches the costly steps across them:

* ``share_keys``: all parties' self-mask seeds and recovery keys are Shamir-shared in one
  :func:`~lepton_ray.crypto.shamir.split_secrets` call per holder count;
* ``masked_sum``: the parties' masked inputs are added up on the host into one
  :class:`~lepton_ray.secagg.messages.MaskedSum`. When two parties in that sum are each
  other's partners, one would add PRG(s_uv) and the other subtract it, so neither expands
  it: the sum is bit for bit the sum of the :class:`MaskedInput` vectors they would have
  sent one by one (a test checks this), with one mask expansion per cross-host pair end
  and per self mask instead of one per pair end. The server sees that sum, which it could
  compute from the single inputs, so it learns less, never more (with one party per host,
  as in a deployment, the sum is that party's masked input).

A party that fails a stage (a bad message, too few live neighbours, a bad vector) leaves
the cohort and is reported; the others go on, exactly as they would on separate hosts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

from lepton_ray.crypto.prg import MaskExpander
from lepton_ray.crypto.shamir import split_secrets
from lepton_ray.errors import DataError, ProtocolError, ThresholdError
from lepton_ray.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedSum,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from lepton_ray.secagg.party import SecAggParty
from lepton_ray.secagg.signing import masked_statement
from lepton_ray.secagg.plan import RoundConfig

Failure = tuple[int, str]  # (party, why it left the round)
_PARTY_ERRORS = (ProtocolError, ThresholdError, DataError)


class PartyCohort:
    """A host's parties of one round (see the module docstring). Stages in order, once each:
    :meth:`advertise`, :meth:`share_keys`, :meth:`masked_sum`, :meth:`consistency`,
    :meth:`unmask`; each returns the messages for the server and the parties that failed."""

    def __init__(self, config: RoundConfig, parties: Mapping[int, SecAggParty], *,
                 expander: MaskExpander | None = None,
                 entropy: Callable[[int], bytes] = os.urandom):
        self.config = config
        self.parties = dict(sorted(parties.items()))
        self._expander = expander or MaskExpander(config.dim, config.dtype)
        self._entropy = entropy

    def drop(self, party: int) -> None:
        """Take ``party`` out of the round (it goes silent, like a dropout)."""
        self.parties.pop(party, None)

    def advertise(self) -> tuple[list[AdvertiseKeys], list[Failure]]:
        adverts, failed = self._each(lambda p, party: party.advertise())
        return list(adverts.values()), failed

    def share_keys(self, broadcast: KeyBroadcast) -> tuple[list[ShareKeys], list[Failure]]:
        holders, failed = self._each(lambda p, party: party.share_holders(broadcast))
        by_count: dict[int, list[int]] = {}
        for p, hs in holders.items():
            by_count.setdefault(len(hs), []).append(p)
        graph, shares = self.config.graph, {}
        for group in by_count.values():  # one batch per number of holders
            xs = np.array([[graph.x_coordinate(h) for h in holders[p]] for p in group])
            secrets = np.concatenate([self.parties[p].secrets() for p in group])
            split = split_secrets(secrets, threshold=self.config.threshold,
                                  xs=np.repeat(xs, 2, axis=0), entropy=self._entropy)
            for i, p in enumerate(group):
                shares[p] = split[2 * i:2 * i + 2]
        sealed, more = self._each(lambda p, party: party.seal_shares(holders[p], shares[p]))
        return list(sealed.values()), failed + more

    def masked_sum(self, inboxes: Mapping[int, ShareInbox],
                   vectors: Mapping[int, np.ndarray]) -> tuple[list[MaskedSum], list[Failure]]:
        """One :class:`MaskedSum` of every party that has an inbox and a vector (parties
        without either leave the round), or no message if none is left."""
        failed = [self._leave(p, "no share inbox from the coordinator" if p not in inboxes
                              else "no input vector")
                  for p in list(self.parties) if p not in inboxes or p not in vectors]
        partners, more = self._each(lambda p, party: party.open_inbox(inboxes[p], vectors[p]))
        failed += more
        if not partners:
            return [], failed
        c = self.config
        total = np.zeros(c.dim, dtype=c.dtype)
        for p in partners:
            np.add(total, vectors[p], out=total)
        rejected = []
        for p, mine in partners.items():
            in_sum = [j for j in mine if j in partners and p in partners[j]]
            bad = self.parties[p].mask_into(total, self._expander, skip=frozenset(in_sum))
            if bad:
                rejected.append((p, bad))
        members, complaints = tuple(partners), tuple(rejected)
        statement = masked_statement(c.transcript, members, total, complaints)  # hashed once
        signatures = tuple(self.parties[p].sign_masked(members, total, complaints, statement)
                           for p in members)
        return [MaskedSum(c.job_id, c.round, members, total, complaints, signatures)], failed

    def consistency(self, request: ConsistencyRequest
                    ) -> tuple[list[ConsistencySignature], list[Failure]]:
        signed, failed = self._each(lambda p, party: party.consistency(request))
        return list(signed.values()), failed

    def unmask(self, request: UnmaskRequest) -> tuple[list[UnmaskResponse], list[Failure]]:
        """Each party checks t signatures of its neighbourhood over the survivor set it
        signed; those of co-hosted parties that signed the same statement are counted without
        verification (they are this host), so a host verifies only other hosts' signatures,
        and each party stops at t."""
        signed = {p: party.signed_statement for p, party in self.parties.items()}
        groups: dict[bytes | None, frozenset[int]] = {}
        for statement in set(signed.values()):
            groups[statement] = frozenset(p for p, s in signed.items() if s == statement)
        responses, failed = self._each(
            lambda p, party: party.unmask(request, co_signed=groups.get(signed[p], ())
                                          if signed[p] is not None else ()))
        self.parties.clear()
        return list(responses.values()), failed

    def _each(self, act) -> tuple[dict, list[Failure]]:
        """``act(p, party)`` for every party still in the round: the results by party, and
        the parties that failed (they leave the round)."""
        results, failed = {}, []
        for p, party in list(self.parties.items()):
            try:
                results[p] = act(p, party)
            except _PARTY_ERRORS as exc:
                failed.append(self._leave(p, exc))
        return results, failed

    def _leave(self, party: int, why: Exception | str) -> Failure:
        self.parties.pop(party, None)
        return party, str(why)
