"""What a user reads when something is wrong, from real `edge-agent` and `edgectl` processes.

- a config value of the wrong type, or a missing TLS file, is named with its key before
  the agent connects anywhere;
- with the broker unreachable the agent logs each attempt and the next delay at INFO
  within seconds (no 40 s of silence);
- after `edgectl keys rotate bundles` a bundle packed before is refused by a real device
  through a real Mosquitto, and `edgectl resign` makes it deployable again, same version.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from harness import BIN
from mosquitto import free_port

pytestmark = pytest.mark.integration

EXIT_CONFIG = 2


def _agent(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edge-agent"), "run", *args], capture_output=True, text=True, timeout=timeout)


def test_a_config_value_of_the_wrong_type_is_named_with_its_key(host, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'broker = "mqtt://127.0.0.1:1"\ndevice_id = "pi-01"\ndata_dir = "{tmp_path / "data"}"\n'
        f'root = "{host.root}"\nreconnect_max_s = "30"\n'
    )
    result = _agent("--config", str(config))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.strip() == (
        f"edge-agent: {config}: reconnect_max_s must be a number of seconds, not a string ('30')"
    )


def test_a_missing_tls_file_is_named_before_connecting(host, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'broker = "mqtts://127.0.0.1:{free_port()}"\ndevice_id = "pi-01"\ndata_dir = "{tmp_path / "data"}"\n'
        f'root = "{host.root}"\n[tls]\nca_file = "{missing}"\n'
    )
    started = time.monotonic()
    result = _agent("--config", str(config))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"edge-agent: TLS ca_file {missing} does not exist" in result.stderr
    assert "connect" not in result.stderr and time.monotonic() - started < 20


def test_an_unreachable_broker_is_logged_at_info_within_seconds(host, start_agent) -> None:
    port = free_port()  # nothing listens there
    agent = start_agent(f"mqtt://127.0.0.1:{port}", "unreachable", host.root, "--log-level", "INFO", wait=False)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and "(attempt 2)" not in agent.log():
        time.sleep(0.2)
    log = agent.log()
    assert agent.alive, log
    assert f"INFO edge_sdk.mqtt: cannot connect to mqtt://127.0.0.1:{port} (attempt 1): connection failed:" in log
    assert "Connection refused; next attempt in 1 s" in log
    assert "(attempt 2)" in log and "next attempt in 2 s" in log


def test_bundles_packed_before_a_key_rotation_are_refused_until_resigned(
    host, tiny_model, mosquitto, start_agent, tmp_path: Path
) -> None:
    agent = start_agent(mosquitto.url, "resign-01", host.root)
    url, dev = mosquitto.url, agent.device_id
    old = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", "tiny", 1)

    rotated = host.run("keys", "rotate", "bundles", "--json")
    assert rotated.code == 0, rotated.stderr
    (warning,) = rotated.json()["warnings"]
    assert f"signed by {rotated.json()['replaced']}" in warning and "edgectl resign BUNDLE" in warning
    assert f"edgectl: warning: {warning}" in rotated.stderr

    deploy = ("deploy", "--device", dev, "--broker", url, "--runs", "3", "--warmup", "1", "--json")
    refused = host.run(deploy[0], str(old), *deploy[1:])
    assert refused.code == 3 and refused.json()["error"]["code"] == "untrusted_key", refused.stdout + refused.stderr

    resigned_path = tmp_path / "v1-resigned.edge"
    resigned = host.run("resign", str(old), "-o", str(resigned_path), "--json")
    assert resigned.code == 0, resigned.stderr
    assert resigned.json()["signed_by"] == [rotated.json()["new_keyid"]]
    assert resigned.json()["manifest"]["version"] == 1
    assert host.run("verify", str(resigned_path)).code == 0

    accepted = host.run(deploy[0], str(resigned_path), *deploy[1:])
    assert accepted.code == 0, accepted.stdout + accepted.stderr + agent.log()[-3000:]
    assert (agent.state()["bundles"]["tiny"]["active"] or {}).get("version") == 1
