"""The fleet CA and device provisioning: what a device needs to join the shipped broker config.

The broker config in ``deploy/mosquitto/`` wants a client certificate from every client,
signed by the fleet CA, whose CN becomes the MQTT username (``use_identity_as_username``)
that its ACL confines to ``edge/v1/devices/<CN>/...``. ``edgectl ca init`` makes that CA,
an operator identity for ``edgectl`` itself (CN ``edge-host``, the ACL's host user) and,
with ``--broker-host``, the broker's server certificate::

    HOME/ca/
      ca.pem              the fleet CA certificate (ECDSA P-256): broker, devices and edgectl trust it
      ca.key              its private key (0600): whoever holds it can mint identities
      edge-host.pem/.key  the operator's client certificate and key (0600), for edgectl
      server.pem/.key     the broker's certificate and key, for mosquitto's certfile/keyfile

``edgectl devices provision ID`` writes one directory per device (default ``HOME/devices/ID``),
whose files go to the device's config directory (``--device-dir``, default ``/etc/edge-agent``)::

    agent.toml   the agent's config; its paths name the files below in the device directory
    root.json    the signed root of trust (HOME/keys/root.json): which keys may sign bundles and commands
    ca.pem       the fleet CA                                              (with a CA)
    client.pem   the device's client certificate, CN = ID                  (with a CA)
    client.key   its private key, 0600                                     (with a CA)

The device's own Ed25519 identity key, which signs what it reports, is made on the device
at its first start by default (``device_agent/identity.py``); a provisioned one would go in
this directory as ``identity.key`` (0600), named by ``identity_key`` in ``agent.toml``. This
module does not make it.

Certificates are built in memory (:func:`issue_certificate`, pure apart from key
generation and the injected time); files are written atomically, private ones 0600.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import ConfigError, KeyStoreError, StorageError
from edge_sdk.protocol.topics import check_device_id

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_DEVICE_DIR",
    "IDENTITY_KEY_FILE",
    "OPERATOR_NAME",
    "CaSummary",
    "FleetCa",
    "IssuedCertificate",
    "ProvisionRequest",
    "Provisioned",
    "init_ca",
    "issue_certificate",
    "load_ca",
    "provision_device",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
#: The operator identity's CN: the host user of ``deploy/mosquitto/acl.example``.
OPERATOR_NAME = "edge-host"
#: Where the provisioned files live on a device.
DEFAULT_DEVICE_DIR = "/etc/edge-agent"
DEFAULT_DATA_DIR = "/var/lib/edge-agent"
#: Reserved name of a provisioned device identity key (made by ``device_agent/identity.py``'s owner, not here).
IDENTITY_KEY_FILE = "identity.key"
AGENT_CONFIG = "agent.toml"
ROOT_FILE = "root.json"
CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"
_DAY_S = 86400.0
_BACKDATE = datetime.timedelta(minutes=5)  # clocks differ; a certificate valid "from now" fails on a slow one
_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)  # fmt: skip
_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its new private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class FleetCa:
    """The fleet CA, loaded: its directory, certificate and private key."""

    directory: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate, hex: what an operator compares on the broker and devices."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class CaSummary:
    """What ``edgectl ca init`` made or found."""

    created: bool
    directory: Path
    subject: str
    fingerprint: str
    expires_at: float
    files: tuple[Path, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "directory": str(self.directory),
            "subject": self.subject,
            "fingerprint_sha256": self.fingerprint,
            "expires_at": self.expires_at,
            "files": [str(p) for p in self.files],
        }


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_certificate(
    ca: FleetCa, common_name: str, now: float, ttl_s: float, server_names: Sequence[str] = ()
) -> IssuedCertificate:
    """A new ECDSA P-256 key and a certificate for it signed by the fleet CA.

    Args:
        ca: the fleet CA.
        common_name: the subject's CN (a device id, ``edge-host``, or the broker's name).
        now: the issue time; the certificate is valid from five minutes before.
        ttl_s: its lifetime in seconds.
        server_names: for a broker's server certificate: its DNS names and IP addresses
            (subject alternative names, checked by every client). Empty: a client certificate.

    Returns:
        The certificate and key, PEM.

    Raises:
        ConfigError: a lifetime that is not positive.
    """
    if ttl_s <= 0:
        raise ConfigError(f"a certificate lifetime must be positive, not {ttl_s / _DAY_S:g} days", key="ttl")
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now) - _BACKDATE)
        .not_valid_after(min(_utc(now + ttl_s), ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(server_names)), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _self_signed_ca(common_name: str, now: float, ttl_s: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now) - _BACKDATE)
        .not_valid_after(_utc(now + ttl_s))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_ca(ca_dir: Path) -> FleetCa:
    """Load the fleet CA from ``ca_dir``.

    Args:
        ca_dir: the CA directory (``HOME/ca``).

    Returns:
        The CA.

    Raises:
        KeyStoreError: no CA there (run ``edgectl ca init``), or its files are unreadable or
            not a certificate and matching EC key.
    """
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyStoreError(f"no fleet CA in {ca_dir}: run `edgectl ca init`", path=str(ca_dir)) from exc
    except OSError as exc:
        raise KeyStoreError(f"cannot read the fleet CA in {ca_dir}: {exc.strerror}", path=str(ca_dir)) from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(f"the fleet CA in {ca_dir} is not a PEM certificate and key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise KeyStoreError(f"{key_path} is not the EC key of {cert_path}", path=str(key_path))
    return FleetCa(ca_dir, cert, key)


def _write_pair(directory: Path, stem: str, issued: IssuedCertificate) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    atomic_write_bytes(key_path, issued.key_pem, mode=0o600)
    atomic_write_bytes(cert_path, issued.cert_pem)
    return cert_path, key_path


def init_ca(
    ca_dir: Path,
    now: float,
    *,
    ttl_days: float = 3650.0,
    operator: str = OPERATOR_NAME,
    broker_hosts: Sequence[str] = (),
    force: bool = False,
) -> CaSummary:
    """Make the fleet CA and the operator's client certificate, unless a CA exists.

    Args:
        ca_dir: where to write them (created 0700).
        now: the current time.
        ttl_days: the CA's lifetime; certificates it issues end no later.
        operator: the CN of ``edgectl``'s own client certificate (an ACL host user).
        broker_hosts: names and addresses of the broker: also issue its server
            certificate (``server.pem``/``server.key``) for them.
        force: make a new CA even if one exists (every certificate it issued stops working).

    Returns:
        What was made, or found (``created`` false: nothing was written).

    Raises:
        ConfigError: a bad operator name or lifetime.
        KeyStoreError: an existing CA that cannot be read.
        StorageError: the directory cannot be written.
    """
    check_device_id(operator)  # the operator's CN is an MQTT username in topics' ACL patterns too
    if ttl_days <= 0:
        raise ConfigError(f"--ttl-days must be positive, not {ttl_days:g}", key="ttl_days")
    if (ca_dir / CA_CERT).exists() and not force:
        ca = load_ca(ca_dir)
        return _summary(ca, False, sorted(p for p in ca_dir.iterdir() if p.suffix in (".pem", ".key")))
    try:
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {ca_dir}: {exc.strerror}", path=str(ca_dir)) from exc
    ttl_s = ttl_days * _DAY_S
    cert, key = _self_signed_ca("edge-sdk fleet CA", now, ttl_s)
    atomic_write_bytes(ca_dir / CA_KEY, _key_pem(key), mode=0o600)
    atomic_write_bytes(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    ca = FleetCa(ca_dir, cert, key)
    files = [ca_dir / CA_CERT, ca_dir / CA_KEY]
    files += _write_pair(ca_dir, operator, issue_certificate(ca, operator, now, ttl_s))
    if broker_hosts:
        files += _write_pair(ca_dir, "server", issue_certificate(ca, broker_hosts[0], now, ttl_s, broker_hosts))
    return _summary(ca, True, files)


def _summary(ca: FleetCa, created: bool, files: Sequence[Path]) -> CaSummary:
    return CaSummary(
        created,
        ca.directory,
        ca.certificate.subject.rfc4514_string(),
        ca.fingerprint,
        ca.certificate.not_valid_after_utc.timestamp(),
        tuple(files),
    )


@dataclass(frozen=True)
class ProvisionRequest:
    """What ``edgectl devices provision`` is asked for.

    Attributes:
        device_id: the device's id: its topic segment and its certificate's CN.
        out_dir: the directory to write (must not exist, or be empty, unless ``force``).
        broker: the broker URL the device connects to.
        root_file: the signed root of trust to ship (``HOME/keys/root.json``).
        device_dir: where ``out_dir``'s files will be on the device; ``agent.toml`` names them there.
        data_dir: the agent's data directory on the device.
        ttl_days: the client certificate's lifetime.
        force: replace what ``out_dir`` holds (a new key and certificate).

    Raises:
        ConfigError: a bad device id or lifetime.
    """

    device_id: str
    out_dir: Path
    broker: str
    root_file: Path
    device_dir: str = DEFAULT_DEVICE_DIR
    data_dir: str = DEFAULT_DATA_DIR
    ttl_days: float = 825.0
    force: bool = False

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        if self.ttl_days <= 0:
            raise ConfigError(f"--ttl-days must be positive, not {self.ttl_days:g}", key="ttl_days")


@dataclass(frozen=True)
class Provisioned:
    """What was written for one device, and what to copy where."""

    device_id: str
    out_dir: Path
    device_dir: str
    files: tuple[Path, ...]
    certificate: bool
    ca_fingerprint: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "out_dir": str(self.out_dir),
            "device_dir": self.device_dir,
            "files": [str(p) for p in self.files],
            "client_certificate": self.certificate,
            "ca_fingerprint_sha256": self.ca_fingerprint,
        }


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def agent_toml(request: ProvisionRequest, with_certificate: bool) -> str:
    """The agent's config for a provisioned device, naming the files in ``request.device_dir``.

    Args:
        request: the provisioning request.
        with_certificate: whether a CA and client certificate are shipped (adds ``[tls]``).

    Returns:
        The TOML text.
    """
    d = request.device_dir.rstrip("/") or "/"
    lines = [
        f"# edge-agent config for {request.device_id}, written by `edgectl devices provision`.",
        f"# Copy this directory's files to {d}/ on the device (private keys stay 0600).",
        f"broker = {_toml_string(request.broker)}",
        f"device_id = {_toml_string(request.device_id)}",
        f"data_dir = {_toml_string(request.data_dir)}",
        f"root = {_toml_string(f'{d}/{ROOT_FILE}')}",
        "# identity_key: the device's Ed25519 identity key is made on the device at first start;",
        f"# a provisioned one would be {d}/{IDENTITY_KEY_FILE}.",
    ]
    if with_certificate:
        lines += [
            "",
            "[tls]",
            f"ca_file = {_toml_string(f'{d}/{CA_CERT}')}",
            f"cert_file = {_toml_string(f'{d}/{CLIENT_CERT}')}",
            f"key_file = {_toml_string(f'{d}/{CLIENT_KEY}')}",
        ]
    return "\n".join(lines) + "\n"


def provision_device(request: ProvisionRequest, root_json: bytes, ca: FleetCa | None, now: float) -> Provisioned:
    """Write what a device needs into ``request.out_dir``.

    Args:
        request: the device and where to write.
        root_json: the signed root of trust's bytes (already checked by the caller).
        ca: the fleet CA, to issue a client certificate with CN = device id; ``None``: no TLS files.
        now: the current time.

    Returns:
        The files written.

    Raises:
        ConfigError: ``out_dir`` is a file, or holds files and ``force`` is not set.
        StorageError: it cannot be written.
    """
    out = request.out_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a directory", path=str(out))
    if out.is_dir() and any(out.iterdir()) and not request.force:
        raise ConfigError(
            f"{out} already holds a provisioned device: pass --force to replace it (new key and certificate)",
            path=str(out),
        )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {out}: {exc.strerror}", path=str(out)) from exc
    for stale in (CA_CERT, CLIENT_CERT, CLIENT_KEY):  # --force without a CA must not leave an old identity
        with contextlib.suppress(FileNotFoundError):
            (out / stale).unlink()
    files = [out / AGENT_CONFIG, out / ROOT_FILE]
    atomic_write_bytes(out / ROOT_FILE, root_json)
    if ca is not None:
        issued = issue_certificate(ca, request.device_id, now, request.ttl_days * _DAY_S)
        atomic_write_bytes(out / CLIENT_KEY, issued.key_pem, mode=0o600)
        atomic_write_bytes(out / CLIENT_CERT, issued.cert_pem)
        atomic_write_bytes(out / CA_CERT, ca.certificate.public_bytes(serialization.Encoding.PEM))
        files += [out / CA_CERT, out / CLIENT_CERT, out / CLIENT_KEY]
    atomic_write_bytes(out / AGENT_CONFIG, agent_toml(request, ca is not None).encode(), mode=0o640)
    return Provisioned(
        request.device_id,
        out,
        request.device_dir,
        tuple(files),
        ca is not None,
        ca.fingerprint if ca is not None else None,
    )
