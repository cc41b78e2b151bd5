"""An in-memory :class:`device_agent.transport.Transport` for unit tests of the agent.

It keeps what the agent publishes, in order, and lets a test play the broker: deliver a
message, drop the connection, bring it back. No sockets and no threads of its own.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

from edge_sdk.mqtt import ConnectionChange, InboxSink, Incoming
from edge_sdk.protocol import DeviceStatus, Event, Heartbeat, MetricsReport, SignedReport, decode

__all__ = ["MemoryTransport", "Published"]


@dataclass(frozen=True)
class Published:
    """One message the agent published."""

    topic: str
    payload: bytes
    retain: bool


class _Ack:
    def wait(self, timeout_s: float | None = None) -> None:
        return None


@dataclass
class MemoryTransport:
    """Plays the broker for one agent.

    Attributes:
        published: everything the agent published, oldest first.
        subscriptions: topic filters the agent subscribed to.
    """

    address: str = "memory://broker"
    published: list[Published] = field(default_factory=list)
    subscriptions: list[str] = field(default_factory=list)
    inbox: queue.Queue[Incoming | ConnectionChange] = field(default_factory=queue.Queue)
    sink: InboxSink | None = None
    _connected: bool = False
    network_alive: bool = True
    started: bool = False
    closed: bool = False

    # --- the Transport protocol ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def deliver_to(self, sink: InboxSink) -> None:
        self.sink = sink

    def start(self) -> None:
        self.started = True
        self.reconnect()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscriptions.append(topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        if topic_filter in self.subscriptions:
            self.subscriptions.remove(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> _Ack:
        self.published.append(Published(topic, payload, retain))
        return _Ack()

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.publish(topic, payload, qos, retain)

    def close(self) -> None:
        self.closed = True
        self._connected = False

    # --- playing the broker --------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes) -> None:
        """A message arrives for the agent."""
        self._arrive(Incoming(topic, payload, False))

    def disconnect(self) -> None:
        """The connection drops."""
        self._connected = False
        self._arrive(ConnectionChange(False, "connection lost"))

    def reconnect(self) -> None:
        """The connection is (back) up."""
        self._connected = True
        self._arrive(ConnectionChange(True, "connected"))

    def _arrive(self, item: Incoming | ConnectionChange) -> None:
        """Into the sink the agent gave (as the network thread does), else the inbox."""
        if self.sink is not None:
            self.sink.put(item)
        else:
            self.inbox.put(item)

    # --- reading what the agent said -------------------------------------------------------

    def events(self) -> list[Event]:
        """Every event published, decoded."""
        return [m for m in self._decoded("/events") if isinstance(m, Event)]

    def statuses(self) -> list[DeviceStatus]:
        """Every status published, decoded."""
        return [m for m in self._decoded("/status") if isinstance(m, DeviceStatus)]

    def heartbeats(self) -> list[Heartbeat]:
        """Every heartbeat published, decoded."""
        return [m for m in self._decoded("/heartbeat") if isinstance(m, Heartbeat)]

    def metrics(self) -> list[MetricsReport]:
        """Every metrics report published, decoded."""
        return [m for m in self._decoded("/metrics") if isinstance(m, MetricsReport)]

    def _decoded(self, suffix: str) -> list[object]:
        """The messages published on topics ending in ``suffix``; a device signs each, so each is unwrapped."""
        out: list[object] = []
        for p in self.published:
            if p.topic.endswith(suffix):
                msg = decode(p.payload)
                out.append(decode(msg.message.encode()) if isinstance(msg, SignedReport) else msg)
        return out
