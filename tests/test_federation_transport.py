"""gRPC over mutual TLS on localhost: real certificates, real handshakes. Attacks: a site
with another CA's certificate, a CA-valid certificate outside the roster, a site claiming
another site's id. Plus streaming of a 10M-float vector, timeouts and reconnection."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
import threading
import time

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lepton_ray.errors import FederationError
from lepton_ray.federation import wire
from lepton_ray.federation.provision import (
    FederationSpec,
    Role,
    issue_site_cert,
    load_kit,
    provision,
)
from lepton_ray.federation.transport import (
    CallTimeout,
    CoordinatorServer,
    RemoteError,
    SiteClient,
    SiteGone,
)

SPEC = FederationSpec(name="demo", host="127.0.0.1", port=1, parties=("north", "south", "east"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision(SPEC, tmp_path_factory.mktemp("fed") / "kits")


@pytest.fixture
def server(kits):
    srv = CoordinatorServer(load_kit(kits["coordinator"]), host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()


def echo(message):
    if isinstance(message, wire.Call):
        if message.method == "sleep":
            time.sleep(message.args[0])
        if message.method == "fail":
            raise ValueError("site says no")
        return message.args
    return None


def _site(kit, port, handler=echo):
    client = SiteClient(kit, handler, address=f"127.0.0.1:{port}")
    thread = threading.Thread(target=client.run, kwargs={"max_backoff": 0.5, "connect_timeout": 3},
                              daemon=True)
    thread.start()
    return client, thread


def test_good_sites_are_accepted_and_answer_calls(kits, server):
    clients = [_site(load_kit(kits[p]), server.port)[0] for p in ("north", "south", "east")]
    live = server.wait_for(3, timeout=20)
    assert sorted(live) == ["east", "north", "south"]
    assert [live[p].index for p in ("north", "south", "east")] == [0, 1, 2]
    assert live["south"].call("ping", 1, (2, 3), {0: b"x"}, timeout=10) == (1, (2, 3), {0: b"x"})
    with pytest.raises(RemoteError, match="ValueError: site says no"):
        live["north"].call("fail", timeout=10)
    with pytest.raises(CallTimeout, match="within 0.2 s"):
        live["east"].call("sleep", 1.0, timeout=0.2)
    for c in clients:
        c.stop()


def test_negotiates_tls13_and_requires_a_client_certificate(kits, server):
    """Probe with OpenSSL (the ``ssl`` module): TLS 1.3 is negotiated with a good client
    certificate; without one the server refuses (require_client_auth)."""
    path = kits["north"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(path / "ca.pem"))
    ctx.load_cert_chain(str(path / "site.pem"), str(path / "site.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="coordinator.demo.lepton") as tls:
            assert tls.version() == "TLSv1.3"
            peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            assert peer.subject.rfc4514_string().startswith("OU=demo,CN=coordinator")
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(str(path / "ca.pem"))
    bare.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with bare.wrap_socket(raw, server_hostname="coordinator.demo.lepton") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # TLS 1.3: refused after the handshake
            try:
                served = tls.recv(100)
            except (ssl.SSLError, OSError):
                served = b""
            assert served == b""  # closed without one HTTP/2 byte
    assert server.live() == {}


def test_tls12_and_unpinned_peers_are_refused_before_any_message(kits):
    from lepton_ray.federation.transport import authenticate_peer

    roster = load_kit(kits["north"]).roster
    pem = (kits["north"] / "site.pem").read_bytes()
    good = {"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [pem]}
    assert authenticate_peer(good, roster)[0].id == "north"
    entry, why = authenticate_peer({**good, "ssl_tls_version": [b"TLSv1.2"]}, roster)
    assert entry is None and "requires TLSv1.3" in why
    entry, why = authenticate_peer({"ssl_tls_version": [b"TLSv1.3"]}, roster)
    assert entry is None and why == "no client certificate"


def test_attack_site_with_another_cas_certificate_fails_tls(kits, server, tmp_path):
    """Attack: an outsider provisions its own CA and kit for 'north' and connects."""
    other = provision(SPEC, tmp_path / "other")
    client = SiteClient(load_kit(other["north"]), echo, address=f"127.0.0.1:{server.port}")
    with pytest.raises(SiteGone, match="TLS handshake or network failed"):
        client.connect_once(connect_timeout=3)
    assert server.live() == {}


def _outsider(kits, tmp_path):
    """A certificate the federation CA really issued, to a site the roster does not list."""
    ca_dir = kits["north"].parent / "ca"
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    key, cert = issue_site_cert(federation="demo", site="mallory", role=Role.PARTY, ca_key=ca_key,
                                ca_cert=ca_cert)
    pem = lambda k: k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return dataclasses.replace(load_kit(kits["north"]), cert_pem=cert.public_bytes(
        serialization.Encoding.PEM), key_pem=pem(key))


def test_attack_certificate_not_in_roster_is_refused(kits, server, tmp_path):
    client = SiteClient(_outsider(kits, tmp_path), echo, address=f"127.0.0.1:{server.port}")
    exc = _attempt(client)
    assert server.live() == {}, "an outsider's certificate got a session"
    assert isinstance(exc, FederationError) and "not in the roster" in str(exc)
    assert "not in the roster" in server.refused[-1]


def _attempt(client, wait: float = 10.0):
    """Connect once in the background; the exception it ended with (None: still connected)."""
    out = {}

    def go():
        try:
            client.connect_once(connect_timeout=5)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["exc"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(wait)
    client.stop()
    return out.get("exc")


def test_attack_site_claiming_another_sites_id_is_refused(kits, server):
    north = load_kit(kits["north"])
    client = SiteClient(dataclasses.replace(north, site="south"), echo,
                        address=f"127.0.0.1:{server.port}")
    exc = _attempt(client)
    assert server.live() == {}
    assert isinstance(exc, FederationError) and "certificate of 'north' says Hello from 'south'" in str(exc)


def test_party_certificate_cannot_pose_as_the_coordinator(kits):
    """A party's kit (its key, its CA-valid certificate) serving as coordinator: sites refuse
    it (the name check), so a party cannot intercept the others."""
    fake = dataclasses.replace(load_kit(kits["coordinator"]),
                               cert_pem=(kits["east"] / "site.pem").read_bytes(),
                               key_pem=(kits["east"] / "site.key").read_bytes())
    srv = CoordinatorServer(fake, host="127.0.0.1", port=0).start()
    try:
        client = SiteClient(load_kit(kits["north"]), echo, address=f"127.0.0.1:{srv.port}")
        with pytest.raises(SiteGone):
            client.connect_once(connect_timeout=3)
    finally:
        srv.stop()


def test_ten_million_floats_stream_in_chunks(kits, server):
    client, _ = _site(load_kit(kits["north"]), server.port)
    session = server.wait_for(1, timeout=20)["north"]
    v = np.random.default_rng(1).standard_normal(10_000_000).astype(np.float32)
    out0, in0 = session.bytes_out, session.bytes_in
    t = time.perf_counter()
    (back,) = session.call("echo", v, timeout=120)
    seconds = time.perf_counter() - t
    assert np.array_equal(back, v)
    sent, received = session.bytes_out - out0, session.bytes_in - in0
    assert v.nbytes < sent < 1.001 * v.nbytes and v.nbytes < received < 1.001 * v.nbytes
    print(f"10M float32 echo over mTLS: {sent / 1e6:.1f} MB each way, {seconds:.2f} s round trip")
    client.stop()


def test_disconnect_fails_pending_calls_and_site_reconnects_to_a_restarted_coordinator(kits):
    kit = load_kit(kits["coordinator"])
    srv = CoordinatorServer(kit, host="127.0.0.1", port=0).start()
    port = srv.port
    client, _ = _site(load_kit(kits["south"]), port)
    session = srv.wait_for(1, timeout=20)["south"]
    pending = session.call_async("sleep", 3.0)
    srv.stop(grace=0)
    with pytest.raises(SiteGone):
        pending.result(timeout=10)
    srv2 = CoordinatorServer(kit, host="127.0.0.1", port=port).start()  # restarted
    try:
        assert "south" in srv2.wait_for(1, timeout=30)
        assert srv2.live()["south"].call("ping", 7, timeout=10) == (7,)
    finally:
        client.stop()
        srv2.stop()
