"""The privacy commands of the CLI (no Ray)."""

import json

import pytest

from lepton_ray.cli import main
from lepton_ray.privacy.calibration import compute_epsilon
from lepton_ray.privacy.skellam import skellam_epsilon


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_epsilon_matches_opacus_reference(capsys):
    code, out, _ = run(capsys, "epsilon", "--sampling-rate", "0.04", "--noise-multiplier", "1.5",
                       "--steps", "2250", "--delta", "1e-5", "--json")
    assert code == 0
    assert json.loads(out)["epsilon"] == pytest.approx(7.3291, abs=5e-4)  # Opacus's test value


def test_calibrate_never_overshoots_and_is_tight(capsys):
    code, out, _ = run(capsys, "calibrate", "--epsilon", "2", "--sampling-rate", "0.01", "--steps", "1000",
                       "--delta", "1e-5", "--json")
    z = json.loads(out)["noise_multiplier"]
    assert compute_epsilon(sampling_rate=0.01, noise_multiplier=z, steps=1000, delta=1e-5) <= 2
    assert compute_epsilon(sampling_rate=0.01, noise_multiplier=z / 1.01, steps=1000, delta=1e-5) > 2


def test_skellam_epsilon_and_calibration(capsys):
    common = ["--mechanism", "skellam", "--bits", "16", "--parties", "50", "--min-survivors", "45",
              "--dim", "1000", "--sampling-rate", "0.2", "--steps", "20", "--delta", "1e-5"]
    code, out, _ = run(capsys, "epsilon", *common, "--noise-multiplier", "1.5", "--json")
    got = json.loads(out)
    assert code == 0 and 0 < got["wraparound_probability"] <= 1e-6
    assert got["epsilon"] == pytest.approx(skellam_epsilon(
        sampling_rate=0.2, steps=20, delta=1e-5, bits=16, dim=1000, clip_norm=1.0, parties=50,
        min_survivors=45, noise_multiplier=1.5))
    code, out, _ = run(capsys, "calibrate", *common, "--epsilon", "5", "--json")
    z = json.loads(out)["noise_multiplier"]
    assert skellam_epsilon(sampling_rate=0.2, steps=20, delta=1e-5, bits=16, dim=1000, clip_norm=1.0,
                           parties=50, min_survivors=45, noise_multiplier=z) <= 5


@pytest.mark.parametrize("argv, needle", [
    (["epsilon", "--sampling-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
     "sampling"),
    (["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10", "--delta", "1e-5"],
     "noise_multiplier"),
    (["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"],
     "delta"),
    (["epsilon", "--mechanism", "skellam", "--bits", "16", "--sampling-rate", "0.1",
      "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "needs --parties, --dim"),
    (["ledger", "/nonexistent-dir"], "no ledger.jsonl here"),
    (["audit", "/nonexistent-dir"], "no audit.jsonl here"),
])
def test_bad_privacy_arguments_exit_2(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err
