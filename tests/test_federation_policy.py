"""Site policy: a job that breaks it is refused with a message naming every violation."""

from __future__ import annotations

import pytest

from lepton_ray.config import load_spec
from lepton_ray.errors import FederationError
from lepton_ray.federation.policy import SitePolicy


def _spec(**over):
    raw = {"name": "f", "rounds": 20, "data": {"source": "digits"}, "parties": {"count": 3},
           "model": {"kind": "mlp"}, "secure_aggregation": {"mode": "secagg+"}}
    for k, v in over.items():
        raw.setdefault(k, {}) if isinstance(v, dict) else None
        if isinstance(v, dict):
            raw[k] = {**raw.get(k, {}), **v}
        else:
            raw[k] = v
    return load_spec(raw)


def _federation_violations(policy, spec):
    return [v for v in policy.violations(spec) if not v.startswith("data.source")]


def test_default_policy_requires_secure_aggregation():
    policy = SitePolicy()
    assert _federation_violations(policy, _spec()) == []
    problems = _federation_violations(policy, _spec(secure_aggregation={"mode": "none"}))
    assert len(problems) == 1 and "requires secure aggregation" in problems[0]


def test_every_rule_refuses_and_all_are_reported_at_once():
    policy = SitePolicy.from_mapping({"require_privacy": True, "max_epsilon": 2.0, "min_threshold": 3,
                                      "allowed_models": ["logistic"], "max_rounds": 10})
    spec = _spec(privacy={"mode": "user_level", "epsilon": 5.0, "noise_multiplier": 1.0},
                 secure_aggregation={"threshold": 2}, rounds=50)
    problems = _federation_violations(policy, spec)
    text = "\n".join(problems)
    for needle in ("privacy.epsilon: 5.0 exceeds the site's max_epsilon 2.0",
                   "threshold: 2 is below the site's min_threshold 3",
                   "model.kind: mlp is not in the site's allowed_models",
                   "rounds: 50 exceeds the site's max_rounds 10"):
        assert needle in text
    assert len(problems) == 4
    with pytest.raises(FederationError, match="job refused by site policy"):
        policy.check(spec)
    no_dp = _federation_violations(policy, _spec(model={"kind": "logistic"}, rounds=5))
    assert no_dp == ["privacy.mode: none; the site policy requires differential privacy"]


def test_spec_naming_data_is_refused():
    problems = SitePolicy().violations(_spec())
    assert any(p.startswith("data.source: digits") for p in problems)


def test_round_check_on_the_plan_actually_sent():
    policy = SitePolicy(min_threshold=3)
    policy.check_round(threshold=3, secure=True)
    with pytest.raises(FederationError, match="threshold 2 < min_threshold 3"):
        policy.check_round(threshold=2, secure=True)
    with pytest.raises(FederationError, match="plaintext round"):
        policy.check_round(threshold=3, secure=False)


def test_bad_policy_files(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("max_epsilon: -1\nmax_rounds: 0\nallowed_models: [cnn]\n")
    with pytest.raises(FederationError) as err:
        SitePolicy.load(f)
    for field in ("max_epsilon", "max_rounds", "allowed_models"):
        assert field in str(err.value)
    f.write_text("max_epsilon: 1\nmax_epsion: 2\n")
    with pytest.raises(FederationError, match=r"unknown key\(s\) \['max_epsion'\]"):
        SitePolicy.load(f)
    with pytest.raises(FederationError, match="not found"):
        SitePolicy.load(tmp_path / "none.yaml")
    assert SitePolicy.load(None) == SitePolicy()
