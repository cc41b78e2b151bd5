"""The shipped Mosquitto TLS + ACL config, run for real: a device is confined to its own topics.

A CA, a server certificate and client certificates (CN = identity) are generated with
``cryptography`` at test time. Mosquitto runs with TLS, ``require_certificate``,
``use_identity_as_username`` and ``deploy/mosquitto/acl.example`` itself. Device A can
use its own topics but cannot read device B's commands, cannot publish as device B,
and cannot read B's status; a client without a certificate cannot connect at all. Every
device reads the broadcast transfers (``edge/v1/transfers/#``); only the host writes them.
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from topologies import expect_delivery

from edge_sdk.errors import BrokerUnreachableError
from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import DeviceTopics

pytestmark = pytest.mark.integration

ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.example"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, issuer_key, issuer_name, key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name or _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name: str, cert, key) -> tuple[Path, Path]:
    crt, pem = d / f"{name}.crt", d / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pem.chmod(0o600)
    return crt, pem


@pytest.fixture
def tls_broker(tmp_path, start_mosquitto):
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edge-sdk test CA", ca_key, None, ca_key, ca=True)
    ca_file, _ = _write(pki, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_crt, server_pem = _write(
        pki, "server", _cert("127.0.0.1", ca_key, ca.subject, server_key, server=True), server_key
    )
    clients = {}
    for cn in ("edge-host", "dev-a", "dev-b"):
        k = ec.generate_private_key(ec.SECP256R1())
        clients[cn] = _write(pki, cn, _cert(cn, ca_key, ca.subject, k), k)
    broker = start_mosquitto(
        extra_config=(
            f"cafile {ca_file}",
            f"certfile {server_crt}",
            f"keyfile {server_pem}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            f"acl_file {ACL}",
            "allow_anonymous false",
        )
    )

    def connect(cn: str | None) -> MqttClient:
        crt, key = clients[cn] if cn else (None, None)
        c = MqttClient(
            f"mqtts://127.0.0.1:{broker.port}",
            MqttOptions(
                client_id=f"acl-{cn}", ca_file=ca_file, cert_file=crt, key_file=key, connect_timeout_s=5 if cn else 2
            ),
        )
        c.connect()
        return c

    return connect


def _drain(client: MqttClient, wait_s: float = 1.0) -> list[tuple[str, bytes]]:
    got, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            item = client.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, Incoming):
            got.append((item.topic, item.payload))
    return got


def test_a_device_is_confined_to_its_own_topics(tls_broker):
    a_topics, b_topics = DeviceTopics("dev-a"), DeviceTopics("dev-b")
    host, dev_a, dev_b = tls_broker("edge-host"), tls_broker("dev-a"), tls_broker("dev-b")
    try:
        host.subscribe("edge/v1/devices/+/events")
        host.subscribe(b_topics.status)
        dev_a.subscribe(a_topics.cmd)
        dev_a.subscribe(b_topics.cmd)  # denied by the ACL
        dev_a.subscribe(b_topics.status)  # denied: devices only write status
        dev_b.subscribe(b_topics.cmd)
        time.sleep(0.5)

        host.publish_wait(a_topics.cmd, b"for a")
        host.publish_wait(b_topics.cmd, b"for b")
        dev_b.publish_wait(b_topics.status, b"b online")
        dev_a.publish_wait(a_topics.events, b"a's own event")
        dev_a.publish_wait(b_topics.events, b"a pretending to be b")  # acknowledged, then dropped

        assert _drain(dev_a) == [(a_topics.cmd, b"for a")]  # nothing of b's cmd or status
        assert _drain(dev_b, 0.3) == [(b_topics.cmd, b"for b")]
        assert _drain(host, 0.3) == [(b_topics.status, b"b online"), (a_topics.events, b"a's own event")]
    finally:
        for c in (host, dev_a, dev_b):
            c.close()


def test_a_client_without_a_certificate_cannot_connect(tls_broker):
    with pytest.raises(BrokerUnreachableError):
        tls_broker(None)


def test_devices_read_every_transfer_and_only_the_host_writes_one(tls_broker):
    transfer = f"edge/v1/transfers/{uuid.uuid4().hex}"
    host, dev_a, dev_b = tls_broker("edge-host"), tls_broker("dev-a"), tls_broker("dev-b")
    try:
        for device in (dev_a, dev_b):
            device.subscribe(transfer)
        host.subscribe(transfer)
        expect_delivery(dev_a, transfer, lambda p: host.publish_wait(transfer, p))
        _drain(dev_a, 0.3)
        _drain(host, 0.3)
        _drain(dev_b, 0.3)

        host.publish_wait(transfer, b"chunk from the host")
        dev_a.publish_wait(transfer, b"chunk forged by dev-a")  # acknowledged, then dropped by the ACL
        assert _drain(dev_b) == [(transfer, b"chunk from the host")]  # both devices read it; nothing forged
        assert _drain(dev_a, 0.3) == [(transfer, b"chunk from the host")]
        assert _drain(host, 0.3) == [(transfer, b"chunk from the host")]
    finally:
        for c in (host, dev_a, dev_b):
            c.close()
