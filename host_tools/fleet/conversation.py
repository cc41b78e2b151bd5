"""One signed command's conversation with one device, heard through the client's inbox.

Deploy, profile, rollback and remove each send one command and then read the device's
answers to it: events and metrics reports carrying that command's id. Everything else
in the inbox is passed over, except the device's status, whose latest value is kept so
that a timeout can say what the device was last doing. A malformed message is logged
and skipped: a device (or anyone on the broker) cannot end a conversation with junk.

:mod:`host_tools.fleet.deployer` and :mod:`host_tools.fleet.profiler` share this module;
neither reaches into the other.
"""

from __future__ import annotations

import logging
import queue
import time

from edge_sdk.errors import DeviceTimeoutError, EdgeError, MessageError, error_from_code
from edge_sdk.mqtt import Incoming, MqttClient
from edge_sdk.protocol import CodecLimits, DeviceStatus, DeviceTopics, Event, EventKind, MetricsReport, decode

__all__ = ["TERMINAL_KINDS", "Conversation", "end_state", "error_of"]

log = logging.getLogger(__name__)

#: Event kinds that end a command without success: the device's error says why.
TERMINAL_KINDS: frozenset[str] = frozenset({EventKind.REFUSED, EventKind.FAILED, EventKind.ERROR})


class Conversation:
    """Events and metrics reports of one command, read from the client's inbox.

    Args:
        client: a connected client, subscribed to the device's topics (see :meth:`open`).
        topics: the device's topics.
        command_id: the command whose answers are wanted.
    """

    def __init__(self, client: MqttClient, topics: DeviceTopics, command_id: str) -> None:
        self.client = client
        self.topics = topics
        self.command_id = command_id
        self.last_status: DeviceStatus | None = None
        self.limits = CodecLimits()

    @classmethod
    def open(cls, client: MqttClient, topics: DeviceTopics, command_id: str, *, metrics: bool) -> Conversation:
        """Subscribe (QoS 1) to the device's events, its metrics when wanted, and its status.

        Args:
            client: a connected client.
            topics: the device's topics.
            command_id: the command about to be sent.
            metrics: also hear the device's metrics reports (deploy and profile do).

        Returns:
            The conversation, ready before the command goes out so no answer is missed.

        Raises:
            TransportError: the broker connection failed.
        """
        convo = cls(client, topics, command_id)
        channels = (topics.events, topics.metrics, topics.status) if metrics else (topics.events, topics.status)
        for topic in channels:
            client.subscribe(topic, qos=1)
        return convo

    def next(self, deadline: float) -> Event | MetricsReport | None:
        """The next event or metrics report of this command, or None at the deadline.

        Args:
            deadline: a :func:`time.monotonic` time.
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                item = self.client.inbox.get(timeout=remaining)
            except queue.Empty:
                return None
            if not isinstance(item, Incoming):
                continue
            try:
                msg = decode(item.payload, self.limits)
            except MessageError as exc:
                log.warning("ignoring malformed message on %s: %s", item.topic, exc.message)
                continue
            if isinstance(msg, DeviceStatus):
                self.last_status = msg
            elif isinstance(msg, (Event, MetricsReport)) and msg.command_id == self.command_id:
                return msg

    def wait_for(self, wanted: set[str], timeout_s: float, what: str) -> Event:
        """The next event of a wanted kind, or a terminal one (refused, failed, error).

        Args:
            wanted: the event kinds to return besides :data:`TERMINAL_KINDS`.
            timeout_s: how long the device has.
            what: what the device should do, for the timeout's message ("accept the deploy").

        Raises:
            DeviceTimeoutError: no such event in time; it names the device's last status.
        """
        device_id = self.topics.device_id
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.next(deadline)
            if msg is None:
                state = self.last_status.state if self.last_status else "never seen"
                raise DeviceTimeoutError(
                    f"device {device_id} did not {what} within {timeout_s:g} s (its last status: {state})",
                    device_id=device_id,
                    last_status=state,
                )
            if isinstance(msg, Event) and (msg.kind in wanted or msg.kind in TERMINAL_KINDS):
                return msg


def end_state(event: Event) -> str:
    """The outcome state of a terminal event: ``refused`` (refused, error) or ``failed``."""
    return "refused" if event.kind in (EventKind.REFUSED, EventKind.ERROR) else "failed"


def error_of(event: Event) -> EdgeError:
    """The device's error in a terminal event, rebuilt as its own :class:`EdgeError` type."""
    if event.error is None:
        return EdgeError(f"device reported {event.kind} without an error")
    return error_from_code(event.error.code, event.error.message, **event.error.details)
