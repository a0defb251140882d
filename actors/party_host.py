"""PartyHost: one Ray actor hosting one or many federated parties.

Simulation runs about one host per CPU, each hosting N/W parties; a deployment runs one
host per party on that party's node. Every exchange is batched: one call per round stage
carries the work of all the parties this host holds, so Ray calls grow with hosts, not
parties. The host holds state (its parties' data, in the object store once; their identity
keys; this round's SecAgg+ party state machines) and moves messages. Training happens in
:func:`actors.training.train_task`; protocol logic in :mod:`lepton_ray.secagg`.

Every stage method returns ``(StageReport, payload)`` (called with ``num_returns=2``), so
the driver reads the small report and forwards the payload to the coordinator through the
object store without fetching it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import ray

from lepton_ray.config import JobSpec
from lepton_ray.errors import DataError, PrivacyError, ProtocolError
from lepton_ray.learning.aggregation import PartialSum
from lepton_ray.learning.local import party_seed, public_party_seed


@dataclass(frozen=True)
class StageReport:
    """Small per-stage metadata the driver reads (the messages travel separately): only what
    the protocol needs (who answered, who failed and why), where the work ran, and how many
    Ray calls it took. Nothing computed from party data: a host's example count, loss or
    clip count would be one party's own values in a deployment (one host per party), so
    they travel as coordinates of the summed vector (:mod:`lepton_ray.learning.party_update`)
    and the coordinator and driver see only their totals."""

    host: int
    parties: tuple[int, ...]  # parties that sent this stage's message
    failed: tuple[tuple[int, str], ...] = ()  # (party, reason) that could not
    device: str = ""
    ray_calls: int = 0


@dataclass
class _Round:
    round: int
    plan: object  # lepton_ray.learning.party_update.SecureRoundPlan
    cohort: object = None  # lepton_ray.secagg.cohort.PartyCohort
    training: object = None  # ObjectRef of the training task
    order: list = field(default_factory=list)


class PartyHost:
    """``datasets`` are the parties' ``(X, y)`` in simulation. In a deployment
    (``parties.deploy``) they are ``None``: the host reads its party's file from its own
    node's disk, standardised with the ``server`` statistics, and its training tasks request
    the party's node resource, so the raw data never leaves that node."""

    def __init__(self, host: int, spec: JobSpec, party_ids: list[int], datasets: list | None,
                 n_features: int, n_classes: int, server=None, *, prior_rounds: int = 0,
                 identity_seed: bytes | None = None, first_round: int = 0,
                 identity_keys: dict[int, bytes] | None = None,
                 participation_log: str | None = None, record: str | None = None):
        from lepton_ray.secagg.keys import ParticipationLog, PartyKeyring

        self.host = host
        self.spec = spec
        self.party_ids = list(party_ids)
        self.index = {p: i for i, p in enumerate(self.party_ids)}
        self.n_features = n_features
        self.n_classes = n_classes
        self.task_resources: dict[str, float] = {}
        if datasets is None:
            from lepton_ray.learning.data import as_float32, load_party_file

            deployed = [spec.parties.deploy[p] for p in self.party_ids]
            datasets = list(as_float32([
                load_party_file(spec.data, d.data, server, field=f"parties.deploy[{p}].data")
                for p, d in zip(self.party_ids, deployed)]))
            self.task_resources = {d.node_resource: 0.001 for d in deployed}
        t = spec.training
        gpus, cpus = t.gpus_per_party, t.cpus_per_task
        if spec.parties.deploy:  # a deployed party may bring its own resources
            party = spec.parties.deploy[self.party_ids[0]]
            gpus = party.gpus if party.gpus is not None else gpus
            cpus = party.cpus if party.cpus is not None else cpus
        self.task_options = {"num_gpus": gpus, "num_cpus": cpus,
                             "resources": self.task_resources or None,
                             **({"memory": t.memory_mb * 2**20} if t.memory_mb else {})}
        self.sizes = [len(y) for _, y in datasets]
        self.eval_ref = None
        if spec.evaluation.federated:  # each party's own held-out rows (public split from seed)
            from lepton_ray.learning.fed_eval import holdout_split

            split = [holdout_split(X, y, spec.evaluation.holdout, spec.seed, p)
                     for p, (X, y) in zip(self.party_ids, datasets)]
            datasets = [train for train, _ in split]
            self.eval_ref = ray.put([held for _, held in split])
        self.data_ref = ray.put(datasets)  # once, in this node's object store
        # Each party's long-term Ed25519 identity, derived from the host's identity seed so a
        # restarted host has the same identities and the job's roster never changes; and its
        # SecAgg+ key material (X25519 keys, pair secrets, signature memo, participation log).
        # The private keys never leave this process.
        # A federation site passes its kit's identity (``identity_keys``: party -> Ed25519
        # private bytes; the actor runs on the site's own Ray) and its participation log, a
        # file in the site's state directory that survives restarts.
        if identity_keys is not None:
            from lepton_ray.crypto.identity import IdentityKey

            if sorted(identity_keys) != sorted(self.party_ids):
                raise ProtocolError(f"host {host}: identity keys for {sorted(identity_keys)}, "
                                    f"parties {self.party_ids}")
            self.identities = {p: IdentityKey.from_private_bytes(k)
                               for p, k in identity_keys.items()}
        else:
            self.identities = party_identities(identity_seed or os.urandom(32), self.party_ids)
        self.keyring = PartyKeyring(participation=ParticipationLog(participation_log))
        self.record = record  # test mode (federation --record): each round's ring inputs here
        self.first_round = int(first_round)  # a restarted host never joins an earlier round
        self.pins = None  # the job's lepton_ray.secagg.JobPins, set by pin()
        self.round: _Round | None = None
        self._rings: np.ndarray | None = None  # quantised updates, reused across rounds
        # How often each party ran local DP-SGD (record-level accounting). It never leaves the
        # host (it would reveal who was sampled): the host tells each party its own epsilon and
        # the driver only the maximum. A host started on a resume or after a crash does not know
        # the rounds before, so it counts every party in all of them: over-count, never under.
        self.participation = dict.fromkeys(self.party_ids, int(prior_rounds))

    def ready(self) -> int:
        return len(self.party_ids)

    def placement(self) -> dict:
        """Where this host runs and which object stores hold its parties' rows. Nothing about
        the rows themselves: in a deployment a host is one party, and its row count is a
        statistic of that party's data that would reach the driver outside the secure sum
        (the example counts a round needs travel inside it, as extra coordinates)."""
        from ray.experimental import get_object_locations

        where = get_object_locations([self.data_ref])[self.data_ref]
        return {"node": ray.get_runtime_context().get_node_id(),
                "data_nodes": sorted(where["node_ids"])}  # every object store holding the rows

    def public_keys(self) -> dict[int, bytes]:
        return {p: k.public_bytes for p, k in self.identities.items()}

    def pin(self, pins) -> None:
        """Fix the job's public parameters (job id, roster hash, graph seed, k/t policy) that
        every round's plan is checked against (:class:`lepton_ray.secagg.JobPins`)."""
        from lepton_ray.secagg import JobPins

        if type(pins) is not JobPins:
            raise ProtocolError(f"host {self.host}: pins must be JobPins")
        if self.pins is not None and self.pins != pins:
            raise ProtocolError(f"host {self.host}: the job's pins are already fixed and differ")
        self.pins = pins

    # ------------------------------------------------------------------ training
    def _goes_silent(self, round_: int, party: int) -> bool:
        """``parties.simulated_dropout``: does ``party`` go silent this round? Public
        randomness from (seed, round, party), so runs are reproducible. It may stay public:
        it is a test harness that models dropouts, and nothing DP relies on it (a real
        dropout is not random at all; the accounting never assumes dropouts are secret)."""
        rate = self.spec.parties.simulated_dropout
        if not rate:
            return False
        return float(np.random.default_rng([self.spec.seed, round_, party, 0x5D]).random()) < rate

    def _launch_training(self, round_: int, params_box: list, sampled: list[int], *, fold=None,
                         ring=None, evaluate=(), rule=None):
        from actors.training import train_task

        picks = [self.index[p] for p in sampled]
        for p in sampled:  # counted when its training starts: a later drop over-counts
            self.participation[p] += 1
        if self.spec.training.deterministic_seeds:  # non-private reproducible runs (tests) only
            seeds = [public_party_seed(self.spec.seed, round_, p) for p in sampled]
        else:
            seeds = [party_seed() for _ in sampled]  # secret: drawn here from the OS, never logged
        task = train_task.options(**self.task_options)
        rule = fold if fold is not None else rule  # the round's UpdateRule
        evaluating = rule is not None and rule.eval_classes > 0
        if evaluating and self.eval_ref is None:
            raise ProtocolError(f"host {self.host}: asked to evaluate but holds no held-out rows")
        chosen = set(evaluate)
        return task.remote(self.spec, self.n_features, self.n_classes, params_box[0],
                           self.data_ref, picks, seeds, fold=fold, ring=ring,
                           eval_data=self.eval_ref if evaluating else None,
                           evaluate=tuple(j for j, p in enumerate(sampled) if p in chosen))

    def train(self, round_: int, params_box: list, sampled: list[int], rule,
              ring=None, evaluate: tuple[int, ...] = ()) -> tuple[StageReport, PartialSum]:
        """Plaintext path: train ``sampled`` from the global parameters in ``params_box[0]``
        (an ObjectRef, boxed so Ray hands it on without fetching it); return the sum of their
        update vectors under ``rule`` (an ``UpdateRule``). ``ring`` (central DP):
        ``(quantization, rounding bound)``: the vectors are conditionally rounded into the
        ring and summed there, so the coordinator can add integer noise to the ring sum.
        ``evaluate``: the sampled parties that also evaluate the global model on their held-out
        rows (when ``rule.eval_classes``)."""
        silent = [p for p in sampled if self._goes_silent(round_, p)]
        sampled = [p for p in sampled if p not in silent]
        if not sampled:  # every party of this host went silent: an empty partial sum
            width = rule.width(len(ray.get(params_box[0])))
            if ring is None:
                empty = PartialSum(total=np.zeros(width), parties=0)
            else:
                from lepton_ray.crypto.prg import ring_dtype

                empty = PartialSum(total=np.zeros(width, dtype=ring_dtype(ring[0].modulus_bits)),
                                   parties=0)
            return StageReport(host=self.host, parties=(),
                               failed=tuple((p, "simulated dropout") for p in silent)), empty
        (partial, _clipped, _losses, _examples, bad), device = ray.get(
            self._launch_training(round_, params_box, sampled, fold=rule, ring=ring,
                                  evaluate=evaluate))
        dropped = {sampled[i] for i in bad}
        report = StageReport(
            host=self.host, parties=tuple(p for p in sampled if p not in dropped),
            failed=tuple((p, "its update has non-finite values (training diverged)") for p in sorted(dropped))
            + tuple((p, "simulated dropout") for p in silent),
            device=device, ray_calls=1,
        )
        return report, partial

    def record_level_epsilon_max(self) -> float:
        """Each of this host's parties' record-level DP-SGD epsilon, written to this host's own
        log (in a deployment: on the party's node) and reported to no one else; returns only
        their maximum, for the job summary."""
        from lepton_ray.privacy.accountants import AccountantKind
        from lepton_ray.privacy.calibration import record_level_epsilon_over_rounds

        d, t = self.spec.privacy.dp_sgd, self.spec.training
        kind = AccountantKind(self.spec.privacy.accountant.value)
        cache: dict[tuple[int, int], float] = {}
        worst = 0.0
        for p, n in zip(self.party_ids, self.sizes):
            key = (int(n), self.participation[p])
            if key not in cache:
                cache[key] = record_level_epsilon_over_rounds(
                    n_local=key[0], rounds=key[1], batch_size=t.batch_size, epochs=t.epochs,
                    noise_multiplier=d.noise_multiplier, delta=d.delta, accountant=kind)
            print(f"party {p}: record-level DP-SGD epsilon {cache[key]:.4g} at delta {d.delta:g} "
                  f"({key[1]} rounds of local training)", file=sys.stderr, flush=True)
            worst = max(worst, cache[key])
        return worst

    # ------------------------------------------------------------------ SecAgg+ stages
    def advertise(self, round_: int, plan, params_box: list, sampled: list[int],
                  evaluate: tuple[int, ...] = ()):
        """Stage 1: start training (it overlaps the key stages), make each sampled party's
        round state and return their signed adverts. ``evaluate``: the sampled parties that
        also evaluate the global model (when ``plan.rule.eval_classes``)."""
        from lepton_ray.secagg import SecAggParty
        from lepton_ray.secagg.cohort import PartyCohort

        config = plan.config
        if self.pins is None:
            raise ProtocolError(f"host {self.host}: no job pins; refusing to run a round")
        if config.round < self.first_round or config.round != round_:
            why = (f"round {config.round} started before this host did (restarted in round "
                   f"{self.first_round}): its parties never run a round twice")
            self.round = None
            return self._report([], [(p, why) for p in sampled], ray_calls=1), []
        state = _Round(round=round_, plan=plan)
        failed = []
        try:
            self.keyring.check_plan(config, self.pins)
        except ProtocolError as exc:  # the server's plan is not the job's: nobody takes part
            self.round = None
            return self._report([], [(p, str(exc)) for p in sampled], ray_calls=1), []
        again = set(self.keyring.participation.claim(config.job_id, config.round, sampled))
        failed += [(p, f"already took part in round {config.round}: never twice") for p in
                   sorted(again)]
        sampled = [p for p in sampled if p not in again]
        state.training = self._launch_training(round_, params_box, sampled, evaluate=evaluate,
                                               rule=plan.rule)
        state.order = list(sampled)
        parties = {}
        for p in sampled:
            try:
                parties[p] = SecAggParty(party=p, identity=self.identities[p], config=config,
                                         keyring=self.keyring, pins=self.pins, claimed=True)
            except ProtocolError as exc:
                failed.append((p, str(exc)))
        state.cohort = PartyCohort(config, parties)
        self.round = state
        adverts, more = state.cohort.advertise()
        return self._report(adverts, failed + more, ray_calls=1), adverts

    def share_keys(self, round_: int, broadcast):
        """Stage 2: every party Shamir-shares its self-mask seed and recovery key to its
        neighbours (one batch for the host), encrypted pairwise, and seals its pair seeds
        under the recovery key."""
        messages, failed = self._state(round_).cohort.share_keys(broadcast)
        return self._report(messages, failed), messages

    def masked_input(self, round_: int, inboxes: dict):
        """Stage 3: clip, weight and quantise each party's delta, then mask them into one
        sum for the host (:meth:`PartyCohort.masked_sum`)."""
        from lepton_ray.learning.party_update import encode_ring_batch

        state = self._state(round_)
        cohort = state.cohort
        result, device = ray.get(state.training)
        rule, quant = state.plan.rule, state.plan.quantization
        row = {p: i for i, p in enumerate(state.order)}
        if state.plan.skellam is None:  # every party's vector in one vectorised pass
            batch = encode_ring_batch(result.deltas, result.examples, rule, quant,
                                      norm_bound_sq=state.plan.rounding_bound_sq,
                                      out=self._ring_buffer(result.deltas.shape[0],
                                                            rule.width(result.deltas.shape[1]),
                                                            quant.modulus_bits),
                                      losses=result.losses if rule.stats else None,
                                      evals=result.evals if rule.eval_classes else None)
            diverged = set(batch.bad)

            def encode(i):
                if i in diverged:
                    raise DataError("its update has non-finite values (training diverged)")
                return batch.rings[i], bool(batch.clipped[i])
        else:  # distributed DP: each party adds its own noise share
            from lepton_ray.privacy.skellam import encode_update as skellam_encode
            from lepton_ray.privacy.skellam import os_seeded_generator

            params, signs = state.plan.skellam, state.plan.rotation_signs()

            def encode(i):
                enc = skellam_encode(result.deltas[i], params, signs=signs, rng=os_seeded_generator())
                return enc.values, enc.clipped
        vectors, clipped, failed = {}, {}, []
        for p in list(cohort.parties):
            if p in inboxes and self._goes_silent(round_, p):
                failed.append((p, "simulated dropout"))
                cohort.drop(p)
                continue
            try:
                vectors[p], clipped[p] = encode(row[p])
            except (DataError, PrivacyError) as exc:  # e.g. a diverged, non-finite update
                failed.append((p, str(exc)))
                cohort.drop(p)
        if self.record is not None:
            self._record_inputs(state.plan.config, vectors)
        messages, more = cohort.masked_sum(inboxes, vectors)
        sent = messages[0].parties if messages else ()
        report = StageReport(host=self.host, parties=sent, failed=tuple(failed + more), device=device)
        return report, messages

    def consistency(self, round_: int, request):
        """Stage 4a: each survivor signs the survivor set, once (Bonawitz et al. 2017, §4)."""
        messages, failed = self._state(round_).cohort.consistency(request)
        return self._report(messages, failed), messages

    def unmask(self, round_: int, request):
        """Stage 4b: send the shares that remove survivors' self masks and dropped parties'
        pairwise masks; then forget the round. With distributed DP an honest party refuses
        when fewer parties survived than the noise was calibrated for (their noise shares
        would not add up to the promised variance), so such a sum is never revealed. It
        counts only survivors whose signature over the survivor set verifies: a list padded
        with parties that never sent a noised input carries no signature of theirs."""
        state = self._state(round_)
        skellam = state.plan.skellam
        signed = (self._signed_survivors(state.plan.config, request) if skellam is not None
                  else 0)
        if skellam is not None and signed < skellam.min_survivors:
            why = (f"only {signed} survivors signed the survivor set, the noise needs "
                   f"{skellam.min_survivors}: refusing to unmask")
            failed = tuple((p, why) for p in state.cohort.parties)
            self.round = None
            return StageReport(host=self.host, parties=(), failed=failed), []
        messages, failed = state.cohort.unmask(request)
        self.round = None
        return self._report(messages, failed), messages

    # ------------------------------------------------------------------ helpers
    def _record_inputs(self, config, vectors: dict) -> None:
        """Test mode: write each party's ring input of this round (one host per party in a
        federation: ``<job>-round-<r>.npy``)."""
        from pathlib import Path

        out = Path(self.record)
        out.mkdir(parents=True, exist_ok=True)
        for p, vector in vectors.items():
            name = (f"{config.job_id}-round-{config.round}" if len(self.party_ids) == 1
                    else f"{config.job_id}-round-{config.round}-party-{p}")
            np.save(out / f"{name}.npy", vector)

    def _signed_survivors(self, config, request) -> int:
        """How many listed survivors signed the survivor set (each checked once per host; the
        set and its statement are the keyring's, which the parties' own checks reuse)."""
        signatures = getattr(request, "signature_of", None)
        if signatures is None:
            return 0
        alive, statement, problem = self.keyring.survivor_view(
            getattr(request, "survivors", None), config)
        if problem:
            return 0
        verify, roster = self.keyring.verifier.verify, config.roster
        return sum(1 for p, sig in signatures.items()
                   if p in alive and verify(roster.public_key(p), statement, sig))

    def _ring_buffer(self, rows: int, width: int, modulus_bits: int) -> np.ndarray:
        """The host's quantised-update buffer, reused while the round shape stays the same
        (its contents only live until the round's masked sum is made)."""
        from lepton_ray.crypto.prg import ring_dtype

        dtype = ring_dtype(modulus_bits)
        buf = self._rings
        if buf is None or buf.shape != (rows, width) or buf.dtype != dtype:
            buf = self._rings = np.empty((rows, width), dtype=dtype)
        return buf

    def _state(self, round_: int) -> _Round:
        if self.round is None or self.round.round != round_:
            have = None if self.round is None else self.round.round
            raise ProtocolError(f"host {self.host}: asked for round {round_}, holds round {have}")
        return self.round

    def _report(self, messages, failed, ray_calls: int = 0) -> StageReport:
        return StageReport(host=self.host, parties=tuple(m.party for m in messages),
                           failed=tuple(failed), ray_calls=ray_calls)

    # test hooks: a crash of this host's process, and a host too busy to answer in time
    def die(self) -> None:
        os._exit(1)

    def stall(self, seconds: float) -> None:
        import time

        time.sleep(seconds)



def party_identities(seed: bytes, party_ids) -> dict:
    """Each party's Ed25519 identity key from the host's 32-byte identity seed (HKDF, one key
    per party id): the same seed gives the same keys, so a host restarted with it keeps its
    parties' roster identities. The seed comes from the OS CSPRNG in the driver of a
    single-cluster job (whose operator is one trust domain with its hosts, see the README's
    threat model); across organisations each site holds its own key (lepton_ray.federation)."""
    from lepton_ray.crypto.identity import IdentityKey
    from lepton_ray.crypto.kdf import KeyPurpose, derive_key

    if not isinstance(seed, bytes) or len(seed) != 32:
        raise ProtocolError("identity seed must be 32 bytes")
    return {p: IdentityKey.from_private_bytes(derive_key(seed, KeyPurpose.IDENTITY, p))
            for p in party_ids}
