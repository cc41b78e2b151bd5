"""A broker URL without a port: edgectl echoes the address it uses, port included, and fails as transport.

In-process, with the connection refused by a stand-in: no test may connect to port 1883 or
8883 of this machine, where a real broker may be listening.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_sdk.errors import BrokerUnreachableError, ExitCode
from edge_sdk.mqtt import DEFAULT_PORTS, MqttClient
from host_tools.cli import cli


@pytest.mark.parametrize(
    ("url", "echoed"),
    [
        ("mqtt://broker.invalid", f"mqtt://broker.invalid:{DEFAULT_PORTS[False]}"),
        ("mqtts://broker.invalid", f"mqtts://broker.invalid:{DEFAULT_PORTS[True]}"),
    ],
)
def test_a_broker_url_without_a_port_is_echoed_with_the_port_used(
    url: str, echoed: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    tried: list[str] = []

    def refuse(client: MqttClient, *_args: object, **_kw: object) -> None:
        tried.append(str(client.address))
        raise BrokerUnreachableError(f"cannot reach {client.address}: refused (test stand-in)")

    monkeypatch.setattr(MqttClient, "connect", refuse)
    assert host_keys(tmp_path).exit_code == 0
    args = ["--home", str(tmp_path), "rollback", "--device", "pi-01", "--name", "t", "--version", "1"]
    result = CliRunner().invoke(cli, [*args, "--broker", url, "--connect-timeout", "1", "--json"])
    assert result.exit_code == ExitCode.TRANSPORT, result.output
    assert f"edgectl: broker {echoed}" in result.stderr and "edgectl: broker" not in result.stdout
    assert json.loads(result.stdout)["error"]["kind"] == "transport" and tried == [echoed]


def host_keys(home) -> object:  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--home", str(home), "keys", "init"])


@pytest.mark.parametrize(
    ("flags", "env", "protocol"),
    [([], {}, "auto"), (["--mqtt-protocol", "3.1.1"], {}, "3.1.1"), ([], {"EDGE_SDK_MQTT_PROTOCOL": "5"}, "5")],
)
def test_edgectl_asks_for_the_mqtt_protocol_it_is_given_with_a_clean_session(
    flags: list[str], env: dict[str, str], protocol: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, int]] = []

    def refuse(client: MqttClient, *_args: object, **_kw: object) -> None:
        seen.append((client.options.protocol, client.options.session_expiry_s))
        raise BrokerUnreachableError("refused (test stand-in)")

    monkeypatch.setattr(MqttClient, "connect", refuse)
    monkeypatch.delenv("EDGE_SDK_MQTT_PROTOCOL", raising=False)
    assert host_keys(tmp_path).exit_code == 0
    args = [*flags, "--home", str(tmp_path), "rollback", "--device", "pi-01", "--name", "t", "--version", "1"]
    result = CliRunner().invoke(cli, [*args, "--broker", "mqtt://broker.invalid:18830"], env=env)
    assert result.exit_code == ExitCode.TRANSPORT, result.output
    assert seen == [(protocol, 0)]


def test_an_unknown_mqtt_protocol_is_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli, ["--mqtt-protocol", "4", "--home", str(tmp_path), "devices", "--broker", "x"])
    assert result.exit_code == ExitCode.USAGE and "'4' is not one of 'auto', '5', '3.1.1'" in result.output
