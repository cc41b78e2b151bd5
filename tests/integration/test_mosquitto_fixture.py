"""The Mosquitto fixtures start a real broker that relays messages."""

from __future__ import annotations

import os
import queue
import socket
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from mosquitto import MosquittoProcess

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


class _Client:
    """A paho client whose network thread only queues what arrives."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._events: queue.Queue[object] = queue.Queue()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self._events.put(rc)
        self.paho.on_subscribe = lambda _c, _u, _m, codes, _p: self._events.put(codes)
        self.paho.connect("127.0.0.1", port, keepalive=30)
        self.paho.loop_start()
        reason = self._events.get(timeout=TIMEOUT)
        assert not reason.is_failure, reason

    def subscribe(self, topic: str) -> None:
        self.paho.subscribe(topic, qos=1)
        codes = self._events.get(timeout=TIMEOUT)
        assert not any(code.is_failure for code in codes), codes

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.paho.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def open_client() -> Iterator[Callable[[int], _Client]]:
    made: list[_Client] = []

    def open_one(port: int) -> _Client:
        client = _Client(port)
        made.append(client)
        return client

    yield open_one
    for client in made:
        client.close()


def _relay(pub: _Client, sub: _Client, topic: str, payload: bytes) -> mqtt.MQTTMessage:
    sub.subscribe(topic)
    pub.publish(topic, payload)
    return sub.messages.get(timeout=TIMEOUT)


def test_fixture_broker_relays_a_message(mosquitto: MosquittoProcess, open_client: Callable[[int], _Client]) -> None:
    assert mosquitto.port != 1883
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    sub, pub = open_client(mosquitto.port), open_client(mosquitto.port)

    msg = _relay(pub, sub, "edge/v1/test/fixture-relay", b"ping")

    assert msg.payload == b"ping"
    assert msg.qos == 1
    assert mosquitto.log_path.exists()


def test_fixture_broker_carries_a_1_mib_payload(
    mosquitto: MosquittoProcess, open_client: Callable[[int], _Client]
) -> None:
    sub, pub = open_client(mosquitto.port), open_client(mosquitto.port)
    payload = os.urandom(1024 * 1024)

    msg = _relay(pub, sub, "edge/v1/test/fixture-big", payload)

    assert msg.payload == payload


def test_own_broker_restarts_on_the_same_port(
    start_mosquitto: Callable[..., MosquittoProcess], open_client: Callable[[int], _Client]
) -> None:
    broker = start_mosquitto()
    port = broker.port
    assert broker.running

    broker.kill()
    assert not broker.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()

    broker.restart()
    assert broker.port == port
    sub, pub = open_client(port), open_client(port)
    assert _relay(pub, sub, "edge/v1/test/restart", b"back").payload == b"back"
