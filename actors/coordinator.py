"""SmpcCoordinator: the server side of aggregation, one Ray actor per job.

Modes (``secure_aggregation.mode``):

* ``secagg+`` / ``secagg`` — the server side of SecAgg+ (:class:`lepton_ray.secagg.SecAggServer`):
  relays encrypted shares between parties, collects masked inputs, asks survivors for the
  shares that remove masks, and learns only the sum. It never holds a single party's
  unmasked update.
* ``none`` — plain sum of the hosts' partial sums. The coordinator sees every host's update
  in the clear (with one party per host, every party's update), so this mode says so loudly.

With central differential privacy the coordinator adds discrete Gaussian noise to the
unmasked sum in the ring, before dequantising (DP-FedAvg, McMahan et al. 2018; Canonne,
Kamath and Steinke 2020): it must be trusted to add it and to forget the un-noised sum.
Noise is integer-valued, sampled exactly from OS CSPRNG bits; no floating-point noise. In
``none`` mode with DP the hosts quantise too and send ring sums, so the same holds.

Secure stage methods take each host's message list (Ray resolves the refs) and return
``(StageStatus, payload...)``: a round that falls below threshold is reported as aborted,
never released.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from lepton_ray.config import SecureAggregation
from lepton_ray.errors import ThresholdError
from lepton_ray.learning.aggregation import PartialSum, reduce
from lepton_ray.privacy.dpfedavg import RingNoise

PLAINTEXT_WARNING = (
    "WARNING secure_aggregation is 'none': the coordinator sees each host's update in the "
    "clear (with one party per host, each party's own update). Use 'secagg+' unless every "
    "party trusts the coordinator."
)


@dataclass(frozen=True)
class StageStatus:
    ok: bool
    reason: str = ""
    rejections: tuple = ()  # lepton_ray.secagg.Rejection values, new at this stage


@dataclass(frozen=True)
class Released:
    """What leaves the coordinator: the (noised) sum, and who is in it."""

    total: np.ndarray
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()


class SmpcCoordinator:
    def __init__(self, mode: SecureAggregation):
        self.mode = mode
        self.server = None
        self.plan = None
        self.noise: RingNoise | None = None
        self._seen_rejections = 0
        self._verifier = None  # advert signatures, memoised across rounds (adverts are per job)
        if mode is SecureAggregation.NONE:
            print(PLAINTEXT_WARNING, file=sys.stderr, flush=True)

    def ready(self) -> str:
        return self.mode.value

    def _release(self, ring_total: np.ndarray, noise, quantization, rule=None) -> np.ndarray:
        """Central DP: discrete Gaussian noise added to the sum *in the ring* (integers from
        the OS CSPRNG, :mod:`lepton_ray.privacy.discrete_gaussian`), then dequantised: no
        floating-point noise. The un-noised sum is dropped here. ``rule``: the round's
        ``UpdateRule``, whose federated-evaluation counts are exact integers in the ring
        (never noised: the config refuses federated evaluation under DP)."""
        from lepton_ray.learning.party_update import ring_to_float

        if noise is not None:
            ring_total = noise.add_to(ring_total)
        return ring_to_float(ring_total, quantization, rule)

    # ------------------------------------------------------------------ plaintext
    def aggregate(self, round_: int, noise: RingNoise | None, *partials: PartialSum) -> Released:
        """Reduce the hosts' partial sums (Ray resolves them from the object store) and
        release the sum, noised when central DP is on."""
        total = reduce(list(partials))
        if noise is None:
            return Released(total=total.total)
        return Released(total=self._release(total.total, noise, noise.quantization))

    # ------------------------------------------------------------------ SecAgg+
    def begin(self, plan, noise: RingNoise | None) -> None:
        from lepton_ray.crypto.identity import SignatureVerifier
        from lepton_ray.secagg import SecAggServer

        if self._verifier is None:
            self._verifier = SignatureVerifier()
        self.server = SecAggServer(plan.config, verifier=self._verifier)
        self.plan = plan
        self.noise = noise
        self._seen_rejections = 0

    def collect_adverts(self, host_parties: list[list[int]], *host_messages):
        return self._stage(lambda msgs: self.server.collect_adverts(msgs),
                           *self._own(host_parties, host_messages))

    def route_shares(self, host_parties: list[list[int]], *host_messages):
        """Returns ``(status, inbox dict for host 0, for host 1, ...)``: each host receives
        only its own parties' encrypted shares."""
        status, inboxes = self._stage(lambda msgs: self.server.route_shares(msgs),
                                      *self._own(host_parties, host_messages))
        if not status.ok:
            return (status, *({} for _ in host_parties))
        per_host = tuple({p: inboxes[p] for p in parties if p in inboxes} for parties in host_parties)
        return (status, *per_host)

    def collect_masked(self, host_parties: list[list[int]], *host_messages):
        """A masked sum is taken whole or not at all, so one false claim must not knock out a
        host's sum: a host's message naming a party of another host is dropped here."""
        return self._stage(lambda msgs: self.server.collect_masked(msgs),
                           *self._own(host_parties, host_messages))

    def collect_consistency(self, host_parties: list[list[int]], *host_messages):
        return self._stage(lambda msgs: self.server.collect_consistency(msgs),
                           *self._own(host_parties, host_messages))

    @staticmethod
    def _own(host_parties, host_messages):
        """Every stage: ``host_parties[i]`` are the parties placed on the host that sent
        ``host_messages[i]``; a message naming a party of another host is refused here
        (IMPERSONATION, naming the party it claimed), so one host cannot speak, replay or
        equivocate for another's parties and knock them out. Returns (kept, refusals)."""
        from lepton_ray.secagg import MaskedSum, Rejection, RejectionReason

        kept, refused = [], []
        for own, batch in zip(host_parties, host_messages, strict=True):
            own = set(own)
            for msg in batch:
                named = (getattr(msg, "parties", None) if isinstance(msg, MaskedSum)
                         else (getattr(msg, "party", None),))
                try:
                    foreign = [p for p in named if isinstance(p, int) and p not in own]
                except TypeError:  # not a tuple of ids: the server rejects it as malformed
                    foreign = []
                if foreign:
                    refused.append(Rejection(
                        foreign[0] if isinstance(foreign[0], int) else -1,
                        type(msg).STAGE, RejectionReason.IMPERSONATION,
                        f"a host's {type(msg).__name__} names parties {foreign[:8]} placed on "
                        "another host; the message is dropped"))
                else:
                    kept.append(msg)
        return [kept], refused

    def finish(self, host_parties: list[list[int]], *host_messages):
        """Unmask, (central DP) noise in the ring, dequantise; only this leaves the actor."""
        status, result = self._stage(lambda msgs: self.server.finish(msgs),
                                     *self._own(host_parties, host_messages))
        if not status.ok:
            return status, None
        if self.plan.skellam is not None:  # distributed DP: the sum already carries the noise
            from lepton_ray.privacy.skellam import decode_sum

            total = decode_sum(result.total, self.plan.skellam, signs=self.plan.rotation_signs())
        else:
            total = self._release(result.total, self.noise, self.plan.quantization, self.plan.rule)
        self.server = None  # the round's protocol state (and the un-noised sum) goes
        return status, Released(total=total, survivors=tuple(result.survivors),
                                dropped=tuple(result.dropped))

    def _stage(self, work, host_messages, refused=()):
        """Run a server stage on every host's messages; ``refused``: rejections made here,
        before the server saw the messages."""
        messages = [m for batch in host_messages for m in batch]
        try:
            out = work(messages)
        except ThresholdError as exc:
            return StageStatus(False, str(exc), tuple(refused) + self._new_rejections()), None
        return StageStatus(True, "", tuple(refused) + self._new_rejections()), out

    def _new_rejections(self) -> tuple:
        allr = self.server.rejections if self.server is not None else ()
        new = tuple(allr[self._seen_rejections :])
        self._seen_rejections = len(allr)
        return new
