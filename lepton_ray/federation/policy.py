"""A site's policy: which jobs the organisation lets its data take part in.

The coordinator proposes a job spec (data, never code); each site checks it against its own
policy, written by that organisation, and refuses a job that violates it, with a message the
coordinator records. The check is the site's, so a malicious coordinator cannot weaken it: the
worst it can do is lie about the spec, and the site then runs the spec it accepted (its hosts
build every round from that spec and the round plan, whose values are checked again per round by
:meth:`SitePolicy.check_round`).

Example ``POLICY.yaml``::

    require_secure_aggregation: true   # refuse plaintext updates (mode: none)
    require_privacy: false             # refuse jobs without user-level DP
    max_epsilon: 8.0                   # a DP job's epsilon budget may not exceed this
    min_threshold: 2                   # SecAgg+ threshold t at least this (per round)
    allowed_models: [logistic, mlp]
    max_rounds: 200
    lifetime_epsilon: 20.0             # the site's budget across every job (its own ledger)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lepton_ray.errors import FederationError


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    require_secure_aggregation: bool = True
    require_privacy: bool = False
    max_epsilon: float | None = None
    min_threshold: int = 2
    allowed_models: tuple[str, ...] | None = None  # None: any built-in model
    max_rounds: int | None = None
    lifetime_epsilon: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("require_secure_aggregation", "require_privacy"):
            if type(getattr(self, name)) is not bool:
                problems.append(f"{name}: must be true or false, got {getattr(self, name)!r}")
        for name in ("max_epsilon", "lifetime_epsilon"):
            v = getattr(self, name)
            if v is not None and (type(v) not in (int, float) or not v > 0):
                problems.append(f"{name}: must be a number > 0, got {v!r}")
        for name in ("min_threshold", "max_rounds"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 1):
                problems.append(f"{name}: must be an int >= 1, got {v!r}")
        if self.allowed_models is not None:
            from lepton_ray.config import ModelKind

            known = {k.value for k in ModelKind}
            if not isinstance(self.allowed_models, tuple) or not all(
                    m in known for m in self.allowed_models):
                problems.append(f"allowed_models: must list some of {sorted(known)}, got "
                                f"{self.allowed_models!r}")
        if problems:
            raise FederationError("invalid site policy: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "site policy") -> SitePolicy:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise FederationError(f"{source}: expected a mapping of policy keys")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FederationError(f"{source}: unknown key(s) {unknown} (known: {sorted(known)})")
        values = dict(raw)
        if isinstance(values.get("allowed_models"), list):
            values["allowed_models"] = tuple(values["allowed_models"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None) -> SitePolicy:
        """The policy in ``path``; the default (secure aggregation required) when ``None``."""
        if path is None:
            return cls()
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise FederationError(f"site policy not found: {path}") from None
        except yaml.YAMLError as exc:
            raise FederationError(f"site policy {path}: not valid YAML: {exc}") from None
        return cls.from_mapping(raw, str(path))

    def violations(self, spec) -> list[str]:
        """Every way ``spec`` (a validated ``JobSpec``) breaks this policy; empty: accepted."""
        from lepton_ray.config import DataSource, SecureAggregation

        out = []
        sa, privacy = spec.secure_aggregation, spec.privacy
        if self.require_secure_aggregation and sa.mode is SecureAggregation.NONE:
            out.append("secure_aggregation.mode: none sends this site's update in the clear; "
                       "the site policy requires secure aggregation")
        if self.require_privacy and not privacy.enabled:
            out.append("privacy.mode: none; the site policy requires differential privacy")
        if self.max_epsilon is not None and privacy.enabled and privacy.epsilon > self.max_epsilon:
            out.append(f"privacy.epsilon: {privacy.epsilon} exceeds the site's max_epsilon "
                       f"{self.max_epsilon}")
        if sa.threshold is not None and sa.threshold < self.min_threshold:
            out.append(f"secure_aggregation.threshold: {sa.threshold} is below the site's "
                       f"min_threshold {self.min_threshold}")
        if self.allowed_models is not None and spec.model.kind.value not in self.allowed_models:
            out.append(f"model.kind: {spec.model.kind.value} is not in the site's allowed_models "
                       f"{list(self.allowed_models)}")
        if self.max_rounds is not None and spec.rounds > self.max_rounds:
            out.append(f"rounds: {spec.rounds} exceeds the site's max_rounds {self.max_rounds}")
        if spec.data.source is not DataSource.PARTY_FILES:
            out.append(f"data.source: {spec.data.source.value}; a federation job must use "
                       "party_files (each site reads its own data path)")
        if spec.parties.deploy:
            out.append("parties.deploy: a trusted-cluster deployment, not a federation job")
        return out

    def accept(self, raw: Any, data_path: str) -> Any:
        """The ``JobSpec`` this site runs for the coordinator's spec ``raw`` (data, as sent):
        the spec may not name any site's data; the site puts its own ``data_path`` in (for
        every party slot, as ``party_files`` validation expects one path per party: the site
        only ever reads its own), validates it and checks this policy.
        :class:`FederationError` naming every problem otherwise."""
        from lepton_ray.config import load_spec
        from lepton_ray.errors import ConfigError

        if not isinstance(raw, Mapping):
            raise FederationError("job refused: the spec is not a mapping")
        data = raw.get("data") or {}
        if not isinstance(data, Mapping) or data.get("party_paths") or data.get("path"):
            raise FederationError("job refused by site policy: data.party_paths/data.path: the "
                                  "coordinator's spec may not name a site's data")
        count = (raw.get("parties") or {}).get("count", 1)
        local = {**raw, "data": {**data, "party_paths": [str(data_path)] * int(count)}}
        try:
            spec = load_spec(local)
        except ConfigError as exc:
            raise FederationError(f"job refused: invalid spec: {exc}") from None
        self.check(spec)
        return spec

    def check(self, spec) -> None:
        """:class:`FederationError` listing every violation (the site's refusal message)."""
        problems = self.violations(spec)
        if problems:
            raise FederationError("job refused by site policy: " + "; ".join(problems))

    def check_round(self, *, threshold: int, secure: bool) -> None:
        """Per round, on the plan the coordinator actually sent (it may differ from the spec)."""
        if self.require_secure_aggregation and not secure:
            raise FederationError("round refused by site policy: plaintext round, secure "
                                  "aggregation required")
        if secure and threshold < self.min_threshold:
            raise FederationError(f"round refused by site policy: threshold {threshold} < "
                                  f"min_threshold {self.min_threshold}")
