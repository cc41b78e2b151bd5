"""Delivery to many devices: one deploy, each chunk sent once, resumed over a broker restart, forgeries refused.

Real agents, a real Mosquitto, real `edgectl`. A listener on the broker counts what the
host publishes: chunk frames on the transfer topic (sent once for every device) and on
the devices' own data topics (repairs).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from agent_models import big_model
from harness import BIN
from taps import BrokerTap

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import INDEX_FRAME, content_transfer_id, decode_chunk, encode_chunk, transfer_topic

pytestmark = pytest.mark.integration


def _pack(host, model: Path, sample: Path, out: Path, version: int, name: str = "fleet") -> Path:
    r = host.run("pack", str(model), "-o", str(out), "--name", name, "--version", str(version), "--sample", str(sample))
    assert r.code == 0, r.stderr
    return out


class _Tap:
    """Counts the chunk frames the host publishes, by topic kind and index."""

    def __init__(self, url: str) -> None:
        self.broadcast: Counter[int] = Counter()
        self.unicast: Counter[int] = Counter()
        self._tap = BrokerTap(url, ("edge/v1/transfers/#", "edge/v1/devices/+/data"), self._count)

    def _count(self, topic: str, payload: bytes) -> None:
        chunk = decode_chunk(payload)
        (self.broadcast if topic.startswith("edge/v1/transfers/") else self.unicast)[chunk.index] += 1

    def close(self) -> None:
        self._tap.close()


def _deploy_args(bundle: Path, url: str, devices: list[str], *extra: str) -> list[str]:
    args = ["deploy", str(bundle), "--broker", url, "--runs", "5", "--warmup", "1", "--min-duration", "0", "--json"]
    for d in devices:
        args += ["--device", d]
    return [*args, *extra]


def test_one_deploy_reaches_twenty_devices_with_each_chunk_sent_once(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    devices = [f"fleet-{i:02d}" for i in range(20)]
    for d in devices:
        start_agent(mosquitto.url, d, host.root)
    bundle = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", 1)
    chunks = -(-bundle.stat().st_size // 1024)
    tap = _Tap(mosquitto.url)
    try:
        r = host.run(*_deploy_args(bundle, mosquitto.url, devices, "--chunk-size", "1024"))
        assert r.code == 0, r.stderr
        out = r.json()
        assert out["devices"] == 20 and out["states"] == {"installed": 20}
        assert sorted(o["device_id"] for o in out["outcomes"]) == devices
        time.sleep(0.5)
        # Every chunk once on the transfer topic (and the chunk index once), whatever the number of devices.
        assert set(tap.broadcast) == {INDEX_FRAME, *range(chunks)}
        assert sum(tap.broadcast.values()) <= 1.1 * (chunks + 1), tap.broadcast
        assert sum(tap.unicast.values()) <= chunks, tap.unicast  # repairs only, if any
        # Deployed again: every device runs it already, so nothing moves and nothing fails.
        sent_before = sum(tap.broadcast.values()) + sum(tap.unicast.values())
        again = host.run(*_deploy_args(bundle, mosquitto.url, devices, "--chunk-size", "1024"))
        assert again.code == 0, again.stderr
        assert again.json()["states"] == {"refused": 20}
        assert {o["detail"].get("refused_by") for o in again.json()["outcomes"]} == {"host"}
        time.sleep(0.5)
        assert sum(tap.broadcast.values()) + sum(tap.unicast.values()) == sent_before
    finally:
        tap.close()


def _background_deploy(host, args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, EDGE_SDK_HOME=str(host.home))
    env.pop("EDGE_SDK_BROKER", None)
    return subprocess.Popen(
        [str(BIN / "edgectl"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_broker_restart_half_way_costs_only_what_was_in_flight(host, start_mosquitto, start_agent, tmp_path):
    broker = start_mosquitto()
    model, sample = big_model(tmp_path, mib=4)
    bundle = _pack(host, model, sample, tmp_path / "big.edge", 1)
    chunks = -(-bundle.stat().st_size // 8192)
    start_agent(broker.url, "fleet-restart", host.root)
    tap = _Tap(broker.url)
    deployer = _background_deploy(host, _deploy_args(bundle, broker.url, ["fleet-restart"], "--chunk-size", "8192"))
    try:
        assert _wait_for(lambda: len(tap.broadcast) >= chunks // 2, 60), tap.broadcast
        broker.kill()
        time.sleep(1.0)
        broker.restart()
        out, err = deployer.communicate(timeout=240)
        assert deployer.returncode == 0, err[-3000:]
        assert '"state": "installed"' in out
        time.sleep(0.5)
    finally:
        tap.close()
        if deployer.poll() is None:
            deployer.kill()
            deployer.wait()
    # What went out, as the tap (reconnected after the restart) saw it: the bundle once, and again
    # at most what was in flight when the broker went away (the window, 64 chunks).
    frames = sum(tap.broadcast.values()) + sum(tap.unicast.values())
    assert frames <= chunks + 1 + 64, (frames, chunks)


def test_forged_chunks_on_the_transfer_topic_are_refused_one_by_one(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "fleet-forged", host.root)
    model, sample = big_model(tmp_path, mib=2)
    bundle = _pack(host, model, sample, tmp_path / "b.edge", 1)
    data = bundle.read_bytes()
    chunk = 8192
    tid = content_transfer_id(hashlib.sha256(data).hexdigest(), chunk)
    chunks = -(-len(data) // chunk)
    forger = MqttClient(mosquitto.url, MqttOptions(client_id="forger"))
    forger.connect()
    stop = threading.Event()
    forged = Counter[str]()
    rng = random.Random(7)

    def forge() -> None:  # about one forged frame for every ten real ones, from another client on the broker
        while not stop.is_set():
            index = rng.randrange(chunks)
            forger.publish(transfer_topic(tid), encode_chunk(tid, index, rng.randbytes(chunk)))
            forged["chunks"] += 1
            time.sleep(0.005)

    thread = threading.Thread(target=forge, daemon=True)
    thread.start()
    try:
        r = host.run(*_deploy_args(bundle, mosquitto.url, [agent.device_id], "--chunk-size", str(chunk)))
    finally:
        stop.set()
        thread.join(timeout=5)
        forger.close()
    assert r.code == 0, r.stderr
    assert r.json()["state"] == "installed"
    discarded = [line for line in agent.log().splitlines() if "discarded chunk" in line and ": digest" in line]
    assert forged["chunks"] > 0 and discarded, forged


def test_one_deploy_to_two_devices_through_every_broker_topology(host, tiny_model, topology, start_agent, tmp_path):
    """Mosquitto with MQTT 5 and with 3.1.1 clients, the embedded amqtt, and a gateway bridged to the fleet broker."""
    devices = [f"topo-{topology.name.replace('.', '')}-{i}" for i in range(2)]
    for d in devices:
        start_agent(topology.device_url, d, host.root, "--mqtt-protocol", topology.protocol)
    bundle = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", 1)
    r = host.run("--mqtt-protocol", topology.protocol, *_deploy_args(bundle, topology.host_url, devices))
    assert r.code == 0, r.stderr
    assert r.json()["states"] == {"installed": 2}


def test_edgectl_killed_half_way_and_run_again_sends_only_the_rest(host, mosquitto, start_agent, tmp_path):
    model, sample = big_model(tmp_path, mib=4)
    bundle = _pack(host, model, sample, tmp_path / "big.edge", 1)
    chunks = -(-bundle.stat().st_size // 8192)
    start_agent(mosquitto.url, "fleet-host-killed", host.root)
    args = _deploy_args(bundle, mosquitto.url, ["fleet-host-killed"], "--chunk-size", "8192")
    tap = _Tap(mosquitto.url)
    try:
        first = _background_deploy(host, args)
        assert _wait_for(lambda: len(tap.broadcast) >= chunks // 2, 60), tap.broadcast
        first.kill()
        first.communicate()  # reaps it and closes its pipes
        r = host.run(*args)
        assert r.code == 0, r.stderr
        assert r.json()["state"] == "installed"
        time.sleep(0.5)
    finally:
        tap.close()
    sent = sum(n for i, n in tap.broadcast.items() if i >= 0) + sum(n for i, n in tap.unicast.items() if i >= 0)
    assert sent <= chunks + 64, (sent, chunks)  # the second run sends what the device lacks, not the bundle again
