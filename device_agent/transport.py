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

The worker takes what waits in batches (:meth:`InboundQueue.get_batch`): one wake-up and
one lock for a burst of chunks, not one for each. Bulk items (chunks, as the agent's
``bulk`` predicate says) may wait a few milliseconds (``linger_s``) for the rest of their
burst; anything else (a command, a connection change) wakes the worker at once and ends
any lingering. Handing a worker each 64 KiB chunk on its own costs more CPU, in
wake-ups and GIL hand-offs between the two threads, than checking and writing it.
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
    "DEFAULT_BATCH_MAX",
    "DEFAULT_GATHER",
    "DEFAULT_INBOUND_MAX",
    "DEFAULT_INBOUND_MAX_BYTES",
    "DEFAULT_LINGER_S",
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
#: Most items :meth:`InboundQueue.get_batch` returns at once (the worker's periodic work
#: runs between batches, so a batch is short: 64 chunks of 64 KiB are checked in a few ms).
DEFAULT_BATCH_MAX = 64
#: Bulk items waiting before the worker is woken without lingering.
DEFAULT_GATHER = 16
#: How long a worker woken for bulk items waits for the rest of their burst.
DEFAULT_LINGER_S = 0.005

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
        bulk: which items may wait for the rest of their burst (chunks); default none.
        gather: bulk items waiting that wake the worker without lingering.
        linger_s: how long :meth:`get_batch` waits for ``gather`` bulk items, when only
            bulk items wait (0: never).
    """

    def __init__(
        self,
        max_messages: int = DEFAULT_INBOUND_MAX,
        *,
        max_bytes: int = DEFAULT_INBOUND_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
        log_every_s: float = _DROP_LOG_EVERY_S,
        bulk: Callable[[Inbound], bool] = lambda _item: False,
        gather: int = DEFAULT_GATHER,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        if gather < 1 or linger_s < 0:
            raise ValueError(f"gather must be positive and linger_s not negative, got {gather} and {linger_s}")
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
        self._bulk = bulk
        self._gather = gather
        self._linger_s = linger_s
        self._urgent = 0  # items waiting that are not bulk

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
            if not self._bulk(item):
                self._urgent += 1
                self._ready.notify()
            elif len(self._items) == 1 or len(self._items) >= self._gather:
                self._ready.notify()  # a worker waits for the first item, or lingers for this many
        return True

    def get(self, timeout: float) -> Inbound | None:
        """The oldest item, waiting up to ``timeout`` seconds; None if none came."""
        with self._ready:
            if not self._items and not self._ready.wait_for(lambda: bool(self._items), timeout):
                return None
            return self._take()

    def get_batch(self, timeout: float, max_items: int = DEFAULT_BATCH_MAX) -> list[Inbound]:
        """The items waiting, oldest first, at most ``max_items``; empty if none came within ``timeout``.

        When only bulk items wait, fewer than ``gather``, it waits up to ``linger_s`` more
        for the rest of their burst (ended early by ``gather`` of them or any other item).
        """
        with self._ready:
            if not self._items and not self._ready.wait_for(lambda: bool(self._items), timeout):
                return []
            if not self._urgent and len(self._items) < self._gather and self._linger_s > 0:
                self._ready.wait_for(lambda: self._urgent > 0 or len(self._items) >= self._gather, self._linger_s)
            return [self._take() for _ in range(min(max_items, len(self._items)))]

    def _take(self) -> Inbound:  # under the lock, with an item waiting
        item = self._items.popleft()
        if isinstance(item, Incoming):
            self._messages -= 1
            self._bytes -= len(item.payload)
        if not self._bulk(item):
            self._urgent -= 1
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
