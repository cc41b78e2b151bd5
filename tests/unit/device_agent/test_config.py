"""device_agent.config: a config file's mistakes are named by key, with the type the agent wants."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from device_agent.config import AgentConfig, load_config
from edge_sdk.errors import ConfigError

_VALID = 'broker = "mqtt://127.0.0.1:18883"\ndevice_id = "pi-01"\ndata_dir = "/tmp/edge-agent"\nroot = "root.json"\n'
# limits are not a setting; the password is read from password_file (tested below), never set in the file
_SETTABLE = [f for f in fields(AgentConfig) if f.name not in ("limits", "password")]
_TLS = {"ca_file", "cert_file", "key_file"}


def _wanted(annotation: str) -> str:
    """The type a field's annotation asks for, as the message must name it."""
    if annotation.startswith(("float", "int")):
        return "a number of seconds" if annotation.startswith("float") else "an integer"
    if "Path" in annotation:
        return "a path (a string)"
    if annotation.startswith("Mapping"):
        return "a table of key = value strings, or a list of key=value strings"
    if annotation.startswith("tuple[str, ...] | None"):
        return "a command line (a string) or a list of strings"
    if annotation.startswith("tuple"):
        return "a list of strings"
    return "a string"


def _load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path, {})


@pytest.mark.parametrize("field", _SETTABLE, ids=lambda f: f.name)
@pytest.mark.parametrize("wrong", ['"30"', "7", "true", "{ a = 1 }"], ids=["string", "integer", "boolean", "table"])
def test_every_setting_of_the_wrong_type_is_named_with_the_type_wanted(
    field: object, wrong: str, tmp_path: Path
) -> None:
    name, annotation = field.name, str(field.type)  # type: ignore[attr-defined]  # a dataclasses.Field
    wanted = _wanted(annotation)
    if wrong == '"30"' and wanted != "a number of seconds" and wanted != "an integer":
        wrong = "30"  # a string is right for these: give a number instead
    if wrong == "7" and wanted in ("a number of seconds", "an integer"):
        wrong = "[7]"
    lines = [line for line in _VALID.splitlines() if not line.startswith(f"{name} =")]
    text = "\n".join(lines) + "\n"
    text += f"[tls]\n{name} = {wrong}\n" if name in _TLS else ""
    if name not in _TLS:
        text = f"{name} = {wrong}\n" + text
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    where = f"[tls] {name}" if name in _TLS else name
    assert caught.value.message.startswith(f"{tmp_path / 'agent.toml'}: {where} must be {wanted}, not "), (
        caught.value.message
    )
    assert caught.value.details["key"] == name
    assert "not supported between" not in caught.value.message


def test_the_reported_case_names_the_key_not_a_python_comparison(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape("reconnect_max_s must be a number of seconds, not a string ('30')")
    ):
        _load(tmp_path, _VALID + 'reconnect_max_s = "30"\n')


def test_a_single_accelerator_string_is_not_split_into_letters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="accelerators must be a list of strings"):
        _load(tmp_path, 'accelerators = "cuda"\n' + _VALID)


def test_values_of_the_right_type_load_and_range_errors_name_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_text("a CA\n")  # a TLS file named in the config must exist
    config = _load(
        tmp_path,
        _VALID
        + 'accelerators = ["cuda"]\nreconnect_max_s = 5\ntransfer_idle_timeout_s = 2.5\n'
        + 'update_gate_command = "/bin/true --x"\noutbox_max_bytes = 4096\n[tls]\nca_file = "ca.pem"\n',
    )
    assert config.accelerators == ("cuda",) and config.reconnect_max_s == 5
    assert config.update_gate_command == ("/bin/true", "--x") and config.ca_file == Path("ca.pem")
    for setting, message in (
        ("reconnect_max_s = 0.5", "reconnect_max_s must be at least 1 (seconds), got 0.5"),
        ("transfer_idle_timeout_s = 0", "transfer_idle_timeout_s must be positive (seconds), got 0"),
        ("update_gate_retry_s = -1", "update_gate_retry_s must be positive (seconds), got -1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            _load(tmp_path, _VALID + setting + "\n")


def test_username_and_password_come_from_flag_environment_or_file_in_that_order(tmp_path: Path) -> None:
    for name in ("file", "env", "flag"):
        (tmp_path / f"{name}.pw").write_text(f"{name}-password\n")
    path = tmp_path / "agent.toml"
    path.write_text(_VALID + f'username = "file-user"\npassword_file = "{tmp_path / "file.pw"}"\n')
    env = {"EDGE_SDK_BROKER_USERNAME": "env-user", "EDGE_SDK_BROKER_PASSWORD_FILE": str(tmp_path / "env.pw")}
    flags = {"username": "flag-user", "password_file": tmp_path / "flag.pw"}
    from_file = load_config(path, {})
    assert (from_file.username, from_file.password) == ("file-user", "file-password")
    from_env = load_config(path, {}, env)
    assert (from_env.username, from_env.password) == ("env-user", "env-password")
    from_flags = load_config(path, flags, env)
    assert (from_flags.username, from_flags.password) == ("flag-user", "flag-password")
    assert "flag-password" not in repr(from_flags)


def test_tls_files_come_from_flags_and_the_environment_too(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("pem")
    env = {"EDGE_SDK_BROKER_CA_FILE": str(tmp_path / "ca.pem"), "EDGE_SDK_BROKER_CERT_FILE": str(tmp_path / "x")}
    flags = {"cert_file": tmp_path / "cert.pem", "key_file": tmp_path / "key.pem"}
    config = load_config(_write(tmp_path, _VALID), flags, env)
    assert (config.ca_file, config.cert_file, config.key_file) == (
        tmp_path / "ca.pem",
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
    )


def test_a_missing_password_file_is_named_with_where_it_was_set(tmp_path: Path) -> None:
    missing = tmp_path / "no.pw"
    env = {"EDGE_SDK_BROKER_USERNAME": "u", "EDGE_SDK_BROKER_PASSWORD_FILE": str(missing)}
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, _VALID), {}, env)
    assert caught.value.message == f"broker password_file {missing} does not exist (from EDGE_SDK_BROKER_PASSWORD_FILE)"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_the_mqtt_protocol_and_session_expiry_default_to_auto_and_an_hour_and_reach_the_client(
    tmp_path: Path,
) -> None:
    from device_agent.agent import mqtt_transport
    from device_agent.identity import DeviceIdentity

    config = _load(tmp_path, _VALID.replace("/tmp/edge-agent", str(tmp_path / "data")))
    assert (config.mqtt_protocol, config.session_expiry_s) == ("auto", 3600)
    pinned = _load(
        tmp_path,
        _VALID.replace("/tmp/edge-agent", str(tmp_path / "data")) + 'mqtt_protocol = "3.1.1"\nsession_expiry_s = 0\n',
    )
    assert (pinned.mqtt_protocol, pinned.session_expiry_s) == ("3.1.1", 0)
    identity = DeviceIdentity(config.device_id, tmp_path / "identity", None)
    options = mqtt_transport(config, identity).options
    assert (options.protocol, options.session_expiry_s, options.client_id) == ("auto", 3600, "edge-agent-pi-01")
    assert mqtt_transport(pinned, identity).options.protocol == "3.1.1"
    flagged = load_config(tmp_path / "agent.toml", {"mqtt_protocol": "5", "session_expiry_s": 60})
    assert (flagged.mqtt_protocol, flagged.session_expiry_s) == ("5", 60)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('mqtt_protocol = "4"', "mqtt_protocol must be one of auto, 5, 3.1.1, got '4'"),
        ("session_expiry_s = -1", "session_expiry_s must be an integer of seconds in 0..4294967295, got -1"),
        ("session_expiry_s = 4294967296", "session_expiry_s must be an integer of seconds in 0..4294967295"),
    ],
)
def test_a_bad_mqtt_protocol_or_session_expiry_is_named(setting: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        _load(tmp_path, _VALID + setting + "\n")
    assert caught.value.details["key"] == setting.split()[0]


def test_labels_come_from_a_table_or_a_list_and_are_checked(tmp_path: Path) -> None:
    table = _load(tmp_path, _VALID + 'heartbeat_s = 15\n[labels]\nsite = "depot-3"\nhw = "pi5"\n')
    assert table.labels == {"hw": "pi5", "site": "depot-3"} and table.heartbeat_s == 15
    listed = _load(tmp_path, 'labels = ["site=depot-3"]\n' + _VALID)
    assert listed.labels == {"site": "depot-3"} and listed.heartbeat_s == 60.0
    flagged = load_config(tmp_path / "agent.toml", {"labels": ("site=depot-4", "hw=pi4")})
    assert flagged.labels == {"hw": "pi4", "site": "depot-4"}
    with pytest.raises(ConfigError, match="bad label key 'Site'"):
        _load(tmp_path, 'labels = ["Site=x"]\n' + _VALID)
    with pytest.raises(ConfigError, match="heartbeat_s must be a number of seconds from 1"):
        _load(tmp_path, "heartbeat_s = 0.5\n" + _VALID)


def test_periodic_metrics_are_off_unless_set_and_bounded(tmp_path: Path) -> None:
    default = _load(tmp_path, _VALID)
    assert default.metrics_every_s is None and default.metrics_runs == 10
    on = _load(tmp_path, "metrics_every_s = 30\nmetrics_runs = 5\n" + _VALID)
    assert on.metrics_every_s == 30 and on.metrics_runs == 5
    flagged = load_config(tmp_path / "agent.toml", {"metrics_every_s": 1.5, "metrics_runs": 100})
    assert flagged.metrics_every_s == 1.5 and flagged.metrics_runs == 100
    for bad in ("0.5", "86401", "nan", "inf", "-1"):
        with pytest.raises(ConfigError, match="metrics_every_s must be a number of seconds from 1 to 86400"):
            _load(tmp_path, f"metrics_every_s = {bad}\n" + _VALID)
    for bad in ("0", "101", "-3"):
        with pytest.raises(ConfigError, match="metrics_runs must be an integer from 1 to 100"):
            _load(tmp_path, f"metrics_runs = {bad}\n" + _VALID)
    with pytest.raises(ConfigError, match="metrics_every_s must be a number of seconds, not a string"):
        _load(tmp_path, 'metrics_every_s = "60"\n' + _VALID)
    with pytest.raises(ConfigError, match="metrics_runs must be an integer, not a float"):
        _load(tmp_path, "metrics_runs = 2.5\n" + _VALID)
    with pytest.raises(ConfigError, match="metrics_every_s must be a number of seconds from 1"):
        AgentConfig("mqtt://127.0.0.1:1", "pi-01", tmp_path, root=tmp_path / "r.json", metrics_every_s=True)
