"""edgectl's settings: flag > environment > config file > default, `edgectl init` and `edgectl config show`.

The layering is tested on the pure resolver, setting by setting; the commands through click's
runner, with the broker connection refused by a stand-in (no socket is opened).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_sdk.errors import BrokerUnreachableError, ConfigError, ExitCode
from edge_sdk.mqtt import MqttClient
from host_tools.cli import cli
from host_tools.config import (
    CONNECTION,
    MASK,
    SETTINGS,
    ConfigFile,
    Resolved,
    file_layers,
    parse_config_file,
    read_toml,
    render_config_file,
    resolve_settings,
)

USER = Path("/home/operator")
CWD = Path("/work/here")
#: A value each setting takes, for the layering tests (file values are typed, as parse_config_file makes them).
SAMPLE: dict[str, tuple[str, object]] = {
    "home": ("/srv/edge", Path("/srv/edge")),
    "registry": ("postgresql://db.example/edge", "postgresql://db.example/edge"),
    "keys_dir": ("/srv/keys", Path("/srv/keys")),
    "mqtt_protocol": ("3.1.1", "3.1.1"),
    "allow_unsigned_reports": ("true", True),
    "broker": ("mqtts://broker.example:9443", "mqtts://broker.example:9443"),
    "username": ("operator", "operator"),
    "password_file": ("/etc/edge/password", Path("/etc/edge/password")),
    "password": ("s3cret", "s3cret"),
    "ca_file": ("/etc/edge/ca.pem", Path("/etc/edge/ca.pem")),
    "cert_file": ("/etc/edge/host.pem", Path("/etc/edge/host.pem")),
    "key_file": ("/etc/edge/host.key", Path("/etc/edge/host.key")),
}


def test_every_setting_has_a_sample() -> None:
    assert set(SAMPLE) == {s.name for s in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_flag_beats_environment_beats_file_beats_default(setting) -> None:  # type: ignore[no-untyped-def]
    text, typed = SAMPLE[setting.name]
    other_file = ConfigFile(Path("/etc/edgectl.toml"), {setting.name: typed})
    env = {setting.env: text} if setting.env else {}
    flag_value = True if setting.kind == "bool" else text
    layers = [
        ({setting.name: flag_value}, env, [other_file], f"flag {setting.flag}"),
        ({}, env, [other_file], f"env {setting.env}"),
        ({}, {}, [other_file], "file /etc/edgectl.toml"),
        ({}, {}, [], "default"),
    ]
    for flags, environ, files, source in layers:
        if (source.startswith("flag") and setting.flag is None) or (source.startswith("env") and not setting.env):
            continue
        if source.startswith("file") and not setting.file_key:
            continue
        got = resolve_settings(flags, environ, files, USER, CWD)[setting.name]
        assert got.source == source
        if source != "default":
            assert got.value == typed


def test_defaults_follow_home_wherever_home_came_from() -> None:
    got = resolve_settings({}, {"EDGE_SDK_HOME": "/data/edge"}, [], USER, CWD)
    assert got["registry"].value == "/data/edge/registry.db" and got["keys_dir"].value == Path("/data/edge/keys")
    assert resolve_settings({}, {}, [], USER, CWD)["home"] == Resolved("home", USER / ".edge-sdk", "default")


def test_relative_paths_from_flags_and_environment_are_relative_to_the_working_directory() -> None:
    got = resolve_settings({"home": Path("h")}, {"EDGE_SDK_KEYS_DIR": "~/k"}, [], USER, CWD)
    assert got["home"].value == CWD / "h" and got["keys_dir"].value == USER / "k"


def test_an_empty_flag_or_environment_value_counts_as_not_given() -> None:
    file = ConfigFile(Path("/c.toml"), {"broker": "mqtt://from-file"})
    got = resolve_settings({"broker": ""}, {"EDGE_SDK_BROKER": ""}, [file], USER, CWD)["broker"]
    assert got.value == "mqtt://from-file" and got.layer == "file"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGE_SDK_ALLOW_UNSIGNED_REPORTS": "maybe"}, "EDGE_SDK_ALLOW_UNSIGNED_REPORTS is 'maybe'"),
        ({"EDGE_SDK_MQTT_PROTOCOL": "4"}, "EDGE_SDK_MQTT_PROTOCOL is '4': want one of"),
    ],
)
def test_an_environment_value_a_setting_does_not_take_is_refused_by_name(env, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        resolve_settings({}, env, [], USER, CWD)


def test_a_secret_is_masked_wherever_it_is_shown() -> None:
    got = resolve_settings({}, {"EDGE_SDK_BROKER_PASSWORD": "s3cret"}, [], USER, CWD)["password"]
    assert got.value == "s3cret" and got.shown() == MASK and got.to_dict()["value"] == MASK
    assert "s3cret" not in json.dumps(got.to_dict())


# --- the file -----------------------------------------------------------------------------


def parse(tmp_path: Path, text: str) -> ConfigFile:
    path = tmp_path / "config.toml"
    path.write_text(text)
    body, raw = read_toml(path, "config file", "--config")
    return parse_config_file(body, raw, path, USER)


def test_a_file_gives_typed_values_with_paths_relative_to_its_directory(tmp_path: Path) -> None:
    file = parse(
        tmp_path,
        'registry = "reg.db"\nallow_unsigned_reports = true\n[broker]\nurl = "mqtt://b:1"\n'
        '[broker.tls]\nca_file = "ca.pem"\ncert_file = "~/host.pem"\n',
    )
    assert file.values == {
        "registry": str(tmp_path / "reg.db"),
        "allow_unsigned_reports": True,
        "broker": "mqtt://b:1",
        "ca_file": tmp_path / "ca.pem",
        "cert_file": USER / "host.pem",
    }


def test_a_dotted_key_is_the_same_setting_as_its_table(tmp_path: Path) -> None:
    assert parse(tmp_path, 'broker.tls.ca_file = "/ca.pem"\n').values == {"ca_file": Path("/ca.pem")}


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ('home = "/h"\n\nregistr = "x"\n', 3, "registr", "unknown setting"),
        ('home = "/h"\n[broker]\nurl = 1883\n', 3, "broker.url", "must be a string"),
        ('[broker]\nurl = "mqtt://b"\n[broker.tls]\nca_file = ""\n', 4, "broker.tls.ca_file", "is empty"),
        ('allow_unsigned_reports = "yes"\n', 1, "allow_unsigned_reports", "must be true or false"),
        ('mqtt_protocol = "4"\n', 1, "mqtt_protocol", "want one of"),
        ('home = "/h"\nbroker = "mqtt://b"\n', 2, "broker", "must be a table"),
        ('home = "/h"\n[broker]\nurl = \n', 3, "url", "not valid TOML"),
        ('home = "/h"\n[broker]\nusername = "a"\nusername = "b"\n', 4, "username", "not valid TOML"),
    ],
)
def test_a_malformed_file_is_named_with_its_line_and_key(tmp_path: Path, text, line, key, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, text)
    message = caught.value.message
    assert f"{tmp_path / 'config.toml'}, line {line}, key {key!r}" in message and reason in message
    assert caught.value.details["line"] == line and caught.value.details["key"] == key


def test_what_init_writes_reads_back_to_the_values_given(tmp_path: Path) -> None:
    flags = {s: SAMPLE[s][1] for s in ("home", "broker", "ca_file", "username")}
    environ = {"EDGE_SDK_MQTT_PROTOCOL": "5", "EDGE_SDK_ALLOW_UNSIGNED_REPORTS": "1", "EDGE_SDK_BROKER_PASSWORD": "pw"}
    given = resolve_settings(flags, environ, [], USER, CWD)
    text = render_config_file(given)
    assert "pw" not in text and text.count("\n# ") > len(SETTINGS)  # commented
    written = parse(tmp_path, text)
    assert written.values == {
        **{s: SAMPLE[s][1] for s in ("home", "broker", "ca_file", "username")},
        "mqtt_protocol": "5",
        "allow_unsigned_reports": True,
    }


def test_a_broker_config_file_gives_every_connection_setting_the_config_file_would() -> None:
    config = ConfigFile(Path("/c.toml"), {"home": Path("/h"), "username": "a", "ca_file": Path("/ca")})
    broker = ConfigFile(Path("/broker.toml"), {"username": "b"})
    got = resolve_settings({}, {}, file_layers(config, broker), USER, CWD)
    assert got["home"].source == "file /c.toml" and got["username"].value == "b"
    assert got["ca_file"].value is None  # one file for the connection: the broker file, whole
    assert file_layers(config, config) == [config] and file_layers(None, None) == []
    assert set(CONNECTION) <= {s.name for s in SETTINGS}


# --- the commands -------------------------------------------------------------------------


def edgectl(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), env=env)


def test_init_writes_the_file_then_refuses_to_overwrite_it_without_force(edgectl_env: Path) -> None:
    path = edgectl_env / ".edge-sdk" / "config.toml"
    first = edgectl("init", "--broker", "mqtt://127.0.0.1:1", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["path"] == str(path) and 'url = "mqtt://127.0.0.1:1"' in path.read_text()
    before = path.read_bytes()
    again = edgectl("init", "--broker", "mqtt://other:1")
    assert again.exit_code == ExitCode.USAGE
    assert f"config file {path} exists; --force replaces it" in again.stderr and path.read_bytes() == before
    forced = edgectl("init", "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["replaced"] is True
    assert "mqtt://127.0.0.1:1" not in path.read_text()


def test_init_replaces_a_malformed_file_with_force(edgectl_env: Path) -> None:
    bad = edgectl_env / "bad.toml"
    bad.write_text("home = \n")
    assert edgectl("--config", str(bad), "keys", "show").exit_code == ExitCode.USAGE
    assert edgectl("--config", str(bad), "init").exit_code == ExitCode.USAGE
    assert edgectl("--config", str(bad), "init", "--force").exit_code == 0
    assert edgectl("--config", str(bad), "config", "show").exit_code == 0


def test_config_show_says_where_each_value_came_from(edgectl_env: Path) -> None:
    config = edgectl_env / "edgectl.toml"
    config.write_text('registry = "reg.db"\nmqtt_protocol = "5"\n[broker]\nurl = "mqtt://file:1"\n')
    env = {"EDGE_SDK_CONFIG": str(config), "EDGE_SDK_MQTT_PROTOCOL": "3.1.1", "EDGE_SDK_BROKER_PASSWORD": "s3cret"}
    result = edgectl("--keys-dir", "k", "config", "show", "--username", "op", "--json", env=env)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    by_name = {s["name"]: s for s in shown["settings"]}
    assert shown["config_file"] == str(config) and shown["config_file_exists"] is True
    assert by_name["registry"] == {**by_name["registry"], "value": str(edgectl_env / "reg.db"), "layer": "file"}
    assert (
        by_name["mqtt_protocol"]["source"] == "env EDGE_SDK_MQTT_PROTOCOL"
        and by_name["mqtt_protocol"]["value"] == "3.1.1"
    )
    assert by_name["keys_dir"]["source"] == "flag --keys-dir" and by_name["username"]["source"] == "flag --username"
    assert by_name["broker"]["source"] == f"file {config}" and by_name["home"]["layer"] == "default"
    assert by_name["password"]["value"] == MASK and "s3cret" not in result.output
    text = edgectl("config", "show", env=env)
    assert "s3cret" not in text.output and f"file {config}" in text.output


def test_the_broker_and_its_connection_come_from_the_config_file(
    edgectl_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[str] = []

    def refuse(client: MqttClient, *_args: object, **_kw: object) -> None:
        tried.append(str(client.address))
        raise BrokerUnreachableError("refused (test stand-in)")

    monkeypatch.setattr(MqttClient, "connect", refuse)
    config = edgectl_env / "edgectl.toml"
    config.write_text('[broker]\nurl = "mqtt://from-file.invalid:18831"\n')
    result = edgectl("--config", str(config), "metrics", "--json")
    assert result.exit_code == ExitCode.TRANSPORT and tried == ["mqtt://from-file.invalid:18831"]
    flag = edgectl("--config", str(config), "metrics", "--broker", "mqtt://flag.invalid:18832")
    assert flag.exit_code == ExitCode.TRANSPORT and tried[-1] == "mqtt://flag.invalid:18832"
    env = edgectl("--config", str(config), "metrics", env={"EDGE_SDK_BROKER": "mqtt://env.invalid:18833"})
    assert env.exit_code == ExitCode.TRANSPORT and tried[-1] == "mqtt://env.invalid:18833"
    config.write_text('[broker]\nurl = "mqtt://from-file.invalid:18831"\n[broker.tls]\nca_file = "missing-ca.pem"\n')
    missing = edgectl("--config", str(config), "metrics")
    assert missing.exit_code == ExitCode.USAGE and len(tried) == 3
    assert f"TLS ca_file {edgectl_env / 'missing-ca.pem'} does not exist (from {config})" in missing.stderr


def test_a_config_file_that_was_named_must_exist(edgectl_env: Path) -> None:
    result = edgectl("keys", "show", env={"EDGE_SDK_CONFIG": str(edgectl_env / "nope.toml")})
    assert result.exit_code == ExitCode.USAGE
    assert f"config file {edgectl_env / 'nope.toml'} does not exist (from EDGE_SDK_CONFIG)" in result.stderr


def test_keys_go_where_the_keys_dir_setting_says(edgectl_env: Path) -> None:
    config = edgectl_env / "edgectl.toml"
    config.write_text('keys_dir = "fleet-keys"\n')
    assert edgectl("--config", str(config), "keys", "init").exit_code == 0
    assert (edgectl_env / "fleet-keys" / "root.json").is_file() and not (edgectl_env / ".edge-sdk" / "keys").exists()
