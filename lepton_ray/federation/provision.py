"""Provisioning: the federation's certificate authority, one startup kit per site, the roster.

``lepton-ray provision FEDERATION.yaml --out KITS`` reads::

    name: demo
    coordinator: {host: 127.0.0.1, port: 50051}
    parties: [north, south, east]
    valid_days: 365          # optional, certificate lifetime

and writes ``KITS/ca/`` (the CA certificate and private key: kept by whoever provisions, never
shipped), ``KITS/coordinator/`` and ``KITS/<party>/``. Every kit holds the CA certificate, the
site's X.509 certificate and private key (mode 0600) for TLS 1.3 mutual authentication, and the
**signed roster**; a party's kit also holds its Ed25519 SecAgg identity key (mode 0600).

The roster lists, in SecAgg id order, every party's id, the SHA-256 fingerprint of its
certificate and its Ed25519 public key, plus the coordinator's fingerprint. Its canonical bytes
(sorted-key JSON) are hashed (the **roster hash**, which SecAgg+ binds into every signed message
of a round, see DESIGN "Threat model") and signed by the CA key (ECDSA P-256, SHA-256). A site
trusts only what its own kit says: the coordinator cannot add, drop or replace a party, because
it cannot forge the CA signature and every site checks its pinned copy (NVFlare's signed startup
kits are the model; STYLE point 13).

Security reasoning for the checks in :func:`load_kit`: a private key readable by others is
refused (as ssh does), a certificate must be issued by the kit's CA and valid now, its public
key must match the private key, the roster signature must verify under the CA and its hash must
match its bytes, and the site's own certificate and identity key must be the ones the roster
pins. Everything fails closed with a :class:`~lepton_ray.errors.FederationError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton_ray.crypto.identity import IdentityKey, Roster
from lepton_ray.errors import FederationError

KIT_VERSION = 1
ROSTER_DOMAIN = b"lepton-ray roster v1\x00"  # domain separation of the CA's roster signature
COORDINATOR = "coordinator"
CA_DIR = "ca"
_RESERVED = {COORDINATOR, CA_DIR}
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SITE_CERT, SITE_KEY = "site.pem", "site.key"
IDENTITY_KEY, ROSTER_FILE, KIT_FILE = "identity.key", "roster.json", "kit.json"


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    PARTY = "party"


# --------------------------------------------------------------------------- federation file
@dataclass(frozen=True, kw_only=True)
class FederationSpec:
    """The provisioning file: federation name, where the coordinator listens, the parties (in
    SecAgg id order) and the certificate lifetime."""

    name: str
    host: str
    port: int
    parties: tuple[str, ...]
    valid_days: int = 365

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not _ID.match(self.name):
            problems.append(f"name: must match {_ID.pattern} (lowercase letters, digits, - and _), "
                            f"got {self.name!r}")
        if not isinstance(self.host, str) or not self.host:
            problems.append(f"coordinator.host: must be a host name or IP address, got {self.host!r}")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            problems.append(f"coordinator.port: must be an int in [1, 65535], got {self.port!r}")
        if not isinstance(self.parties, tuple) or len(self.parties) < 2:
            problems.append(f"parties: must list at least 2 party ids, got {self.parties!r}")
        else:
            for i, p in enumerate(self.parties):
                if not isinstance(p, str) or not _ID.match(p):
                    problems.append(f"parties[{i}]: must match {_ID.pattern}, got {p!r}")
                elif p in _RESERVED:
                    problems.append(f"parties[{i}]: {p!r} is reserved")
            dup = sorted({p for p in self.parties if self.parties.count(p) > 1}, key=str)
            if dup:
                problems.append(f"parties: listed twice: {dup}")
        if type(self.valid_days) is not int or not 1 <= self.valid_days <= 3650:
            problems.append(f"valid_days: must be an int in [1, 3650], got {self.valid_days!r}")
        if problems:
            raise FederationError(_lines("invalid federation file", problems))

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "federation file") -> FederationSpec:
        if not isinstance(raw, Mapping):
            raise FederationError(f"{source}: expected a mapping at the top level")
        known = {"name", "coordinator", "parties", "valid_days"}
        problems = [f"{k}: unknown key (expected one of {sorted(known)})" for k in raw if k not in known]
        problems += [f"{k}: required" for k in ("name", "coordinator", "parties") if k not in raw]
        coord = raw.get("coordinator", {})
        if not isinstance(coord, Mapping) or set(coord) - {"host", "port"}:
            problems.append("coordinator: must be a mapping {host, port}")
            coord = {}
        if problems:
            raise FederationError(_lines(f"invalid federation file {source}", problems))
        parties = raw["parties"]
        return cls(name=raw["name"], host=coord.get("host", ""), port=coord.get("port", 0),
                   parties=tuple(parties) if isinstance(parties, list) else parties,
                   valid_days=raw.get("valid_days", 365))

    @classmethod
    def load(cls, path: str | Path) -> FederationSpec:
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FederationError(f"federation file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise FederationError(f"federation file {path}: not valid YAML: {exc}") from None
        return cls.from_mapping(raw, str(path))


# --------------------------------------------------------------------------- signed roster
@dataclass(frozen=True)
class RosterEntry:
    id: str
    index: int  # SecAgg party id
    cert_sha256: str
    identity_key: bytes  # Ed25519 public key


@dataclass(frozen=True)
class SignedRoster:
    """The CA-signed roster: ``document`` is the exact signed bytes; everything else is parsed
    from it (so the parsed view can never disagree with what was signed)."""

    document: bytes
    signature: bytes
    federation: str
    coordinator_sha256: str
    parties: tuple[RosterEntry, ...]

    @property
    def roster_hash(self) -> str:
        """SHA-256 of the canonical roster bytes (hex): what SecAgg+ binds every round to."""
        return hashlib.sha256(self.document).hexdigest()

    def secagg_roster(self) -> Roster:
        """The SecAgg+ roster: party ``i``'s Ed25519 key at index ``i``."""
        return Roster(tuple(p.identity_key for p in self.parties))

    def party(self, party_id: str) -> RosterEntry:
        for p in self.parties:
            if p.id == party_id:
                return p
        raise FederationError(f"roster: no party {party_id!r} in federation {self.federation!r}")

    def by_fingerprint(self, sha256_hex: str) -> RosterEntry | None:
        return next((p for p in self.parties if p.cert_sha256 == sha256_hex), None)

    def verify(self, ca_cert: x509.Certificate, source: str = ROSTER_FILE) -> None:
        """The CA's signature over the roster bytes; :class:`FederationError` if it fails."""
        try:
            ca_cert.public_key().verify(self.signature, ROSTER_DOMAIN + self.document,
                                        ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, TypeError, ValueError):
            raise FederationError(f"{source}: the roster signature does not verify under the "
                                  "federation CA (roster altered, or from another federation)") from None

    def to_json(self) -> str:
        return json.dumps({"document": self.document.decode(), "roster_hash": self.roster_hash,
                           "signature": self.signature.hex()}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = ROSTER_FILE) -> SignedRoster:
        try:
            outer = json.loads(text)
            document = outer["document"].encode()
            signature = bytes.fromhex(outer["signature"])
            doc = json.loads(document)
            if doc.get("version") != KIT_VERSION:
                raise FederationError(f"{source}: roster version {doc.get('version')!r}, "
                                      f"this Lepton-Ray reads version {KIT_VERSION}")
            parties = tuple(RosterEntry(id=str(p["id"]), index=int(p["index"]),
                                        cert_sha256=str(p["cert_sha256"]),
                                        identity_key=bytes.fromhex(p["ed25519"]))
                            for p in doc["parties"])
            roster = cls(document=document, signature=signature, federation=str(doc["federation"]),
                         coordinator_sha256=str(doc["coordinator"]["cert_sha256"]), parties=parties)
        except FederationError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FederationError(f"{source}: malformed roster ({type(exc).__name__}: {exc})") from None
        if outer.get("roster_hash") != roster.roster_hash:
            raise FederationError(f"{source}: roster_hash does not match the roster's bytes")
        if [p.index for p in parties] != list(range(len(parties))):
            raise FederationError(f"{source}: party indices must be 0..{len(parties) - 1} in order")
        return roster


def sign_roster(*, federation: str, coordinator_sha256: str, parties: list[RosterEntry],
                ca_key: ec.EllipticCurvePrivateKey) -> SignedRoster:
    doc = {"version": KIT_VERSION, "federation": federation,
           "coordinator": {"cert_sha256": coordinator_sha256},
           "parties": [{"id": p.id, "index": p.index, "cert_sha256": p.cert_sha256,
                        "ed25519": p.identity_key.hex()} for p in parties]}
    document = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    signature = ca_key.sign(ROSTER_DOMAIN + document, ec.ECDSA(hashes.SHA256()))
    return SignedRoster(document=document, signature=signature, federation=federation,
                        coordinator_sha256=coordinator_sha256, parties=tuple(parties))


# --------------------------------------------------------------------------- certificates
def fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 over the certificate's DER bytes, hex. ``bytes``: PEM or DER."""
    if isinstance(cert, bytes):
        cert = _parse_cert(cert, "certificate")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def server_name(federation: str) -> str:
    """The DNS name in the coordinator's certificate that sites check (TLS name override)."""
    return f"{COORDINATOR}.{federation}.lepton"


def make_ca(name: str, valid_days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed federation CA (ECDSA P-256, key from the OS CSPRNG via OpenSSL)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lepton-ray federation {name} CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_site_cert(*, federation: str, site: str, role: Role, ca_key, ca_cert: x509.Certificate,
                    host: str | None = None, valid_days: int = 365
                    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A site's TLS certificate. The coordinator's carries ``server_name(federation)`` (and its
    host) and serverAuth; a party's carries ``<party>.<federation>.lepton`` and clientAuth only,
    so a party's certificate cannot pose as the coordinator."""
    key = ec.generate_private_key(ec.SECP256R1())
    if role is Role.COORDINATOR:
        names: list[x509.GeneralName] = [x509.DNSName(server_name(federation))]
        if host:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usage = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        names = [x509.DNSName(f"{site}.{federation}.lepton")]
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


# --------------------------------------------------------------------------- provisioning
def provision(spec: FederationSpec, out: str | Path) -> dict[str, Path]:
    """Write the CA directory and one kit per site under ``out``; returns site -> kit dir.
    Refuses to write over existing kits (keys are never overwritten)."""
    out = Path(out)
    sites = [CA_DIR, COORDINATOR, *spec.parties]
    clash = [s for s in sites if (out / s).exists()]
    if clash:
        raise FederationError(f"--out {out}: already holds {', '.join(clash)}; provisioning never "
                              "overwrites keys: choose a new directory")
    ca_key, ca_cert = make_ca(spec.name, spec.valid_days)
    coord_key, coord_cert = issue_site_cert(federation=spec.name, site=COORDINATOR,
                                            role=Role.COORDINATOR, ca_key=ca_key, ca_cert=ca_cert,
                                            host=spec.host, valid_days=spec.valid_days)
    issued, entries = {}, []
    for i, party in enumerate(spec.parties):
        key, cert = issue_site_cert(federation=spec.name, site=party, role=Role.PARTY,
                                    ca_key=ca_key, ca_cert=ca_cert, valid_days=spec.valid_days)
        identity = IdentityKey.generate()
        issued[party] = (key, cert, identity)
        entries.append(RosterEntry(id=party, index=i, cert_sha256=fingerprint(cert),
                                   identity_key=identity.public_bytes))
    roster = sign_roster(federation=spec.name, coordinator_sha256=fingerprint(coord_cert),
                         parties=entries, ca_key=ca_key)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_dir(out / CA_DIR, {CA_CERT: ca_pem}, {CA_KEY: _key_pem(ca_key)})
    kits = {}
    for site, role, key, cert, identity in (
            [(COORDINATOR, Role.COORDINATOR, coord_key, coord_cert, None)]
            + [(p, Role.PARTY, *issued[p]) for p in spec.parties]):
        meta = {"version": KIT_VERSION, "federation": spec.name, "site": site, "role": role.value,
                "coordinator": {"host": spec.host, "port": spec.port},
                "roster_hash": roster.roster_hash}
        public = {CA_CERT: ca_pem, SITE_CERT: cert.public_bytes(serialization.Encoding.PEM),
                  ROSTER_FILE: roster.to_json().encode(),
                  KIT_FILE: (json.dumps(meta, indent=1) + "\n").encode()}
        private = {SITE_KEY: _key_pem(key)}
        if identity is not None:
            private[IDENTITY_KEY] = identity.private_bytes().hex().encode() + b"\n"
        _write_dir(out / site, public, private)
        kits[site] = out / site
    return kits


# --------------------------------------------------------------------------- kit loading
@dataclass(frozen=True)
class Kit:
    """A loaded, verified startup kit. ``key_pem`` and ``identity`` are private."""

    path: Path
    federation: str
    site: str
    role: Role
    host: str
    port: int
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    roster: SignedRoster
    identity: IdentityKey | None = None  # parties only

    @property
    def index(self) -> int | None:
        """The party's SecAgg id (its roster index); ``None`` for the coordinator."""
        return None if self.role is Role.COORDINATOR else self.roster.party(self.site).index

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    def __repr__(self) -> str:  # never print key material
        return f"Kit({self.site!r} of {self.federation!r}, {self.role.value}, {self.path})"


def load_kit(path: str | Path, *, now: _dt.datetime | None = None) -> Kit:
    """Load and verify a kit (see the module docstring for every check)."""
    path = Path(path)
    if not path.is_dir():
        raise FederationError(f"kit {path}: not a directory (expected the output of "
                              "`lepton-ray provision` for one site)")
    try:
        meta = json.loads((path / KIT_FILE).read_text())
        role = Role(meta["role"])
        site, federation = str(meta["site"]), str(meta["federation"])
        host, port = str(meta["coordinator"]["host"]), int(meta["coordinator"]["port"])
    except FileNotFoundError:
        raise FederationError(f"kit {path}: {KIT_FILE} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FederationError(f"kit {path}: {KIT_FILE} is malformed ({type(exc).__name__}: {exc})") from None
    if meta.get("version") != KIT_VERSION:
        raise FederationError(f"kit {path}: {KIT_FILE} version {meta.get('version')!r}, "
                              f"this Lepton-Ray reads version {KIT_VERSION}")
    private = [SITE_KEY] + ([IDENTITY_KEY] if role is Role.PARTY else [])
    missing = [f for f in (CA_CERT, SITE_CERT, ROSTER_FILE, *private) if not (path / f).is_file()]
    if missing:
        raise FederationError(f"kit {path}: missing {', '.join(missing)}")
    for name in private:
        mode = (path / name).stat().st_mode & 0o777
        if mode & 0o077:
            raise FederationError(f"kit {path}: {name} has mode {mode:04o}, which lets other users "
                                  f"read a private key; run: chmod 600 {path / name}")
    ca_pem, cert_pem, key_pem = ((path / f).read_bytes() for f in (CA_CERT, SITE_CERT, SITE_KEY))
    ca = _parse_cert(ca_pem, str(path / CA_CERT))
    cert = _parse_cert(cert_pem, str(path / SITE_CERT))
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FederationError(f"kit {path}: {SITE_KEY} is not a PEM private key ({exc})") from None
    _check_ca(ca, path / CA_CERT)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FederationError(f"kit {path}: {SITE_CERT} was not issued by the CA in {CA_CERT}") from None
    when = now or _now()
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise FederationError(f"kit {path}: {SITE_CERT} is valid {cert.not_valid_before_utc:%Y-%m-%d} "
                              f"to {cert.not_valid_after_utc:%Y-%m-%d}, not now ({when:%Y-%m-%d})")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise FederationError(f"kit {path}: {SITE_KEY} does not match the key in {SITE_CERT}")
    roster = SignedRoster.from_json((path / ROSTER_FILE).read_text(), str(path / ROSTER_FILE))
    roster.verify(ca, str(path / ROSTER_FILE))
    if roster.federation != federation:
        raise FederationError(f"kit {path}: the roster is for federation {roster.federation!r}, "
                              f"the kit for {federation!r}")
    if meta.get("roster_hash") not in (None, roster.roster_hash):
        raise FederationError(f"kit {path}: {KIT_FILE} pins roster {meta['roster_hash'][:16]}..., "
                              f"{ROSTER_FILE} is {roster.roster_hash[:16]}...")
    fp = fingerprint(cert)
    identity = None
    if role is Role.COORDINATOR:
        if fp != roster.coordinator_sha256:
            raise FederationError(f"kit {path}: {SITE_CERT} is not the coordinator certificate "
                                  "the roster pins")
    else:
        entry = roster.party(site)
        if fp != entry.cert_sha256:
            raise FederationError(f"kit {path}: {SITE_CERT} (sha256 {fp[:16]}...) is not the "
                                  f"certificate the roster pins for {site!r}")
        try:
            identity = IdentityKey.from_private_bytes(
                bytes.fromhex((path / IDENTITY_KEY).read_text().strip()))
        except (ValueError, Exception) as exc:  # ConfigError from a wrong length
            raise FederationError(f"kit {path}: {IDENTITY_KEY} is not a hex Ed25519 private "
                                  f"key ({exc})") from None
        if identity.public_bytes != entry.identity_key:
            raise FederationError(f"kit {path}: {IDENTITY_KEY} is not the Ed25519 identity the "
                                  f"roster pins for {site!r}")
    return Kit(path=path, federation=federation, site=site, role=role, host=host, port=port,
               ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, roster=roster, identity=identity)


# --------------------------------------------------------------------------- helpers
def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _lines(head: str, problems: list[str]) -> str:
    return f"{head}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _parse_cert(data: bytes, source: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise FederationError(f"{source}: not an X.509 certificate ({exc})") from None


def _check_ca(ca: x509.Certificate, source: Path) -> None:
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        ca.verify_directly_issued_by(ca)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        raise FederationError(f"{source}: not a self-signed CA certificate") from None
    if not bc.ca:
        raise FederationError(f"{source}: not a CA certificate (basicConstraints ca=false)")


def _write_dir(path: Path, public: dict[str, bytes], private: dict[str, bytes]) -> None:
    path.mkdir(parents=True, mode=0o700)
    for name, data in public.items():
        (path / name).write_bytes(data)
    for name, data in private.items():  # created 0600, never world-readable even briefly
        fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
