"""Attacks on the agent's liveness and clock, against real agent processes and a real Mosquitto.

Each test mounts what someone who can publish anything on the broker (and holds no key)
could do, shows it fail, the device's installed state unchanged, and the agent answering
a good deploy afterwards:

- a message whose topic is not valid UTF-8 (Mosquitto refuses these itself, so it is
  injected into the broker-to-agent stream by a proxy, as a less strict broker would pass it);
- a flood of junk, large and small, against an agent under ``RLIMIT_AS``;
- a signed rollback recorded and replayed after a restart with the clock 15 minutes early
  (the config file's test-only ``debug_clock_offset_s`` sets the agent's clock);
- a signed remove under an expired root.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_security import _active, _Attacker, _deploy, _pack

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import DeviceTopics, EventKind, RemoveCommand, RollbackCommand

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, name: str, **values: object) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return path


# --- a topic that is not UTF-8 -------------------------------------------------------------


class InjectingProxy:
    """A TCP proxy between one MQTT client and the broker that can slip a raw packet to the client.

    Packets from the broker are forwarded whole (framed by their remaining length), so an
    injected packet lands between two of them.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def inject(self, packet: bytes) -> None:
        with self._lock:
            self._pending.append(packet)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            broker = socket.create_connection(self.upstream)
            threading.Thread(target=self._up, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._down, args=(broker, client), daemon=True).start()

    @staticmethod
    def _up(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.close()

    def _down(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                with self._lock:
                    pending, self._pending = self._pending, []
                for packet in pending:
                    dst.sendall(packet)
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                buf += data
                while (end := _packet_end(buf)) is not None:
                    dst.sendall(buf[:end])
                    buf = buf[end:]
        with contextlib.suppress(OSError):
            dst.close()

    def close(self) -> None:
        self.listener.close()


def _packet_end(buf: bytes) -> int | None:
    """Where the first whole MQTT packet in ``buf`` ends, or None."""
    length, shift = 0, 0
    for i in range(1, min(len(buf), 5)):
        length |= (buf[i] & 0x7F) << shift
        shift += 7
        if not buf[i] & 0x80:
            end = i + 1 + length
            return end if len(buf) >= end else None
    return None


def _raw_publish(topic: bytes, payload: bytes, mqtt5: bool = False) -> bytes:
    """A QoS 0 PUBLISH packet with ``topic`` taken as raw bytes (MQTT 5: with an empty property list)."""
    body = struct.pack("!H", len(topic)) + topic + (b"\x00" if mqtt5 else b"") + payload
    length, encoded = len(body), b""
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x30" + encoded + body


def test_a_topic_that_is_not_utf8_does_not_deafen_the_agent(host, tiny_model, mosquitto, start_agent, tmp_path):
    port = int(mosquitto.url.rsplit(":", 1)[1])
    proxy = InjectingProxy(("127.0.0.1", port))
    try:
        agent = start_agent(proxy.url, "live-utf8", host.root)
        cmd_topic = DeviceTopics(agent.device_id).cmd.encode()
        # Mosquitto itself refuses such a topic (it disconnects the publisher) ...
        with socket.create_connection(("127.0.0.1", port)) as raw:
            cid = b"raw-attacker"
            connect = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
            raw.sendall(bytes([0x10, len(connect)]) + connect)
            assert raw.recv(4)[:1] == b"\x20"
            raw.sendall(_raw_publish(cmd_topic + b"\xff", b"junk"))
            raw.settimeout(5)
            assert raw.recv(16) == b""
        # ... but a less strict broker passes it on: slip it into the agent's stream.
        for topic in (cmd_topic + b"/\xff", b"edge/devices/\xed\xa0\x80/cmd", b"\xc0\xaf"):
            proxy.inject(_raw_publish(topic, b"junk", mqtt5=True))  # the agent speaks MQTT 5 to Mosquitto
        time.sleep(2)
        assert agent.alive
        v1 = _pack(host, tiny_model, tmp_path / "v1.edge", 1)
        r = _deploy(host, v1, mosquitto.url, agent.device_id)
        assert r.code == 0, r.stderr
        assert _active(agent) == 1
        assert "not valid UTF-8" in agent.log()
    finally:
        proxy.close()


# --- floods under a memory limit -------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_under_a_memory_limit_neither_kills_nor_deafens_the_agent(
    host, tiny_model, mosquitto, start_agent, tmp_path, monkeypatch
):
    import subprocess

    limit = 3 << 30
    popen = subprocess.Popen

    def limited(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return popen(*args, **kwargs)

    bound = 32 << 20
    config = _config(tmp_path, "flood", inbound_max_bytes=bound, inbound_queue_max=64)
    monkeypatch.setattr(subprocess, "Popen", limited)
    agent = start_agent(mosquitto.url, "live-flood", host.root, "--config", str(config))
    monkeypatch.setattr(subprocess, "Popen", popen)
    before = _rss_bytes(agent.proc.pid)
    topics = DeviceTopics(agent.device_id)
    flooder = MqttClient(mosquitto.url, MqttOptions(client_id=f"flooder-{uuid.uuid4().hex[:8]}"))
    flooder.connect()
    peak = before
    try:
        big = b"\x00" * (512 << 10)
        for i in range(600):  # 300 MiB of large junk and a swarm of small, as fast as the broker takes it
            flooder.publish(topics.data if i % 2 else topics.cmd, big, qos=0)
            for _ in range(10):
                flooder.publish(topics.data, b"{", qos=0)
            if i % 50 == 0:
                peak = max(peak, _rss_bytes(agent.proc.pid))
        time.sleep(3)
        peak = max(peak, _rss_bytes(agent.proc.pid))
    finally:
        flooder.close()
    assert agent.alive
    # Held messages are bounded by inbound_max_bytes; paho's read buffers and the allocator add some.
    assert peak - before < 3 * bound + (64 << 20), (before, peak)
    v1 = _pack(host, tiny_model, tmp_path / "v1.edge", 1)
    # The broker may still be delivering the flood's tail, and a bounded queue drops (and counts)
    # what does not fit, a command included: the operator's retry must get through.
    for _attempt in range(3):
        r = _deploy(host, v1, mosquitto.url, agent.device_id, "--accept-timeout", "30")
        if r.code == 0:
            break
    assert r.code == 0, r.stderr
    assert _active(agent) == 1 and agent.alive


# --- the clock goes back ---------------------------------------------------------------------


def test_a_rollback_replayed_after_a_restart_with_the_clock_15_minutes_early_is_refused(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    url, dev = mosquitto.url, "live-clock"
    agent = start_agent(url, dev, host.root)
    for version in (1, 2):
        assert _deploy(host, _pack(host, tiny_model, tmp_path / f"v{version}.edge", version), url, dev).code == 0
    now = time.time()
    recorded = host.signed(RollbackCommand(uuid.uuid4().hex, "tiny", 1, now, device_id=dev, expires_at=now + 600))
    attacker = _Attacker(url, dev)
    try:
        assert attacker.send(recorded).kind == EventKind.DONE  # the downgrade, recorded by the attacker
    finally:
        attacker.close()
    assert _active(agent) == 1
    agent.stop()
    # 12 minutes on (past the recorded command's expiry), the device accepts v4.
    agent = start_agent(url, dev, host.root, "--config", str(_config(tmp_path, "later", debug_clock_offset_s=720.0)))
    assert _deploy(host, _pack(host, tiny_model, tmp_path / "v4.edge", 4), url, dev).code == 0
    assert _active(agent) == 4
    agent.stop()
    # Reboot with the clock 15 minutes early: the recorded rollback looks fresh again.
    agent = start_agent(url, dev, host.root, "--config", str(_config(tmp_path, "early", debug_clock_offset_s=-180.0)))
    attacker = _Attacker(url, dev)
    try:
        replay = attacker.send(recorded)
    finally:
        attacker.close()
    assert replay.kind == EventKind.REFUSED and replay.error is not None and replay.error.code == "replay"
    assert _active(agent) == 4
    assert _deploy(host, _pack(host, tiny_model, tmp_path / "v5.edge", 5), url, dev).code == 0
    assert _active(agent) == 5 and agent.alive


# --- an expired root --------------------------------------------------------------------------


def test_an_expired_root_commands_nothing_until_a_new_root_arrives(tiny_model, mosquitto, start_agent, tmp_path):
    from harness import Host

    host = Host(tmp_path / "short-home")
    ttl_s = 40.0
    assert host.run("keys", "init", "--ttl-days", str(ttl_s / 86400)).code == 0
    expires = time.time() + ttl_s
    url, dev = mosquitto.url, "live-root"
    agent = start_agent(url, dev, host.root, enroll_home=host.home)
    v1 = _pack(host, tiny_model, tmp_path / "v1.edge", 1)
    assert _deploy(host, v1, url, dev).code == 0 and _active(agent) == 1
    time.sleep(max(0.0, expires - time.time()) + 1)
    now = time.time()
    remove = host.signed(RemoveCommand(uuid.uuid4().hex, "tiny", now, device_id=dev, expires_at=now + 60))
    attacker = _Attacker(url, dev)
    try:
        ev = attacker.send(remove)
    finally:
        attacker.close()
    assert ev.kind == EventKind.REFUSED and ev.error is not None and ev.error.code == "expired"
    assert "root" in ev.error.message
    assert _active(agent) == 1 and (agent.data_dir / "slots" / "tiny" / "v1").is_dir()
    # A new root still applies (edgectl sends it ahead of the deploy); then the device obeys again.
    assert host.run("keys", "rotate", "commands").code == 0
    r = _deploy(host, _pack(host, tiny_model, tmp_path / "v2.edge", 2), url, dev)
    assert r.code == 0, r.stderr
    assert _active(agent) == 2 and agent.alive
