"""edge_sdk.mqtt: the inbox is bounded; what does not fit is dropped, counted and logged.

The network thread's callbacks are called directly with stand-ins for paho's message
(no broker): they only convert and hand over, which is what is tested here. The real
broker drives the same callbacks in the integration tests.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_sdk.errors import ConfigError, TransportError
from edge_sdk.mqtt import (
    DEFAULT_INBOX_MAX,
    DEFAULT_MAX_INFLIGHT,
    ConnectAttempts,
    ConnectionChange,
    Incoming,
    LinkFacts,
    MqttClient,
    MqttOptions,
    publish_packet_size,
    take_waiting,
)


def _client(inbox_max: int) -> MqttClient:
    return MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="unit-inbox", inbox_max=inbox_max))


def _receive(client: MqttClient, n: int) -> None:
    for i in range(n):
        client._on_message(None, None, SimpleNamespace(topic=f"t/{i}", payload=b"x", retain=False, qos=0, mid=0))  # type: ignore[arg-type]


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


def test_a_sink_takes_what_arrives_instead_of_the_inbox_and_only_before_the_start() -> None:
    taken: list[Incoming | ConnectionChange] = []

    class Sink:
        def put(self, item: Incoming | ConnectionChange) -> bool:
            taken.append(item)
            return len(taken) <= 1  # the sink bounds and counts; the client does not

    client = _client(1)
    client.deliver_to(Sink())
    _receive(client, 3)
    assert [m.topic for m in taken if isinstance(m, Incoming)] == ["t/0", "t/1", "t/2"]
    assert client.inbox.empty() and client.inbox_dropped == 0
    client._started = True  # as start() leaves it, without a connection attempt
    with pytest.raises(ConfigError, match="before the client starts"):
        client.deliver_to(Sink())


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
        client._on_message(None, None, SimpleNamespace(topic=f"t/{i}", payload=b"1234", retain=False, qos=0, mid=0))  # type: ignore[arg-type]
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


# --- protocol versions, CONNACK facts, sessions -----------------------------------------------


def _connack(**values: int) -> Properties:
    properties = Properties(PacketTypes.CONNACK)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


class _Recorder:
    """Stands in for paho's client where a callback subscribes and unsubscribes through it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def subscribe(self, topic_filter: str, qos: int) -> None:
        self.calls.append(("subscribe", topic_filter))

    def unsubscribe(self, topic_filter: str) -> None:
        self.calls.append(("unsubscribe", topic_filter))


_OK = ReasonCode(PacketTypes.CONNACK, identifier=0)
_NO_MQTT5 = ReasonCode(PacketTypes.CONNACK, aName="Unsupported protocol version")


def _connected(client: MqttClient, session_present: bool = False, **connack: int) -> _Recorder:
    recorder = _Recorder()
    client._on_pre_connect(client._client, None)
    client._on_connect(recorder, None, SimpleNamespace(session_present=session_present), _OK, _connack(**connack))  # type: ignore[arg-type]
    return recorder


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"protocol": "4"}, "MQTT protocol must be one of auto, 5, 3.1.1"),
        ({"protocol": "mqtt5"}, "MQTT protocol must be one of"),
        ({"session_expiry_s": -1}, "session_expiry_s must be an integer of seconds in 0..4294967295"),
        ({"session_expiry_s": 2**32}, "session_expiry_s must be an integer"),
        ({"session_expiry_s": True}, "session_expiry_s must be an integer"),
        ({"session_expiry_s": 1.5}, "session_expiry_s must be an integer"),
        ({"session_expiry_s": 60, "client_id": ""}, "needs a client_id"),
        ({"max_inflight": 0}, "max_inflight must be an integer in 1..65535"),
        ({"connack_timeout_s": 0}, "connack_timeout_s must be a positive number"),
        ({"connack_timeout_s": "5"}, "connack_timeout_s must be a positive number"),
    ],
)
def test_bad_protocol_session_and_inflight_options_are_refused_by_name(options: dict[str, object], says: str) -> None:
    values: dict[str, object] = {"client_id": "x", **options}
    with pytest.raises(ConfigError, match=re.escape(says)):
        MqttOptions(**values)  # type: ignore[arg-type]


def test_the_paho_client_asks_for_the_protocol_and_session_the_options_say() -> None:
    import paho.mqtt.client as paho

    assert MqttOptions(client_id="x").protocol == "auto" and MqttOptions(client_id="x").session_expiry_s == 0
    auto = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x"))
    assert auto._client.protocol == paho.MQTTv5
    old = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x", protocol="3.1.1", session_expiry_s=60))
    assert old._client.protocol == paho.MQTTv311 and old._client._clean_session is False
    clean = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x", protocol="3.1.1"))
    assert clean._client._clean_session is True


def test_connack_facts_are_kept_and_receive_maximum_lowers_the_inflight_cap() -> None:
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x", max_inflight=32))
    assert client.link is None and client._client.max_inflight_messages == 32
    _connected(client, session_present=True, ReceiveMaximum=7, MaximumPacketSize=100_000)
    assert client.link == LinkFacts("5", 7, 100_000, True)
    assert client._client.max_inflight_messages == 7
    change = client.inbox.get_nowait()
    assert change == ConnectionChange(True, "connected", LinkFacts("5", 7, 100_000, True))
    _connected(client, ReceiveMaximum=1000)  # a broker that takes more: our own cap stays
    assert client._client.max_inflight_messages == 32 and client.link == LinkFacts("5", 1000, None, False)


def test_a_broker_that_says_nothing_or_zero_leaves_the_bounds_unsaid() -> None:
    client = _client(10)
    _connected(client)
    assert client.link == LinkFacts("5", None, None, False)
    zero = SimpleNamespace(ReceiveMaximum=0, MaximumPacketSize=0)  # paho decodes what a broker sends; it may be 0
    client._on_connect(_Recorder(), None, SimpleNamespace(session_present=False), _OK, zero)  # type: ignore[arg-type]
    assert client.link == LinkFacts("5", None, None, False)
    assert client._client.max_inflight_messages == DEFAULT_MAX_INFLIGHT


def test_auto_falls_back_to_mqtt_311_once_when_the_broker_refuses_mqtt5(caplog: pytest.LogCaptureFixture) -> None:
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x", session_expiry_s=60))
    caplog.set_level(logging.INFO, logger="edge_sdk.mqtt")
    for _ in range(2):
        client._on_pre_connect(client._client, None)
        client._on_connect(client._client, None, SimpleNamespace(session_present=False), _NO_MQTT5, None)  # type: ignore[arg-type]
    assert not client._client.speaks_mqtt5
    assert client._client._clean_session is False  # the session is still asked for, the 3.1.1 way
    assert client._client._connect_properties is None
    said = [r.getMessage() for r in caplog.records if "does not speak MQTT 5" in r.getMessage()]
    assert said == [
        "mqtt://127.0.0.1:1 does not speak MQTT 5 (broker refused the connection: Unsupported protocol version): "
        "using MQTT 3.1.1 from now on"
    ]
    _connected(client)
    assert client.link is not None and client.link.protocol == "3.1.1"


def test_auto_falls_back_when_the_connection_ends_before_the_connack() -> None:
    client = _client(10)
    client._started = True  # as after start(), without a network thread
    client._on_pre_connect(client._client, None)
    client._on_disconnect(client._client, None, None, "Keep alive timeout", None)  # type: ignore[arg-type]
    assert not client._client.speaks_mqtt5
    assert "ended before the broker's CONNACK (Keep alive timeout)" in client._last_error
    client._started = False


def test_a_pinned_protocol_or_a_broker_that_once_took_mqtt5_never_falls_back() -> None:
    pinned = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x", protocol="5"))
    pinned._on_pre_connect(pinned._client, None)
    pinned._on_connect(pinned._client, None, SimpleNamespace(session_present=False), _NO_MQTT5, None)  # type: ignore[arg-type]
    assert pinned._client.speaks_mqtt5
    known = _client(10)
    _connected(known)
    known._connected.clear()
    known._on_pre_connect(known._client, None)
    known._on_connect(known._client, None, SimpleNamespace(session_present=False), _NO_MQTT5, None)  # type: ignore[arg-type]
    assert known._client.speaks_mqtt5  # a restarted broker answering oddly once is not a 3.1.1 broker


def test_a_connection_refused_at_tcp_level_is_not_a_reason_to_fall_back() -> None:
    client = _client(10)
    client._started = True
    client._on_pre_connect(client._client, None)
    client._client.connect_error = ConnectionRefusedError(111, "Connection refused")
    client._on_connect_fail(client._client, None)
    client._on_disconnect(client._client, None, None, "gone", None)  # type: ignore[arg-type]
    assert client._client.speaks_mqtt5
    client._started = False


def test_a_publish_larger_than_the_brokers_maximum_packet_size_is_refused_naming_both() -> None:
    client = _client(10)
    _connected(client, MaximumPacketSize=100)
    fits = client.link.largest_payload("t/x", qos=1)  # type: ignore[union-attr]
    assert fits == 100 - 1 - 1 - (2 + 3 + 2 + 1)
    client.publish("t/x", bytes(fits))  # not connected: paho queues it; nothing refused here
    with pytest.raises(TransportError) as caught:
        client.publish("t/x", bytes(fits + 1))
    assert "101 bytes" in caught.value.message and "Maximum Packet Size of 100 bytes" in caught.value.message
    assert caught.value.details == {"topic": "t/x", "packet_bytes": 101, "maximum_packet_size": 100}


@pytest.mark.parametrize(
    ("topic", "payload", "qos", "protocol", "size"),
    [
        ("a", 10, 1, "5", 18),  # 1 + 1 length byte + (2 + 1 topic + 2 id + 1 properties + 10)
        ("a", 10, 1, "3.1.1", 17),
        ("a", 10, 0, "5", 16),
        ("a", 200, 1, "5", 209),  # remaining length 206 takes two bytes
        ("é", 0, 0, "3.1.1", 6),  # the topic's UTF-8 bytes count
    ],
)
def test_publish_packet_size_counts_every_header_byte(
    topic: str, payload: int, qos: int, protocol: str, size: int
) -> None:
    assert publish_packet_size(topic, payload, qos, protocol) == size


@pytest.mark.parametrize("maximum", [20, 127, 128, 129, 130, 131, 16_383, 16_384, 16_387, 16_388, 1_114_112])
@pytest.mark.parametrize("topic", ["t", "edge/v1/transfers/" + "f" * 64, "x" * 200])
def test_the_largest_payload_fits_and_one_byte_more_does_not(maximum: int, topic: str) -> None:
    link = LinkFacts("5", None, maximum, False)
    largest = link.largest_payload(topic, qos=1)
    assert largest is not None
    if publish_packet_size(topic, 0, 1, "5") <= maximum:
        assert publish_packet_size(topic, largest, 1, "5") <= maximum
    else:
        assert largest == 0  # not even an empty payload fits
    assert publish_packet_size(topic, largest + 1, 1, "5") > maximum
    assert LinkFacts("3.1.1", None, None, False).largest_payload(topic) is None


def test_link_facts_are_validated() -> None:
    with pytest.raises(ConfigError, match="protocol"):
        LinkFacts("4", None, None, False)
    with pytest.raises(ConfigError, match="receive_maximum"):
        LinkFacts("5", 0, None, False)


def test_unsubscribe_drops_the_filter_from_every_later_connection() -> None:
    client = _client(10)
    client.subscribe("a/#")
    client.subscribe("b/#")
    client.unsubscribe("a/#")
    client.unsubscribe("never/subscribed")  # harmless
    recorder = _connected(client)
    assert recorder.calls == [("subscribe", "b/#")]


def test_a_persistent_session_unsubscribes_offline_drops_when_the_broker_kept_the_session() -> None:
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x", session_expiry_s=60))
    client.subscribe("a/#")
    client.subscribe("b/#")
    client.unsubscribe("a/#")  # offline: the broker's session still has it
    client.subscribe("c/#")
    client.unsubscribe("c/#")
    client.subscribe("c/#")  # subscribed again: not to be unsubscribed
    recorder = _connected(client, session_present=True)
    assert recorder.calls == [("unsubscribe", "a/#"), ("subscribe", "b/#"), ("subscribe", "c/#")]
    client._connected.clear()
    assert _connected(client, session_present=True).calls == [("subscribe", "b/#"), ("subscribe", "c/#")]
    client.unsubscribe("b/#")
    assert _connected(client, session_present=False).calls == [("subscribe", "c/#")]  # no session: nothing to undo


def test_the_connack_deadline_ends_an_attempt_the_broker_never_answers() -> None:
    """A listening socket that accepts and never answers (as amqtt does with some MQTT 5 CONNECTs)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        client = MqttClient(
            f"mqtt://127.0.0.1:{port}", MqttOptions(client_id="unit-silent", connack_timeout_s=0.5, protocol="5")
        )
        started = time.monotonic()
        client.start()
        try:
            deadline = started + 10
            while "CONNACK" not in client._last_error and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            client.close()
        assert "ended before the broker's CONNACK" in client._last_error
        assert time.monotonic() - started < 5  # not paho's keep-alive (30 s)


# --- acknowledgements after the owner stored a message (manual_ack) ----------------------


def _manual(receive_maximum: int = 10) -> MqttClient:
    options = MqttOptions(client_id="unit-ack", manual_ack=True, receive_maximum=receive_maximum, inbox_max=10)
    return MqttClient("mqtt://127.0.0.1:1", options)


def _deliver(client: MqttClient, mid: int) -> Incoming:
    client._on_message(None, None, SimpleNamespace(topic="t/x", payload=b"x", retain=False, qos=1, mid=mid))  # type: ignore[arg-type]
    items = [client.inbox.get_nowait() for _ in range(client.inbox.qsize())]
    assert isinstance(items[-1], Incoming)  # after the connection changes, if any
    return items[-1]


def test_manual_ack_sends_the_puback_only_when_the_owner_acks_and_only_on_the_same_connection() -> None:
    client = _manual()
    _connected(client)
    sent: list[tuple[int, int]] = []
    client._client._send_puback = lambda mid: sent.append((mid, 1)) or MQTTErrorCode.MQTT_ERR_SUCCESS  # type: ignore[method-assign]
    first = _deliver(client, 7)
    assert first.qos == 1 and first.mid == 7 and first.link_epoch == 1
    assert sent == []  # paho did not acknowledge it on receipt
    assert client.ack(first) and sent == [(7, 1)]

    stale = _deliver(client, 8)
    _connected(client)  # a new connection: packet id 8 may name another message now
    assert not client.ack(stale) and sent == [(7, 1)]  # the broker sends it again instead
    assert client.ack(_deliver(client, 8)) and sent == [(7, 1), (8, 1)]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"manual_ack": True}, "manual_ack needs a receive_maximum"),
        ({"receive_maximum": 20, "inbox_max": 10}, "receive_maximum must be an integer in 1..10"),
        ({"receive_maximum": 0}, "receive_maximum must be an integer"),
    ],
)
def test_manual_ack_needs_a_receive_maximum_the_inbox_can_hold(options: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        MqttOptions(client_id="unit", **options)  # type: ignore[arg-type]


# --- an incoming PUBLISH, decoded with one copy of its payload ----------------------------------


def _publish_body(topic: bytes, qos: int, payload: bytes, properties: bytes | None) -> bytes:
    """A PUBLISH after its fixed header: topic, packet id (QoS>0), properties (MQTT 5), payload."""
    body = len(topic).to_bytes(2, "big") + topic + ((4242).to_bytes(2, "big") if qos else b"")
    if properties is not None:
        body += len(properties).to_bytes(1, "big") + properties
    return body + payload


_USER_PROPERTY = b"\x26" + (1).to_bytes(2, "big") + b"k" + (1).to_bytes(2, "big") + b"v"
_EXPIRY = b"\x02" + (30).to_bytes(4, "big")


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("properties", [None, b"", _EXPIRY + _USER_PROPERTY])
def test_a_publish_decodes_as_paho_decodes_it(qos: int, properties: bytes | None) -> None:
    from paho.mqtt._packet import decode_publish
    from paho.mqtt.enums import MQTTProtocolVersion

    from edge_sdk.mqtt import _decode_publish

    mqtt5 = properties is not None
    body = _publish_body(b"edge/v1/transfers/ab", qos, b"\x00chunk" * 5000, properties)
    protocol = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
    theirs = decode_publish(0x30 | qos << 1, bytearray(body), protocol)
    topic, mid, props, payload = _decode_publish(memoryview(bytearray(body)), qos, mqtt5)
    assert (topic, mid, payload) == (theirs.topic, theirs.mid, theirs.payload)
    assert type(payload) is bytes  # the callback's bytes(...) is then no copy
    if properties:
        assert props is not None and props.json() == theirs.properties.json()
        assert props.MessageExpiryInterval == 30 and props.UserProperty == [("k", "v")]
    else:
        assert props is None  # none carried: none parsed


@pytest.mark.parametrize(
    "body, qos, mqtt5",
    [
        (b"\x00", 0, False),  # shorter than the topic length
        (b"\x00\x09abc", 0, False),  # the topic overruns the packet
        (b"\x00\x00payload", 0, False),  # MQTT 3.1.1 forbids an empty topic
        (b"\x00\x01t\x00", 1, False),  # the packet id overruns
        (b"\x00\x01t\x00\x01\x05\x02", 1, True),  # the properties overrun
        (b"\x00\x01t\x00\x01\xff\xff\xff\xff\x01", 1, True),  # a properties length of five bytes
        (b"\x00\x01t\x00\x01", 1, True),  # no properties length at all
    ],
)
def test_a_malformed_publish_is_a_protocol_error_not_a_crash(body: bytes, qos: int, mqtt5: bool) -> None:
    from paho.mqtt.exception import MalformedPacket

    from edge_sdk.mqtt import _decode_publish

    with pytest.raises(MalformedPacket):
        _decode_publish(memoryview(body), qos, mqtt5)


@pytest.mark.parametrize("manual_ack", [False, True])
def test_an_incoming_publish_reaches_the_sink_as_bytes_and_is_acknowledged_unless_acks_are_manual(
    manual_ack: bool,
) -> None:
    ack_options: dict[str, object] = {"manual_ack": True, "receive_maximum": 16} if manual_ack else {}
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="unit-publish", **ack_options))  # type: ignore[arg-type]
    got: list[Incoming] = []
    client.deliver_to(SimpleNamespace(put=lambda item: got.append(item) or True))  # type: ignore[arg-type]
    acks: list[int] = []
    paho_client = client._client
    paho_client._send_puback = lambda mid: acks.append(mid) or MQTTErrorCode.MQTT_ERR_SUCCESS  # type: ignore[method-assign]
    paho_client._in_packet["command"] = 0x32  # PUBLISH, QoS 1
    paho_client._in_packet["packet"] = bytearray(_publish_body(b"edge/v1/transfers/ab", 1, b"frame", b""))
    assert paho_client._handle_publish() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [Incoming("edge/v1/transfers/ab", b"frame", False, 1, 4242, 0)]
    assert type(got[0].payload) is bytes
    assert acks == ([] if manual_ack else [4242])


def test_take_waiting_takes_a_batch_under_one_lock_and_keeps_the_byte_count() -> None:
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="unit-take", inbox_max=10))
    assert take_waiting(client.inbox, 5, 0) == []  # nothing waiting, no wait
    for i in range(7):
        client._on_message(None, None, SimpleNamespace(topic=f"t/{i}", payload=b"1234", retain=False, qos=0, mid=i))  # type: ignore[arg-type]
    first = take_waiting(client.inbox, 5, 0)
    assert [m.topic for m in first] == [f"t/{i}" for i in range(5)]  # type: ignore[union-attr]
    assert client.inbox.qsize() == 2 and client.inbox.payload_bytes == 8
    assert [m.topic for m in take_waiting(client.inbox, 5, 0)] == ["t/5", "t/6"]  # type: ignore[union-attr]
    assert client.inbox.payload_bytes == 0

    started = time.monotonic()
    assert take_waiting(client.inbox, 5, 0.1) == []  # waited for one, none came
    assert time.monotonic() - started >= 0.09
    late = threading.Timer(0.05, client.inbox.put, (ConnectionChange(True, "back"),))
    late.start()
    assert take_waiting(client.inbox, 5, 5.0) == [ConnectionChange(True, "back")]  # woken by the first item
    late.join()
