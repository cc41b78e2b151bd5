"""host_tools.provision and its commands: a fleet CA, and per-device directories the agent loads as they are."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.config import load_config
from edge_sdk.errors import ConfigError, KeyStoreError
from host_tools.cli import cli
from host_tools.keys import init_keys
from host_tools.provision import ProvisionRequest, init_ca, load_ca, provision_device

NOW = 1_700_000_000.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _verify(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    public = issuer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(issuer)


def test_ca_init_makes_a_ca_an_operator_and_a_server_certificate_with_private_keys_0600(tmp_path: Path) -> None:
    summary = init_ca(tmp_path / "ca", NOW, broker_hosts=("127.0.0.1", "broker.example"))
    assert summary.created
    ca = load_ca(tmp_path / "ca")
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("ca.key", "edge-host.key", "server.key"):
        assert _mode(tmp_path / "ca" / name) == 0o600
    operator = x509.load_pem_x509_certificate((tmp_path / "ca" / "edge-host.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "ca" / "server.pem").read_bytes())
    _verify(operator, ca.certificate)
    _verify(server, ca.certificate)
    assert _cn(operator) == "edge-host"
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_ca_init_keeps_an_existing_ca_unless_forced(tmp_path: Path) -> None:
    first = init_ca(tmp_path / "ca", NOW)
    again = init_ca(tmp_path / "ca", NOW + 10)
    assert not again.created and again.fingerprint == first.fingerprint
    forced = init_ca(tmp_path / "ca", NOW + 20, force=True)
    assert forced.created and forced.fingerprint != first.fingerprint


def test_load_ca_without_a_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="edgectl ca init"):
        load_ca(tmp_path / "ca")


def _request(tmp_path: Path, device_id: str = "pi-01", **kw: object) -> ProvisionRequest:
    out = tmp_path / "out" / device_id
    return ProvisionRequest(
        device_id, out, "mqtts://127.0.0.1:18884", tmp_path / "root.json", device_dir=str(out),
        data_dir=str(tmp_path / "data"), **kw,  # type: ignore[arg-type]  # the remaining fields
    )  # fmt: skip


def test_provision_writes_a_directory_the_agent_loads_with_a_certificate_for_its_id(tmp_path: Path) -> None:
    ring, _ = init_keys(tmp_path / "keys", time.time())
    init_ca(tmp_path / "ca", time.time())
    ca = load_ca(tmp_path / "ca")
    done = provision_device(_request(tmp_path), ring.root_path.read_bytes(), ca, time.time())
    out = done.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["agent.toml", "ca.pem", "client.key", "client.pem", "root.json"]
    assert _mode(out / "client.key") == 0o600 and _mode(out) == 0o700
    cert = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    _verify(cert, ca.certificate)
    assert _cn(cert) == "pi-01"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    config = load_config(out / "agent.toml", {})  # the agent's own loader checks every file it names
    assert config.device_id == "pi-01" and config.broker == "mqtts://127.0.0.1:18884"
    assert (config.ca_file, config.cert_file, config.key_file) == (
        out / "ca.pem",
        out / "client.pem",
        out / "client.key",
    )
    assert config.load_root() == ring.root_path.read_bytes()
    assert "identity.key" in (out / "agent.toml").read_text()  # the reserved place for a provisioned identity


def test_provision_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    ring, _ = init_keys(tmp_path / "keys", time.time())
    init_ca(tmp_path / "ca", time.time())
    ca = load_ca(tmp_path / "ca")
    first = provision_device(_request(tmp_path), ring.root_path.read_bytes(), ca, time.time())
    key_before = (first.out_dir / "client.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a provisioned device: pass --force"):
        provision_device(_request(tmp_path), ring.root_path.read_bytes(), ca, time.time())
    assert (first.out_dir / "client.key").read_bytes() == key_before
    provision_device(_request(tmp_path, force=True), ring.root_path.read_bytes(), None, time.time())
    assert sorted(p.name for p in first.out_dir.iterdir()) == ["agent.toml", "root.json"]  # no stale identity


def test_provision_refuses_a_device_id_that_would_widen_an_acl(tmp_path: Path) -> None:
    for bad in ("+", "a/b", "#", ""):
        with pytest.raises(ConfigError, match="bad device id"):
            _request(tmp_path, bad)


def _edgectl(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], env=env)
    return result.exit_code, result.output


def test_edgectl_ca_init_and_devices_provision(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _edgectl(home, "keys", "init")[0] == 0
    code, out = _edgectl(home, "ca", "init", "--json")
    assert code == 0 and json.loads(out)["created"]
    code, out = _edgectl(home, "devices", "provision", "pi-07", "--broker", "mqtts://b.example")
    assert code == 0, out
    assert "copy them to /etc/edge-agent/ on the device" in out and "client.key (0600)" in out
    assert (home / "devices" / "pi-07" / "client.pem").is_file()
    code, out = _edgectl(home, "devices", "provision", "pi-07", "--broker", "mqtts://b.example")
    assert code == 2 and "pass --force" in out
    code, out = _edgectl(home, "devices", "provision", "pi-07", "--broker", "mqtts://b.example", "--force")
    assert code == 0, out


def test_edgectl_provision_without_keys_says_to_run_keys_init(tmp_path: Path) -> None:
    code, out = _edgectl(tmp_path / "home", "devices", "provision", "pi-07", "--broker", "mqtt://b")
    assert code == 5 and "edgectl keys init" in out
    assert not (tmp_path / "home" / "devices").exists()


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (
            ("--cert-file", "{missing}", "--key-file", "{missing}"),
            {},
            "TLS cert_file {missing} does not exist (from --cert-file)",
        ),
        (
            (),
            {"EDGE_SDK_BROKER_CA_FILE": "{missing}"},
            "TLS ca_file {missing} does not exist (from EDGE_SDK_BROKER_CA_FILE)",
        ),
        (("--broker-config", "{missing}"), {}, "'--broker-config': File '{missing}' does not exist"),
        (
            ("--username", "edge-host"),
            {"EDGE_SDK_BROKER_PASSWORD_FILE": "{missing}"},
            "broker password_file {missing} does not exist (from EDGE_SDK_BROKER_PASSWORD_FILE)",
        ),
    ],
)
def test_edgectl_names_a_missing_connection_file_before_connecting(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    missing = str(tmp_path / "missing.pem")
    args = tuple(a.format(missing=missing) for a in args)
    env = {k: v.format(missing=missing) for k, v in env.items()}
    started = time.monotonic()
    code, out = _edgectl(tmp_path / "home", "devices", "--broker", "mqtts://127.0.0.1:9", *args, env=env)
    assert code == 2, out
    assert named.format(missing=missing) in out
    assert "edgectl: broker" not in out and time.monotonic() - started < 5  # refused before any connection


def test_edgectl_reads_home_broker_toml_by_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "broker.toml").write_text(f'[tls]\nca_file = "{tmp_path / "gone.pem"}"\n')
    code, out = _edgectl(home, "devices", "--broker", "mqtts://127.0.0.1:9")
    assert code == 2 and f"TLS ca_file {tmp_path / 'gone.pem'} does not exist (from {home / 'broker.toml'})" in out


def test_edgectl_names_a_missing_broker_config_from_the_environment(tmp_path: Path) -> None:
    missing = tmp_path / "gone.toml"
    code, out = _edgectl(
        tmp_path / "home", "devices", "--broker", "mqtts://127.0.0.1:9", env={"EDGE_SDK_BROKER_CONFIG": str(missing)}
    )
    assert code == 2 and f"broker config file {missing} does not exist (from EDGE_SDK_BROKER_CONFIG)" in out
