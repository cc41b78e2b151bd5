"""device_agent.transport: the bounded inbound queue, its drop count and its rate-limited warning."""

from __future__ import annotations

import logging
import threading
import time
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


# --- batches: one wake-up for a burst of chunks ----------------------------------------------


def _chunk_msg(i: int) -> Incoming:
    return Incoming(f"edge/v1/transfers/t/{i}", b"c", False)


def _is_chunk(item: object) -> bool:
    return isinstance(item, Incoming) and item.topic.startswith("edge/v1/transfers/")


def test_a_batch_is_everything_waiting_in_order_up_to_its_bound() -> None:
    q = InboundQueue(100, bulk=_is_chunk, gather=2, linger_s=0.0)
    assert q.get_batch(0.01) == []
    items = [_chunk_msg(0), _msg(1), ConnectionChange(False, "lost"), _chunk_msg(3), _chunk_msg(4)]
    for item in items:
        q.put(item)
    assert q.get_batch(0.01, max_items=3) == items[:3]
    assert q.get_batch(0.01) == items[3:]
    assert len(q) == 0 and q.payload_bytes == 0


def test_a_lone_chunk_lingers_for_its_burst_but_not_past_linger_s() -> None:
    q = InboundQueue(100, bulk=_is_chunk, gather=4, linger_s=0.2)
    q.put(_chunk_msg(0))
    threading.Timer(0.05, lambda: [q.put(_chunk_msg(i)) for i in (1, 2, 3)]).start()
    started = time.monotonic()
    assert q.get_batch(1.0) == [_chunk_msg(i) for i in range(4)]  # one batch: the burst gathered
    assert time.monotonic() - started < 0.19  # ended by the fourth chunk, not by linger_s
    q.put(_chunk_msg(9))
    started = time.monotonic()
    assert q.get_batch(1.0) == [_chunk_msg(9)]  # nothing more came: out after linger_s
    assert 0.15 <= time.monotonic() - started < 0.9


def test_a_command_or_a_connection_change_ends_lingering_at_once() -> None:
    for urgent in (_msg(1), ConnectionChange(True, "up")):
        q = InboundQueue(100, bulk=_is_chunk, gather=64, linger_s=5.0)
        q.put(_chunk_msg(0))
        threading.Timer(0.05, q.put, (urgent,)).start()
        started = time.monotonic()
        assert q.get_batch(1.0) == [_chunk_msg(0), urgent]
        assert time.monotonic() - started < 2.0
        q.put(urgent)  # waiting with a chunk behind it: no lingering at all
        q.put(_chunk_msg(1))
        started = time.monotonic()
        assert q.get_batch(1.0) == [urgent, _chunk_msg(1)]
        assert time.monotonic() - started < 2.0


def test_gather_and_linger_are_checked() -> None:
    with pytest.raises(ValueError):
        InboundQueue(4, gather=0)
    with pytest.raises(ValueError):
        InboundQueue(4, linger_s=-1.0)
