"""edge_sdk.mqtt: the inbox is bounded; what does not fit is dropped, counted and logged.

The network thread's callbacks are called directly with stand-ins for paho's message
(no broker): they only convert and hand over, which is what is tested here. The real
broker drives the same callbacks in the integration tests.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import DEFAULT_INBOX_MAX, ConnectionChange, Incoming, MqttClient, MqttOptions


def _client(inbox_max: int) -> MqttClient:
    return MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="unit-inbox", inbox_max=inbox_max))


def _receive(client: MqttClient, n: int) -> None:
    for i in range(n):
        client._on_message(None, None, SimpleNamespace(topic=f"t/{i}", payload=b"x", retain=False))  # type: ignore[arg-type]


def test_the_default_bound_is_positive_and_a_bad_one_is_refused() -> None:
    assert MqttOptions(client_id="x").inbox_max == DEFAULT_INBOX_MAX > 0
    with pytest.raises(ConfigError, match="inbox bound"):
        MqttOptions(client_id="x", inbox_max=0)


def test_a_full_inbox_drops_new_messages_counts_and_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    client = _client(3)
    _receive(client, 5)
    assert client.inbox.qsize() == 3 and client.inbox_dropped == 2
    kept = [client.inbox.get_nowait() for _ in range(3)]
    assert [m.topic for m in kept if isinstance(m, Incoming)] == ["t/0", "t/1", "t/2"]  # oldest kept, in order
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "edge_sdk.mqtt"]
    assert len(warnings) == 1 and "dropped t/3" in warnings[0].getMessage()  # the first drop, not each one
    _receive(client, 1)  # room again once the owner has caught up
    assert client.inbox.qsize() == 1 and client.inbox_dropped == 2


def test_a_connection_change_finds_room_in_a_full_inbox() -> None:
    client = _client(2)
    _receive(client, 4)
    client._on_disconnect(None, None, None, "gone", None)  # type: ignore[arg-type]
    assert client.inbox_dropped == 2  # nothing: the client was never connected, so nothing to say
    client._connected.set()
    client._on_disconnect(None, None, None, "gone", None)  # type: ignore[arg-type]
    items = [client.inbox.get_nowait() for _ in range(client.inbox.qsize())]
    assert len(items) == 3 and items[-1] == ConnectionChange(False, "gone")
    assert client.inbox_dropped == 2


def test_a_topic_that_is_not_utf8_is_counted_and_dropped_and_the_next_message_goes_through() -> None:
    import paho.mqtt.client as paho

    client = _client(10)
    bad = paho.MQTTMessage(topic=b"edge/devices/\xff/cmd")
    bad.payload = b"x"
    client._on_message(None, None, bad)  # type: ignore[arg-type]  # must not raise: it would end paho's thread
    assert client.rejected == 1 and client.inbox.qsize() == 0
    good = paho.MQTTMessage(topic=b"edge/devices/d/cmd")
    good.payload = b"y"
    client._on_message(None, None, good)  # type: ignore[arg-type]
    assert client.inbox.get_nowait() == Incoming("edge/devices/d/cmd", b"y", False)


def test_no_exception_leaves_a_callback_not_even_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(10)

    def no_memory(item: object) -> None:
        raise MemoryError

    monkeypatch.setattr(client.inbox, "put_nowait", no_memory)
    _receive(client, 2)
    client._connected.set()
    client._on_disconnect(None, None, None, "gone", None)  # type: ignore[arg-type]
    client._on_connect(None, None, None, None, None)  # type: ignore[arg-type]  # reason_code None: AttributeError
    assert client.callback_errors == 4


def test_the_inbox_is_bounded_in_bytes_too() -> None:
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="unit-bytes", inbox_max_bytes=10))
    for i in range(4):
        client._on_message(None, None, SimpleNamespace(topic=f"t/{i}", payload=b"1234", retain=False))  # type: ignore[arg-type]
    assert client.inbox.qsize() == 2 and client.inbox.payload_bytes == 8 and client.inbox_dropped == 2
    client.inbox.get_nowait()
    assert client.inbox.payload_bytes == 4
    with pytest.raises(ConfigError, match="byte bound"):
        MqttOptions(client_id="x", inbox_max_bytes=0)


def test_network_alive_follows_the_network_thread() -> None:
    import threading

    client = _client(10)
    assert client.network_alive  # not started: nothing to watch
    client.start()  # nothing listens on port 1: the thread keeps retrying
    try:
        assert client.network_alive
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        running = client._client._thread
        client._client._thread = dead  # what an exception escaping paho's loop leaves behind
        assert not client.network_alive
        client._client._thread = running
    finally:
        client.close()
