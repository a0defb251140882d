"""The SecAgg benchmark runs, prints one JSON object, and the library stays light."""

from __future__ import annotations

import json
import subprocess
import sys

from lepton_ray.bench.secagg import main


def test_bench_prints_one_json_object(capsys):
    assert main(["--parties", "12", "--dim", "500", "--dropout", "0.1"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("party_seconds", "server_seconds", "total_seconds", "plaintext_sum_seconds",
                "ratio_total_to_plaintext", "k", "t", "n"):
        assert key in report
    assert report["exact"] and report["n"] == 12 and report["dropped"] == 1
    assert set(report["party_seconds"]) == {"advertise_keys", "share_keys", "masked_input",
                                            "consistency", "unmask"}


def test_secagg_and_crypto_import_neither_ray_nor_torch():
    code = ("import sys, lepton_ray.secagg, lepton_ray.crypto, lepton_ray.secagg.quantize, "
            "lepton_ray.bench.secagg; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
