"""Attacks on commands and keys, against a real agent process through a real Mosquitto.

Whoever controls the broker can publish anything on a device's command topic. Each test
sends what such an attacker could send and checks three things: the device refuses it
with the specific error, its installed state is unchanged, and it keeps running. Key
rotation and revocation go through the real `edgectl keys` commands and reach the device
over MQTT ahead of the next command.
"""

from __future__ import annotations

import json
import queue
import shutil
import time
import uuid
from pathlib import Path

import pytest
from harness import read_device_message

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import (
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    RemoveCommand,
    TransferOffer,
    encode,
    sign_command,
)
from host_tools.keys import KeyRing

pytestmark = pytest.mark.integration

EXIT_UNTRUSTED = 3


def _pack(host, model, out: Path, version: int, *extra: str, home: Path | None = None) -> Path:
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
        *extra,
        home=home,
    )
    assert r.code == 0, r.stderr
    return out


def _deploy(host, bundle: Path, url: str, device: str, *extra: str, home: Path | None = None):
    return host.run(
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
        home=home,
    )


def _active(agent) -> int | None:
    entry = agent.state().get("bundles", {}).get("tiny") or {}
    return (entry.get("active") or {}).get("version")


class _Attacker:
    """Publishes raw bytes on a device's command topic, as anyone on the broker could."""

    def __init__(self, url: str, device_id: str) -> None:
        self.topics = DeviceTopics(device_id)
        self.client = MqttClient(url, MqttOptions(client_id=f"attacker-{uuid.uuid4().hex[:8]}"))
        self.client.connect()
        self.client.subscribe(self.topics.events)

    def send(self, payload: bytes, timeout: float = 10.0) -> Event:
        """Publish and return the device's next terminal-ish answer."""
        self.client.publish_wait(self.topics.cmd, payload)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.client.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Incoming):
                ev = read_device_message(item.payload)
                if isinstance(ev, Event) and ev.kind in (
                    EventKind.ACCEPTED,
                    EventKind.REFUSED,
                    EventKind.ERROR,
                    EventKind.DONE,
                ):
                    return ev
        raise AssertionError("the device did not answer")

    def close(self) -> None:
        self.client.close()


def _deploy_cmd(device: str, now: float, ttl: float = 60.0) -> DeployCommand:
    offer = TransferOffer(uuid.uuid4().hex, 4096, "0" * 64, 1024, "0" * 64)
    return DeployCommand(uuid.uuid4().hex, "tiny", 1, offer, now, device_id=device, expires_at=now + ttl)


def test_unsigned_forged_misaddressed_expired_and_replayed_commands_are_refused(host, mosquitto, start_agent):
    agent = start_agent(mosquitto.url, "sec-cmds", host.root)
    ring = KeyRing(host.home / "keys")
    now = time.time()
    attacker = _Attacker(mosquitto.url, agent.device_id)
    try:
        cases = [
            ("unsigned deploy", encode(_deploy_cmd(agent.device_id, now)), "signature_invalid"),
            (
                "unsigned remove",
                encode(RemoveCommand(uuid.uuid4().hex, "tiny", now, agent.device_id, now + 60)),
                "signature_invalid",
            ),
            (
                "signed by the bundle key",
                encode(sign_command(_deploy_cmd(agent.device_id, now), ring.role_keys("bundles"))),
                "untrusted_key",
            ),
            ("addressed to another device", host.signed(_deploy_cmd("sec-other", now)), "target_mismatch"),
            ("expired", host.signed(_deploy_cmd(agent.device_id, now - 120)), "expired"),
            ("lives too long", host.signed(_deploy_cmd(agent.device_id, now, ttl=7 * 86400)), "expired"),
        ]
        tampered = json.loads(host.signed(_deploy_cmd(agent.device_id, now)))
        tampered["command"] = tampered["command"].replace('"bundle_version":1', '"bundle_version":9')
        cases.append(("edited after signing", json.dumps(tampered).encode(), "signature_invalid"))
        for what, payload, code in cases:
            ev = attacker.send(payload)
            assert ev.kind in (EventKind.REFUSED, EventKind.ERROR), what
            assert ev.error is not None and ev.error.code == code, (what, ev.error)
        good = host.signed(_deploy_cmd(agent.device_id, now))
        assert attacker.send(good).kind == EventKind.ACCEPTED
        replay = attacker.send(good)
        assert replay.kind == EventKind.REFUSED and replay.error is not None and replay.error.code == "replay"
    finally:
        attacker.close()
    assert agent.alive and agent.state() == {}
    assert not list((agent.data_dir / "slots").iterdir())
    agent.stop()  # the nonce record survives a restart: the replay is still refused
    agent = start_agent(mosquitto.url, "sec-cmds", host.root)
    attacker = _Attacker(mosquitto.url, agent.device_id)
    try:
        again = attacker.send(good)
        assert again.error is not None and again.error.code == "replay"
    finally:
        attacker.close()


def test_rollback_and_remove_are_explicit_signed_commands(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "sec-rollback", host.root)
    url, dev = mosquitto.url, agent.device_id
    v1 = _pack(host, tiny_model, tmp_path / "v1.edge", 1)
    v2 = _pack(host, tiny_model, tmp_path / "v2.edge", 2)
    assert _deploy(host, v1, url, dev).code == 0
    assert _deploy(host, v2, url, dev).code == 0 and _active(agent) == 2

    wrong = host.run("rollback", "--device", dev, "--name", "tiny", "--version", "7", "--broker", url)
    assert wrong.code == EXIT_UNTRUSTED and "keeps v1" in wrong.stderr and _active(agent) == 2
    back = host.run("rollback", "--device", dev, "--name", "tiny", "--version", "1", "--broker", url, "--json")
    assert back.code == 0, back.stderr
    assert _active(agent) == 1 and agent.state()["bundles"]["tiny"]["floor"] == {"version": 1, "reason": "rollback"}

    # The signed rollback reset the floor: v1 again is not newer, but v2 (the content that ran) deploys again.
    again = _deploy(host, v1, url, dev)
    assert again.code == EXIT_UNTRUSTED and again.json()["error"]["code"] == "rollback" and _active(agent) == 1
    assert _deploy(host, v2, url, dev).code == 0 and _active(agent) == 2

    gone = host.run("remove", "--device", dev, "--name", "tiny", "--broker", url)
    assert gone.code == 0, gone.stderr
    assert _active(agent) is None and agent.state()["bundles"]["tiny"]["floor"] == {"version": 2, "reason": "removed"}
    assert not (agent.data_dir / "slots" / "tiny").exists()

    old = _deploy(host, v1, url, dev)  # rollback protection outlives the removal ...
    assert old.code == EXIT_UNTRUSTED and old.json()["error"]["code"] == "rollback"
    explicit = _deploy(host, v1, url, dev, "--rollback")  # ... unless a signed command names the older version
    assert explicit.code == 0, explicit.stderr
    assert _active(agent) == 1 and agent.alive


def test_target_constraints_are_enforced_by_the_device(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "sec-target", host.root)
    for extra, constraint in (
        (("--arch", "riscv64"), "arch"),
        (("--min-memory-mb", str(1 << 30)), "min_memory_bytes"),
        (("--accelerator", "npu"), "accelerators"),
    ):
        bundle = _pack(host, tiny_model, tmp_path / f"{constraint}.edge", 1, *extra)
        r = _deploy(host, bundle, mosquitto.url, agent.device_id)
        assert r.code == EXIT_UNTRUSTED, r.stderr
        err = r.json()["error"]
        assert err["code"] == "target_mismatch" and err["details"]["constraint"] == constraint
    assert agent.alive and agent.state() == {}


def test_key_rotation_and_revocation_reach_the_device(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "sec-rotate", host.root)
    url, dev = mosquitto.url, agent.device_id
    stale_home = tmp_path / "stale-home"  # an operator machine (or a thief) still holding the old keys
    shutil.copytree(host.home, stale_home)
    assert _deploy(host, _pack(host, tiny_model, tmp_path / "v1.edge", 1), url, dev).code == 0
    signed_by_old_key = _pack(host, tiny_model, tmp_path / "v2-old-key.edge", 2)

    rotated = host.run("keys", "rotate", "bundles", "--json")
    assert rotated.code == 0, rotated.stderr
    old_bundle_key = rotated.json()["replaced"]
    assert host.run("keys", "rotate", "commands").code == 0
    shown = host.run("keys", "show", "--json").json()
    assert shown["version"] == 3

    v3 = _pack(host, tiny_model, tmp_path / "v3.edge", 3)
    ok = _deploy(host, v3, url, dev)  # roots v2 and v3 go out first, then the command signed by the new key
    assert ok.code == 0, ok.stderr + agent.log()[-3000:]
    device_root = json.loads((agent.data_dir / "trust" / "root.json").read_text())["signed"]
    assert device_root["version"] == 3 and old_bundle_key not in device_root["keys"]

    revoked = _deploy(host, signed_by_old_key, url, dev, "--rollback")  # valid signature, revoked key
    assert revoked.code == EXIT_UNTRUSTED and revoked.json()["error"]["code"] == "untrusted_key"
    v4 = _pack(host, tiny_model, tmp_path / "v4.edge", 4)  # newer than v3, so only the command key is wrong
    stale = _deploy(host, v4, url, dev, home=stale_home)  # old command key: the device no longer obeys it
    assert stale.code == EXIT_UNTRUSTED and stale.json()["error"]["code"] == "untrusted_key"
    assert _active(agent) == 3

    # A restart with the shipped v1 root does not bring the revoked keys back.
    agent.stop()
    agent = start_agent(url, dev, stale_home / "keys" / "root.json")
    again = _deploy(host, signed_by_old_key, url, dev, "--rollback")
    assert again.code == EXIT_UNTRUSTED and again.json()["error"]["code"] == "untrusted_key"
    assert _active(agent) == 3 and agent.alive
