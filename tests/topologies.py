"""Broker topologies for the integration tests: who connects where, with which MQTT version.

Four topologies, each a :class:`Topology` (the ``topology`` fixture in
``tests/integration/conftest.py`` runs a test once per topology):

- ``mosquitto-mqtt5``: one Mosquitto; clients ask for MQTT 5 (``protocol="auto"``).
- ``mosquitto-mqtt311``: the same broker, which speaks both; the clients choose 3.1.1.
- ``amqtt``: the embedded amqtt broker (:class:`host_tools.broker.EmbeddedBroker`), which
  speaks only 3.1.1; clients on ``"auto"`` fall back to it.
- ``bridged``: two Mosquittos, as in a vehicle: devices on the vehicle's gateway broker,
  the host on the fleet's. The gateway's bridge (:func:`bridge_config`, from the shipped
  ``deploy/mosquitto/gateway-bridge.conf.example``) forwards ``edge/v1/devices/#`` both
  ways and ``edge/v1/transfers/#`` from fleet to gateway, QoS 1.

Used by the fixtures; tests use :meth:`Topology.connect` and :func:`expect_delivery`.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions

__all__ = [
    "BRIDGED_IN",
    "BRIDGED_OUT",
    "GATEWAY_BRIDGE",
    "TOPOLOGIES",
    "Topology",
    "bridge_config",
    "expect_delivery",
    "wait_bridged",
]

#: Every topology's name, in the order the ``topology`` fixture runs them.
TOPOLOGIES = ("mosquitto-mqtt5", "mosquitto-mqtt311", "amqtt", "bridged")
#: What the gateway's bridge forwards both ways: everything per device.
BRIDGED_OUT = "edge/v1/devices/#"
#: What it forwards from the fleet broker to the gateway only: the broadcast transfers.
BRIDGED_IN = "edge/v1/transfers/#"
#: The shipped gateway bridge configuration, which the bridged topology runs.
GATEWAY_BRIDGE = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "gateway-bridge.conf.example"


def bridge_config(fleet_port: int, *, client_id: str = "gateway-bridge") -> tuple[str, ...]:
    """The bridge lines of ``deploy/mosquitto/gateway-bridge.conf.example``, pointed at a test's fleet broker.

    Taken as shipped, except the fleet's address (``127.0.0.1:fleet_port``), the client
    id and the TLS files (the test brokers listen without TLS), and a quick restart so a
    test that restarts the fleet broker is not kept waiting.

    Args:
        fleet_port: the fleet broker's loopback port.
        client_id: the client id the bridge uses on the fleet broker.

    Returns:
        Config lines, for ``MosquittoProcess(extra_config=...)`` of the gateway.
    """
    swap = {"address": f"127.0.0.1:{fleet_port}", "remote_clientid": client_id, "restart_timeout": "1 2"}
    lines = []
    for line in GATEWAY_BRIDGE.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#") or words[0].startswith("bridge_"):
            continue
        lines.append(f"{words[0]} {swap[words[0]]}" if words[0] in swap else line)
    assert f"topic {BRIDGED_OUT} both 1" in lines and f"topic {BRIDGED_IN} in 1" in lines, lines
    return tuple(lines)


@dataclass
class Topology:
    """Where the host and the devices connect, and the MQTT version they ask for.

    Attributes:
        name: one of :data:`TOPOLOGIES`.
        host_url: the broker ``edgectl`` connects to.
        device_url: the broker devices connect to (the same one except when bridged).
        protocol: what clients ask for (``MqttOptions.protocol``).
        expected_protocol: what the broker's CONNACK must then say (``LinkFacts.protocol``).
    """

    name: str
    host_url: str
    device_url: str
    protocol: str
    expected_protocol: str
    _clients: list[MqttClient] = field(default_factory=list, repr=False)

    def connect(self, side: str, name: str, **options: object) -> MqttClient:
        """A client connected to the host's (``side="host"``) or the devices' broker.

        Args:
            side: ``"host"`` or ``"device"``.
            name: part of its client id (a random suffix keeps ids apart).
            **options: more :class:`MqttOptions` (``session_expiry_s``, a fixed ``client_id``...).

        Returns:
            The connected client; closed when the fixture ends.
        """
        assert side in ("host", "device"), side
        values: dict[str, object] = {"client_id": f"{name}-{uuid.uuid4().hex[:8]}", "protocol": self.protocol}
        values.update(options)
        client = MqttClient(self.host_url if side == "host" else self.device_url, MqttOptions(**values))  # type: ignore[arg-type]
        self._clients.append(client)
        client.connect()
        return client

    def close(self) -> None:
        """Close every client :meth:`connect` made."""
        for client in self._clients:
            client.close()
        self._clients.clear()


def expect_delivery(
    receiver: MqttClient, topic: str, send: Callable[[bytes], None], *, tries: int = 20, wait_s: float = 0.5
) -> bytes:
    """Send distinct payloads until one reaches ``receiver`` on ``topic``; a subscription may take a moment.

    Args:
        receiver: subscribed to ``topic`` (or a filter matching it).
        topic: where the payload must arrive.
        send: publishes one payload (at QoS 1, on whichever broker the sender is on).
        tries: most payloads sent.
        wait_s: how long each waits for its delivery.

    Returns:
        The payload that arrived.

    Raises:
        AssertionError: none arrived.
    """
    sent: set[bytes] = set()
    for attempt in range(tries):
        payload = f"probe {attempt} {uuid.uuid4().hex}".encode()
        sent.add(payload)
        send(payload)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                item = receiver.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Incoming) and item.topic == topic and item.payload in sent:
                return item.payload
    raise AssertionError(f"nothing sent on {topic} reached {receiver.options.client_id} in {tries} tries")


def wait_bridged(gateway_url: str, fleet_url: str, timeout_s: float = 15.0) -> None:
    """Block until the gateway's bridge forwards both ways (it connects a moment after the broker starts).

    Args:
        gateway_url: the gateway broker.
        fleet_url: the fleet broker.
        timeout_s: how long the bridge has.

    Raises:
        AssertionError: it did not forward both ways in time.
    """
    probe = f"bridge-probe-{uuid.uuid4().hex[:8]}"
    gateway = MqttClient(gateway_url, MqttOptions(client_id=f"{probe}-gw"))
    fleet = MqttClient(fleet_url, MqttOptions(client_id=f"{probe}-fleet"))
    try:
        gateway.connect()
        fleet.connect()
        inward, outward = f"edge/v1/transfers/{probe}", f"edge/v1/devices/{probe}/events"
        gateway.subscribe(inward)
        fleet.subscribe(outward)
        tries = max(1, int(timeout_s / 0.5))
        expect_delivery(gateway, inward, lambda p: fleet.publish_wait(inward, p), tries=tries)
        expect_delivery(fleet, outward, lambda p: gateway.publish_wait(outward, p), tries=tries)
    finally:
        gateway.close()
        fleet.close()
