"""Device- and bundle-supplied strings reach the terminal escaped (issue 13, attack 5).

Against a real Mosquitto and real `edgectl` processes, whose stdout and stderr bytes are
read as they are written:

- a client publishing as a device (signing with a key enrolled in the host's registry, as
  a real agent does: the host believes nothing else) reports a platform, runtimes, an
  agent version and a metrics report full of escape sequences, and refuses a deploy with
  an error message full of them; `edgectl devices`, `edgectl metrics` and both deploy
  refusals (the device's, and the host's own, which quotes the device's runtime names)
  print them as visible escapes;
- a bundle whose precision (the packer's free text) holds escape sequences: `edgectl pack`
  prints it escaped, and a real agent's refusal to run it (which quotes it) prints escaped;
  the agent answers a good deploy afterwards.

No output contains ESC, the one-byte CSI (0x9b, in UTF-8 or raw), BEL, backspace,
carriage return or a bidi override/isolate; ``--json`` output is exact JSON.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from device_keys import TestDevice
from harness import BIN, Host, TinyModel

from edge_sdk.metrics import LatencyStats
from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import (
    DeviceStatus,
    DeviceTopics,
    ErrorInfo,
    Event,
    EventKind,
    MetricsReport,
    SignedCommand,
    decode,
    peek_command_id,
)
from host_tools.fleet.registry import open_registry

pytestmark = pytest.mark.integration

# ESC [2J (clear screen), OSC 52 (write "rm -rf ~" to the clipboard), CSI as the one byte
# 0x9b (red), BEL, backspace, carriage return, a right-to-left override and an isolate.
EVIL = "\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\x9b31m\x08\rok\u202eevil\u2066"
SHOWN = "\\x1b[2J\\x1b]52;c;cm0gLXJmIH4=\\x07\\x9b31m\\x08\\x0dok\\u202eevil\\u2066"
#: Byte sequences that must never reach the terminal.
RAW = [b"\x1b", b"\x07", b"\x08", b"\r", b"\x9b", "\x9b".encode(), *(chr(c).encode() for c in (0x202E, 0x2066))]
EXIT_UNTRUSTED = 3


def edgectl(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
    """`edgectl ARGS` with its stdout and stderr as the bytes it wrote."""
    # No progress bar: its carriage returns are edgectl's own, not a device's.
    env = dict(os.environ, EDGE_SDK_HOME=str(home), TQDM_DISABLE="1")
    env.pop("EDGE_SDK_BROKER", None)
    return subprocess.run([str(BIN / "edgectl"), *args], capture_output=True, timeout=timeout, env=env)


def assert_printable(result: subprocess.CompletedProcess[bytes]) -> str:
    """Neither stream holds a raw control or bidi character; returns both, decoded."""
    for name, stream in (("stdout", result.stdout), ("stderr", result.stderr)):
        found = [raw for raw in RAW if raw in stream]
        assert not found, f"{name} carries {found}: {stream!r}"
    return result.stdout.decode() + result.stderr.decode()


def _status(device_id: str, runtimes: dict[str, str]) -> DeviceStatus:
    platform = {"kind": EVIL, "arch": EVIL, "model": EVIL, "memory_bytes": 1 << 30}
    return DeviceStatus(device_id, "online", time.time(), agent_version=EVIL, platform=platform, runtimes=runtimes)


def _metrics(device_id: str) -> MetricsReport:
    latency = LatencyStats(
        count=10, mean_ms=1.0, stdev_ms=0.1, min_ms=0.9, max_ms=2.0, p50_ms=1.0, p90_ms=1.5, p99_ms=2.0,
        throughput_per_s=900.0,
    )  # fmt: skip
    return MetricsReport(device_id, f"digits{EVIL}", 1, EVIL, EVIL, ts=time.time(), latency=latency)


def enrolled_device(home: Path, device_id: str) -> TestDevice:
    """A device with its own key, enrolled in the registry under ``home`` so the host believes it."""
    device = TestDevice(device_id)
    with open_registry(home / "registry.db") as reg:
        reg.ensure_schema()
        reg.enroll(device_id, device.public_hex, time.time())
    return device


@contextmanager
def forged_device(url: str, device: TestDevice, runtimes: dict[str, str]) -> Iterator[None]:
    """A client publishing as ``device``, signed: retained status and metrics, and a refusal of every command."""
    device_id = device.device_id
    topics = DeviceTopics(device_id)
    client = MqttClient(url, MqttOptions(client_id=f"forged-{device_id}-{os.getpid()}"))
    client.connect()
    stop = threading.Event()

    def refuse_commands() -> None:
        while not stop.is_set():
            try:
                item = client.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not isinstance(item, Incoming) or item.topic != topics.cmd:
                continue
            msg = decode(item.payload)
            if isinstance(msg, SignedCommand):
                error = ErrorInfo("target_mismatch", f"no room for it {EVIL}", {"why": EVIL})
                refusal = Event(device_id, EventKind.REFUSED, time.time(), command_id=peek_command_id(msg), error=error)
                client.publish(topics.events, device.sign(refusal))

    client.subscribe(topics.cmd)
    client.publish_wait(topics.status, device.sign(_status(device_id, runtimes)), retain=True)
    client.publish_wait(topics.metrics, device.sign(_metrics(device_id)), retain=True)
    worker = threading.Thread(target=refuse_commands, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(5)
        for topic in (topics.status, topics.metrics):
            client.publish_wait(topic, b"", retain=True)
        client.close()


def test_devices_metrics_and_deploy_refusals_print_a_forged_devices_strings_escaped(
    host: Host, tiny_model: TinyModel, mosquitto, tmp_path: Path
) -> None:
    bundle = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "digits-v1.bundle", "digits")
    with (
        forged_device(mosquitto.url, enrolled_device(host.home, "escapes-1"), {"onnxruntime": "1.0", EVIL: "1"}),
        forged_device(mosquitto.url, enrolled_device(host.home, "escapes-2"), {EVIL: "1"}),
    ):
        devices = edgectl(host.home, "devices", "--broker", mosquitto.url, "--wait", "0.5")
        assert devices.returncode == 0, devices.stderr
        text = assert_printable(devices)
        rows = [line for line in text.splitlines() if line.startswith("escapes-")]
        assert len(rows) == 2 and all(f"online  {SHOWN}  {SHOWN}" in row for row in rows), text

        as_json = edgectl(host.home, "devices", "--broker", mosquitto.url, "--wait", "0.5", "--json")
        assert_printable(as_json)
        mine = [d for d in json.loads(as_json.stdout) if d["device_id"].startswith("escapes-")]
        assert [d["platform"]["kind"] for d in mine] == [EVIL, EVIL]  # exact JSON: the string as sent

        metrics = edgectl(host.home, "metrics", "--broker", mosquitto.url)
        assert metrics.returncode == 0, metrics.stderr
        text = assert_printable(metrics)
        assert f"escapes-1  digits{SHOWN} v1  {SHOWN} {SHOWN} x1" in text, text

        # The device refuses: its error message is printed escaped, with its blame's exit code.
        refused = edgectl(host.home, "deploy", str(bundle), "--device", "escapes-1", "--broker", mosquitto.url)
        text = assert_printable(refused)
        assert refused.returncode == EXIT_UNTRUSTED, text
        assert f"edgectl: error [target_mismatch]: no room for it {SHOWN}" in text

        # The host refuses before sending, quoting the runtime names the device reported.
        refused = edgectl(host.home, "deploy", str(bundle), "--device", "escapes-2", "--broker", mosquitto.url)
        text = assert_printable(refused)
        assert refused.returncode == EXIT_UNTRUSTED, text
        assert f"which device escapes-2 lacks (it has {SHOWN}," in text

        shown_json = edgectl(host.home, "deploy", str(bundle), "--device", "escapes-1", "--broker", mosquitto.url,
                             "--json")  # fmt: skip
        assert_printable(shown_json)
        assert json.loads(shown_json.stdout)["error"]["message"] == f"no room for it {EVIL}"


def test_a_bundles_strings_print_escaped_and_a_real_agents_refusal_too(
    host: Host, tiny_model: TinyModel, mosquitto, start_agent, tmp_path: Path
) -> None:
    # The packer's free text (precision) holds the escape sequences: pack prints it escaped.
    pack = edgectl(
        host.home, "pack", str(tiny_model.path), "-o", str(tmp_path / "evil.bundle"), "--name", "digits",
        "--version", "1", "--sample", str(tiny_model.sample), "--precision", f"fp32{EVIL}",
    )  # fmt: skip
    assert pack.returncode == 0, pack.stderr
    assert f"(onnxruntime, fp32{SHOWN}, " in assert_printable(pack)
    verify = edgectl(host.home, "verify", str(tmp_path / "evil.bundle"), "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["manifest"]["precision"] == f"fp32{EVIL}"
    assert_printable(verify)

    # A real agent refuses to run it, quoting the bundle's string; the refusal prints escaped.
    agent = start_agent(mosquitto.url, "escapes-agent", host.root)
    deploy = edgectl(
        host.home, "deploy", str(tmp_path / "evil.bundle"), "--device", "escapes-agent", "--broker", mosquitto.url,
        "--runs", "10", "--warmup", "1", "--min-duration", "0",
    )  # fmt: skip
    text = assert_printable(deploy)
    assert deploy.returncode != 0 and "unknown precision 'fp32\\x1b[2J" in text, text

    # The agent still answers a good deploy afterwards.
    good = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "good.bundle", "digits", 2)
    assert host.deploy_metrics(good, mosquitto.url, "escapes-agent", runs=10, warmup=1)["bundle_version"] == 2
    assert agent.alive
