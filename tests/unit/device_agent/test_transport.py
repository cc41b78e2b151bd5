"""device_agent.transport: the bounded inbound queue, its drop count and its rate-limited warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from device_agent.transport import InboundQueue
from edge_sdk.mqtt import ConnectionChange, Incoming, MqttClient, MqttOptions


def _msg(i: int) -> Incoming:
    return Incoming(f"edge/v1/devices/d/data/{i}", b"x", False)


def test_items_leave_in_order_and_get_times_out_when_empty() -> None:
    q = InboundQueue(4)
    assert q.get(0.01) is None
    for i in range(3):
        assert q.put(_msg(i))
    assert [q.get(0.01) for _ in range(3)] == [_msg(0), _msg(1), _msg(2)]
    assert q.get(0.01) is None and q.dropped == 0


def test_a_full_queue_drops_new_messages_but_never_connection_changes() -> None:
    q = InboundQueue(2)
    assert q.put(_msg(0)) and q.put(_msg(1))
    assert not q.put(_msg(2))
    assert q.put(ConnectionChange(False, "lost"))
    assert q.dropped == 1 and len(q) == 3
    assert q.get(0.01) == _msg(0)
    assert q.put(_msg(3))  # room again once the worker took one
    assert [q.get(0.01) for _ in range(3)] == [_msg(1), ConnectionChange(False, "lost"), _msg(3)]


def test_drops_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    q = InboundQueue(1, clock=lambda: now[0], log_every_s=30.0)
    q.put(_msg(0))
    with caplog.at_level(logging.WARNING, logger="device_agent.transport"):
        for i in range(5):
            q.put(_msg(i))
        now[0] += 31
        q.put(_msg(9))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "dropped 1 message(s)" in warnings[0] and "5 since start" not in warnings[0]
    assert "dropped 5 message(s)" in warnings[1] and "6 since start" in warnings[1]
    assert q.dropped == 6


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        InboundQueue(0)


def test_a_client_delivering_into_the_queue_fills_it_from_the_network_thread_and_drops_the_rest() -> None:
    into = InboundQueue(3)
    client = MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="unit-sink"))
    client.deliver_to(into)
    for i in range(5):  # paho's network thread calls this for each message; here, a stand-in message
        client._on_message(None, None, SimpleNamespace(topic=_msg(i).topic, payload=b"x", retain=False, qos=0, mid=0))  # type: ignore[arg-type]
    assert into.dropped == 2 and client.inbox.empty() and client.inbox_dropped == 0
    assert [into.get(0.01) for _ in range(4)] == [_msg(0), _msg(1), _msg(2), None]


def test_the_inbound_queue_is_bounded_in_bytes() -> None:
    q = InboundQueue(100, max_bytes=10)
    assert [q.put(Incoming("t", b"1234", False)) for _ in range(3)] == [True, True, False]
    assert q.dropped == 1 and q.payload_bytes == 8
    q.get(0)
    assert q.payload_bytes == 4 and q.put(Incoming("t", b"123456", False))
