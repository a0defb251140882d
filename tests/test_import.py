import subprocess
import sys


def test_import_lepton_ray_loads_neither_ray_nor_torch():
    code = (
        "import sys, lepton_ray, lepton_ray.config, lepton_ray.cli, lepton_ray.errors\n"
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import lepton_ray loaded: {out.stdout.strip()}"


def test_cli_help_runs_without_ray():
    out = subprocess.run([sys.executable, "-m", "lepton_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "simulate" in out.stdout and "validate" in out.stdout
