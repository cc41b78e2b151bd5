"""One signed command's conversation with one device, heard through a router.

Deploy, profile, rollback and remove each send one command and then read the device's
answers to it: events and metrics reports carrying that command's id. The
:class:`~host_tools.fleet.router.Router` of the connection delivers exactly those into the
conversation's own bounded mailbox, and the device's statuses to every conversation of
that device, whose latest value is kept so that a timeout can say what the device was
last doing. So one connection carries many conversations at once, each read by its own
thread; junk and other commands' answers never reach a conversation.

:mod:`host_tools.fleet.deployer` and :mod:`host_tools.fleet.profiler` share this module;
neither reaches into the other.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from typing import Literal, TypeVar

from edge_sdk.errors import DeviceTimeoutError, EdgeError, error_from_code
from edge_sdk.mqtt import MqttClient
from edge_sdk.protocol import DeviceStatus, DeviceTopics, Event, EventKind, MetricsReport
from host_tools.fleet.router import Router

__all__ = ["TERMINAL_KINDS", "Conversation", "FleetConversation", "end_state", "error_of"]

T = TypeVar("T")

#: Event kinds that end a command without success: the device's error says why.
TERMINAL_KINDS: frozenset[str] = frozenset({EventKind.REFUSED, EventKind.FAILED, EventKind.ERROR})


class Conversation:
    """Events and metrics reports of one command, delivered by the connection's router.

    Listening starts when it is made (the router delivers to it from then on) and ends with
    :meth:`close`; use it as a context manager.

    Attributes:
        last_status: the device's latest status, None until one is heard.

    Args:
        router: the router of the connection the command goes out on.
        topics: the device's topics.
        command_id: the command whose answers are wanted.
        transfer_id: the command's transfer, if any (answers naming only it are wanted too).

    Raises:
        ConfigError: another open conversation already waits for this command or transfer.
    """

    def __init__(self, router: Router, topics: DeviceTopics, command_id: str, *, transfer_id: str = "") -> None:
        self.router = router
        self.topics = topics
        self.command_id = command_id
        self.transfer_id = transfer_id
        self.last_status: DeviceStatus | None = None
        self._mailbox: queue.Queue[Event | MetricsReport] = queue.Queue(router.mailbox_max)
        router.register(topics.device_id, (command_id, transfer_id), self)

    @property
    def client(self) -> MqttClient:
        """The connection this conversation is heard on."""
        return self.router.client

    @classmethod
    def open(
        cls, router: Router, topics: DeviceTopics, command_id: str, *, metrics: bool, transfer_id: str = ""
    ) -> Conversation:
        """Listen for the command's answers, then subscribe to the device's channels.

        The channels (QoS 1) are its events, its metrics when wanted, and its status.

        Args:
            router: the running router of a connected client.
            topics: the device's topics.
            command_id: the command about to be sent.
            metrics: also hear the device's metrics reports (deploy and profile do).
            transfer_id: the command's transfer, if any.

        Returns:
            The conversation, ready before the command goes out so no answer is missed.

        Raises:
            TransportError: the broker connection failed.
            ConfigError: another open conversation already waits for this command.
        """
        convo = cls(router, topics, command_id, transfer_id=transfer_id)
        channels = (topics.events, topics.metrics, topics.status) if metrics else (topics.events, topics.status)
        try:
            for topic in channels:
                router.client.subscribe(topic, qos=1)
        except BaseException:
            convo.close()
            raise
        return convo

    def close(self) -> None:
        """Stop listening: the router forgets this conversation. Idempotent."""
        self.router.unregister(self.topics.device_id, self)

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the router's side (its worker thread) -----------------------------------------

    def offer(self, msg: Event | MetricsReport) -> bool:
        """Take an answer into the mailbox without blocking; False when the mailbox is full."""
        try:
            self._mailbox.put_nowait(msg)
        except queue.Full:
            return False
        return True

    def note_status(self, status: DeviceStatus) -> None:
        """Remember the device's latest status."""
        self.last_status = status

    # --- the reader's side ---------------------------------------------------------------

    def next(self, deadline: float) -> Event | MetricsReport | None:
        """The next event or metrics report of this command, or None at the deadline.

        Args:
            deadline: a :func:`time.monotonic` time.
        """
        return _take(self._mailbox, deadline)

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


class FleetConversation:
    """One command's answers from each of many devices, in one mailbox: a deploy to a fleet.

    Each device has its own command (its own id, signed for it) for the same transfer; the
    router delivers each device's answers here, tagged with the device, in arrival order.

    Attributes:
        last_status: each device's latest status, once heard.

    Args:
        router: the router of the connection the commands go out on.
        ids: per device, the (command id, transfer id) whose answers are wanted.

    Raises:
        ConfigError: another open conversation already waits for one of these.
    """

    def __init__(self, router: Router, ids: Mapping[str, tuple[str, str]]) -> None:
        self.router = router
        self.last_status: dict[str, DeviceStatus] = {}
        self._mailbox: queue.Queue[tuple[str, Event | MetricsReport]] = queue.Queue(
            router.mailbox_max * max(1, len(ids))
        )
        self._devices: list[str] = []
        try:
            for device_id, (command_id, transfer_id) in ids.items():
                router.register(device_id, (command_id, transfer_id), self)
                self._devices.append(device_id)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, router: Router, ids: Mapping[str, tuple[str, str]]) -> FleetConversation:
        """Listen for the commands' answers, then subscribe to each device's events, metrics and status.

        Raises:
            TransportError: the broker connection failed.
            ConfigError: another open conversation already waits for one of these.
        """
        convo = cls(router, ids)
        try:
            for device_id in ids:
                topics = DeviceTopics(device_id)
                for topic in (topics.events, topics.metrics, topics.status):
                    router.client.subscribe(topic, qos=1)
        except BaseException:
            convo.close()
            raise
        return convo

    def close(self) -> None:
        """Stop listening. Idempotent."""
        for device_id in self._devices:
            self.router.unregister(device_id, self)

    def __enter__(self) -> FleetConversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def offer(self, msg: Event | MetricsReport) -> bool:
        """Take an answer into the mailbox without blocking; False when the mailbox is full."""
        try:
            self._mailbox.put_nowait((msg.device_id, msg))
        except queue.Full:
            return False
        return True

    def note_status(self, status: DeviceStatus) -> None:
        """Remember the device's latest status."""
        self.last_status[status.device_id] = status

    def next(self, deadline: float) -> tuple[str, Event | MetricsReport] | None:
        """The next (device id, answer), or None at the deadline (a :func:`time.monotonic` time)."""
        return _take(self._mailbox, deadline)


def _take(mailbox: queue.Queue[T], deadline: float) -> T | None:
    """The next item of a mailbox, or None at ``deadline`` (:func:`time.monotonic`); at once if it has passed."""
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            return mailbox.get_nowait()
        return mailbox.get(timeout=remaining)
    except queue.Empty:
        return None


def end_state(event: Event) -> Literal["refused", "failed"]:
    """The outcome state of a terminal event: ``refused`` (refused, error) or ``failed``."""
    return "refused" if event.kind in (EventKind.REFUSED, EventKind.ERROR) else "failed"


def error_of(event: Event) -> EdgeError:
    """The device's error in a terminal event, rebuilt as its own :class:`EdgeError` type."""
    if event.error is None:
        return EdgeError(f"device reported {event.kind} without an error")
    return error_from_code(event.error.code, event.error.message, **event.error.details)
