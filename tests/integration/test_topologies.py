"""The MQTT link through every broker topology edge-sdk supports, on real brokers.

Mosquitto with MQTT 5 clients and with 3.1.1 clients, the embedded amqtt broker, and two
Mosquittos bridged as in a vehicle (devices on the gateway, the host on the fleet broker).
Also: the CONNACK facts MQTT 5 brings, the fallback of ``protocol="auto"`` to 3.1.1, and a
persistent session that queues QoS 1 messages while its client is away.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid

import pytest
from mosquitto import MosquittoProcess
from topologies import Topology, expect_delivery

from edge_sdk.errors import TransportError
from edge_sdk.mqtt import Incoming, LinkFacts, MqttClient, MqttOptions
from edge_sdk.protocol import DeviceTopics
from host_tools.broker import EmbeddedBroker

pytestmark = pytest.mark.integration


def _received(client: MqttClient, topic: str, count: int, timeout_s: float, prefix: bytes = b"") -> list[bytes]:
    """Payloads arriving on ``topic`` (those starting with ``prefix``) until ``count`` came or the time is up."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        try:
            item = client.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, Incoming) and item.topic == topic and item.payload.startswith(prefix):
            got.append(item.payload)
    return got


def test_qos1_messages_cross_each_topology_both_ways(topology: Topology) -> None:
    device_id, transfer = f"topo-{uuid.uuid4().hex[:8]}", f"edge/v1/transfers/{uuid.uuid4().hex}"
    topics = DeviceTopics(device_id)
    host, device = topology.connect("host", "topo-host"), topology.connect("device", f"edge-agent-{device_id}")
    assert host.link is not None and host.link.protocol == topology.expected_protocol
    assert device.link is not None and device.link.protocol == topology.expected_protocol
    device.subscribe(transfer)
    device.subscribe(topics.cmd)
    host.subscribe(topics.events)

    expect_delivery(device, transfer, lambda p: host.publish_wait(transfer, p))  # the broadcast, fleet -> gateway
    expect_delivery(device, topics.cmd, lambda p: host.publish_wait(topics.cmd, p))
    expect_delivery(host, topics.events, lambda p: device.publish_wait(topics.events, p))  # and back
    big = bytes(range(256)) * 256  # a 64 KiB chunk, byte for byte
    host.publish_wait(transfer, big)
    assert big in _received(device, transfer, 1, 10.0)


def test_mqtt5_connack_facts_come_from_mosquitto_and_bound_the_client(start_mosquitto) -> None:
    broker: MosquittoProcess = start_mosquitto(max_packet_size=200_000, extra_config=("max_inflight_messages 7",))
    topic = f"edge/v1/transfers/{uuid.uuid4().hex}"
    sender = MqttClient(broker.url, MqttOptions(client_id=f"facts-{uuid.uuid4().hex[:8]}", session_expiry_s=60))
    receiver = MqttClient(broker.url, MqttOptions(client_id=f"facts-rx-{uuid.uuid4().hex[:8]}", protocol="3.1.1"))
    try:
        sender.connect()
        receiver.connect()
        assert sender.link == LinkFacts("5", 7, 200_000, False)
        assert sender._client.max_inflight_messages == 7  # min(our 20, the broker's Receive Maximum)
        assert receiver.link == LinkFacts("3.1.1", None, None, False)
        receiver.subscribe(topic)
        expect_delivery(receiver, topic, lambda p: sender.publish_wait(topic, p))
        largest = sender.link.largest_payload(topic, qos=1)
        assert largest is not None and 199_000 < largest < 200_000
        sender.publish_wait(topic, bytes(largest))  # exactly the broker's limit: accepted and delivered
        assert _received(receiver, topic, 1, 10.0) == [bytes(largest)]
        with pytest.raises(TransportError, match="larger than the broker's Maximum Packet Size of 200000 bytes"):
            sender.publish(topic, bytes(largest + 1))
        sender.publish_wait(topic, b"still connected")  # refused here, so the broker never dropped us
        assert _received(receiver, topic, 1, 10.0) == [b"still connected"]
        handles = [sender.publish(topic, b"%d" % i) for i in range(50)]  # more than 7 in flight: paho queues
        for handle in handles:
            handle.wait()
        assert len(_received(receiver, topic, 50, 10.0)) == 50
        assert sender.connected
    finally:
        sender.close()
        receiver.close()
    assert "exceeded" not in broker.log_text().lower()


def test_auto_falls_back_to_mqtt311_against_amqtt(embedded_broker: EmbeddedBroker, caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge_sdk.mqtt")
    topic = f"edge/v1/transfers/{uuid.uuid4().hex}"
    clean = MqttClient(embedded_broker.url, MqttOptions(client_id=f"auto-{uuid.uuid4().hex[:8]}"))
    # A CONNECT with a Session Expiry Interval leaves amqtt waiting for bytes: the CONNACK deadline ends it.
    kept = MqttClient(
        embedded_broker.url,
        MqttOptions(client_id=f"auto-kept-{uuid.uuid4().hex[:8]}", session_expiry_s=60, connack_timeout_s=1.0),
    )
    try:
        started = time.monotonic()
        clean.connect()
        kept.connect()
        assert time.monotonic() - started < 8
        assert clean.link == LinkFacts("3.1.1", None, None, False)
        assert kept.link is not None and kept.link.protocol == "3.1.1"
        kept.subscribe(topic)
        expect_delivery(kept, topic, lambda p: clean.publish_wait(topic, p))
    finally:
        clean.close()
        kept.close()
    said = [r.getMessage() for r in caplog.records if "does not speak MQTT 5" in r.getMessage()]
    assert len(said) == 2, said  # once per client
    assert "Unsupported protocol version" in said[0] and "ended before the broker's CONNACK" in said[1]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_persistent_session_queues_qos1_messages_while_its_client_is_away(mosquitto, protocol: str) -> None:
    client_id, topic = f"away-{uuid.uuid4().hex[:8]}", f"edge/v1/devices/away-{uuid.uuid4().hex[:8]}/cmd"
    options = MqttOptions(client_id=client_id, protocol=protocol, session_expiry_s=30)
    clean_options = MqttOptions(client_id=f"{client_id}-clean", protocol=protocol)
    host = MqttClient(mosquitto.url, MqttOptions(client_id=f"{client_id}-host"))
    away, clean = MqttClient(mosquitto.url, options), MqttClient(mosquitto.url, clean_options)
    try:
        host.connect()
        for client in (away, clean):
            client.connect()
            assert client.link is not None and not client.link.session_present
            client.subscribe(topic)
            expect_delivery(client, topic, lambda p: host.publish_wait(topic, p))
        away.close()
        clean.close()
        sent = [b"queued %d" % i for i in range(5)]
        for payload in sent:
            host.publish_wait(topic, payload)
        time.sleep(2)  # away for a few seconds

        back = MqttClient(mosquitto.url, options)  # a new process would do the same: same id, same options
        clean_back = MqttClient(mosquitto.url, clean_options)
        try:
            back.connect()
            clean_back.connect()
            assert back.link is not None and back.link.session_present
            # All of them, in order. QoS 1 is at least once: the probe sent before the client went
            # away may come again after it (it was in the inbox when the client closed), so only
            # the queued messages are compared.
            assert _received(back, topic, len(sent), 10.0, prefix=b"queued") == sent
            assert clean_back.link is not None and not clean_back.link.session_present
            assert _received(clean_back, topic, 1, 1.0, prefix=b"queued") == []  # a clean session lost them
        finally:
            back.close()
            clean_back.close()
    finally:
        host.close()
