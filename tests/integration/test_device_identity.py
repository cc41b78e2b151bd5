"""Device identity against real agents and a real Mosquitto: the host believes only what devices sign.

Each test mounts one attack of issue 13 ("the host believes forged device messages") by a
party that can publish anything on the broker but holds no device key (or holds only its
own device's key), shows that the host's state does not change, and then shows that the
real device still deploys.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from device_keys import TestDevice
from harness import BIN

from edge_sdk.metrics import LatencyStats
from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import (
    DeviceStatus,
    DeviceTopics,
    Event,
    EventKind,
    MetricsReport,
    SignedCommand,
    decode,
    encode,
)

pytestmark = pytest.mark.integration

EXIT_TRANSPORT = 4


def _pack(host, model, out: Path, version: int) -> Path:
    r = host.run(
        "pack",
        str(model.path),
        "-o",
        str(out),
        "--name",
        "tiny",
        "--version",
        str(version),
        "--sample",
        str(model.sample),
    )
    assert r.code == 0, r.stderr
    return out


def _deploy_args(bundle: Path, url: str, device: str, *extra: str) -> list[str]:
    return [
        "deploy",
        str(bundle),
        "--device",
        device,
        "--broker",
        url,
        "--runs",
        "5",
        "--warmup",
        "1",
        "--json",
        *extra,
    ]


def _active(agent) -> int | None:
    entry = agent.state().get("bundles", {}).get("tiny") or {}
    return (entry.get("active") or {}).get("version")


def _client(url: str) -> MqttClient:
    client = MqttClient(url, MqttOptions(client_id=f"attacker-{uuid.uuid4().hex[:8]}"))
    client.connect()
    return client


def _devices(host, url: str) -> dict[str, dict]:
    r = host.run("devices", "--broker", url, "--json")
    assert r.code == 0, r.stderr
    return {d["device_id"]: d for d in r.json()}


def _forged_answers(device: str, cmd_id: str, transfer_id: str) -> list[tuple[str, object]]:
    """What a forger sends for a live deploy: accepted (nothing missing), installed, and metrics."""
    return [
        ("events", Event(device, EventKind.ACCEPTED, time.time(), command_id=cmd_id, transfer_id=transfer_id)),
        ("events", Event(device, EventKind.RECEIVED, time.time(), command_id=cmd_id, transfer_id=transfer_id)),
        ("events", Event(device, EventKind.INSTALLED, time.time(), command_id=cmd_id, transfer_id=transfer_id)),
        (
            "metrics",
            MetricsReport(
                device, "tiny", 2, "onnxruntime", "fp32", time.time(), command_id=cmd_id,
                latency=LatencyStats(5, 0.001, 0.0, 0.001, 0.001, 0.001, 0.001, 0.001, 1e6),
            ),
        ),
    ]  # fmt: skip


def test_forged_events_for_a_live_deploy_do_not_make_it_succeed(host, tiny_model, mosquitto, start_agent, tmp_path):
    url, dev = mosquitto.url, "id-forge"
    agent = start_agent(url, dev, host.root)
    v1, v2 = _pack(host, tiny_model, tmp_path / "v1.edge", 1), _pack(host, tiny_model, tmp_path / "v2.edge", 2)
    assert host.run(*_deploy_args(v1, url, dev)).code == 0
    agent.stop()  # the device is away: only the forger can answer the next deploy

    topics = DeviceTopics(dev)
    forger = _client(url)
    forger.subscribe(topics.cmd)
    own_key = TestDevice(dev)  # a key the forger made; the host never enrolled it
    stop = threading.Event()

    def forge() -> None:
        while not stop.is_set():
            try:
                item = forger.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not isinstance(item, Incoming):
                continue
            msg = decode(item.payload)
            if not isinstance(msg, SignedCommand):
                continue
            body = json.loads(msg.command)  # the signed deploy is readable: its ids are known
            for channel, fake in _forged_answers(dev, body["command_id"], body["transfer"]["transfer_id"]):
                topic = topics.events if channel == "events" else topics.metrics
                forger.publish_wait(topic, encode(fake))  # unsigned
                forger.publish_wait(topic, own_key.sign(fake, seq=10**9))  # signed by a key not enrolled

    thread = threading.Thread(target=forge, daemon=True)
    thread.start()
    try:
        r = host.run(*_deploy_args(v2, url, dev, "--accept-timeout", "4", "--timeout", "8"))
    finally:
        stop.set()
        thread.join(5)
        forger.close()
    assert r.code == EXIT_TRANSPORT, r.stdout + r.stderr  # the device never answered: a timeout, not "installed"
    assert "installed" not in r.stdout
    metrics = host.run("metrics", "--json").json()
    assert [m["bundle_version"] for m in metrics if m["device_id"] == dev] == [1]  # no fake v2 report stored
    drops = _devices(host, url)[dev]["dropped"]
    assert drops.get("unsigned", 0) >= 1 and drops.get("bad_signature", 0) >= 1

    agent = start_agent(url, dev, host.root)  # the real device is back and deploys as before
    ok = host.run(*_deploy_args(v2, url, dev))
    assert ok.code == 0, ok.stderr
    assert _active(agent) == 2


def test_a_flood_of_forged_statuses_creates_no_ghost_devices(host, tiny_model, start_mosquitto, start_agent, tmp_path):
    broker = start_mosquitto()
    url = broker.url
    agent = start_agent(url, "id-real", host.root)
    flood = 2000
    attacker = _client(url)
    try:
        handles = []
        for i in range(flood):
            ghost = f"ghost-{i:05d}"
            status = DeviceStatus(ghost, "online", time.time(), platform={"kind": "pi"})
            if i % 2:  # half unsigned, half self-signed by keys nobody enrolled (pending requests at most)
                payload = encode(status)
            else:
                device = TestDevice(ghost)
                payload = device.sign(DeviceStatus(ghost, "online", time.time(), public_key=device.public_hex))
            handles.append(attacker.publish(DeviceTopics(ghost).status, payload, retain=True))
        for h in handles:
            h.wait()
    finally:
        attacker.close()

    started = time.monotonic()
    devices = _devices(host, url)
    assert time.monotonic() - started < 60
    assert set(devices) == {"id-real"}  # zero ghosts
    pending = host.run("devices", "enroll", "--json").json()
    assert len(pending) <= 256  # requests are bounded, and are not devices
    text = host.run("devices", "--broker", url)
    # Each listing hears the retained flood again (as much as its time bound allows) and counts it under "*".
    assert text.code == 0 and re.search(r"dropped from unknown devices: .*unsigned \d{3,}", text.stdout), text.stdout

    bundle = _pack(host, tiny_model, tmp_path / "v1.edge", 1)
    ok = host.run(*_deploy_args(bundle, url, "id-real"))
    assert ok.code == 0, ok.stderr
    assert _active(agent) == 1


def test_odd_values_from_an_enrolled_device_neither_freeze_nor_crash(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    url = mosquitto.url
    odd = TestDevice("id-odd")  # an enrolled device that misbehaves (compromised, or a broken clock)
    key_file = tmp_path / "odd.pub"
    key_file.write_bytes(odd.key.public_key.to_pem())
    assert host.run("devices", "enroll", "id-odd", "--key", str(key_file)).code == 0
    topics = DeviceTopics("id-odd")
    year_2100 = 4_102_444_800.0 + 86400 * 180
    client = _client(url)
    try:
        # A status dated 2100 inside an envelope dated now, then one with the envelope dated 2100.
        client.publish_wait(topics.status, odd.sign(DeviceStatus("id-odd", "online", year_2100)), retain=True)
        first = _devices(host, url)["id-odd"]
        assert first["status"] == "online" and first["last_seen"] <= time.time() + 1
        client.publish_wait(topics.status, odd.sign(DeviceStatus("id-odd", "online", 2.0), ts=year_2100), retain=True)
        assert _devices(host, url)["id-odd"]["dropped"] == {"future_time": 1}
        # Later real updates are not made to look older: an offline status now wins.
        client.publish_wait(topics.status, odd.sign(DeviceStatus("id-odd", "offline", time.time())), retain=True)
        assert _devices(host, url)["id-odd"]["status"] == "offline"
        # ts=1e300 and an empty latency, signed by the enrolled key: neither is stored to crash a command later.
        huge = MetricsReport("id-odd", "tiny", 1, "onnxruntime", "fp32", 1e300)
        client.publish_wait(topics.metrics, odd.sign(huge), retain=True)
        assert host.run("metrics", "--broker", url, "--json").code == 0
        empty = json.loads(encode(MetricsReport("id-odd", "tiny", 2, "onnxruntime", "fp32", time.time())))
        empty["latency"] = ""
        client.publish_wait(topics.metrics, odd.sign_bytes(json.dumps(empty).encode()), retain=True)
    finally:
        client.close()
    for args in (
        ["devices", "--broker", url],
        ["metrics", "--broker", url],
        ["metrics"],
        ["devices", "--broker", url, "--json"],
    ):
        r = host.run(*args)
        assert r.code == 0 and "Traceback" not in r.stderr, r.stderr

    agent = start_agent(url, "id-odd-neighbour", host.root)
    ok = host.run(*_deploy_args(_pack(host, tiny_model, tmp_path / "v1.edge", 1), url, "id-odd-neighbour"))
    assert ok.code == 0, ok.stderr
    assert _active(agent) == 1


def test_a_device_cannot_speak_for_another(host, tiny_model, mosquitto, start_agent, tmp_path):
    url = mosquitto.url
    victim = start_agent(url, "id-victim", host.root)
    rogue = TestDevice("id-rogue")  # enrolled, holding only its own key
    key_file = tmp_path / "rogue.pub"
    key_file.write_bytes(rogue.key.public_key.to_pem())
    assert host.run("devices", "enroll", "id-rogue", "--key", str(key_file)).code == 0
    announce = _client(url)
    try:  # the rogue is a device of the fleet in good standing
        status = rogue.sign(DeviceStatus("id-rogue", "online", time.time()))
        announce.publish_wait(DeviceTopics("id-rogue").status, status, retain=True)
    finally:
        announce.close()
    before = _devices(host, url)["id-victim"]
    assert before["status"] == "online"

    victim_topics, rogue_topics = DeviceTopics("id-victim"), DeviceTopics("id-rogue")
    offline = DeviceStatus("id-victim", "offline", time.time())
    forgeries = [
        # Its own key and its own id in the envelope, on the victim's topic.
        (victim_topics.status, rogue.sign(DeviceStatus("id-rogue", "offline", time.time()))),
        # Its own key, the victim's id in the envelope and in the payload.
        (victim_topics.status, rogue.sign(offline)),
        # On its own topic, its own id in the envelope, a payload naming the victim.
        (rogue_topics.status, rogue.sign_bytes(encode(offline))),
    ]
    client = _client(url)
    try:
        for topic, payload in forgeries:  # retained, so that `edgectl devices` hears each
            client.publish_wait(topic, payload, retain=True)
            after = _devices(host, url)
            # The forgery now retained on the victim's topic is dropped, so this listing may not confirm the
            # victim ("unknown"); what it recorded must still be the victim's own "online", never the forged
            # "offline".
            assert after["id-victim"]["status"] in ("online", "unknown")
            assert after["id-victim"]["last_status"] == "online"
            assert after["id-victim"]["last_seen"] == before["last_seen"]
    finally:
        client.close()
    # The last forgery on the victim's topic stays retained, so the last two listings heard it again.
    assert after["id-victim"]["dropped"] == {"device_mismatch": 1, "bad_signature": 2}
    assert after["id-rogue"]["dropped"] == {"device_mismatch": 1}

    ok = host.run(*_deploy_args(_pack(host, tiny_model, tmp_path / "v1.edge", 1), url, "id-victim"))
    assert ok.code == 0, ok.stderr
    assert _active(victim) == 1


def test_enrolment_by_approval_and_revocation(host, tiny_model, mosquitto, start_agent, tmp_path):
    url = mosquitto.url
    agent = start_agent(url, "id-new", host.root, enroll_key=False)
    assert "id-new" not in _devices(host, url)  # pending only: not a device yet
    # (Other tests' devices on the shared broker wait too: this host enrolled none of them.)
    pending = [p for p in host.run("devices", "enroll", "--json").json() if p["device_id"] == "id-new"]
    assert len(pending) == 1 and pending[0]["state"] == "pending"
    from edge_sdk.trust import PublicKey, fingerprint

    expected = fingerprint(PublicKey.from_pem(agent.public_key_file.read_bytes()))
    assert pending[0]["fingerprint"] == expected
    shown = subprocess.run(
        [str(BIN / "edgectl"), "devices", "approve", "id-new"],
        input="y\n", capture_output=True, text=True, env={**_env(host)}, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0 and expected in shown.stderr, shown.stderr
    assert _devices(host, url)["id-new"]["status"] == "online"
    bundle = _pack(host, tiny_model, tmp_path / "v1.edge", 1)
    assert host.run(*_deploy_args(bundle, url, "id-new")).code == 0
    assert _active(agent) == 1

    assert host.run("devices", "revoke", "id-new").code == 0
    refused = host.run(
        *_deploy_args(_pack(host, tiny_model, tmp_path / "v2.edge", 2), url, "id-new", "--accept-timeout", "3")
    )
    assert refused.code == EXIT_TRANSPORT  # its answers are no longer believed
    assert host.run("devices", "enroll", "id-new", "--key", str(agent.public_key_file)).code == 0
    again = host.run(*_deploy_args(_pack(host, tiny_model, tmp_path / "v3.edge", 3), url, "id-new"))
    assert again.code == 0, again.stderr
    assert _active(agent) == 3


def _env(host) -> dict[str, str]:
    import os

    env = dict(os.environ, EDGE_SDK_HOME=str(host.home))
    env.pop("EDGE_SDK_BROKER", None)
    return env
