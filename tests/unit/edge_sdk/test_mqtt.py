"""edge_sdk.mqtt: the inbox is bounded; what does not fit is dropped, counted and logged.

The network thread's callbacks are called directly with stand-ins for paho's message
(no broker): they only convert and hand over, which is what is tested here. The real
broker drives the same callbacks in the integration tests.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import DEFAULT_INBOX_MAX, ConnectAttempts, ConnectionChange, Incoming, MqttClient, MqttOptions


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


# --- connection attempts: each one logged, with its cause and the next delay ----------------


def test_connect_attempts_mirror_paho_backoff_and_say_when_to_log_at_info() -> None:
    attempts = ConnectAttempts(1, 30)
    seen = []
    for _ in range(25):
        attempts.next_attempt()
        seen.append(attempts.failed())
    delays = [d for d, _ in seen]
    assert delays[:7] == [1, 2, 4, 8, 16, 30, 30] and set(delays[6:]) == {30}
    loud = [n for n, (_, is_loud) in enumerate(seen, start=1) if is_loud]
    assert loud == [1, 2, 3, 4, 5, 6, 10, 20]  # the first, each growth of the delay, every tenth after
    assert attempts.attempt == 25
    assert attempts.connected() == 25 and attempts.attempt == 0
    assert attempts.lost() == 1  # paho waits the minimum after a lost connection ...
    attempts.next_attempt()
    assert attempts.failed() == (2, True)  # ... and doubles it after the next failure


def test_each_failed_attempt_is_logged_with_its_cause_and_the_next_delay(caplog: pytest.LogCaptureFixture) -> None:
    client = _client(10)
    caplog.set_level(logging.DEBUG, logger="edge_sdk.mqtt")
    for _ in range(3):
        client._on_pre_connect(client._client, None)
        client._client.connect_error = ConnectionRefusedError(111, "Connection refused")
        client._on_connect_fail(client._client, None)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "edge_sdk.mqtt"]
    assert (logging.DEBUG, "connecting to mqtt://127.0.0.1:1 as unit-inbox with MQTT 5 (attempt 1)") in lines
    failures = [(level, text) for level, text in lines if text.startswith("cannot connect")]
    assert [level for level, _ in failures] == [logging.INFO] * 3
    assert "(attempt 3): connection failed: [Errno 111] Connection refused; next attempt in 4 s" in failures[2][1]


def test_an_unreachable_broker_is_not_silent(caplog: pytest.LogCaptureFixture) -> None:
    """A real socket to a closed loopback port: attempts are logged at INFO within seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.INFO, logger="edge_sdk.mqtt")
    client = MqttClient(f"mqtt://127.0.0.1:{port}", MqttOptions(client_id="unit-closed"))
    client.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot connect")]
            if len(failures) >= 2:
                break
            time.sleep(0.1)
    finally:
        client.close()
    assert len(failures) >= 2, failures
    assert f"127.0.0.1:{port} (attempt 1)" in failures[0] and "next attempt in 1 s" in failures[0]
    assert "(attempt 2)" in failures[1] and "next attempt in 2 s" in failures[1]


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_a_missing_tls_file_is_named_with_its_key_and_path(key: str, tmp_path: Path) -> None:
    present = tmp_path / "present.pem"
    present.write_text("not read before the missing file is named")
    files = {k: present for k in ("ca_file", "cert_file", "key_file")}
    files[key] = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as caught:
        MqttClient("mqtts://127.0.0.1:1", MqttOptions(client_id="unit-tls", **files))
    assert caught.value.message == f"TLS {key} {tmp_path / 'missing.pem'} does not exist"
    assert caught.value.details["key"] == key


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
