"""``import lepton_ray.privacy`` stays light (no torch, Ray, dp_accounting, scipy), and the
RDP path of ``lepton-ray epsilon`` loads only dp_accounting's RDP modules."""

from __future__ import annotations

import json
import subprocess
import sys


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_privacy_loads_no_heavy_dependency():
    loaded = run_python(
        "import sys, json, lepton_ray.privacy\n"
        "heavy = ('torch', 'ray', 'dp_accounting', 'scipy', 'cryptography', 'absl')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))"
    )
    assert loaded == []


def test_rdp_epsilon_skips_dp_accounting_pld_stack_and_stays_compatible():
    result = run_python(
        "import sys, json\n"
        "from lepton_ray.privacy import compute_epsilon\n"
        "eps = compute_epsilon(sampling_rate=0.04, noise_multiplier=1.5, steps=2250, delta=1e-5)\n"
        "skipped = [m for m in ('dp_accounting.pld', 'scipy.stats', 'scipy.signal', 'torch')\n"
        "           if m not in sys.modules]\n"
        "import dp_accounting\n"  # the real package still imports afterwards, same classes
        "from lepton_ray.privacy import _dp_accounting as d\n"
        "same = dp_accounting.GaussianDpEvent is d.dp_event().GaussianDpEvent\n"
        "from lepton_ray.privacy import AccountantKind\n"
        "pld = compute_epsilon(sampling_rate=0.04, noise_multiplier=1.5, steps=2250, delta=1e-5,\n"
        "                      accountant=AccountantKind.PLD)\n"
        "print(json.dumps({'eps': eps, 'skipped': skipped, 'same': same, 'pld': pld}))"
    )
    assert result["skipped"] == ["dp_accounting.pld", "scipy.stats", "scipy.signal", "torch"]
    assert result["same"] is True
    assert abs(result["eps"] - 7.3291) < 1e-3
    assert result["pld"] < result["eps"]


def test_dpsgd_is_the_only_torch_module():
    loaded = run_python(
        "import sys, json, lepton_ray.privacy.dpsgd\nprint(json.dumps('torch' in sys.modules))"
    )
    assert loaded is True
