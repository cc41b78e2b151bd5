"""EmbeddedBroker: a real amqtt broker on a loopback port, driven by paho clients."""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

import host_tools.broker
from edge_sdk.errors import ConfigError, TransportError
from host_tools.broker import EmbeddedBroker

TIMEOUT = 10.0


class _Client:
    """A paho client whose network thread only queues what arrives."""

    def __init__(self, port: int, client_id: str, *, will: tuple[str, bytes] | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected: queue.Queue[object] = queue.Queue()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self._connected.put(rc)
        if will is not None:
            self.paho.will_set(will[0], will[1], qos=1)
        self.port = port

    def connect(self, *, background: bool = True) -> None:
        self.paho.connect("127.0.0.1", self.port, keepalive=30)
        if background:
            self.paho.loop_start()
        else:
            deadline = time.monotonic() + TIMEOUT
            while self._connected.empty() and time.monotonic() < deadline:
                self.paho.loop(timeout=0.1)
        reason = self._connected.get(timeout=TIMEOUT)
        assert not reason.is_failure, reason

    def subscribe(self, topic: str, qos: int = 1) -> None:
        granted: queue.Queue[object] = queue.Queue()
        self.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.put(codes)
        self.paho.subscribe(topic, qos=qos)
        codes = granted.get(timeout=TIMEOUT)
        assert not any(code.is_failure for code in codes), codes

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(port=0) as running:
        yield running


@pytest.fixture
def clients(broker: EmbeddedBroker) -> Iterator[list[_Client]]:
    made: list[_Client] = []
    yield made
    for client in made:
        client.close()


def _connected(broker: EmbeddedBroker, clients: list[_Client], name: str) -> _Client:
    client = _Client(broker.port, name)
    client.connect()
    clients.append(client)
    return client


def test_exports() -> None:
    assert host_tools.broker.__all__ == ["EmbeddedBroker"]


def test_port_zero_picks_a_free_loopback_port(broker: EmbeddedBroker) -> None:
    assert broker.port not in (0, 1883)
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.running
    with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT):
        pass


def test_qos1_roundtrip(broker: EmbeddedBroker, clients: list[_Client]) -> None:
    sub = _connected(broker, clients, "sub")
    pub = _connected(broker, clients, "pub")
    sub.subscribe("edge/v1/devices/+/status", qos=1)

    pub.publish("edge/v1/devices/pi-1/status", b'{"state": "online"}', qos=1)

    msg = sub.messages.get(timeout=TIMEOUT)
    assert msg.topic == "edge/v1/devices/pi-1/status"
    assert msg.payload == b'{"state": "online"}'
    assert msg.qos == 1


def test_256_kib_binary_payload_arrives_intact(broker: EmbeddedBroker, clients: list[_Client]) -> None:
    sub = _connected(broker, clients, "sub")
    pub = _connected(broker, clients, "pub")
    sub.subscribe("edge/v1/devices/pi-1/chunk", qos=1)
    payload = os.urandom(256 * 1024)

    pub.publish("edge/v1/devices/pi-1/chunk", payload, qos=1)

    msg = sub.messages.get(timeout=TIMEOUT)
    assert len(msg.payload) == len(payload)
    assert msg.payload == payload


def test_retained_message_reaches_late_subscriber(broker: EmbeddedBroker, clients: list[_Client]) -> None:
    pub = _connected(broker, clients, "pub")
    pub.publish("edge/v1/devices/pi-1/birth", b"hello", qos=1, retain=True)

    late = _connected(broker, clients, "late")
    late.subscribe("edge/v1/devices/+/birth", qos=1)

    msg = late.messages.get(timeout=TIMEOUT)
    assert msg.payload == b"hello"
    assert msg.retain


def test_will_is_published_when_socket_drops(broker: EmbeddedBroker, clients: list[_Client]) -> None:
    watcher = _connected(broker, clients, "watcher")
    watcher.subscribe("edge/v1/devices/pi-1/status", qos=1)
    device = _Client(broker.port, "pi-1", will=("edge/v1/devices/pi-1/status", b"offline"))
    device.connect(background=False)

    # Drop the TCP connection without an MQTT DISCONNECT, as a power cut would.
    sock = device.paho.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    device.paho.loop(timeout=0.1)  # paho notices the dead socket and closes its side

    msg = watcher.messages.get(timeout=TIMEOUT)
    assert msg.topic == "edge/v1/devices/pi-1/status"
    assert msg.payload == b"offline"


def test_clean_disconnect_does_not_publish_will(broker: EmbeddedBroker, clients: list[_Client]) -> None:
    watcher = _connected(broker, clients, "watcher")
    watcher.subscribe("edge/v1/devices/pi-2/status", qos=1)
    device = _Client(broker.port, "pi-2", will=("edge/v1/devices/pi-2/status", b"offline"))
    device.connect()
    device.close()

    # A message sent after the disconnect arrives first if no will was queued before it.
    marker = _connected(broker, clients, "marker")
    marker.publish("edge/v1/devices/pi-2/status", b"marker", qos=1)
    assert watcher.messages.get(timeout=TIMEOUT).payload == b"marker"


def test_stop_releases_the_port() -> None:
    first = EmbeddedBroker(port=0)
    first.start()
    port = first.port
    client = _Client(port, "c")
    client.connect()
    first.stop()
    assert not first.running
    client.close()

    again = EmbeddedBroker(port=port)
    again.start()
    try:
        assert again.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            pass
    finally:
        again.stop()


def test_stop_is_idempotent() -> None:
    broker = EmbeddedBroker()
    broker.stop()
    broker.start()
    broker.stop()
    broker.stop()


def test_busy_port_gives_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(port=port)
        with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port} is already in use") as info:
            broker.start()
        assert info.value.details["address"] == f"127.0.0.1:{port}"
        assert not broker.running
        broker.stop()  # nothing to stop; must not raise


def test_start_twice_is_refused(broker: EmbeddedBroker) -> None:
    with pytest.raises(ConfigError, match="already started"):
        broker.start()


@pytest.mark.parametrize("port", [-1, 65536, "1883", True])
def test_bad_port_is_config_error(port: object) -> None:
    with pytest.raises(ConfigError, match="port"):
        EmbeddedBroker(port=port)  # type: ignore[arg-type]


def test_bad_host_is_config_error() -> None:
    with pytest.raises(ConfigError, match="host"):
        EmbeddedBroker(host="localhost")


def test_port_unknown_before_start() -> None:
    with pytest.raises(ConfigError, match="start"):
        _ = EmbeddedBroker(port=0).port


def test_serve_runs_until_stop_is_set_then_releases_the_port() -> None:
    import threading

    stop = threading.Event()
    broker = EmbeddedBroker(port=0)
    urls: queue.Queue[str] = queue.Queue()
    server = threading.Thread(target=broker.serve, args=(stop, urls.put))
    server.start()
    try:
        url = urls.get(timeout=TIMEOUT)
        assert url == broker.url and broker.running
        with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT):
            pass
    finally:
        stop.set()
        server.join(TIMEOUT)
    assert not server.is_alive() and not broker.running
