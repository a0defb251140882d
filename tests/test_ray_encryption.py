"""Checkpoints and the final model encrypted at rest (AES-256-GCM), and resumable."""

import io

import numpy as np
import pandas as pd
import pytest
import torch

import lepton_ray
from lepton_ray.crypto.at_rest import generate_key, is_encrypted, read_encrypted
from lepton_ray.errors import ConfigError, LeptonError
from lepton_ray.result import load_result

pytestmark = pytest.mark.ray


def test_encrypted_outputs_resume_and_wrong_key(ray_session, small_job, tmp_path, monkeypatch):
    key = generate_key()
    monkeypatch.setenv("LEPTON_TEST_KEY", key.hex())
    job = dict(small_job, rounds=2, secure_aggregation={"mode": "none"},
               output=dict(small_job["output"], encryption={"key_env": "LEPTON_TEST_KEY"}))
    r = lepton_ray.run(job)
    out = r.output_dir
    assert not (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()
    for name in ("model.pt", "checkpoint.pt"):
        sealed = (out / f"{name}.enc").read_bytes()
        assert is_encrypted(sealed) and b"state_dict" not in sealed and b"params" not in sealed
    saved = torch.load(io.BytesIO(read_encrypted(out / "model.pt.enc", key, associated=b"model.pt")),
                       weights_only=False)
    assert saved["spec"]["rounds"] == 2
    from sklearn.datasets import load_digits

    X, _ = load_digits(return_X_y=True)
    assert np.array_equal(load_result(out, key=key).predict(X), r.predict(X))
    with pytest.raises(LeptonError, match="encrypted"):
        load_result(out)

    from actors.driver import run_job
    from lepton_ray.config import load_spec

    run_job(load_spec(job, rounds=3), resume=True)  # reads the encrypted checkpoint
    assert pd.read_csv(out / "history.csv")["round"].tolist() == [1, 2, 3]

    monkeypatch.setenv("LEPTON_TEST_KEY", generate_key().hex())
    with pytest.raises(LeptonError, match="wrong key or corrupted"):
        run_job(load_spec(job, rounds=4), resume=True)
    monkeypatch.delenv("LEPTON_TEST_KEY")
    with pytest.raises(ConfigError, match="output.encryption: key variable LEPTON_TEST_KEY is not set"):
        lepton_ray.run(job, output__dir=str(tmp_path / "other"))


def test_cli_decrypt_restores_a_jobs_model(ray_session, small_job, tmp_path, monkeypatch, capsys):
    from lepton_ray.cli import main

    key_file = tmp_path / "key.bin"
    key_file.write_bytes(generate_key())
    job = dict(small_job, rounds=1, secure_aggregation={"mode": "none"},
               output=dict(small_job["output"], encryption={"key_file": str(key_file)}))
    out = lepton_ray.run(job).output_dir
    assert main(["decrypt", str(out / "model.pt.enc"), "--key-file", str(key_file)]) == 0
    saved = torch.load(out / "model.pt", weights_only=False)
    assert saved["spec"]["rounds"] == 1
    other = tmp_path / "other.bin"
    other.write_bytes(generate_key())
    assert main(["decrypt", str(out / "checkpoint.pt.enc"), "--key-file", str(other)]) == 2
    assert "wrong key or corrupted" in capsys.readouterr().err
