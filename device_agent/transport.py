"""What the agent needs from its connection, and the bounded queue between it and the worker.

:class:`Transport` is the seam: publish, subscribe, and a sink that takes inbound messages
and connection changes. :class:`edge_sdk.mqtt.MqttClient` satisfies it as it is
(structurally, nothing to inherit); unit tests pass an in-memory one.

The network side never waits for the worker: the transport's network thread puts each
message straight into an :class:`InboundQueue` bounded in messages and in payload bytes
(:meth:`Transport.deliver_to`; one hand-off a message, no thread in between). While the
worker is busy (a health check, a benchmark) and the queue is full, new messages are
dropped, counted and logged, so a flood costs messages, never the device's memory. The
count of drops goes out in the device's status (``inbound_dropped``). Dropping is safe for
this protocol: a lost chunk is asked for again at ``transfer_end``, and a lost
command is one the host times out on and retries. Connection changes are never dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edge_sdk.mqtt import ConnectionChange, Incoming

__all__ = [
    "DEFAULT_INBOUND_MAX",
    "DEFAULT_INBOUND_MAX_BYTES",
    "InboundQueue",
    "PublishAck",
    "Transport",
]

log = logging.getLogger(__name__)

#: Default bound of the agent's inbound queue, in messages (1024 chunks of 64 KiB: 64 MiB).
DEFAULT_INBOUND_MAX = 1024
#: Default bound of the payload bytes held in memory between the network and the worker.
DEFAULT_INBOUND_MAX_BYTES = 64 << 20
_DROP_LOG_EVERY_S = 30.0

Inbound = Incoming | ConnectionChange


class PublishAck(Protocol):
    """A publish in flight."""

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the broker acknowledged it; raise TransportError if it did not."""


class Transport(Protocol):
    """A connection to the broker, as the agent uses it."""

    @property
    def address(self) -> object:
        """Where it connects to, for log lines."""
        ...

    @property
    def connected(self) -> bool:
        """True while the broker accepts publishes."""
        ...

    @property
    def network_alive(self) -> bool:
        """False once the thread that receives has died (the agent is then deaf)."""
        ...

    def deliver_to(self, sink: InboundQueue) -> None:
        """Put inbound messages and connection changes into ``sink``, in arrival order (before :meth:`start`)."""

    def start(self) -> None:
        """Connect in the background, and keep reconnecting."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe now, and no longer after reconnects."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishAck:
        """Queue a publish."""
        ...

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the broker's acknowledgement."""

    def close(self) -> None:
        """Disconnect cleanly (no will)."""


class InboundQueue:
    """A FIFO of inbound items with a bound; thread-safe for one producer and one consumer.

    Args:
        max_messages: most :class:`Incoming` messages held; more are dropped and counted.
            Connection changes are always kept (they are few and the agent must see them).
        max_bytes: most payload bytes held, whatever the number of messages.
        clock: monotonic seconds, for rate-limiting the drop warnings.
        log_every_s: at most one drop warning per this many seconds.
    """

    def __init__(
        self,
        max_messages: int = DEFAULT_INBOUND_MAX,
        *,
        max_bytes: int = DEFAULT_INBOUND_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = _DROP_LOG_EVERY_S,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"inbound queue bound must be positive, got {max_messages}")
        if max_bytes < 1:
            raise ValueError(f"inbound queue byte bound must be positive, got {max_bytes}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: collections.deque[Inbound] = collections.deque()
        self._messages = 0
        self._ready = threading.Condition()
        self._clock = clock
        self._log_every_s = log_every_s
        self._dropped = 0
        self._unlogged = 0
        self._last_log: float | None = None

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue was full, since start."""
        return self._dropped

    @property
    def payload_bytes(self) -> int:
        """Payload bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Inbound) -> bool:
        """Add an item unless the queue is full.

        Returns:
            False when a message was dropped (counted, and logged at most every ``log_every_s``).
        """
        with self._ready:
            if isinstance(item, Incoming):
                if self._messages >= self.max_messages or self._bytes + len(item.payload) > self.max_bytes:
                    self._drop(item)
                    return False
                self._messages += 1
                self._bytes += len(item.payload)
            self._items.append(item)
            self._ready.notify()
        return True

    def get(self, timeout: float) -> Inbound | None:
        """The oldest item, waiting up to ``timeout`` seconds; None if none came."""
        with self._ready:
            if not self._items and not self._ready.wait_for(lambda: bool(self._items), timeout):
                return None
            item = self._items.popleft()
            if isinstance(item, Incoming):
                self._messages -= 1
                self._bytes -= len(item.payload)
            return item

    def _drop(self, item: Incoming) -> None:
        self._dropped += 1
        self._unlogged += 1
        now = self._clock()
        if self._last_log is None or now - self._last_log >= self._log_every_s:
            log.warning(
                "inbound queue full (%d messages or %d bytes): dropped %d message(s) (latest to %s), %d since start",
                self.max_messages,
                self.max_bytes,
                self._unlogged,
                item.topic,
                self._dropped,
            )
            self._last_log = now
            self._unlogged = 0
