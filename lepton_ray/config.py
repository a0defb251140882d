"""The job spec: frozen, keyword-only dataclasses with enums, loaded from YAML.

Loading never stops at the first problem. :func:`load_spec` walks the whole document, checks
every key, type and bound, and raises one :class:`~lepton_ray.errors.ConfigError` listing
every problem with its field path (``training.lr: must be > 0, got -1``), the way Opacus's
validators collect errors before raising.

Overrides (``--set training.lr=0.05`` on the CLI, ``training__lr=0.05`` in
:func:`lepton_ray.run`) are applied to the raw document before validation, so they are
checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from lepton_ray.errors import ConfigError


class Kwargs(dict):
    """Keyword arguments for a user's factory or loader (``model.kwargs``, ``data.kwargs``):
    a plain mapping read from YAML, hashable (by its sorted repr) so a spec holding it stays
    usable as a cache key. Treat it as read-only."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(repr(sorted(self.items(), key=lambda kv: str(kv[0]))))


class DataSource(enum.Enum):
    DIGITS = "digits"
    BREAST_CANCER = "breast_cancer"
    WINE = "wine"
    SYNTHETIC = "synthetic"
    CSV = "csv"
    PARQUET = "parquet"
    PARTY_FILES = "party_files"
    CUSTOM = "custom"  # data.loader: "package.module:function" (lepton_ray.learning.custom)


class PartitionKind(enum.Enum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    COLUMN = "column"


class ModelKind(enum.Enum):
    LOGISTIC = "logistic"
    MLP = "mlp"
    CUSTOM = "custom"  # model.factory: "package.module:function" (lepton_ray.learning.custom)


class OptimizerKind(enum.Enum):
    SGD = "sgd"
    ADAM = "adam"


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class StrategyKind(enum.Enum):
    FEDAVG = "fedavg"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"


class SamplingKind(enum.Enum):
    ALL = "all"
    FIXED = "fixed"
    POISSON = "poisson"


class SecureAggregation(enum.Enum):
    NONE = "none"
    SECAGG = "secagg"
    SECAGG_PLUS = "secagg+"


class PrivacyMode(enum.Enum):
    NONE = "none"
    USER_LEVEL = "user_level"


class NoisePlacement(enum.Enum):
    CENTRAL = "central"
    DISTRIBUTED = "distributed"


class SamplingAmplification(enum.Enum):
    """How a Poisson-sampled distributed (Skellam) round is accounted: ``mixture`` (joint
    convexity, zero-out neighbours), sound for per-party noise shares. ``zhu_wang`` was
    removed (issue 13): Zhu and Wang 2019, Thm. 6 is sound only when the noise in the sum does
    not depend on who took part, and with per-party shares - the only way distributed noise
    is added here - it always does."""

    MIXTURE = "mixture"


_REMOVED_CHOICES: dict[tuple[type, str], str] = {
    (SamplingAmplification, "zhu_wang"): (
        "'zhu_wang' was removed: Zhu and Wang's add/remove amplification (2019, Thm. 6) is "
        "unsound when every party adds its own noise share, as distributed noise does here "
        "(the noise in the sum depends on who took part); use 'mixture'"),
}


class AccountantChoice(enum.Enum):
    RDP = "rdp"
    PLD = "pld"


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """``sklearn.datasets.make_classification`` parameters."""

    samples: int = 10_000
    features: int = 20
    informative: int = 10
    classes: int = 2
    class_sep: float = 1.0

    def problems(self, path: str) -> list[str]:
        out = _positive(self, path, "samples", "features", "informative", "classes")
        if self.informative > self.features:
            out.append(f"{path}.informative: must be <= features ({self.features}), got {self.informative}")
        if self.classes < 2:
            out.append(f"{path}.classes: must be >= 2, got {self.classes}")
        return out


@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    kind: PartitionKind = PartitionKind.IID
    alpha: float = 0.5
    column: str | None = None
    min_size: int = 1

    def problems(self, path: str) -> list[str]:
        out = []
        if self.alpha <= 0:
            out.append(f"{path}.alpha: must be > 0, got {self.alpha}")
        if self.min_size < 1:
            out.append(f"{path}.min_size: must be >= 1, got {self.min_size}")
        if self.kind is PartitionKind.COLUMN and not self.column:
            out.append(f"{path}.column: required when kind is 'column'")
        return out


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    source: DataSource = DataSource.DIGITS
    path: str | None = None
    label: str | None = None
    features: tuple[str, ...] | None = None
    party_paths: tuple[str, ...] | None = None
    test_path: str | None = None
    standardize: bool = True
    test_fraction: float = 0.2
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    loader: str | None = None  # source 'custom': "package.module:function"
    kwargs: Kwargs = field(default_factory=Kwargs)

    def problems(self, path: str) -> list[str]:
        out = []
        if self.source is DataSource.CUSTOM:
            out += _callable_ref_problems(self.loader, f"{path}.loader", "source 'custom'")
        elif self.loader:
            out.append(f"{path}.loader: only used with source 'custom', got source '{self.source.value}'")
        if not 0.0 < self.test_fraction < 1.0:
            out.append(f"{path}.test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.source in (DataSource.CSV, DataSource.PARQUET):
            if not self.path:
                out.append(f"{path}.path: required for source '{self.source.value}'")
            if not self.label:
                out.append(f"{path}.label: required for source '{self.source.value}'")
        if self.source is DataSource.PARTY_FILES:
            if not self.test_path:
                out.append(f"{path}.test_path: required for source 'party_files'")
            if not self.label:
                out.append(f"{path}.label: required for source 'party_files'")
        if self.partition.kind is PartitionKind.COLUMN and self.source not in (
            DataSource.CSV,
            DataSource.PARQUET,
        ):
            out.append(f"{path}.partition.kind: 'column' needs a csv or parquet source")
        if self.features is not None:
            if not self.features:
                out.append(f"{path}.features: empty; list the feature columns or leave it out "
                           "(every column but the label)")
            if self.label and self.label in self.features:
                out.append(f"{path}.features: lists the label '{self.label}'; the model would "
                           "be given the answer it is asked to predict")
            dup = sorted({f for f in self.features if self.features.count(f) > 1})
            if dup:
                out.append(f"{path}.features: repeated column(s) {', '.join(dup)}")
        if self.source is DataSource.SYNTHETIC:
            out += self.synthetic.problems(f"{path}.synthetic")
        out += self.partition.problems(f"{path}.partition")
        return out


@dataclass(frozen=True, kw_only=True)
class DeployedParty:
    """One party of a deployment: its data file *on its own node's disk*, and the Ray custom
    resource that pins its host and training tasks to that node (default ``party:<id>``,
    which the node advertises with ``ray start --resources '{"party:<id>": 1}'``)."""

    id: str = ""
    data: str = ""
    resource: str | None = None
    gpus: float | None = None  # this party's training resources (default: training.*)
    cpus: float | None = None

    @property
    def node_resource(self) -> str:
        return self.resource or f"party:{self.id}"

    def problems(self, path: str) -> list[str]:
        out = []
        if not self.id:
            out.append(f"{path}.id: required")
        if not self.data:
            out.append(f"{path}.data: required (the party's data file on its node)")
        for name in ("gpus", "cpus"):
            v = getattr(self, name)
            if v is not None and v < 0:
                out.append(f"{path}.{name}: must be >= 0, got {v}")
        return out


@dataclass(frozen=True, kw_only=True)
class PartiesSpec:
    count: int = 10
    per_host: int | None = None
    deploy: tuple[DeployedParty, ...] = ()
    # simulation only: each round every sampled party goes silent with this probability just
    # before it would send its update (SecAgg+: its masked input, after sharing its keys)
    simulated_dropout: float = 0.0

    def problems(self, path: str) -> list[str]:
        out = _positive(self, path, "count")
        if not 0.0 <= self.simulated_dropout < 1.0:
            out.append(f"{path}.simulated_dropout: must be in [0, 1), got {self.simulated_dropout}")
        elif self.simulated_dropout and self.deploy:
            out.append(f"{path}.simulated_dropout: is for simulation; a deployment's parties drop out for real")
        if self.per_host is not None and self.per_host < 1:
            out.append(f"{path}.per_host: must be >= 1, got {self.per_host}")
        if self.deploy:
            if len(self.deploy) != self.count:
                out.append(f"{path}.count: is {self.count} but {path}.deploy lists {len(self.deploy)} parties")
            ids = [d.id for d in self.deploy]
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                out.append(f"{path}.deploy: party ids must be unique, repeated: {', '.join(dup)}")
            for i, d in enumerate(self.deploy):
                out += d.problems(f"{path}.deploy[{i}]")
        return out


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    kind: ModelKind = ModelKind.MLP
    hidden: tuple[int, ...] = (128,)
    factory: str | None = None  # kind 'custom': "package.module:function" -> nn.Module
    kwargs: Kwargs = field(default_factory=Kwargs)

    def problems(self, path: str) -> list[str]:
        out = [
            f"{path}.hidden[{i}]: must be >= 1, got {h}" for i, h in enumerate(self.hidden) if h < 1
        ]
        if self.kind is ModelKind.CUSTOM:
            out += _callable_ref_problems(self.factory, f"{path}.factory", "kind 'custom'")
        elif self.factory:
            out.append(f"{path}.factory: only used with kind 'custom', got kind '{self.kind.value}'")
        return out


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    optimizer: OptimizerKind = OptimizerKind.SGD
    lr: float = 0.1
    momentum: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    proximal_mu: float = 0.0
    gpus_per_party: float = 0.0
    cpus_per_task: float = 1.0
    memory_mb: int | None = None  # memory Ray reserves for each training task
    device: Device = Device.AUTO
    vectorised: bool = True
    # public per-(seed, round, party) training seeds, for reproducible non-private runs and
    # tests only; default: secret OS seeds per party and round. Refused under any DP.
    deterministic_seeds: bool = False
    loss: str | None = None  # "package.module:function": (logits, targets) -> per-example losses
    loop: str | None = None  # "package.module:function": a whole local training loop

    def problems(self, path: str) -> list[str]:
        out = _positive(self, path, "lr", "epochs", "batch_size")
        for name in ("loss", "loop"):
            if getattr(self, name) is not None:
                out += _callable_ref_problems(getattr(self, name), f"{path}.{name}", name)
        if not 0.0 <= self.momentum < 1.0:
            out.append(f"{path}.momentum: must be in [0, 1), got {self.momentum}")
        if self.proximal_mu < 0:
            out.append(f"{path}.proximal_mu: must be >= 0, got {self.proximal_mu}")
        if self.gpus_per_party < 0:
            out.append(f"{path}.gpus_per_party: must be >= 0, got {self.gpus_per_party}")
        if self.gpus_per_party > 1 and self.gpus_per_party != int(self.gpus_per_party):
            out.append(f"{path}.gpus_per_party: above 1 must be a whole number, got {self.gpus_per_party}")
        if self.cpus_per_task <= 0:
            out.append(f"{path}.cpus_per_task: must be > 0, got {self.cpus_per_task}")
        if self.memory_mb is not None and self.memory_mb <= 0:
            out.append(f"{path}.memory_mb: must be > 0, got {self.memory_mb}")
        return out


@dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """Server optimiser (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2)."""

    strategy: StrategyKind = StrategyKind.FEDAVG
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def problems(self, path: str) -> list[str]:
        out = _positive(self, path, "lr", "tau")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                out.append(f"{path}.{name}: must be in [0, 1), got {v}")
        return out


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """Which parties train each round: all, a fixed-size uniform sample, or Poisson(rate)."""

    kind: SamplingKind = SamplingKind.ALL
    fraction: float = 1.0
    min_parties: int = 1

    def problems(self, path: str) -> list[str]:
        out = []
        if not 0.0 < self.fraction <= 1.0:
            out.append(f"{path}.fraction: must be in (0, 1], got {self.fraction}")
        if self.min_parties < 1:
            out.append(f"{path}.min_parties: must be >= 1, got {self.min_parties}")
        return out


@dataclass(frozen=True, kw_only=True)
class SecureAggregationSpec:
    """SecAgg+ (Bell et al. 2020) by default; ``secagg`` is the complete graph (Bonawitz et
    al. 2017); ``none`` sends plaintext updates to the coordinator.

    ``clip_norm`` bounds each party's delta (L2) before quantisation into Z_{2^b};
    ``scale`` (default: the largest that cannot overflow for ``parties.count`` parties);
    ``neighbours`` k (default O(log n), see ``lepton_ray.secagg.graph``); ``threshold`` t
    (default and minimum: the smallest t secure against a malicious coordinator, 2t > k + 1 +
    c, see ``lepton_ray.secagg.graph``); ``corrupt_fraction`` the fraction gamma of parties
    that may collude with the coordinator (it sets c per neighbourhood, and k grows with it:
    0.01 doubles k at 10,000 parties); ``stage_timeout_s`` bounds every stage; ``weight_cap``
    is the public example count at which a party's FedAvg weight stops growing (default:
    largest party in a simulation; required with ``parties.deploy`` unless user-level DP
    weighs every party 1).
    """

    mode: SecureAggregation = SecureAggregation.SECAGG_PLUS
    modulus_bits: int = 32
    clip_norm: float = 10.0
    scale: float | None = None
    neighbours: int | None = None
    threshold: int | None = None
    stage_timeout_s: float = 120.0
    weight_cap: int | None = None
    corrupt_fraction: float = 0.0

    def problems(self, path: str) -> list[str]:
        out = _positive(self, path, "clip_norm", "stage_timeout_s")
        if not (isinstance(self.corrupt_fraction, (int, float))
                and 0.0 <= self.corrupt_fraction < 0.5):
            out.append(f"{path}.corrupt_fraction: must be in [0, 0.5), got "
                       f"{self.corrupt_fraction!r}")
        if self.modulus_bits not in (32, 64):
            out.append(f"{path}.modulus_bits: must be 32 or 64, got {self.modulus_bits}")
        for name in ("scale", "neighbours", "threshold", "weight_cap"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                out.append(f"{path}.{name}: must be > 0, got {v}")
        return out


@dataclass(frozen=True, kw_only=True)
class AdaptiveClippingSpec:
    """Andrew et al. 2021: track the ``target_quantile`` of update norms with a noised count."""

    enabled: bool = False
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None  # default: expected parties / 20, as in the paper

    def problems(self, path: str) -> list[str]:
        out = []
        if not 0 < self.target_quantile < 1:
            out.append(f"{path}.target_quantile: must be in (0, 1), got {self.target_quantile}")
        if self.learning_rate <= 0:
            out.append(f"{path}.learning_rate: must be > 0, got {self.learning_rate}")
        if self.count_noise_std is not None and self.count_noise_std <= 0:
            out.append(f"{path}.count_noise_std: must be > 0, got {self.count_noise_std}")
        return out


@dataclass(frozen=True, kw_only=True)
class DpSgdSpec:
    """Record-level DP-SGD inside each party (Abadi et al. 2016); 0 noise = off."""

    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def problems(self, path: str) -> list[str]:
        out = []
        if self.noise_multiplier < 0:
            out.append(f"{path}.noise_multiplier: must be >= 0 (0 turns DP-SGD off), got {self.noise_multiplier}")
        if self.clip_norm <= 0:
            out.append(f"{path}.clip_norm: must be > 0, got {self.clip_norm}")
        if not 0 < self.delta < 1:
            out.append(f"{path}.delta: must be in (0, 1), got {self.delta}")
        return out


@dataclass(frozen=True, kw_only=True)
class PrivacySpec:
    """User-level DP-FedAvg (McMahan et al. 2018): each party's delta is clipped to
    ``clip_norm`` at the party, Gaussian noise of std ``noise_multiplier * clip_norm`` is
    added to the sum (``noise: central``: by the coordinator), and the accountant charges
    every round to the budget (``epsilon``, ``delta``) before it runs. Without
    ``noise_multiplier`` the smallest one that fits the budget over ``rounds`` is used."""

    mode: PrivacyMode = PrivacyMode.NONE
    noise: NoisePlacement = NoisePlacement.CENTRAL
    epsilon: float = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    accountant: AccountantChoice = AccountantChoice.RDP
    adaptive_clipping: AdaptiveClippingSpec = field(default_factory=AdaptiveClippingSpec)
    dp_sgd: DpSgdSpec = field(default_factory=DpSgdSpec)
    # noise: distributed (Skellam, Agarwal et al. 2021): bit width of the mechanism's ring and
    # the fraction of a round's sampled parties that must survive (the noise is calibrated
    # for that many shares; honest parties refuse to unmask a sum with fewer)
    bits: int = 16
    min_survivor_fraction: float = 0.9
    amplification: SamplingAmplification = SamplingAmplification.MIXTURE
    # parties that may collude with the server and subtract their own noise shares: the
    # shares are calibrated for the n_min - c honest survivors. null: 10% of each round's
    # sampled parties, at least 1 (lepton_ray.privacy.dpfedavg.DistributedNoise)
    colluding_parties: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mode is not PrivacyMode.NONE

    def problems(self, path: str) -> list[str]:
        out = []
        if self.epsilon <= 0:
            out.append(f"{path}.epsilon: must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            out.append(f"{path}.delta: must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            out.append(f"{path}.noise_multiplier: must be > 0, got {self.noise_multiplier}")
        if self.clip_norm <= 0:
            out.append(f"{path}.clip_norm: must be > 0, got {self.clip_norm}")
        if not 2 <= self.bits <= 62:
            out.append(f"{path}.bits: must be in [2, 62], got {self.bits}")
        if not 0 < self.min_survivor_fraction <= 1:
            out.append(f"{path}.min_survivor_fraction: must be in (0, 1], got {self.min_survivor_fraction}")
        if self.colluding_parties is not None and self.colluding_parties < 0:
            out.append(f"{path}.colluding_parties: must be >= 0 (or null), got {self.colluding_parties}")
        if (self.enabled and self.noise is NoisePlacement.DISTRIBUTED
                and self.accountant is AccountantChoice.PLD):
            out.append(f"{path}.accountant: 'pld' cannot account for distributed (Skellam) "
                       "noise: dp-accounting has no PLD for it; use 'rdp' (Agarwal et al. "
                       "2021's RDP bound)")
        elif self.enabled and self.accountant is AccountantChoice.PLD:
            out.append(f"{path}.accountant: 'pld' cannot account for central noise, a "
                       "multi-dimensional discrete Gaussian (dp-accounting's PLD has none); "
                       "use 'rdp'")
        if self.dp_sgd.enabled and self.accountant is AccountantChoice.PLD:
            out.append(f"{path}.accountant: 'pld' cannot account for record-level DP-SGD "
                       "(privacy.dp_sgd): its per-step noise is a multi-dimensional discrete "
                       "Gaussian on conditionally rounded integer gradients, and dp-accounting's "
                       "PLD has none; use 'rdp'")
        if self.enabled and self.noise is NoisePlacement.DISTRIBUTED and self.adaptive_clipping.enabled:
            out.append(f"{path}.adaptive_clipping: not available with noise 'distributed' (use a fixed clip_norm)")
        out += self.adaptive_clipping.problems(f"{path}.adaptive_clipping")
        out += self.dp_sgd.problems(f"{path}.dp_sgd")
        return out


@dataclass(frozen=True, kw_only=True)
class EvaluationSpec:
    """Federated evaluation (``federated: true``): in every ``every``-th round (rounds 1,
    1 + every, ...) a ``fraction`` of the round's sampled parties evaluate the global model the
    round starts from on their own held-out rows (floor(n * ``holdout``) of a party's n rows,
    drawn once from the public ``seed``: the split is public by design, like the partition; a
    party left with no held-out row is an error).
    Their counts (correct, examples, per-class TP/FP/FN) and loss sums travel as extra
    coordinates of the round's secure sum, so no party's metrics leave it; history.csv gains
    ``fed_loss``, ``fed_accuracy``, ``fed_f1`` and ``fed_examples``
    (:mod:`lepton_ray.learning.fed_eval`). Refused with any differential privacy: the totals are
    exact statistics of party data that no accountant charges."""

    federated: bool = False
    fraction: float = 1.0
    every: int = 1
    holdout: float = 0.2

    def problems(self, path: str) -> list[str]:
        out = []
        if not 0.0 < self.fraction <= 1.0:
            out.append(f"{path}.fraction: must be in (0, 1], got {self.fraction}")
        if self.every < 1:
            out.append(f"{path}.every: must be >= 1, got {self.every}")
        if not 0.0 < self.holdout < 1.0:
            out.append(f"{path}.holdout: must be in (0, 1), got {self.holdout}")
        return out

    def in_round(self, round_: int) -> bool:
        """Does round ``round_`` (1-based) evaluate? Rounds 1, 1 + every, 1 + 2 every, ...:
        the models after rounds 0, every, 2 every, ..."""
        return self.federated and (round_ - 1) % self.every == 0


@dataclass(frozen=True, kw_only=True)
class EncryptionSpec:
    """Encrypt checkpoints and the final model at rest (AES-256-GCM) with a 32-byte key read
    from a file or an environment variable (never from the spec itself)."""

    key_file: str | None = None
    key_env: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.key_file or self.key_env)

    def problems(self, path: str) -> list[str]:
        if self.key_file and self.key_env:
            return [f"{path}: give key_file or key_env, not both"]
        return []


@dataclass(frozen=True, kw_only=True)
class MlflowSpec:
    """Log params, per-round metrics and the final model to MLflow (``pip install
    lepton-ray[mlflow]``); a local ``file:`` or ``sqlite:`` URI needs no server. Off while
    ``tracking_uri`` is unset."""

    tracking_uri: str | None = None
    experiment: str = "lepton-ray"

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri)

    def problems(self, path: str) -> list[str]:
        return [] if self.experiment else [f"{path}.experiment: must not be empty"]


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    dir: str = "runs/job"
    checkpoint_every: int = 1
    progress: bool = True
    encryption: EncryptionSpec = field(default_factory=EncryptionSpec)
    # write who was sampled/completed/dropped each round to participants.jsonl (confidential)
    record_participants: bool = False
    tensorboard: bool = False  # event files under dir/tensorboard (pip install lepton-ray[tensorboard])
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)

    def problems(self, path: str) -> list[str]:
        return (_positive(self, path, "checkpoint_every") + self.encryption.problems(f"{path}.encryption")
                + self.mlflow.problems(f"{path}.mlflow"))


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    name: str = "job"
    seed: int = 0
    rounds: int = 20
    data: DataSpec = field(default_factory=DataSpec)
    parties: PartiesSpec = field(default_factory=PartiesSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    secure_aggregation: SecureAggregationSpec = field(default_factory=SecureAggregationSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def problems(self, path: str = "") -> list[str]:
        out = _positive(self, path, "rounds")
        if self.seed < 0:
            out.append(_join(path, "seed") + f": must be >= 0, got {self.seed}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out += value.problems(_join(path, f.name))
        sa = self.secure_aggregation
        if sa.mode is not SecureAggregation.NONE and sa.scale is not None and not out:
            from lepton_ray.errors import ConfigError as _ConfigError
            from lepton_ray.learning.party_update import UpdateRule, quantization_for

            try:  # n parties at the clip norm must not overflow Z_{2^b}
                quantization_for(n_parties=self.parties.count,
                                 rule=UpdateRule(clip_norm=sa.clip_norm),
                                 modulus_bits=sa.modulus_bits, dim=1, scale=sa.scale)
            except _ConfigError as exc:
                out += [f"secure_aggregation.scale: {p.split(': ', 1)[-1]}" for p in exc.problems]
        if (self.privacy.enabled and self.privacy.noise is NoisePlacement.DISTRIBUTED
                and self.secure_aggregation.mode is SecureAggregation.NONE):
            out.append("privacy.noise: 'distributed' adds the noise inside secure aggregation; "
                       "set secure_aggregation.mode to secagg+ or secagg")
        p = self.privacy
        if (p.enabled and p.noise is NoisePlacement.DISTRIBUTED and p.colluding_parties
                and not out):
            q = self.sampling.fraction if self.sampling.kind is SamplingKind.POISSON else 1.0
            n = max(2, round(q * self.parties.count))  # as DpFedAvg calibrates
            n_min = min(n, math.ceil(p.min_survivor_fraction * n))
            if p.colluding_parties >= n_min:
                out.append(
                    f"privacy.colluding_parties: {p.colluding_parties} colluders would leave no "
                    f"honest share among the {n_min} survivors a round of ~{n} sampled parties "
                    f"needs (min_survivor_fraction {p.min_survivor_fraction}); must be < {n_min}")
        if self.training.deterministic_seeds and (self.privacy.enabled or self.privacy.dp_sgd.enabled):
            out.append("training.deterministic_seeds: public training seeds let anyone re-run a "
                       "party's training and reproduce DP-SGD's batches; not allowed with privacy")
        if self.privacy.enabled and self.sampling.kind is SamplingKind.FIXED:
            out.append("sampling.kind: 'fixed' has no privacy amplification the accountant can "
                       "count; use 'poisson' (rate = sampling.fraction) or 'all' with privacy")
        if self.evaluation.federated and (self.privacy.enabled or self.privacy.dp_sgd.enabled):
            which = "privacy.mode" if self.privacy.enabled else "privacy.dp_sgd"
            out.append(f"evaluation.federated: not available with differential privacy ({which} "
                       "is on): the evaluation totals (correct, examples, per-class counts, loss "
                       "sums) would be released exact, outside the privacy accountant; set "
                       "evaluation.federated: false (the server-side test set still evaluates)")
        if self.training.device is Device.CUDA and not _asks_for_gpus(self):
            out.append("training.device: 'cuda' needs training.gpus_per_party > 0 (Ray gives a "
                       "training task a GPU only when it asks for one); or use device 'auto'")
        if self.training.loop and self.privacy.dp_sgd.enabled:
            out.append("training.loop: record-level DP-SGD (privacy.dp_sgd) needs per-sample "
                       "clipping inside every step, which a custom loop does not expose; drop "
                       "privacy.dp_sgd or training.loop (user-level DP, privacy.mode, still applies)")
        if self.parties.deploy and self.data.source is not DataSource.PARTY_FILES:
            out.append("data.source: must be 'party_files' when parties.deploy lists parties "
                       "(each reads its own file on its node; set data.test_path and data.label)")
        if (self.data.source is DataSource.PARTY_FILES and not self.parties.deploy
                and not self.data.party_paths):
            out.append("data.party_paths: required for source 'party_files' (or list the "
                       "parties with their paths under parties.deploy)")
        if (self.parties.deploy and self.secure_aggregation.weight_cap is None
                and not self.privacy.enabled):
            out.append("secure_aggregation.weight_cap: required with parties.deploy (the public "
                       "example count at which a party's FedAvg weight stops growing): a deployed "
                       "party's row count never leaves its node, so the driver cannot default it "
                       "to the largest party's")
        if self.parties.deploy and self.data.party_paths:
            out.append("data.party_paths: leave empty with parties.deploy (each party's "
                       "parties.deploy[i].data is its path)")
        if self.data.party_paths and len(self.data.party_paths) != self.parties.count:
            out.append(
                f"parties.count: is {self.parties.count} but data.party_paths lists "
                f"{len(self.data.party_paths)} files (one per party)"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able dict; ``load_spec(spec.to_dict())`` gives an equal spec."""
        return _to_plain(self)


def _asks_for_gpus(spec: "JobSpec") -> bool:
    """Whether every training task of the job requests a GPU share."""
    if spec.parties.deploy:
        return all((d.gpus if d.gpus is not None else spec.training.gpus_per_party) > 0
                   for d in spec.parties.deploy)
    return spec.training.gpus_per_party > 0


# --------------------------------------------------------------------------- loading


def load_spec(spec_or_path: Any, /, **overrides: Any) -> JobSpec:
    """Load a spec from a YAML path, a mapping or a ``JobSpec``, apply overrides, validate.

    Keyword overrides use ``__`` for a dot (``training__lr=0.05``); a mapping value merges
    into that section (``training={"lr": 0.05}``). Raises ``ConfigError`` with every problem.
    """
    source = None
    if isinstance(spec_or_path, JobSpec):
        raw: dict[str, Any] = spec_or_path.to_dict()
    elif isinstance(spec_or_path, Mapping):
        raw = _deep_copy(spec_or_path)
    else:
        source = str(spec_or_path)
        raw = read_yaml(Path(spec_or_path))
    for key, value in overrides.items():
        set_path(raw, key.replace("__", "."), value, source=source)
    return build_spec(raw, source=source)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"malformed YAML{where}: {problem}"], str(path)) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"top level must be a mapping, got {type(doc).__name__}"], str(path))
    return doc


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"training.lr=0.05"`` -> ``("training.lr", 0.05)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected key.path=value"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_path(raw: dict[str, Any], dotted: str, value: Any, *, source: str | None = None) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError([f"{where}: is a value, cannot set {dotted}"], source)
        node = child
    last = parts[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for k, v in value.items():
            set_path(node[last], k, v, source=source)
    else:
        node[last] = _deep_copy(value) if isinstance(value, Mapping) else value


def build_spec(raw: Mapping[str, Any], *, source: str | None = None) -> JobSpec:
    problems: list[str] = []
    spec = _convert(JobSpec, raw, "", problems)
    if spec is not _MISSING:
        # A field that failed to convert fell back to its (valid) default, so the semantic
        # checks still run on every other field: all problems are reported in one pass.
        problems += spec.problems("")
    if problems:
        raise ConfigError(problems, source)
    return spec


# --------------------------------------------------------------------------- helpers


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _callable_ref_problems(ref: str | None, where: str, needed_for: str) -> list[str]:
    """Syntax only ("package.module:function"); importing happens at validation of the data
    and model (lepton_ray.learning.custom), where the error names the reference."""
    if not ref:
        return [f"{where}: required for {needed_for} (\"package.module:function\")"]
    if ref.startswith("__python__:"):  # a callable passed to lepton_ray.run (pickled)
        # Resolving it runs a pickle: only a reference this process registered itself (from
        # a callable handed to lepton_ray.run) is accepted. A spec file, a checkpoint or a job
        # offer carrying one would be foreign code, run on load.
        import sys

        custom = sys.modules.get("lepton_ray.learning.custom")
        if custom is None or not custom.registered(ref):
            return [f"{where}: a pickled Python callable is accepted only from "
                    "lepton_ray.run(model=..., data=...) in this process, never from a spec "
                    "file or a stored spec (it would run foreign code); name an importable "
                    "\"package.module:function\" instead"]
        return []
    module, sep, name = ref.partition(":")
    if not sep or not module or not name or not all(p.isidentifier() for p in module.split(".") + name.split(".")):
        return [f"{where}: expected \"package.module:function\", got {ref!r}"]
    return []


def _positive(obj: Any, path: str, *names: str) -> list[str]:
    return [
        f"{_join(path, n)}: must be > 0, got {getattr(obj, n)}"
        for n in names
        if getattr(obj, n) <= 0
    ]


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep_copy(v) for v in value]
    return value


_MISSING = object()


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert a YAML value to ``tp``; on a problem, record it and return ``_MISSING``."""
    where = path or "spec"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, problems)
    if tp is Kwargs:
        if value is None:
            return Kwargs()
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            problems.append(f"{where}: expected a mapping of argument names to values, got {_show(value)}")
            return _MISSING
        return Kwargs(_deep_copy(value))
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {_show(value)}")
            return _MISSING
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        for key in value:
            if key not in known:
                hint = _closest(str(key), known)
                problems.append(f"{_join(path, str(key))}: unknown key{hint}")
        kwargs = {}
        for name in known:
            if name in value:
                converted = _convert(hints[name], value[name], _join(path, name), problems)
                if converted is not _MISSING:
                    kwargs[name] = converted
        try:
            return tp(**kwargs)
        except TypeError as exc:  # pragma: no cover - all fields have defaults
            problems.append(f"{where}: {exc}")
            return _MISSING
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and value.lower() in choices:
            return tp(value.lower())
        if isinstance(value, str) and (tp, value.lower()) in _REMOVED_CHOICES:
            problems.append(f"{where}: {_REMOVED_CHOICES[(tp, value.lower())]}")
            return _MISSING
        problems.append(f"{where}: must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
        return _MISSING
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {_show(value)}")
            return _MISSING
        items = [_convert(item_tp, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _MISSING if any(i is _MISSING for i in items) else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true or false, got {_show(value)}")
        return _MISSING
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}: expected an integer, got {_show(value)}")
        return _MISSING
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {_show(value)}")
        return _MISSING
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {_show(value)}")
        return _MISSING
    raise TypeError(f"unsupported spec field type {tp!r} at {where}")  # a bug, not user input


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}..." if len(text) > 43 else text


def _closest(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{match[0]}'?)" if match else f" (known: {', '.join(sorted(known))})"


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, Kwargs):
        return _deep_copy(dict(value))
    return value
