"""Field conditions, end to end: the update gate, the offline buffer, systemd notifications.

Real agent processes and real Mosquitto brokers. The offline test stops the broker,
lets the agent install a deferred bundle while it is unreachable, restarts the agent
while still offline, and then brings the broker back: the buffered events and metrics
arrive in order, and a device whose buffer was too small reports how many it dropped.
The host side listens with a persistent MQTT session (clean_session off) on a broker
with persistence, so what the agent sends before the listener has reconnected is queued
for it rather than lost to a race.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from harness import BIN, read_device_message
from paho.mqtt.enums import CallbackAPIVersion

from edge_sdk.protocol import DeviceTopics, Event, EventKind, MetricsReport

pytestmark = pytest.mark.integration


def _pack(host, tiny_model, out: Path, name: str, version: int = 1) -> Path:
    r = host.run(
        "pack",
        str(tiny_model.path),
        "-o",
        str(out),
        "--name",
        name,
        "--version",
        str(version),
        "--sample",
        str(tiny_model.sample),
    )
    assert r.code == 0, r.stderr
    return out


def _deploy_bg(host, bundle: Path, url: str, device: str, timeout_s: float) -> subprocess.Popen[str]:
    env = dict(os.environ, EDGE_SDK_HOME=str(host.home))
    env.pop("EDGE_SDK_BROKER", None)
    return subprocess.Popen(
        [
            str(BIN / "edgectl"),
            "deploy",
            str(bundle),
            "--device",
            device,
            "--broker",
            url,
            "--runs",
            "10",
            "--warmup",
            "1",
            "--timeout",
            str(timeout_s),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class PersistentWatcher:
    """A host-side listener with a persistent session: the broker queues for it while it reconnects."""

    def __init__(self, port: int, devices: list[str]) -> None:
        self.port = port
        self.devices = devices
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        # A fresh client id has no old session; clean_session off keeps this one while away.
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:12]}", clean_session=False
        )
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        # paho's default backoff grows to 120 s; while the broker is down for a while the
        # watcher could come back long after the agents have drained their outboxes.
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=1)
        self._connect()
        for d in devices:
            t = DeviceTopics(d)
            self.client.subscribe([(t.events, 1), (t.metrics, 1)])
        time.sleep(0.3)

    def _connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        _until(self.client.is_connected, 10, "watcher connection")

    def messages(self, quiet_s: float = 1.5, max_s: float = 20.0) -> list[Event | MetricsReport]:
        """What arrived, read until nothing more comes for ``quiet_s`` (once connected)."""
        _until(self.client.is_connected, max_s, "the watcher to reconnect")
        out = []
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            try:
                _topic, payload = self.inbox.get(timeout=quiet_s)
            except queue.Empty:
                break
            out.append(read_device_message(payload))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_gate_defers_across_a_restart_then_installs(host, tiny_model, mosquitto, start_agent, tmp_path):
    hold = tmp_path / "hold"
    hold.write_text("in flight\n")
    gate_args = ("--update-gate-file", str(hold), "--update-gate-retry", "0.5")
    agent = start_agent(mosquitto.url, "gate-field", host.root, *gate_args)
    bundle = _pack(host, tiny_model, tmp_path / "g.edge", "gated")
    deployer = _deploy_bg(host, bundle, mosquitto.url, agent.device_id, timeout_s=30)
    out, err = deployer.communicate(timeout=60)
    assert deployer.returncode == 0, err  # deferred is an answer, not a failure
    assert json.loads(out)["state"] == "deferred" and json.loads(out)["detail"]["reason"] == "in flight"
    assert "deferred: in flight" in agent.log()
    assert agent.state().get("bundles", {}) == {}
    assert len(list((agent.data_dir / "deferred").glob("*.edge"))) == 1

    assert agent.stop() == 0  # a reboot while the gate is closed
    agent = start_agent(mosquitto.url, "gate-field", host.root, *gate_args)
    time.sleep(1.0)
    assert agent.state().get("bundles", {}) == {}
    hold.unlink()
    _until(
        lambda: agent.state().get("bundles", {}).get("gated", {}).get("active") == {"version": 1},
        20,
        "the deferred install",
    )
    _until(lambda: "pending" not in agent.state()["bundles"]["gated"], 20, "confirmation")
    # The held bundle is dropped once its install, benchmark included, has finished.
    _until(lambda: not list((agent.data_dir / "deferred").iterdir()), 20, "the deferred bundle to be dropped")


def test_offline_events_and_metrics_are_buffered_and_delivered_in_order(
    host, tiny_model, start_mosquitto, start_agent, tmp_path
):
    broker = start_mosquitto(extra_config=("persistence true", f"persistence_location {tmp_path}/"))
    hold = tmp_path / "hold"
    hold.write_text("driving\n")
    common = ("--update-gate-file", str(hold), "--update-gate-retry", "0.5", "--reconnect-max", "1")
    watcher = PersistentWatcher(broker.port, ["offline-big", "offline-small"])
    big = start_agent(broker.url, "offline-big", host.root, *common)
    small = start_agent(broker.url, "offline-small", host.root, *common, "--outbox-max-bytes", "1024")
    bundle = _pack(host, tiny_model, tmp_path / "o.edge", "ob")
    for agent in (big, small):
        d = _deploy_bg(host, bundle, broker.url, agent.device_id, timeout_s=2)
        d.communicate(timeout=60)
        assert list((agent.data_dir / "deferred").glob("*.cmd")), agent.log()[-2000:]

    broker.stop()
    for agent in (big, small):
        _until(lambda a=agent: "connection lost" in a.log(), 20, "the agent to notice")
    assert big.stop() == 0  # restart while offline: the buffer is on disk
    big = start_agent(broker.url, "offline-big", host.root, *common, wait=False)
    hold.unlink()
    for agent in (big, small):
        _until(
            lambda a=agent: a.state().get("bundles", {}).get("ob", {}).get("active") == {"version": 1},
            30,
            "offline install",
        )
    _until(lambda: (big.data_dir / "outbox" / "log").stat().st_size > 0, 10, "buffered messages")
    cursor = json.loads((small.data_dir / "outbox" / "cursor").read_text())
    assert cursor["dropped"] >= 1

    broker.restart()
    for agent in (big, small):
        _until(lambda a=agent: (a.data_dir / "outbox" / "log").stat().st_size == 0, 30, "the buffer to drain")
    got = watcher.messages()
    watcher.close()

    by_device: dict[str, list[str]] = {}
    for m in got:
        label = m.kind if isinstance(m, Event) else "metrics"
        by_device.setdefault(m.device_id, []).append(label)
    big_seen = by_device["offline-big"]
    assert big_seen[:3] == [EventKind.ACCEPTED, EventKind.RECEIVED, EventKind.DEFERRED], big_seen
    assert EventKind.INSTALLED in big_seen and "metrics" in big_seen, big_seen
    assert big_seen.index(EventKind.INSTALLED) < big_seen.index("metrics"), big_seen
    assert EventKind.DROPPED not in big_seen
    dropped = [
        m for m in got if isinstance(m, Event) and m.device_id == "offline-small" and m.kind == EventKind.DROPPED
    ]
    assert len(dropped) == 1 and dropped[0].detail["count"] == cursor["dropped"]
    assert json.loads((small.data_dir / "outbox" / "cursor").read_text())["dropped"] == 0


def test_systemd_notifications_ready_watchdog_stopping(host, mosquitto, start_agent, tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    try:
        agent = start_agent(mosquitto.url, "sdnotify", host.root)
        seen: list[bytes] = []
        while not any(b"WATCHDOG=1" in m for m in seen[1:]):
            seen.append(sock.recv(4096))
        assert seen[0].startswith(b"READY=1\nSTATUS=")
        agent.proc.send_signal(signal.SIGTERM)
        while b"STOPPING=1" not in seen[-1]:
            seen.append(sock.recv(4096))
        assert agent.proc.wait(timeout=15) == 0
    finally:
        sock.close()


def test_deferred_install_finished_before_a_crash_is_not_retried(host, tiny_model, mosquitto, start_agent, tmp_path):
    hold = tmp_path / "hold"
    hold.write_text("driving\n")
    gate_args = ("--update-gate-file", str(hold), "--update-gate-retry", "0.3")
    agent = start_agent(mosquitto.url, "gate-crash", host.root, *gate_args, "--debug-crash-at", "reported")
    bundle = _pack(host, tiny_model, tmp_path / "c.edge", "held")
    deployer = _deploy_bg(host, bundle, mosquitto.url, agent.device_id, timeout_s=30)
    out, err = deployer.communicate(timeout=60)
    assert json.loads(out)["state"] == "deferred", err
    hold.unlink()
    # Installed, confirmed and reported, then SIGKILLed before the held copy was dropped.
    assert agent.proc.wait(timeout=30) == -signal.SIGKILL, agent.log()[-2000:]
    assert agent.state()["bundles"]["held"]["active"] == {"version": 1}
    assert list((agent.data_dir / "deferred").glob("*.cmd"))

    agent = start_agent(mosquitto.url, "gate-crash", host.root, *gate_args)
    _until(lambda: not list((agent.data_dir / "deferred").iterdir()), 20, "the held copy to be dropped")
    log = agent.log()
    assert "already active; dropping it" in log and "refused" not in log.lower(), log[-2000:]
    assert agent.state()["bundles"]["held"]["active"] == {"version": 1}
