"""``lepton-ray party``: one organisation's site process in a federation.

The site dials **out** to the coordinator named in its kit (mutual TLS, :mod:`.transport`)
and reconnects after network failures and coordinator restarts. Everything it receives is a
schema-checked message (:mod:`.wire`), never code:

1. ``JobOffer``: the job spec as data. The site's own policy (:class:`.policy.SitePolicy`)
   accepts or refuses it; the refusal's reason goes back to the coordinator, which records it.
   The spec never names the site's data: the site runs it on its own ``--data`` file.
2. ``prepare`` (:class:`.wire.JobData`): the federation's feature columns and class set.
   The site reads its file with the same loader as a simulation's ``party_files``
   (:func:`lepton_ray.learning.data.load_party_file`), refuses (with the difference named) if
   its columns or labels disagree, and keeps its rows in memory.
3. Round 0, a SecAgg+ secure sum of the sites' moments (:mod:`.stats`): with
   ``data.standardize`` the row count, feature sums and sums of squares, otherwise the row
   count alone. The coordinator learns only the pooled values.
4. ``standardise`` (:class:`.wire.Standardisation`): the pooled mean and scale; the site
   standardises its rows with them.
5. Each round ``r``: ``train`` (:class:`.wire.TrainRound`) carries the global parameters, the
   update rule and the quantisation. The site checks the rule against the spec it accepted
   (the clip norm and ring are the spec's: a coordinator cannot ask for an unclipped update),
   trains locally in a background thread (it overlaps the key stages) and encodes the delta
   exactly as a simulated party does (:func:`lepton_ray.learning.party_update.encode_ring_batch`:
   clipped, weighted, stochastically rounded into the ring); then the SecAgg+ stages of
   :class:`.site.SiteSecAgg` mask that ring vector with the site's own Ed25519 identity.

Training runs in this process (torch), not in a Ray actor on the site's own Ray: the issue's
"PartyHost on the site's Ray" is not built yet (see the README).

``--record DIR`` (a test mode) writes each round's ring input to ``DIR/round-<r>.npy`` so a
test can check that the aggregate equals the sum of what the sites computed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray.errors import DataError, FederationError, LeptonError
from lepton_ray.federation import wire
from lepton_ray.federation.site import SiteSecAgg

TRAIN_WAIT_S = 3600.0  # masked_input waits at most this long for the round's training


class PartySite(SiteSecAgg):
    """A site with data: :class:`SiteSecAgg` plus the job's data, standardisation and local
    training. ``record``: a directory for each round's ring input (test mode), or None."""

    def __init__(self, kit, data_path: str, *, policy=None, ledger=None,
                 state_dir: str | None = None, record: str | None = None):
        super().__init__(kit, self._input, policy=policy, data_path=data_path, ledger=ledger,
                         state_dir=state_dir)
        self.record_dir = Path(record) if record else None
        self.data: dict[str, dict[str, Any]] = {}  # job id -> its rows, schema, round state
        self.finished = threading.Event()
        self.jobs_done: list[str] = []

    # ------------------------------------------------------------------ job admission
    def offer(self, offer: wire.JobOffer) -> wire.JobAnswer:
        answer = super().offer(offer)
        spec = self.jobs.get(offer.job_id)
        if answer.accepted and spec is not None and spec.privacy.enabled:
            del self.jobs[offer.job_id]  # refused: the site cannot keep the job's promise
            answer = wire.JobAnswer(job_id=offer.job_id, accepted=False, reason=(
                "job refused: privacy.mode is not none, and this site's lepton-ray does not yet "
                "run differentially private jobs in a federation"))
        verdict = "accepted" if answer.accepted else f"refused: {answer.reason}"
        _say(f"job {offer.job_id}: {verdict}")
        return answer

    def rpc_prepare(self, job: Any) -> int:
        """Read this site's file for ``job`` (:class:`wire.JobData`) and check it agrees with
        the federation's columns and classes. Returns 0 (the row count travels only inside the
        secure sum)."""
        from lepton_ray.learning.data import FederatedData, load_party_file

        if type(job) is not wire.JobData:
            raise FederationError("prepare: expected JobData")
        spec = self._spec(job.job_id)
        features = len(job.features)
        schema = FederatedData(parties=(), X_test=np.zeros((0, features), dtype=np.float32),
                               y_test=np.zeros(0, dtype=np.int64), classes=np.asarray(job.classes),
                               feature_names=tuple(job.features), mean=np.zeros(features),
                               scale=np.ones(features))
        try:
            X, y = load_party_file(spec.data, self.data_path, schema, field="--data")
        except DataError as exc:
            raise FederationError(f"site data refused for job {job.job_id}: {exc}") from None
        self.data[job.job_id] = {"raw": X, "y": y, "schema": job, "X": None, "rounds": {}}
        _say(f"job {job.job_id}: {len(y)} rows of {self.data_path}, {features} features, "
             f"{len(job.classes)} classes")
        return 0

    def rpc_standardise(self, message: Any) -> int:
        if type(message) is not wire.Standardisation:
            raise FederationError("standardise: expected Standardisation")
        job = self._job(message.job_id)
        features = len(job["schema"].features)
        mean = np.asarray(message.mean, dtype=np.float64)
        scale = np.asarray(message.scale, dtype=np.float64)
        if mean.shape != (features,) or scale.shape != (features,):
            raise FederationError(f"standardise: mean/scale must have {features} values")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise FederationError("standardise: mean and scale must be finite, scale > 0")
        job["X"] = np.ascontiguousarray((job["raw"] - mean) / scale, dtype=np.float32)
        return 0

    # ------------------------------------------------------------------ rounds
    def rpc_train(self, message: Any) -> int:
        """Start this round's local training (in a thread); the ring input is ready for
        ``masked_input``. The rule and ring are checked against the accepted spec."""
        if type(message) is not wire.TrainRound:
            raise FederationError("train: expected TrainRound")
        spec = self._spec(message.job_id)
        job = self._job(message.job_id)
        if job["X"] is None:
            raise FederationError(f"train: job {message.job_id} has no standardisation yet")
        if message.round < 1 or message.round > spec.rounds:
            raise FederationError(f"train: round {message.round} is outside the accepted job's "
                                  f"1..{spec.rounds}")
        sa, rule, quant = spec.secure_aggregation, message.rule, message.quantization
        problems = []
        if rule.clip_norm is None or abs(rule.clip_norm - sa.clip_norm) > 1e-12:
            problems.append(f"clip norm {rule.clip_norm}, the accepted spec's is {sa.clip_norm}")
        if rule.clip_bit or rule.weight_cap is None or not rule.weight_cap > 0:
            problems.append("the update rule is not the non-private FedAvg rule")
        if quant.modulus_bits != sa.modulus_bits:
            problems.append(f"ring of {quant.modulus_bits} bits, the spec's is {sa.modulus_bits}")
        if abs(quant.clip_norm - rule.norm_bound) > 1e-9 or not quant.scale > 0:
            problems.append("quantisation does not match the update rule's norm bound")
        if problems:
            raise FederationError("train refused: " + "; ".join(problems))
        params = np.ascontiguousarray(message.params, dtype=np.float32)
        state = {"done": threading.Event(), "ring": None, "error": None}
        job["rounds"][message.round] = state
        threading.Thread(target=self._train, args=(spec, job, message, params, state),
                         daemon=True, name=f"train-{message.round}").start()
        return 0

    def _train(self, spec, job, message, params, state) -> None:
        try:
            state["ring"] = train_ring_input(spec, job["X"], job["y"], params, message.rule,
                                             message.quantization, round_=message.round,
                                             party=self.party,
                                             n_classes=len(job["schema"].classes))
        except Exception as exc:  # reported at masked_input: the site drops out this round
            state["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            state["done"].set()

    def _input(self, round_: int) -> np.ndarray:
        """The site's SecAgg+ input for ``round_`` of the job in progress: round 0 is the
        moments of its rows, every later round its encoded update."""
        job_id = self.state.config.job_id
        job = self._job(job_id)
        if round_ == 0:
            from lepton_ray.federation.stats import encode_moments

            X = job["raw"] if job["schema"].moments else job["raw"][:, :0]
            vector = encode_moments(X, max_sites=max(2, len(self.roster)))
        else:
            state = job["rounds"].get(round_)
            if state is None:
                raise FederationError(f"round {round_}: no train message came before it")
            if not state["done"].wait(TRAIN_WAIT_S):
                raise FederationError(f"round {round_}: training did not finish")
            job["rounds"].pop(round_, None)
            if state["error"]:
                raise FederationError(f"round {round_}: local training failed: {state['error']}")
            vector = state["ring"]
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            np.save(self.record_dir / f"{job_id}-round-{round_}.npy", vector)
        return vector

    def rpc_finish(self, job_id: str, status: str) -> int:
        """The coordinator says the job ended: the site forgets its rows."""
        self.data.pop(job_id, None)
        self.jobs.pop(job_id, None)
        self.jobs_done.append(job_id)
        _say(f"job {job_id} ended ({status})")
        self.finished.set()
        return 0

    # ------------------------------------------------------------------ helpers
    def _spec(self, job_id: str):
        spec = self.jobs.get(job_id)
        if spec is None:
            raise FederationError(f"job {job_id!r} was not accepted by this site")
        return spec

    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.data.get(job_id)
        if job is None:
            raise FederationError(f"job {job_id!r}: this site has not prepared its data")
        return job


def train_ring_input(spec, X: np.ndarray, y: np.ndarray, params: np.ndarray, rule, quant, *,
                     round_: int, party: int, n_classes: int) -> np.ndarray:
    """One site's round: local training from ``params`` with the job's model and training
    spec, then the delta clipped, weighted and rounded into the ring exactly as a simulated
    party's (:func:`~lepton_ray.learning.party_update.encode_ring_batch`). The training seed
    is secret (OS randomness) unless the job asks for ``training.deterministic_seeds``, when
    it is the public seed a simulation gives the same party index."""
    import torch

    from lepton_ray.learning.local import party_seed, public_party_seed, train_parties
    from lepton_ray.learning.party_update import encode_ring_batch
    from lepton_ray.learning.vectorised import train_parties_vectorised, vectorise_blocker

    train = train_parties
    if spec.training.vectorised and vectorise_blocker(
            spec.model, spec.training, dp_sgd=spec.privacy.dp_sgd.enabled, sample=X[:4]) is None:
        train = train_parties_vectorised
    seed = (public_party_seed(spec.seed, round_, party) if spec.training.deterministic_seeds
            else party_seed())
    result = train(model_spec=spec.model, training=spec.training, n_features=X.shape[1],
                   n_classes=n_classes, global_params=params, datasets=[(X, y)], seeds=[seed],
                   device=_device(spec.training.device),
                   **({"dp_sgd": spec.privacy.dp_sgd} if spec.privacy.dp_sgd.enabled else {}))
    batch = encode_ring_batch(result.deltas, result.examples, rule, quant,
                              losses=result.losses if rule.stats else None)
    if batch.bad:
        raise DataError("the update has non-finite values (training diverged)")
    del torch
    return batch.rings[0].copy()


def _device(requested):
    import torch

    from lepton_ray.config import Device

    if requested is Device.CPU:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if requested is Device.CUDA:
        raise LeptonError("training.device: 'cuda' but this site has no CUDA device")
    return torch.device("cpu")


def _say(text: str) -> None:
    print(f"[site] {text}", file=sys.stderr, flush=True)


def run_party(*, kit: str, data: str, policy: str | None = None, state: str | None = None,
              record: str | None = None, connect: str | None = None,
              exit_after_job: bool = False) -> int:
    """The ``lepton-ray party`` command (see the module docstring)."""
    import torch

    from lepton_ray.federation.policy import SitePolicy
    from lepton_ray.federation.provision import load_kit
    from lepton_ray.federation.transport import SiteClient

    site_kit = load_kit(kit)
    if site_kit.identity is None:
        raise FederationError(f"--kit {kit}: the coordinator's kit; a party site needs its own")
    if not Path(data).is_file():
        raise DataError(f"--data: file not found: {data}")
    site_policy = SitePolicy.load(policy)
    state_dir = Path(state) if state else Path(kit) / "state"
    ledger = None
    if site_policy.lifetime_epsilon is not None:
        from lepton_ray.federation.ledger import SiteLedger

        ledger = SiteLedger(state_dir / "ledger.jsonl", lifetime_epsilon=site_policy.lifetime_epsilon)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    site = PartySite(site_kit, str(data), policy=site_policy, ledger=ledger,
                     state_dir=str(state_dir), record=record)
    client = SiteClient(site_kit, site, address=connect)
    print(f"site {site_kit.site} (party {site_kit.index} of federation {site_kit.federation}): "
          f"data {data}, state {state_dir}; dialling {client.address}", flush=True)
    try:
        if exit_after_job:  # serve in a thread; return once the coordinator ends a job
            failure: list[BaseException] = []

            def serve():
                try:
                    client.run(max_backoff=5.0)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(exc)
                    site.finished.set()

            threading.Thread(target=serve, daemon=True, name="site-client").start()
            site.finished.wait()
            if failure:
                raise failure[0]
            time.sleep(0.5)  # let the reply to ``finish`` leave before the process exits
        else:
            client.run(max_backoff=5.0)
    except FederationError as exc:  # the coordinator refused this site: final
        raise FederationError(f"site {site_kit.site}: {exc}") from None
    finally:
        if ledger is not None:
            ledger.close()
    print(f"site {site_kit.site}: done ({', '.join(site.jobs_done) or 'no job'})", flush=True)
    return 0
