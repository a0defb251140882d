"""Encryption at rest (lepton_ray.crypto.at_rest) and ``lepton-ray decrypt``: no Ray."""

from __future__ import annotations

import base64
import os
import re
import stat

import pytest

from lepton_ray.crypto import at_rest
from lepton_ray.crypto.at_rest import (
    HEADER_BYTES,
    MAGIC,
    OVERHEAD_BYTES,
    VERSION,
    decrypt_bytes,
    encrypt_bytes,
    load_key,
    read_encrypted,
    write_encrypted,
)
from lepton_ray.errors import DataError, LeptonError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
WRONG = "wrong key or corrupted file"


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("plaintext", [b"", b"x", os.urandom(100_000)])
def test_round_trip(plaintext):
    sealed = encrypt_bytes(plaintext, KEY)
    assert len(sealed) == len(plaintext) + OVERHEAD_BYTES
    assert sealed[:len(MAGIC)] == MAGIC and sealed[len(MAGIC)] == VERSION
    assert decrypt_bytes(sealed, KEY) == plaintext


def test_fresh_nonce_every_time():
    a, b = encrypt_bytes(b"same", KEY), encrypt_bytes(b"same", KEY)
    assert a[len(MAGIC) + 1:HEADER_BYTES] != b[len(MAGIC) + 1:HEADER_BYTES] and a != b


def test_wrong_key_and_wrong_associated_data_fail_cleanly():
    sealed = encrypt_bytes(b"model weights", KEY, associated=b"checkpoint")
    with pytest.raises(DataError, match=WRONG):
        decrypt_bytes(sealed, OTHER, associated=b"checkpoint")
    with pytest.raises(DataError, match=WRONG):
        decrypt_bytes(sealed, KEY, associated=b"model")  # a file swapped for another
    assert decrypt_bytes(sealed, KEY, associated=b"checkpoint") == b"model weights"


def test_every_flipped_byte_is_rejected():
    sealed = encrypt_bytes(b"sixteen byte msg", KEY)
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(DataError):
            decrypt_bytes(bytes(bad), KEY)


def test_every_truncation_is_rejected():
    sealed = encrypt_bytes(b"some plaintext", KEY)
    for n in range(len(sealed)):
        with pytest.raises(DataError):
            decrypt_bytes(sealed[:n], KEY)
    with pytest.raises(DataError, match=WRONG):
        decrypt_bytes(sealed + b"\0", KEY)  # extended, too


def test_foreign_data_and_future_versions_are_named():
    with pytest.raises(DataError, match="not a Lepton-Ray encrypted file"):
        decrypt_bytes(b"PK\x03\x04 a zip file, say" * 3, KEY, source="model.pt.enc")
    future = bytearray(encrypt_bytes(b"x", KEY))
    future[len(MAGIC)] = VERSION + 1
    with pytest.raises(DataError, match=f"format version {VERSION + 1}"):
        decrypt_bytes(bytes(future), KEY)


@pytest.mark.parametrize("key", [b"short", KEY + b"!", "not bytes" * 4])
def test_bad_key_size_or_type(key):
    with pytest.raises(DataError, match="32-byte key"):
        encrypt_bytes(b"x", key)


# --------------------------------------------------------------------------- keys


def test_load_key_accepts_raw_hex_and_base64(tmp_path, monkeypatch):
    forms = {
        "raw": KEY,
        "hex": (KEY.hex() + "\n").encode(),
        "HEX": KEY.hex().upper().encode(),
        "b64": base64.b64encode(KEY) + b"\n",
        "b64url": base64.urlsafe_b64encode(KEY).rstrip(b"="),
    }
    for name, content in forms.items():
        (tmp_path / name).write_bytes(content)
        assert load_key(key_file=tmp_path / name) == KEY, name
    for text in (KEY.hex(), base64.b64encode(KEY).decode(), f"  {KEY.hex()}\n"):
        monkeypatch.setenv("LR_TEST_KEY", text)
        assert load_key(key_env="LR_TEST_KEY") == KEY


def test_load_key_problems_name_the_source_never_the_key(tmp_path, monkeypatch):
    cases = []
    short = tmp_path / "short.key"
    short.write_text(KEY.hex()[:62])
    cases.append(({"key_file": short}, f"key file {short}: expected 32 raw bytes"))
    cases.append(({"key_file": tmp_path / "nope.key"}, "key file not found: .*nope.key"))
    cases.append(({"key_file": tmp_path}, "is a directory"))
    monkeypatch.delenv("LR_MISSING_KEY", raising=False)
    cases.append(({"key_env": "LR_MISSING_KEY"}, "key variable LR_MISSING_KEY is not set"))
    monkeypatch.setenv("LR_SHORT_KEY", KEY.hex()[:-2])
    cases.append(({"key_env": "LR_SHORT_KEY"}, "key variable LR_SHORT_KEY: expected 64 hex"))
    monkeypatch.setenv("LR_EMPTY_KEY", "")
    cases.append(({"key_env": "LR_EMPTY_KEY"}, "an empty value"))
    cases.append(({}, "exactly one key source"))
    cases.append(({"key_file": short, "key_env": "LR_SHORT_KEY"}, "exactly one key source"))
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as info:
            load_key(**kwargs)
        assert KEY.hex()[:16] not in str(info.value)


def test_unreadable_key_file(tmp_path, monkeypatch):
    path = tmp_path / "k"
    path.write_text(KEY.hex())

    def denied(self):  # chmod 0 does not stop root, who may run this suite
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(DataError, match=f"cannot read key file {path}: Permission denied"):
        load_key(key_file=path)


# --------------------------------------------------------------------------- files


def test_write_encrypted_is_atomic_private_and_replaces(tmp_path):
    path = tmp_path / "sub" / "model.pt.enc"
    write_encrypted(path, b"v1", KEY)
    write_encrypted(path, b"v2", KEY)
    assert read_encrypted(path, KEY) == b"v2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["model.pt.enc"]  # no temp files left


def test_read_encrypted_names_the_file(tmp_path):
    with pytest.raises(DataError, match="encrypted file not found"):
        read_encrypted(tmp_path / "missing.enc", KEY)
    path = write_encrypted(tmp_path / "c.enc", b"x", KEY)
    with pytest.raises(DataError, match=f"{path}: authentication failed: {WRONG}"):
        read_encrypted(path, OTHER)


def test_errors_are_lepton_errors():
    assert issubclass(DataError, LeptonError)
    assert at_rest.is_encrypted(encrypt_bytes(b"", KEY)) and not at_rest.is_encrypted(b"PK")


# --------------------------------------------------------------------------- lepton-ray decrypt


@pytest.fixture
def sealed(tmp_path):
    keyfile = tmp_path / "key.hex"
    keyfile.write_text(KEY.hex() + "\n")
    path = write_encrypted(tmp_path / "model.pt.enc", b"\x80weights", KEY, associated=b"model.pt")  # as a job seals it
    return path, keyfile


def test_decrypt_cli_round_trip_default_output(cli, sealed, capsys):
    path, keyfile = sealed
    assert cli(["decrypt", str(path), "--key-file", str(keyfile)]) == 0
    assert (path.parent / "model.pt").read_bytes() == b"\x80weights"
    assert "wrote" in capsys.readouterr().out
    # the plaintext is not overwritten by accident
    assert cli(["decrypt", str(path), "--key-file", str(keyfile)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["decrypt", str(path), "--key-file", str(keyfile), "--overwrite"]) == 0


def test_decrypt_cli_key_env_and_explicit_output(cli, sealed, monkeypatch, tmp_path, capsysbinary):
    path, _ = sealed
    monkeypatch.setenv("LR_TEST_KEY", base64.b64encode(KEY).decode())
    out = tmp_path / "plain.bin"
    assert cli(["decrypt", str(path), "--key-env", "LR_TEST_KEY", "-o", str(out)]) == 0
    assert out.read_bytes() == b"\x80weights"
    capsysbinary.readouterr()
    assert cli(["decrypt", str(path), "--key-env", "LR_TEST_KEY", "-o", "-"]) == 0
    assert capsysbinary.readouterr().out == b"\x80weights"


def test_decrypt_cli_failures_exit_2_with_a_message(cli, sealed, monkeypatch, tmp_path, capsys):
    path, keyfile = sealed
    other = tmp_path / "other.key"
    other.write_bytes(OTHER)
    tampered = tmp_path / "tampered.enc"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 2] ^= 0x40
    tampered.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.enc"
    truncated.write_bytes(path.read_bytes()[:HEADER_BYTES + 3])
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    monkeypatch.delenv("LR_UNSET_KEY", raising=False)
    cases = [
        (["decrypt", str(path), "--key-file", str(other)], WRONG),
        (["decrypt", str(tampered), "--key-file", str(keyfile)], WRONG),
        (["decrypt", str(truncated), "--key-file", str(keyfile)], f"truncated.*{WRONG}"),
        (["decrypt", str(path), "--key-env", "LR_UNSET_KEY"], "LR_UNSET_KEY is not set"),
        (["decrypt", str(plain), "--key-file", str(keyfile)], "no .enc suffix"),
        (["decrypt", str(tmp_path / "gone.enc"), "--key-file", str(keyfile)], "not found"),
        (["decrypt", str(path), "--key-file", str(keyfile), "-o", str(path), "--overwrite"],
         "over the encrypted file"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lepton-ray decrypt: error:") and re.search(message, err), err
        assert "Traceback" not in err
    for name in ("tampered", "truncated"):
        assert not (tmp_path / name).exists()  # nothing half-written
    assert not (path.parent / "model.pt").exists()


def test_decrypt_cli_associated_data(cli, tmp_path, capsys):
    keyfile = tmp_path / "k"
    keyfile.write_bytes(KEY)
    path = write_encrypted(tmp_path / "ckpt.enc", b"state", KEY, associated=b"checkpoint")
    assert cli(["decrypt", str(path), "--key-file", str(keyfile)]) == 2
    assert WRONG in capsys.readouterr().err
    assert cli(["decrypt", str(path), "--key-file", str(keyfile),
                "--associated", "checkpoint"]) == 0
    assert (tmp_path / "ckpt").read_bytes() == b"state"


def test_decrypt_requires_one_key_source(cli, sealed, capsys):
    path, keyfile = sealed
    with pytest.raises(SystemExit) as info:
        cli(["decrypt", str(path)])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli(["decrypt", str(path), "--key-file", str(keyfile), "--key-env", "X"])
