"""The shipped Mosquitto queue settings, run for real: a device away keeps a whole window of chunks.

The host keeps at most a window of chunks (64) beyond the slowest device in flight, so the
most a device's queue at the broker must hold is that window, what was in flight, and the
device's own commands. Mosquitto runs with the sizes and queue settings of
``deploy/mosquitto/mosquitto.conf.example`` as shipped (without its TLS listener); a device
with a persistent session goes away, the host publishes a full window of 64 KiB chunks
plus commands, and the device gets every one back, in order, when it returns.
"""

from __future__ import annotations

import queue
import time
import uuid
from pathlib import Path

import pytest
from topologies import expect_delivery

from edge_sdk.mqtt import Incoming, LinkFacts, MqttClient, MqttOptions
from edge_sdk.protocol import DeviceTopics
from host_tools.fleet.deployer import DeployOptions

pytestmark = pytest.mark.integration

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf.example"
#: The settings taken as shipped.
QUEUE_SETTINGS = (
    "max_packet_size",
    "max_inflight_messages",
    "max_queued_messages",
    "max_queued_bytes",
    "persistent_client_expiration",
)
WINDOW = DeployOptions().window


def _shipped() -> dict[str, str]:
    values = {}
    for line in SHIPPED.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] in QUEUE_SETTINGS:
            values[words[0]] = words[1]
    assert set(values) == set(QUEUE_SETTINGS), values
    return values


def test_a_device_away_gets_a_full_window_of_chunks_and_its_commands_back(start_mosquitto) -> None:
    shipped = _shipped()
    broker = start_mosquitto(
        max_packet_size=int(shipped["max_packet_size"]),
        extra_config=tuple(f"{k} {v}" for k, v in shipped.items() if k != "max_packet_size"),
    )
    device_id, transfer = f"queue-{uuid.uuid4().hex[:8]}", f"edge/v1/transfers/{uuid.uuid4().hex}"
    cmd = DeviceTopics(device_id).cmd
    options = MqttOptions(client_id=f"edge-agent-{device_id}", session_expiry_s=60)
    host = MqttClient(broker.url, MqttOptions(client_id=f"queue-host-{uuid.uuid4().hex[:8]}"))
    device = MqttClient(broker.url, options)
    try:
        host.connect()
        device.connect()
        inflight = int(shipped["max_inflight_messages"])
        assert device.link == LinkFacts("5", inflight, int(shipped["max_packet_size"]), False)
        device.subscribe(transfer)
        device.subscribe(cmd)
        expect_delivery(device, transfer, lambda p: host.publish_wait(transfer, p))
        device.close()

        chunks = [i.to_bytes(4, "big") + bytes(64 * 1024 - 4) for i in range(WINDOW + inflight)]
        commands = [b"command %d" % i for i in range(10)]
        pending = [host.publish(transfer, chunk) for chunk in chunks]
        pending += [host.publish(cmd, command) for command in commands]
        for handle in pending:
            handle.wait()

        back = MqttClient(broker.url, options)
        try:
            back.connect()
            assert back.link is not None and back.link.session_present
            got: dict[str, list[bytes]] = {transfer: [], cmd: []}
            deadline = time.monotonic() + 20
            while len(got[transfer]) + len(got[cmd]) < len(chunks) + len(commands) and time.monotonic() < deadline:
                try:
                    item = back.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                if isinstance(item, Incoming) and item.topic in got:
                    got[item.topic].append(item.payload)
        finally:
            back.close()
        assert [c[:4] for c in got[transfer]] == [c[:4] for c in chunks]  # every chunk, in order, none dropped
        assert got[cmd] == commands
    finally:
        host.close()
        device.close()
    assert "dropped" not in broker.log_text().lower()
