import textwrap

import pytest

from lepton_ray.cli import main
from lepton_ray.config import (
    DataSource,
    JobSpec,
    ModelKind,
    OptimizerKind,
    StrategyKind,
    load_spec,
    parse_assignment,
)
from lepton_ray.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_main_job_spec_loads_with_enums():
    spec = load_spec("jobs/digits.yaml")
    assert spec.data.source is DataSource.DIGITS
    assert spec.model.kind is ModelKind.MLP and spec.model.hidden == (128,)
    assert spec.training.optimizer is OptimizerKind.SGD
    assert spec.server.strategy is StrategyKind.FEDAVG
    assert spec.parties.count == 10


def test_spec_is_frozen():
    spec = JobSpec()
    with pytest.raises(Exception):
        spec.rounds = 3  # type: ignore[misc]


def test_round_trip_through_dict():
    spec = load_spec("jobs/digits.yaml", training__lr=0.05)
    assert load_spec(spec.to_dict()) == spec


def test_overrides_keyword_dotted_and_nested():
    spec = load_spec("jobs/digits.yaml", rounds=4, training__lr=0.5, server={"strategy": "fedadam"})
    assert spec.rounds == 4 and spec.training.lr == 0.5
    assert spec.server.strategy is StrategyKind.FEDADAM
    assert spec.training.momentum == 0.9  # untouched sibling kept


def test_parse_assignment_uses_yaml_types():
    assert parse_assignment("model.hidden=[64, 32]") == ("model.hidden", [64, 32])
    assert parse_assignment("training.lr=1e-3") == ("training.lr", "1e-3")  # YAML 1.1; float() accepts
    assert load_spec({"training": {"lr": "1e-3"}}).training.lr == 1e-3
    with pytest.raises(ConfigError):
        parse_assignment("no-equals-sign")


def test_every_problem_reported_at_once_with_paths(tmp_path):
    p = write(tmp_path, """
        rounds: -1
        parties: {count: 0}
        training: {lr: fast, batch_size: 0}
        model: {kind: transformer, hiden: [3]}
        sampling: {fraction: 1.5}
        bogus: 1
    """)
    with pytest.raises(ConfigError) as info:
        load_spec(p)
    text = str(info.value)
    for needle in [
        "rounds: must be > 0, got -1",
        "parties.count: must be > 0, got 0",
        "training.lr: expected a number, got 'fast'",
        "training.batch_size: must be > 0",
        "model.kind: must be one of",
        "model.hiden: unknown key (did you mean 'hidden'?)",
        "sampling.fraction: must be in (0, 1]",
        "bogus: unknown key",
    ]:
        assert needle in text, needle
    assert len(info.value.problems) == 8


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["unknown_section.x=1"], "unknown_section: unknown key"),
        (["training.epochs=two"], "training.epochs: expected an integer, got 'two'"),
        (["parties.count=-5"], "parties.count: must be > 0, got -5"),
        (["data.source=mnist"], "data.source: must be one of"),
        (["data.source=csv", "data.path=/does/not/exist.csv", "data.label=y"],
         "data.path: file not found: /does/not/exist.csv"),
        (["data.source=csv", "data.path={csv}", "data.label=diagnosis"],
         "data.label: column 'diagnosis' not in"),
        (["data.source=csv", "data.path={csv_text}", "data.label=y"],
         "data.features: non-numeric feature column(s) colour"),
        (["data.source=csv"], "data.path: required for source 'csv'"),
        (["secure_aggregation.mode=maybe"], "secure_aggregation.mode: must be one of"),
    ],
)
def test_bad_specs_exit_2_naming_the_field(tmp_path, capsys, sets, needle):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    csv_text = tmp_path / "t.csv"
    csv_text.write_text("a,colour,y\n1,red,0\n3,blue,1\n")
    args = ["validate", "jobs/digits.yaml"]
    for s in sets:
        args += ["--set", s.format(csv=csv, csv_text=csv_text)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_malformed_yaml_and_missing_file(tmp_path, capsys):
    p = write(tmp_path, "rounds: [1,\n")
    assert main(["validate", str(p)]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_validate_ok(capsys):
    assert main(["validate", "jobs/digits.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: jobs/digits.yaml: 10 parties") and "64 features, 10 classes" in out


def test_party_paths_count_must_match(tmp_path):
    with pytest.raises(ConfigError, match="parties.count: is 3 but data.party_paths lists 2"):
        load_spec({"parties": {"count": 3},
                   "data": {"source": "party_files", "party_paths": ["a", "b"], "test_path": "t",
                            "label": "y"}})


def test_simulated_dropout_is_a_probability_and_only_for_simulation():
    assert load_spec("jobs/digits.yaml", parties__simulated_dropout=0.1).parties.simulated_dropout == 0.1
    with pytest.raises(ConfigError, match=r"parties.simulated_dropout: must be in \[0, 1\), got 1.5"):
        load_spec("jobs/digits.yaml", parties__simulated_dropout=1.5)


DISTRIBUTED = {"mode": "user_level", "noise": "distributed", "epsilon": 3.0}


def _problems(**overrides):
    with pytest.raises(ConfigError) as err:
        load_spec("jobs/synthetic_dp.yaml", **overrides)
    return "\n".join(err.value.problems)


def test_attack_pld_with_distributed_noise_fails_at_validation():
    """Before issue 13 this passed validation and failed only when the job started."""
    msg = _problems(privacy=dict(DISTRIBUTED, accountant="pld"))
    assert "privacy.accountant: 'pld' cannot account for distributed (Skellam) noise" in msg
    load_spec("jobs/synthetic_dp.yaml", privacy=dict(DISTRIBUTED, accountant="rdp"))
    # central noise is a discrete Gaussian: PLD has none either, refused at validation too
    assert "'pld' cannot account for central noise" in _problems(
        privacy={"mode": "user_level", "accountant": "pld"})


def test_attack_pld_with_dp_sgd_fails_at_validation():
    """DP-SGD's per-step noise is a multi-dimensional discrete Gaussian: PLD cannot account
    for it, so the job is refused before it starts, not when a host reports its epsilon."""
    msg = _problems(privacy={"mode": "none", "accountant": "pld",
                             "dp_sgd": {"noise_multiplier": 1.1}})
    assert "privacy.accountant: 'pld' cannot account for record-level DP-SGD" in msg
    assert "use 'rdp'" in msg
    load_spec("jobs/synthetic_dp.yaml", privacy={"mode": "none", "accountant": "rdp",
                                                 "dp_sgd": {"noise_multiplier": 1.1}})
    load_spec("jobs/synthetic_dp.yaml", privacy={"mode": "none", "accountant": "pld"})


def test_zhu_wang_amplification_is_refused_as_unsound():
    msg = _problems(privacy=dict(DISTRIBUTED, amplification="zhu_wang"))
    assert "privacy.amplification: 'zhu_wang' was removed" in msg and "unsound" in msg
    spec = load_spec("jobs/synthetic_dp.yaml", privacy=dict(DISTRIBUTED, amplification="mixture"))
    assert spec.privacy.colluding_parties is None  # the default: 10% of each round's sample


def test_colluding_parties_must_leave_an_honest_survivor():
    # synthetic_dp: 1000 parties, q = 0.1 -> ~100 sampled, n_min = 90 at fraction 0.9
    load_spec("jobs/synthetic_dp.yaml", privacy=dict(DISTRIBUTED, colluding_parties=89))
    msg = _problems(privacy=dict(DISTRIBUTED, colluding_parties=90))
    assert "privacy.colluding_parties: 90 colluders would leave no honest share" in msg
    assert "must be < 90" in msg
    assert "colluding_parties: must be >= 0" in _problems(
        privacy=dict(DISTRIBUTED, colluding_parties=-1))


def test_deterministic_training_seeds_are_refused_with_privacy():
    from lepton_ray.config import load_spec
    from lepton_ray.errors import ConfigError

    base = {"name": "t", "data": {"source": "digits"}, "parties": {"count": 6},
            "training": {"deterministic_seeds": True}}
    load_spec(base)  # fine without privacy (reproducible tests)
    with pytest.raises(ConfigError, match="training.deterministic_seeds"):
        load_spec(dict(base, privacy={"mode": "user_level", "epsilon": 3, "delta": 1e-5,
                                      "clip_norm": 1.0}))


def _deploy(**extra):
    return {"data": {"source": "party_files", "test_path": "/srv/test.csv", "label": "y"},
            "parties": {"count": 2, "deploy": [{"id": "north", "data": "/srv/north.csv"},
                                              {"id": "south", "data": "/srv/south.csv"}]},
            **extra}


def test_a_deployment_needs_a_public_weight_cap():
    """A deployed party's row count never leaves its node (issue 13), so the driver cannot
    take the largest party's as the FedAvg weight cap: the spec must give it."""
    with pytest.raises(ConfigError) as exc:
        load_spec(_deploy())
    assert any(p.startswith("secure_aggregation.weight_cap: required with parties.deploy")
               for p in exc.value.problems), exc.value.problems
    assert load_spec(_deploy(secure_aggregation={"weight_cap": 500})).secure_aggregation.weight_cap == 500
    # user-level DP weighs every party 1: no cap is used, none is needed
    spec = load_spec(_deploy(privacy={"mode": "user_level", "epsilon": 5.0, "noise_multiplier": 1.0},
                             sampling={"kind": "poisson", "fraction": 0.5}))
    assert spec.secure_aggregation.weight_cap is None
    # simulation keeps its default (the driver made the split and knows the sizes)
    assert load_spec({"parties": {"count": 2}}).secure_aggregation.weight_cap is None


def test_a_fixed_secure_aggregation_scale_is_checked_not_crashed(small_job):
    """A spec setting secure_aggregation.scale used to fail to load (an import of a module
    that no longer exists); now a safe scale loads and an overflowing one names the field."""
    from lepton_ray.config import build_spec
    from lepton_ray.errors import ConfigError

    ok = build_spec(dict(small_job, secure_aggregation={"scale": 1000.0}))
    assert ok.secure_aggregation.scale == 1000.0
    with pytest.raises(ConfigError, match="secure_aggregation.scale"):
        build_spec(dict(small_job, secure_aggregation={"scale": 1e12}))


def test_corrupt_fraction_out_of_range_is_named(small_job):
    from lepton_ray.config import build_spec
    from lepton_ray.errors import ConfigError

    assert build_spec(dict(small_job, secure_aggregation={"corrupt_fraction": 0.01})
                      ).secure_aggregation.corrupt_fraction == 0.01
    for bad in (-0.1, 0.5, "many"):
        with pytest.raises(ConfigError, match="secure_aggregation.corrupt_fraction"):
            build_spec(dict(small_job, secure_aggregation={"corrupt_fraction": bad}))
