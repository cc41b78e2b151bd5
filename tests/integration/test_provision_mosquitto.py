"""The whole provisioning path through the shipped Mosquitto config, TLS and per-device ACLs.

``deploy/mosquitto/mosquitto.conf.example`` and ``acl.example`` run as shipped, with only
what a test must change: the certificates (from ``edgectl ca init``), a free loopback
port, and paths under the test's temp dir. Agents run from directories written by
``edgectl devices provision``; ``edgectl`` connects with its own operator certificate
(CN ``edge-host``, the ACL's host user) named in ``HOME/broker.toml``.

Attack 7 and the ACL's promises, mounted: a provisioned device publishing on another
device's topics is dropped (its message never arrives), it cannot read another device's
commands, a client without a certificate cannot connect; afterwards the victim still
answers a good deploy. A 1 MiB chunk plus its header passes the shipped max_packet_size.
"""

from __future__ import annotations

import os
import queue
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import BIN, AgentProcess, Host, enroll, read_device_message
from mosquitto import MosquittoProcess

from edge_sdk.errors import BrokerUnreachableError
from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import DeviceStatus, DeviceTopics, encode
from edge_sdk.protocol.codec import CodecLimits, encode_chunk

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"


def shipped_config_lines(ca_dir: Path, workdir: Path) -> tuple[str, ...]:
    """The shipped config with only the test's certificates, paths and loopback listener swapped in.

    The harness's own lines (listener on a free loopback port, log file, user) come first;
    these follow, so every security setting is the shipped one.
    """
    swap = {
        "cafile": str(ca_dir / "ca.pem"),
        "certfile": str(ca_dir / "server.pem"),
        "keyfile": str(ca_dir / "server.key"),
        "acl_file": str(DEPLOY / "acl.example"),
        "persistence_location": f"{workdir}/",
    }
    dropped = {"listener", "log_dest", "persistence"}  # the harness listens on loopback and logs to a file
    out = []
    for line in (DEPLOY / "mosquitto.conf.example").read_text().splitlines():
        words = line.split()
        if not words or line.startswith("#") or words[0] in dropped:
            continue
        out.append(f"{words[0]} {swap[words[0]]}" if words[0] in swap else line)
    assert any(line.startswith("require_certificate true") for line in out)
    return (*out, "persistence false")


@dataclass
class Fleet:
    host: Host
    broker: MosquittoProcess
    url: str
    ca_dir: Path
    devices: dict[str, Path]

    def client(self, name: str, cert: tuple[Path, Path] | None, timeout: float = 5.0) -> MqttClient:
        cert_file, key_file = cert if cert else (None, None)
        client = MqttClient(
            self.url,
            MqttOptions(
                client_id=f"{name}-{uuid.uuid4().hex[:8]}",
                ca_file=self.ca_dir / "ca.pem",
                cert_file=cert_file,
                key_file=key_file,
                connect_timeout_s=timeout,
            ),
        )
        client.connect()
        return client

    def operator(self) -> MqttClient:
        return self.client("operator", (self.ca_dir / "edge-host.pem", self.ca_dir / "edge-host.key"))

    def device(self, device_id: str) -> MqttClient:
        d = self.devices[device_id]
        return self.client(f"impostor-{device_id}", (d / "client.pem", d / "client.key"))


@pytest.fixture
def fleet(host: Host, tmp_path: Path, start_mosquitto) -> Fleet:
    made = host.run("ca", "init", "--broker-host", "127.0.0.1", "--json")
    assert made.code == 0, made.stderr
    ca_dir = host.home / "ca"
    shipped = int(next(line.split()[1] for line in shipped_config_lines(ca_dir, tmp_path) if "max_packet_size" in line))
    broker = start_mosquitto(max_packet_size=shipped, extra_config=shipped_config_lines(ca_dir, tmp_path))
    url = f"mqtts://127.0.0.1:{broker.port}"
    (host.home / "broker.toml").write_text(
        f'[tls]\nca_file = "{ca_dir / "ca.pem"}"\ncert_file = "{ca_dir / "edge-host.pem"}"\n'
        f'key_file = "{ca_dir / "edge-host.key"}"\n'
    )
    devices = {}
    for device_id in ("dev-a", "dev-b"):
        out = tmp_path / "provisioned" / device_id
        done = host.run(
            "devices", "provision", device_id, "--broker", url, "--out", str(out), "--device-dir", str(out),
            "--data-dir", str(tmp_path / f"data-{device_id}"),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        assert f"copy them to {out}/ on the device" in done.stdout
        devices[device_id] = out
    return Fleet(host, broker, url, ca_dir, devices)


@pytest.fixture
def agents(fleet: Fleet, tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[str]]]:
    procs = {}
    for device_id, d in fleet.devices.items():
        log = open(tmp_path / f"{device_id}.log", "w")  # noqa: SIM115 - closed once the process has it
        procs[device_id] = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(d / "agent.toml"), "--log-level", "DEBUG"],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
    try:
        for device_id, proc in procs.items():  # the host believes only enrolled devices: enrol each key it made
            agent = AgentProcess(proc, device_id, tmp_path / f"data-{device_id}", tmp_path / f"{device_id}.log")
            enroll(fleet.host.home, device_id, agent.wait_for_key())
        watcher = fleet.operator()
        try:
            for device_id in procs:
                watcher.subscribe(DeviceTopics(device_id).status)
            online: set[str] = set()
            deadline = time.monotonic() + 30
            while online != set(procs) and time.monotonic() < deadline:
                with _suppress_empty():
                    item = watcher.inbox.get(timeout=0.2)
                    if isinstance(item, Incoming):
                        msg = read_device_message(item.payload)  # devices sign: read inside the envelope
                        if isinstance(msg, DeviceStatus) and msg.state == "online":
                            online.add(msg.device_id)
            assert online == set(procs), {k: (tmp_path / f"{k}.log").read_text()[-2000:] for k in procs}
        finally:
            watcher.close()
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=15)


class _suppress_empty:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return kind is queue.Empty


def _drain(client: MqttClient, wait_s: float) -> list[tuple[str, bytes]]:
    got, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with _suppress_empty():
            item = client.inbox.get(timeout=0.1)
            if isinstance(item, Incoming):
                got.append((item.topic, item.payload))
    return got


def _deploy(fleet: Fleet, bundle: Path, device_id: str) -> None:
    result = fleet.host.run(
        "deploy", str(bundle), "--device", device_id, "--broker", fleet.url, "--runs", "3", "--warmup", "1", "--json"
    )
    assert result.code == 0, result.stdout + result.stderr + fleet.broker.log_text()[-2000:]
    assert result.json()["state"] == "installed"


def test_provisioned_devices_and_edgectl_work_through_the_shipped_tls_acl_config(
    fleet: Fleet, agents, tiny_model, tmp_path: Path
) -> None:
    a, b = DeviceTopics("dev-a"), DeviceTopics("dev-b")
    v1 = fleet.host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", "tiny", 1)
    v2 = fleet.host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", "tiny", 2)
    _deploy(fleet, v1, "dev-a")  # edgectl with its operator certificate (HOME/broker.toml)

    watcher, impostor = fleet.operator(), fleet.device("dev-b")
    try:
        watcher.subscribe(a.events)
        watcher.subscribe(a.status)
        watcher.subscribe(b.events)
        impostor.subscribe(a.cmd)  # another device's commands: denied
        impostor.subscribe(a.data)
        time.sleep(0.5)
        _drain(watcher, 0.3)  # retained statuses
        forged = encode(DeviceStatus("dev-a", "offline", time.time()))
        impostor.publish_wait(a.status, forged, retain=True)
        impostor.publish_wait(a.events, b"dev-b pretending to be dev-a")
        impostor.publish_wait(a.cmd, b"dev-b commanding dev-a")
        impostor.publish_wait(b.events, b"dev-b's own event")
        _deploy(fleet, v2, "dev-a")  # commands and chunks for dev-a flow while dev-b listens

        seen = _drain(watcher, 1.0)
        assert (b.events, b"dev-b's own event") in seen  # the impostor is connected and may speak for itself
        assert not [p for t, p in seen if b"dev-b" in p and t != b.events], seen  # nothing forged arrives
        assert (a.status, forged) not in seen
        assert _drain(impostor, 0.3) == []  # nothing of dev-a's commands or data
    finally:
        watcher.close()
        impostor.close()
    assert agents["dev-a"].poll() is None and agents["dev-b"].poll() is None


def test_a_client_without_a_certificate_cannot_connect(fleet: Fleet) -> None:
    with pytest.raises(BrokerUnreachableError):
        fleet.client("anonymous", None, timeout=2)


def test_edgectl_without_its_certificate_is_refused_and_names_the_broker(fleet: Fleet) -> None:
    (fleet.host.home / "broker.toml").unlink()
    result = fleet.host.run("devices", "--broker", fleet.url, "--connect-timeout", "2")
    assert result.code == 4, result.stderr
    flags = ("--ca-file", str(fleet.ca_dir / "ca.pem"), "--cert-file", str(fleet.ca_dir / "edge-host.pem"))
    result = fleet.host.run("devices", "--broker", fleet.url, *flags, "--key-file", str(fleet.ca_dir / "edge-host.key"))
    assert result.code == 0, result.stderr


def test_the_shipped_max_packet_size_carries_a_1_mib_chunk_plus_its_header(fleet: Fleet) -> None:
    topic = DeviceTopics("dev-a").data
    frame = encode_chunk("ab" * 16, 7, os.urandom(CodecLimits().max_chunk_bytes - 25))
    watcher, sender = fleet.operator(), fleet.operator()
    try:
        watcher.subscribe(topic)
        time.sleep(0.3)
        sender.publish_wait(topic, frame)
        assert _drain(watcher, 2.0) == [(topic, frame)]
    finally:
        watcher.close()
        sender.close()


def test_the_agent_takes_username_and_password_from_the_environment_and_never_logs_the_password(
    host: Host, mosquitto, start_agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("EDGE_SDK_BROKER_USERNAME", "dev-pw")
    monkeypatch.setenv("EDGE_SDK_BROKER_PASSWORD", password)
    agent = start_agent(mosquitto.url, "dev-pw", host.root)  # the test broker takes any credentials
    agent.stop()
    log = agent.log()
    assert "agent dev-pw starting" in log
    assert password not in log and password not in mosquitto.log_text()
    assert "u'dev-pw'" in mosquitto.log_text()  # the broker saw the username from the environment
