"""host_tools.fleet.conversation: hearing one command's answers, with a fake client.

The fake has only what a conversation and its router touch: ``inbox`` and ``subscribe``.
Messages go through the router's ``dispatch`` in the test's own thread, so every test is
deterministic; tests/unit/host_tools/fleet/test_router.py covers the router, and the real broker and agent
drive the same code in the integration tests (deploy, profile, rollback, remove, and
many deploys over one connection).
"""

from __future__ import annotations

import ast
import queue
import time
from pathlib import Path

import pytest
from device_keys import TestDevice, enrolled_gate

import host_tools.fleet.conversation as conversation
from edge_sdk.errors import DeviceTimeoutError, EdgeError, RollbackError
from edge_sdk.mqtt import ConnectionChange, Incoming
from edge_sdk.protocol import DeviceStatus, DeviceTopics, ErrorInfo, Event, EventKind, MetricsReport
from host_tools.fleet.conversation import TERMINAL_KINDS, Conversation, end_state, error_of
from host_tools.fleet.router import Router

DEVICE = "pi-7"
SIGNER = TestDevice(DEVICE)  # the device signs what it says, as a real agent does
COMMAND = "a" * 32
OTHER = "b" * 32
FLEET = Path(__file__).resolve().parents[4] / "host_tools" / "fleet"


class FakeClient:
    """An inbox and a record of subscriptions, like :class:`edge_sdk.mqtt.MqttClient`.

    ``deliver`` hands a message to the router as its worker would, in this thread.
    """

    def __init__(self) -> None:
        self.inbox: queue.Queue[object] = queue.Queue()
        self.subscribed: list[tuple[str, int]] = []
        self.router = Router(self, gate=enrolled_gate(SIGNER))  # type: ignore[arg-type]

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.subscribed.append((topic, qos))

    def deliver(self, topic: str, payload: bytes) -> None:
        self.router.dispatch(Incoming(topic, payload, False))


def _event(kind: str, command_id: str = COMMAND, error: ErrorInfo | None = None) -> bytes:
    return SIGNER.sign(Event(DEVICE, kind, 1.0, command_id=command_id, error=error))


def _metrics(command_id: str = COMMAND) -> bytes:
    return SIGNER.sign(MetricsReport(DEVICE, "digits", 2, "onnxruntime", "int8", 1.0, command_id=command_id))


def test_exports_are_exactly_the_conversation_api() -> None:
    assert sorted(conversation.__all__) == [
        "Conversation",
        "FleetConversation",
        "TERMINAL_KINDS",
        "end_state",
        "error_of",
    ]


@pytest.mark.parametrize(
    ("metrics", "channels"),
    [(True, ("events", "metrics", "status")), (False, ("events", "status"))],
)
def test_open_subscribes_before_anything_is_sent(metrics: bool, channels: tuple[str, ...]) -> None:
    client, topics = FakeClient(), DeviceTopics(DEVICE)
    convo = Conversation.open(client.router, topics, COMMAND, metrics=metrics)
    assert client.subscribed == [(getattr(topics, c), 1) for c in channels]
    assert convo.command_id == COMMAND and convo.last_status is None


def test_next_returns_only_this_commands_answers_and_keeps_the_status() -> None:
    client, topics = FakeClient(), DeviceTopics(DEVICE)
    convo = Conversation(client.router, topics, COMMAND)
    client.router.dispatch(ConnectionChange(True, "connected"))
    client.deliver(topics.events, b"{not json")
    client.deliver(topics.events, _event(EventKind.ACCEPTED, command_id=OTHER))
    client.deliver(topics.status, SIGNER.sign(DeviceStatus(DEVICE, "online", 1.0)))
    client.deliver(topics.metrics, _metrics())
    client.deliver(topics.events, _event(EventKind.INSTALLED))
    deadline = time.monotonic() + 5
    first, second = convo.next(deadline), convo.next(deadline)
    assert isinstance(first, MetricsReport) and first.command_id == COMMAND
    assert isinstance(second, Event) and second.kind == EventKind.INSTALLED
    assert convo.last_status is not None and convo.last_status.state == "online"
    assert convo.next(time.monotonic() + 0.05) is None


def test_wait_for_skips_unwanted_kinds_and_stops_at_a_terminal_one() -> None:
    client, topics = FakeClient(), DeviceTopics(DEVICE)
    convo = Conversation(client.router, topics, COMMAND)
    client.deliver(topics.metrics, _metrics())
    client.deliver(topics.events, _event(EventKind.RECEIVED))
    client.deliver(topics.events, _event(EventKind.REFUSED))
    got = convo.wait_for({EventKind.ACCEPTED}, 5.0, "accept the deploy")
    assert got.kind == EventKind.REFUSED


def test_wait_for_times_out_naming_the_device_and_its_last_status() -> None:
    client, topics = FakeClient(), DeviceTopics(DEVICE)
    convo = Conversation(client.router, topics, COMMAND)
    with pytest.raises(
        DeviceTimeoutError, match=r"device pi-7 did not accept the deploy within 0.05 s \(its last status: never seen\)"
    ):
        convo.wait_for({EventKind.ACCEPTED}, 0.05, "accept the deploy")
    client.deliver(topics.status, SIGNER.sign(DeviceStatus(DEVICE, "offline", 1.0)))
    with pytest.raises(DeviceTimeoutError) as info:
        convo.wait_for({EventKind.ACCEPTED}, 0.05, "accept the deploy")
    assert info.value.details["last_status"] == "offline"


@pytest.mark.parametrize(
    ("kind", "state"),
    [(EventKind.REFUSED, "refused"), (EventKind.ERROR, "refused"), (EventKind.FAILED, "failed")],
)
def test_end_state_by_blame(kind: str, state: str) -> None:
    assert kind in TERMINAL_KINDS
    assert end_state(Event(DEVICE, kind, 1.0)) == state


def test_error_of_rebuilds_the_devices_own_error_type() -> None:
    refused = Event(
        DEVICE, EventKind.REFUSED, 1.0, error=ErrorInfo("rollback", "v1 is older than v2", {"installed": 2})
    )
    err = error_of(refused)
    assert isinstance(err, RollbackError) and err.message == "v1 is older than v2"
    bare = error_of(Event(DEVICE, EventKind.FAILED, 1.0))
    assert type(bare) is EdgeError and "failed without an error" in bare.message


def test_fleet_modules_import_no_private_names_from_each_other() -> None:
    for path in sorted(FLEET.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("host_tools"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports private {private} from {node.module}"


def test_two_conversations_on_one_connection_each_get_their_own_answers() -> None:
    client, topics = FakeClient(), DeviceTopics(DEVICE)
    mine, other = Conversation(client.router, topics, COMMAND), Conversation(client.router, topics, OTHER)
    client.deliver(topics.events, _event(EventKind.ACCEPTED, command_id=OTHER))
    client.deliver(topics.events, _event(EventKind.REFUSED))
    client.deliver(topics.status, SIGNER.sign(DeviceStatus(DEVICE, "online", 1.0)))
    assert mine.wait_for({EventKind.ACCEPTED}, 5.0, "accept").kind == EventKind.REFUSED
    assert other.wait_for({EventKind.ACCEPTED}, 5.0, "accept").kind == EventKind.ACCEPTED
    assert mine.next(time.monotonic() + 0.05) is None and other.next(time.monotonic() + 0.05) is None
    assert mine.last_status is not None and other.last_status is not None


def test_close_stops_listening_and_frees_the_command_id() -> None:
    client, topics = FakeClient(), DeviceTopics(DEVICE)
    with Conversation.open(client.router, topics, COMMAND, metrics=True) as convo:
        assert client.router.conversations == 1
    assert client.router.conversations == 0
    client.deliver(topics.events, _event(EventKind.INSTALLED))
    assert convo.next(time.monotonic() + 0.05) is None
    assert client.router.dropped_unknown == 1
    Conversation(client.router, topics, COMMAND).close()  # the id is free again
