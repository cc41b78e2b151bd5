"""host_tools.fleet.router: one connection's messages, each to the conversation it belongs to.

Fake messages go through ``Router.dispatch`` in the test's thread (what the worker does
with every inbox item); one test runs the worker itself over a fake client's inbox.
Devices sign what they say (tests/device_keys.py), as real agents do; the routers here
have them enrolled.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest
from device_keys import TestDevice, enrolled_gate

import host_tools.fleet.router as router_module
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import ConnectionChange, Incoming
from edge_sdk.protocol import DeviceStatus, DeviceTopics, Event, EventKind, MetricsReport, RootUpdate, encode
from host_tools.fleet.conversation import Conversation
from host_tools.fleet.router import Router, routed

A, B = DeviceTopics("pi-a"), DeviceTopics("pi-b")
DEVICES = {d: TestDevice(d) for d in ["pi-a", "pi-b", *(f"pi-{i}" for i in range(12))]}
CMD1, CMD2, TRANSFER = "1" * 32, "2" * 32, "t" * 32


class FakeClient:
    """The part of :class:`edge_sdk.mqtt.MqttClient` a router and its conversations touch."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Incoming | ConnectionChange] = queue.Queue()
        self.subscribed: list[str] = []

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.subscribed.append(topic)


def _router(mailbox_max: int = 8) -> Router:
    return Router(FakeClient(), mailbox_max=mailbox_max, gate=_gate())  # type: ignore[arg-type]


def _gate():  # type: ignore[no-untyped-def]
    return enrolled_gate(*DEVICES.values())


def _signed(msg: DeviceStatus | Event | MetricsReport) -> bytes:
    return DEVICES[msg.device_id].sign(msg)


def _event(topics: DeviceTopics, kind: str, command_id: str = "", transfer_id: str = "") -> Incoming:
    msg = Event(topics.device_id, kind, 1.0, command_id=command_id, transfer_id=transfer_id)
    return Incoming(topics.events, _signed(msg), False)


def _metrics(topics: DeviceTopics, command_id: str) -> Incoming:
    msg = MetricsReport(topics.device_id, "tiny", 1, "onnxruntime", "fp32", 1.0, command_id=command_id)
    return Incoming(topics.metrics, _signed(msg), True)


def _status(topics: DeviceTopics, state: str) -> Incoming:
    return Incoming(topics.status, _signed(DeviceStatus(topics.device_id, state, 1.0)), True)


def _drain(convo: Conversation) -> list[Event | MetricsReport]:
    out = []
    while (msg := convo.next(time.monotonic() + 0.01)) is not None:
        out.append(msg)
    return out


def test_exports_are_exactly_the_router_api() -> None:
    assert sorted(router_module.__all__) == ["DEFAULT_MAILBOX_MAX", "Listener", "Router", "gated", "routed"]


def test_routes_by_device_and_command_id() -> None:
    router = _router()
    a1, a2 = Conversation(router, A, CMD1), Conversation(router, A, CMD2)
    b1 = Conversation(router, B, CMD1)  # the same command id on another device is another conversation
    router.dispatch(_event(A, EventKind.ACCEPTED, CMD2))
    router.dispatch(_event(B, EventKind.REFUSED, CMD1))
    router.dispatch(_event(A, EventKind.ACCEPTED, CMD1))
    router.dispatch(_metrics(A, CMD1))
    got_a1, got_a2, got_b1 = _drain(a1), _drain(a2), _drain(b1)
    assert [type(m).__name__ for m in got_a1] == ["Event", "MetricsReport"]
    assert all(m.command_id == CMD1 and m.device_id == "pi-a" for m in got_a1)
    assert [(m.device_id, m.command_id) for m in got_a2] == [("pi-a", CMD2)]
    assert [(m.device_id, m.command_id) for m in got_b1] == [("pi-b", CMD1)]
    assert (router.delivered, router.dropped_unknown, router.dropped_full) == (4, 0, 0)


def test_the_topic_names_the_device_not_the_payload() -> None:
    router = _router()
    convo = Conversation(router, A, CMD1)
    forged = Event("pi-a", EventKind.INSTALLED, 1.0, command_id=CMD1)
    router.dispatch(Incoming(B.events, _signed(forged), False))  # pi-b's topic, claiming to be pi-a
    # Signed by pi-a but published on pi-b's topic: refused outright, before any routing.
    assert _drain(convo) == [] and router.rejected == 1 and router.dropped_unknown == 0


def test_an_event_naming_only_the_transfer_reaches_its_conversation() -> None:
    router = _router()
    convo = Conversation(router, A, CMD1, transfer_id=TRANSFER)
    router.dispatch(_event(A, EventKind.FAILED, transfer_id=TRANSFER))
    assert [m.kind for m in _drain(convo)] == [EventKind.FAILED]  # type: ignore[union-attr]


def test_unknown_ids_and_other_message_types_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    router = _router()
    Conversation(router, A, CMD1)
    caplog.set_level(logging.DEBUG, logger="host_tools.fleet.router")
    router.dispatch(_event(A, EventKind.DONE))  # a root update's answer: no command id
    router.dispatch(_metrics(A, CMD2))  # the retained report of an earlier deploy
    router.dispatch(_event(B, EventKind.ACCEPTED, CMD1))  # no conversation with pi-b
    router.dispatch(Incoming(A.events, encode(RootUpdate({"signed": {}})), False))  # not a signed device message
    assert router.dropped_unknown == 3 and router.rejected == 1 and router.delivered == 0
    assert sum("no conversation" in r.getMessage() for r in caplog.records) == 3


def test_malformed_messages_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    router = _router()
    convo = Conversation(router, A, CMD1)
    router.dispatch(Incoming(A.events, b"{not json", False))
    elsewhere = _signed(Event("pi-a", "accepted", 1.0, command_id=CMD1))
    router.dispatch(Incoming("elsewhere/pi-a/events", elsewhere, False))
    router.dispatch(ConnectionChange(False, "gone"))  # not a message: noted, not counted
    assert router.malformed == 2 and _drain(convo) == []
    assert sum(r.levelno == logging.WARNING and "malformed" in r.getMessage() for r in caplog.records) == 2


def test_each_conversation_is_bounded_and_overflow_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    router = _router(mailbox_max=3)
    flooded, quiet = Conversation(router, A, CMD1), Conversation(router, A, CMD2)
    for _ in range(10):
        router.dispatch(_event(A, EventKind.NEED_CHUNKS, CMD1))
    router.dispatch(_event(A, EventKind.ACCEPTED, CMD2))
    assert len(_drain(flooded)) == 3
    assert [m.command_id for m in _drain(quiet)] == [CMD2]  # one full mailbox does not block another
    assert (router.dropped_full, router.delivered) == (7, 4)
    assert sum(r.levelno == logging.WARNING and "is full" in r.getMessage() for r in caplog.records) == 7


def test_status_reaches_every_conversation_of_its_device_and_only_those() -> None:
    router = _router(mailbox_max=1)
    a1, a2, b1 = Conversation(router, A, CMD1), Conversation(router, A, CMD2), Conversation(router, B, CMD1)
    router.dispatch(_event(A, EventKind.ACCEPTED, CMD1))  # a1's mailbox is now full
    router.dispatch(_status(A, "offline"))
    assert a1.last_status is not None and a1.last_status.state == "offline"  # statuses bypass the mailbox
    assert a2.last_status is not None and a2.last_status.state == "offline"
    assert b1.last_status is None
    assert router.dropped_full == 0 and router.last_status("pi-a") == a1.last_status
    late = Conversation(router, A, "3" * 32)  # opened later: starts with what the device last said
    assert late.last_status is not None and late.last_status.state == "offline"
    with pytest.raises(Exception, match=r"its last status: offline"):
        a2.wait_for({EventKind.INSTALLED}, 0.01, "install")


def test_close_unregisters_and_later_answers_count_as_unknown() -> None:
    router = _router()
    convo = Conversation.open(router, A, CMD1, metrics=False, transfer_id=TRANSFER)
    assert router.client.subscribed == [A.events, A.status]  # type: ignore[attr-defined]
    assert router.conversations == 1
    convo.close()
    convo.close()  # idempotent
    assert router.conversations == 0
    router.dispatch(_event(A, EventKind.ACCEPTED, CMD1))
    router.dispatch(_event(A, EventKind.ACCEPTED, transfer_id=TRANSFER))
    router.dispatch(_status(A, "online"))
    assert router.dropped_unknown == 2 and convo.last_status is None and _drain(convo) == []


def test_one_id_has_one_conversation_at_a_time() -> None:
    router = _router()
    first = Conversation(router, A, CMD1)
    with pytest.raises(ConfigError, match="already waits"):
        Conversation(router, A, CMD1)
    first.close()
    Conversation(router, A, CMD1)


def test_the_mailbox_bound_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        _router(mailbox_max=0)


def test_the_worker_drains_the_inbox_for_many_threads_at_once() -> None:
    client = FakeClient()
    devices = [DeviceTopics(f"pi-{i}") for i in range(12)]
    wanted = {t.device_id: EventKind.INSTALLED if i % 2 else EventKind.REFUSED for i, t in enumerate(devices)}
    results: dict[str, str] = {}
    with Router(client, gate=_gate()) as router:  # type: ignore[arg-type]
        convos = {t.device_id: Conversation(router, t, CMD1) for t in devices}

        def wait(device_id: str) -> None:
            results[device_id] = convos[device_id].wait_for({EventKind.INSTALLED}, 10.0, "install").kind

        threads = [threading.Thread(target=wait, args=(t.device_id,)) for t in devices]
        for th in threads:
            th.start()
        for t in reversed(devices):
            client.inbox.put(_event(t, EventKind.ACCEPTED, CMD1))
            client.inbox.put(_event(t, wanted[t.device_id], CMD1))
        for th in threads:
            th.join(15)
    assert not router.running  # closed: the worker stopped
    assert results == wanted
    assert router.delivered == 2 * len(devices) and client.inbox.empty()


def test_routed_lends_the_given_router_or_runs_its_own_for_the_call() -> None:
    client, other = FakeClient(), FakeClient()
    shared = Router(client)  # type: ignore[arg-type]
    with routed(client, shared) as r:  # type: ignore[arg-type]
        assert r is shared and shared.running
    assert shared.running  # its owner closes it, not the call
    shared.close()
    with routed(client, None) as own:  # type: ignore[arg-type]
        assert own is not shared and own.running
    assert not own.running
    with pytest.raises(ConfigError, match="another connection"), routed(other, shared):  # type: ignore[arg-type]
        pass
