"""The whole path through real processes: `edgectl` and `edge-agent` over a real Mosquitto.

Each bad-input case checks three things: the host sees a refusal that names what is
wrong, nothing was installed (the agent's state file is unchanged), and the agent is
still running and still serves a good deploy afterwards.
"""

from __future__ import annotations

import hashlib
import queue
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from harness import BIN, read_device_message, wait_online

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import (
    INDEX_FRAME,
    ChunkIndex,
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    TransferEnd,
    TransferOffer,
    content_transfer_id,
    encode,
    encode_chunk,
)

pytestmark = pytest.mark.integration

EXIT_UNTRUSTED = 3
EXIT_TRANSPORT = 4


def _pack(host, model, out: Path, version: int, name: str = "tiny", home: Path | None = None) -> Path:
    r = host.run(
        "pack",
        str(model.path),
        "-o",
        str(out),
        "--name",
        name,
        "--version",
        str(version),
        "--sample",
        str(model.sample),
        home=home,
    )
    assert r.code == 0, r.stderr
    return out


def _deploy(host, bundle: Path, broker_url: str, device: str, *extra: str):
    return host.run(
        "deploy",
        str(bundle),
        "--device",
        device,
        "--broker",
        broker_url,
        "--runs",
        "20",
        "--warmup",
        "2",
        "--json",
        *extra,
    )


class _Raw:
    """A hand-driven host, for conversations `edgectl` would never have."""

    def __init__(self, url: str, device_id: str) -> None:
        self.topics = DeviceTopics(device_id)
        self.client = MqttClient(url, MqttOptions(client_id=f"raw-{uuid.uuid4().hex[:8]}"))
        self.client.connect()
        self.client.subscribe(self.topics.events)

    def events(self, timeout: float, until: set[str]) -> list[Event]:
        out: list[Event] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.client.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Incoming) and item.topic == self.topics.events:
                ev = read_device_message(item.payload)
                assert isinstance(ev, Event)
                out.append(ev)
                if ev.kind in until:
                    return out
        return out

    def close(self) -> None:
        self.client.close()


def test_happy_path_deploy_devices_metrics(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "e2e-happy", host.root)
    bundle = _pack(host, tiny_model, tmp_path / "tiny-v1.edge", 1)

    verify = host.run("verify", str(bundle))
    assert verify.code == 0 and "signature" in verify.stdout and "hashes" in verify.stdout

    r = _deploy(host, bundle, mosquitto.url, agent.device_id)
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["state"] == "installed"
    assert any(c.startswith("signature") for c in out["checks"])
    m = out["metrics"]
    assert m["bundle_name"] == "tiny" and m["bundle_version"] == 1
    assert m["runtime"] == "onnxruntime" and m["precision"] == "fp32"
    assert m["latency"]["count"] >= 20
    assert 0 < m["latency"]["p50_ms"] <= m["latency"]["p90_ms"] <= m["latency"]["p99_ms"]
    assert m["memory"]["peak_bytes"] > 0
    assert "estimated" in m["power"]
    assert agent.state()["bundles"]["tiny"]["active"]["version"] == 1

    devices = host.run("devices", "--broker", mosquitto.url, "--json")
    assert devices.code == 0, devices.stderr
    mine = [d for d in devices.json() if d["device_id"] == agent.device_id]
    assert mine and mine[0]["status"] == "online"
    assert mine[0]["active_bundle"] == {"name": "tiny", "version": "1"}

    metrics = host.run("metrics", "--device", agent.device_id, "--json")
    assert metrics.code == 0 and metrics.json()[0]["bundle_version"] == 1
    table = host.run("metrics", "--device", agent.device_id)
    assert "p99 ms" in table.stdout and agent.device_id in table.stdout

    # Same version again: rollback protection refuses it, v1 stays active.
    again = _deploy(host, bundle, mosquitto.url, agent.device_id)
    assert again.code == EXIT_UNTRUSTED
    assert again.json()["error"]["code"] == "rollback"
    assert agent.alive and agent.state()["bundles"]["tiny"]["active"]["version"] == 1


def test_flipped_byte_is_refused_and_agent_survives(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "e2e-flip", host.root)
    good = _pack(host, tiny_model, tmp_path / "good.edge", 1)
    raw = bytearray(good.read_bytes())
    model_offset = raw.index(b"payload/tiny.onnx") + 512 + 100  # inside the model's data
    raw[model_offset] ^= 0x01
    bad = tmp_path / "flipped.edge"
    bad.write_bytes(bytes(raw))

    r = _deploy(host, bad, mosquitto.url, agent.device_id)
    assert r.code == EXIT_UNTRUSTED, r.stderr
    assert r.json()["error"]["code"] == "hash_mismatch"
    assert "tiny.onnx" in r.stderr
    assert agent.alive and agent.state() == {}
    assert not list((agent.data_dir / "slots").iterdir())
    assert not list((agent.data_dir / "staging").iterdir())

    ok = _deploy(host, good, mosquitto.url, agent.device_id)
    assert ok.code == 0, ok.stderr


def test_wrong_key_is_refused(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "e2e-wrongkey", host.root)
    other_home = tmp_path / "other-home"
    assert host.run("keys", "init", home=other_home).code == 0
    bundle = _pack(host, tiny_model, tmp_path / "other.edge", 1, home=other_home)

    r = _deploy(host, bundle, mosquitto.url, agent.device_id)
    assert r.code == EXIT_UNTRUSTED
    err = r.json()["error"]
    assert err["code"] == "untrusted_key"
    assert "does not trust" in err["message"] or "none of which" in err["message"]
    assert agent.alive and agent.state() == {}


def _offer(data: bytes, chunk: int) -> TransferOffer:
    """The offer `edgectl` would make for ``data``: named by content, binding the chunk index."""
    digest = hashlib.sha256(data).hexdigest()
    index = ChunkIndex.of_chunks(data[i : i + chunk] for i in range(0, len(data), chunk))
    return TransferOffer(content_transfer_id(digest, chunk), len(data), digest, chunk, index.sha256)


def test_a_cut_transfer_is_kept_and_a_later_deploy_sends_only_the_rest(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    """The sender goes silent half-way: the device keeps what it has, says what it lacks, and a new deploy resumes."""
    agent = start_agent(mosquitto.url, "e2e-trunc", host.root, "--transfer-idle-timeout", "2")
    bundle = _pack(host, tiny_model, tmp_path / "b.edge", 1)
    data = bundle.read_bytes()
    chunk = 1024
    offer = _offer(data, chunk)
    cmd = DeployCommand(
        uuid.uuid4().hex, "tiny", 1, offer, time.time(), device_id=agent.device_id, expires_at=time.time() + 60
    )
    raw = _Raw(mosquitto.url, agent.device_id)
    half = offer.chunk_count // 2
    rest = f"{half}-{offer.chunk_count - 1}"
    try:
        raw.client.publish_wait(raw.topics.cmd, host.signed(cmd))
        accepted = raw.events(10, {EventKind.ACCEPTED})
        assert accepted and accepted[-1].kind == EventKind.ACCEPTED
        assert accepted[-1].missing_ranges == f"0-{offer.chunk_count - 1}"
        raw.client.publish_wait(
            raw.topics.data, encode_chunk(offer.transfer_id, INDEX_FRAME, _index_bytes(data, chunk))
        )
        for i in range(half):
            raw.client.publish_wait(
                raw.topics.data, encode_chunk(offer.transfer_id, i, data[i * chunk : (i + 1) * chunk])
            )
        raw.client.publish_wait(raw.topics.cmd, encode(TransferEnd(cmd.command_id, offer.transfer_id)))
        need = raw.events(10, {EventKind.NEED_CHUNKS})
        assert need[-1].kind == EventKind.NEED_CHUNKS and need[-1].missing_ranges == rest
        # The sender goes silent: the device says again, by itself, what it lacks, and refuses nothing.
        again = raw.events(15, {EventKind.NEED_CHUNKS, EventKind.REFUSED})
        assert again and again[-1].kind == EventKind.NEED_CHUNKS and again[-1].missing_ranges == rest
        kept = sorted(p.name for p in (agent.data_dir / "staging").iterdir())
        assert kept == sorted(f"{offer.transfer_id}{s}" for s in (".cmd", ".index", ".part"))
        # A deploy of the same bundle is the same transfer: the device accepts it lacking only the rest.
        r = _deploy(host, bundle, mosquitto.url, agent.device_id, "--chunk-size", str(chunk))
        assert r.code == 0, r.stderr
        assert r.json()["state"] == "installed"
        resumed = [e for e in raw.events(5, set()) if e.kind == EventKind.ACCEPTED]
        assert resumed and resumed[0].missing_ranges == rest and resumed[0].detail["have_index"] is True
    finally:
        raw.close()
    assert agent.alive and not list((agent.data_dir / "staging").iterdir())


def _index_bytes(data: bytes, chunk: int) -> bytes:
    return ChunkIndex.of_chunks(data[i : i + chunk] for i in range(0, len(data), chunk)).digests


def test_chunks_that_break_the_offer_are_discarded_and_the_transfer_goes_on(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    """Endless data and forged chunks: a chunk longer than declared, or not matching its digest, costs nothing."""
    agent = start_agent(mosquitto.url, "e2e-endless", host.root)
    bundle = _pack(host, tiny_model, tmp_path / "b.edge", 1)
    data = bundle.read_bytes()
    chunk = 1024
    offer = _offer(data, chunk)
    cmd = DeployCommand(
        uuid.uuid4().hex, "tiny", 1, offer, time.time(), device_id=agent.device_id, expires_at=time.time() + 60
    )
    raw = _Raw(mosquitto.url, agent.device_id)
    try:
        raw.client.publish_wait(raw.topics.cmd, host.signed(cmd))
        assert raw.events(10, {EventKind.ACCEPTED})[-1].kind == EventKind.ACCEPTED
        tid = offer.transfer_id
        raw.client.publish_wait(raw.topics.data, encode_chunk(tid, INDEX_FRAME, b"\0" * len(_index_bytes(data, chunk))))
        raw.client.publish_wait(raw.topics.data, encode_chunk(tid, INDEX_FRAME, _index_bytes(data, chunk)))
        raw.client.publish_wait(raw.topics.data, encode_chunk(tid, 0, b"x" * 5000))
        raw.client.publish_wait(raw.topics.data, encode_chunk(tid, 0, b"x" * chunk))
        raw.client.publish_wait(raw.topics.data, encode_chunk(tid, 10**6, b"x" * chunk))
        for i in range(offer.chunk_count):
            raw.client.publish_wait(raw.topics.data, encode_chunk(tid, i, data[i * chunk : (i + 1) * chunk]))
        events = raw.events(30, {EventKind.INSTALLED, EventKind.REFUSED, EventKind.FAILED})
        assert events[-1].kind == EventKind.INSTALLED, [(e.kind, e.error) for e in events]
        assert not [e for e in events if e.kind == EventKind.REFUSED]
    finally:
        raw.close()
    deadline = time.monotonic() + 10  # the received file is removed once the install sequence ends
    while list((agent.data_dir / "staging").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.alive and not list((agent.data_dir / "staging").iterdir())


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\xff\xfe not json", "message_invalid"),
        (b'{"schema": 1, "type": "deploy"}', "message_invalid"),
        (b'{"schema": 99, "type": "deploy"}', "message_invalid"),
        (b"[" * 70000, "message_too_large"),
    ],
)
def test_malformed_command_gets_error_event(host, mosquitto, start_agent, payload, code):
    agent = start_agent(mosquitto.url, f"e2e-bad-{code}-{len(payload)}", host.root)
    raw = _Raw(mosquitto.url, agent.device_id)
    try:
        raw.client.publish_wait(raw.topics.cmd, payload)
        events = raw.events(10, {EventKind.ERROR})
        assert events and events[-1].kind == EventKind.ERROR
        assert events[-1].error is not None and events[-1].error.code == code
    finally:
        raw.close()
    assert agent.alive


def test_unreachable_broker_fails_fast(host, tmp_path):
    from mosquitto import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    r = host.run("devices", "--broker", url, "--connect-timeout", "2")
    assert r.code == EXIT_TRANSPORT
    assert "cannot reach MQTT broker" in r.stderr and url.split("//")[1] in r.stderr
    assert r.seconds < 15

    bundle = tmp_path / "nothing.edge"
    r = host.run("deploy", str(bundle), "--device", "x", "--broker", url, "--connect-timeout", "2")
    assert r.code != 0


def test_agent_retries_until_broker_appears(host, start_agent, start_mosquitto):
    from mosquitto import free_port

    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agent = start_agent(url, "e2e-retry", host.root, "--reconnect-max", "2", wait=False)
    time.sleep(3)
    assert agent.alive, agent.log()
    start_mosquitto(port=port)
    wait_online(url, agent.device_id, timeout=20)


def test_agent_reconnects_after_broker_restart(host, tiny_model, start_agent, start_mosquitto, tmp_path):
    broker = start_mosquitto()
    agent = start_agent(broker.url, "e2e-restart", host.root, "--reconnect-max", "2")
    assert agent.log().count("device_agent.agent: connected to ") == 1
    broker.kill()
    time.sleep(1)
    broker.restart()
    bundle = _pack(host, tiny_model, tmp_path / "r.edge", 1)
    # Deploy once the agent says it is back: a command sent before it resubscribes is
    # lost (clean session), and the deploy would wait out its accept timeout.
    deadline = time.monotonic() + 30
    while agent.log().count("device_agent.agent: connected to ") < 2:
        assert time.monotonic() < deadline, "the agent did not reconnect:\n" + agent.log()[-2000:]
        time.sleep(0.2)
    r = _deploy(host, bundle, broker.url, agent.device_id)
    assert r.code == 0, r.stderr + agent.log()[-2000:]


def test_agent_refuses_bad_config(tmp_path):
    r = subprocess.run(
        [
            str(BIN / "edge-agent"),
            "run",
            "--broker",
            "http://x",
            "--device-id",
            "d",
            "--data-dir",
            str(tmp_path),
            "--trusted-key",
            "k",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "mqtt://" in r.stderr
    r = subprocess.run(
        [
            str(BIN / "edge-agent"),
            "run",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--device-id",
            "d",
            "--data-dir",
            str(tmp_path),
            "--trusted-key",
            str(tmp_path / "missing.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 5 and "missing.pub" in r.stderr  # local state: the same code as edgectl's (ExitCode)


def test_deploy_to_absent_device_times_out(host, tiny_model, mosquitto, tmp_path):
    bundle = _pack(host, tiny_model, tmp_path / "b.edge", 1)
    r = host.run("deploy", str(bundle), "--device", "nobody-home", "--broker", mosquitto.url, "--accept-timeout", "2")
    assert r.code == EXIT_TRANSPORT
    assert "nobody-home did not accept the offer within 2 s" in r.stderr
    assert "never seen" in r.stderr


def test_will_marks_killed_agent_offline(host, mosquitto, start_agent):
    agent = start_agent(mosquitto.url, "e2e-will", host.root)
    agent.proc.kill()  # SIGKILL: no goodbye; the broker publishes the will
    agent.proc.wait()
    deadline = time.monotonic() + 20
    while True:
        r = host.run("devices", "--broker", mosquitto.url, "--json", "--wait", "0.5")
        status = {d["device_id"]: d["status"] for d in r.json()}
        if status.get(agent.device_id) == "offline" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status[agent.device_id] == "offline"


def test_graceful_stop_says_offline_and_agent_reads_toml_config(host, mosquitto, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        f'broker = "{mosquitto.url}"\ndevice_id = "e2e-toml"\ndata_dir = "{tmp_path / "data"}"\nroot = "{host.root}"\n'
    )
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(config)], stderr=out)
    try:
        online = wait_online(mosquitto.url, "e2e-toml")
        assert online.platform["kind"] == "generic-linux" and "onnxruntime" in online.runtimes
        # The operator enrols the key the agent made at first start (only enrolled devices are believed).
        enrolled = host.run(
            "devices", "enroll", "e2e-toml", "--key", str(tmp_path / "data" / "identity" / "device.pub")
        )
        assert enrolled.code == 0, enrolled.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0, log.read_text()
    r = host.run("devices", "--broker", mosquitto.url, "--json")
    assert {d["device_id"]: d["status"] for d in r.json()}["e2e-toml"] == "offline"
