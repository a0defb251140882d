"""Provisioning and kit loading: real X.509 (cryptography), checked by an independent path
(the ``cryptography`` verifier and OpenSSL via ``ssl``), and every way a kit can be wrong."""

from __future__ import annotations

import json
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lepton_ray.errors import FederationError, LeptonError
from lepton_ray.federation.provision import (
    FederationSpec,
    Role,
    SignedRoster,
    fingerprint,
    load_kit,
    provision,
)

SPEC = FederationSpec(name="demo", host="127.0.0.1", port=50051, parties=("north", "south", "east"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision(SPEC, tmp_path_factory.mktemp("fed") / "kits")


@pytest.fixture
def fresh(tmp_path):
    return provision(SPEC, tmp_path / "kits")


def test_federation_file_round_trip_and_errors(tmp_path):
    f = tmp_path / "federation.yaml"
    f.write_text("name: demo\ncoordinator: {host: 127.0.0.1, port: 50051}\nparties: [north, south, east]\n")
    assert FederationSpec.load(f) == SPEC
    f.write_text("name: Demo!\ncoordinator: {host: '', port: 70000}\nparties: [a, a, coordinator]\n")
    with pytest.raises(FederationError) as err:
        FederationSpec.load(f)
    text = str(err.value)
    for field in ("name:", "coordinator.host", "coordinator.port", "parties[2]", "listed twice"):
        assert field in text
    f.write_text("name: demo\nparties: [a, b]\ncolour: red\n")
    with pytest.raises(FederationError, match="colour: unknown key.*\n.*coordinator: required"):
        FederationSpec.load(f)
    with pytest.raises(FederationError, match="not found"):
        FederationSpec.load(tmp_path / "nope.yaml")


def test_kits_layout_modes_and_verification(kits):
    assert set(kits) == {"coordinator", "north", "south", "east"}
    ca_dir = kits["north"].parent / "ca"
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    for site, path in kits.items():
        assert stat.S_IMODE((path / "site.key").stat().st_mode) == 0o600
        kit = load_kit(path)
        assert kit.site == site and kit.federation == "demo"
        assert "PRIVATE" not in repr(kit)
        if site == "coordinator":
            assert kit.role is Role.COORDINATOR and kit.identity is None
            assert not (path / "identity.key").exists()
        else:
            assert stat.S_IMODE((path / "identity.key").stat().st_mode) == 0o600
            assert kit.index == SPEC.parties.index(site)
    hashes = {load_kit(p).roster.roster_hash for p in kits.values()}
    assert len(hashes) == 1  # every site pins the same roster


def test_certificates_checked_by_independent_verifiers(kits):
    """Oracle: cryptography's X.509 path validator and OpenSSL (``ssl``) accept the chain."""
    from cryptography.x509.verification import PolicyBuilder, Store

    path = kits["coordinator"]
    ca = x509.load_pem_x509_certificate((path / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((path / "site.pem").read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(
        x509.DNSName("coordinator.demo.lepton"))
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca
    ctx = ssl.create_default_context(cafile=str(path / "ca.pem"))  # OpenSSL parses the CA
    ctx.load_cert_chain(str(path / "site.pem"), str(path / "site.key"))  # key matches cert
    party = x509.load_pem_x509_certificate((kits["north"] / "site.pem").read_bytes())
    client = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(party, [])
    assert client.chain[-1] == ca


def test_roster_is_signed_by_ca_and_pins_certs_and_identity_keys(kits):
    kit = load_kit(kits["south"])
    roster = kit.roster
    assert [p.id for p in roster.parties] == ["north", "south", "east"]
    for p in roster.parties:
        assert p.cert_sha256 == fingerprint((kits[p.id] / "site.pem").read_bytes())
        Ed25519PublicKey.from_public_bytes(p.identity_key)  # a valid Ed25519 key
    assert roster.coordinator_sha256 == fingerprint((kits["coordinator"] / "site.pem").read_bytes())
    msg = b"advert"
    sig = kit.identity.sign(msg)
    Ed25519PublicKey.from_public_bytes(roster.secagg_roster().public_key(1)).verify(sig, msg)
    import hashlib

    assert roster.roster_hash == hashlib.sha256(roster.document).hexdigest()


def _edit_roster(path, edit):
    outer = json.loads((path / "roster.json").read_text())
    doc = json.loads(outer["document"])
    edit(doc)
    outer["document"] = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    import hashlib

    outer["roster_hash"] = hashlib.sha256(outer["document"].encode()).hexdigest()
    (path / "roster.json").write_text(json.dumps(outer))
    meta = json.loads((path / "kit.json").read_text())  # the attacker rewrites the kit's pin too
    meta["roster_hash"] = outer["roster_hash"]
    (path / "kit.json").write_text(json.dumps(meta))


def test_attack_coordinator_swaps_a_roster_key_is_refused(fresh):
    """Attack: replace south's identity key in north's pinned roster (a coordinator that
    wants to impersonate south), recomputing the hash. The CA signature no longer verifies."""
    attacker = os.urandom(32).hex()

    def swap(doc):
        doc["parties"][1]["ed25519"] = attacker

    _edit_roster(fresh["north"], swap)
    with pytest.raises(FederationError, match="roster signature does not verify"):
        load_kit(fresh["north"])


def test_roster_from_another_federation_is_refused(fresh, tmp_path):
    other = provision(SPEC, tmp_path / "other")
    for f in ("roster.json", "kit.json"):
        (fresh["north"] / f).write_bytes((other["north"] / f).read_bytes())
    with pytest.raises(FederationError, match="roster signature does not verify"):
        load_kit(fresh["north"])


def test_roster_hash_mismatch_is_refused(fresh):
    outer = json.loads((fresh["east"] / "roster.json").read_text())
    outer["roster_hash"] = "00" * 32
    (fresh["east"] / "roster.json").write_text(json.dumps(outer))
    with pytest.raises(FederationError, match="roster_hash does not match"):
        load_kit(fresh["east"])


def test_missing_files_and_loose_modes(fresh):
    (fresh["north"] / "identity.key").unlink()
    (fresh["north"] / "ca.pem").unlink()
    with pytest.raises(FederationError, match="missing ca.pem, identity.key"):
        load_kit(fresh["north"])
    os.chmod(fresh["south"] / "site.key", 0o644)
    with pytest.raises(FederationError, match="site.key has mode 0644.*chmod 600"):
        load_kit(fresh["south"])
    with pytest.raises(FederationError, match="not a directory"):
        load_kit(fresh["south"] / "nope")
    (fresh["east"] / "kit.json").write_text("{")
    with pytest.raises(FederationError, match="kit.json is malformed"):
        load_kit(fresh["east"])


def test_mismatched_files_are_refused(fresh, tmp_path):
    other = provision(SPEC, tmp_path / "other")
    # a certificate from another CA
    (fresh["north"] / "site.pem").write_bytes((other["north"] / "site.pem").read_bytes())
    with pytest.raises(FederationError, match="not issued by the CA"):
        load_kit(fresh["north"])
    # another site's certificate and key of the same CA: not the one the roster pins
    for f in ("site.pem", "site.key"):
        (fresh["south"] / f).write_bytes((fresh["east"] / f).read_bytes())
    with pytest.raises(FederationError, match="not the certificate the roster pins for 'south'"):
        load_kit(fresh["south"])
    # key does not match the certificate
    (fresh["east"] / "site.key").write_bytes((fresh["coordinator"] / "site.key").read_bytes())
    with pytest.raises(FederationError, match="does not match the key"):
        load_kit(fresh["east"])
    # identity key not the pinned one
    (fresh["coordinator"] / "x").write_text("")
    kit = provision(SPEC, tmp_path / "third")
    (kit["north"] / "identity.key").write_bytes((kit["south"] / "identity.key").read_bytes())
    with pytest.raises(FederationError, match="identity the roster pins for 'north'"):
        load_kit(kit["north"])
    (kit["south"] / "site.pem").write_text("garbage")
    with pytest.raises(FederationError, match="not an X.509 certificate"):
        load_kit(kit["south"])


def test_expired_certificate_is_refused(kits):
    import datetime as dt

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    with pytest.raises(FederationError, match="not now"):
        load_kit(kits["north"], now=later)


def test_provision_never_overwrites(kits):
    with pytest.raises(FederationError, match="never overwrites"):
        provision(SPEC, kits["north"].parent)


def test_cli_provision(tmp_path, capsys):
    from lepton_ray.cli import main

    f = tmp_path / "federation.yaml"
    f.write_text("name: demo\ncoordinator: {host: localhost, port: 50051}\nparties: [a, b]\n")
    assert main(["provision", str(f), "--out", str(tmp_path / "kits")]) == 0
    out = capsys.readouterr().out
    assert "roster" in out and "kits/a" in out
    assert load_kit(tmp_path / "kits" / "b").index == 1
    assert main(["provision", str(f), "--out", str(tmp_path / "kits")]) == 2
    assert issubclass(FederationError, LeptonError)
