"""`edgectl collect`: a collector that runs until it is stopped and loses nothing.

It subscribes to every device's status, events and metrics, through an MQTT 5 shared
subscription (``$share/<group>/...``) when several collectors split the traffic, and
writes what the :class:`~host_tools.fleet.enrolment.ReportGate` verified into the registry
(:func:`~host_tools.fleet.collector.record_message`); the device id is the topic's.

Nothing acknowledged is ever lost:

* The session outlives the process (clean start off, a session expiry, a fixed client id
  per collector), so what the broker queued while the collector was away, and what it
  sent and never had acknowledged, comes again when the collector is back.
* paho's network thread only converts each message and hands it over (``edge_sdk.mqtt``);
  one worker (:meth:`Collector.run`) takes them in batches, verifies them, writes a batch
  in one registry transaction, and acknowledges its messages (QoS 1 PUBACK) only once the
  transaction committed. A crash before the commit leaves them unacknowledged: the broker
  sends them again.
* What comes again is stored once: status rows merge by time, metrics reports and events
  are keyed by device and their own signed time (registry schema 6). So the gate checks the
  order of status messages only (``unordered`` heartbeats, events and metrics): messages of one device
  are split between collectors, and repeats after a restart are expected.
* Flow: the collector asks the broker for at most ``receive_maximum`` unacknowledged
  messages (MQTT 5 Receive Maximum), so a slow registry slows the broker's sending. Mosquitto
  2.0 does not apply it to what it queued while the collector was away: it sends all of that
  at once. The inbox is therefore sized for a backlog (``inbox_max`` messages, 256 MiB), and
  should it overflow anyway, the dropped messages are unacknowledged, not lost: the
  collector commits what it holds and ends with a :class:`~edge_sdk.errors.TransportError`
  (exit 4), and on the restart (systemd ``Restart=always``) the broker sends them again.

A batch the registry refuses is rolled back, kept, and tried again after ``retry_s``
(logged), for as long as the collector runs.

Speed: a batch's signatures are the costliest part of it. When a batch holds at least
``pool_min`` messages (a backlog, not a trickle), they are checked all at once, split
between this process and ``verify_workers`` worker processes (started on the first such
batch, with ``spawn``: this process runs paho's thread); everything else the gate judges
stays in the worker thread, in order. A batch's metrics reports are written in one
statement.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edge_sdk.errors import ConfigError, StorageError, TransportError
from edge_sdk.mqtt import ConnectionChange, Incoming, MqttClient, MqttOptions, take_waiting
from edge_sdk.protocol import Channel, fleet_filter, shared
from host_tools.fleet.collector import record_messages
from host_tools.fleet.enrolment import Dropped, PreparedBatch, ReportGate, Verified
from host_tools.fleet.registry import Registry
from host_tools.fleet.signature_workers import SignaturePool

__all__ = [
    "COLLECTED_CHANNELS",
    "CollectCounts",
    "CollectOptions",
    "Collector",
    "collect_filters",
    "default_verify_workers",
]

log = logging.getLogger(__name__)


def default_verify_workers() -> int:
    """Signature worker processes a collector starts unless told: one per other CPU, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


#: The device channels a collector listens to.
COLLECTED_CHANNELS = (Channel.STATUS, Channel.HEARTBEAT, Channel.EVENTS, Channel.METRICS)
#: Channels stored under their own unique key (see the module's docstring).
_UNORDERED = frozenset({Channel.HEARTBEAT, Channel.EVENTS, Channel.METRICS})


@dataclass(frozen=True)
class CollectOptions:
    """How a collector listens and writes.

    Attributes:
        client_id: the MQTT client id; fixed per collector, so its session survives restarts.
        group: the shared-subscription group several collectors split the traffic in;
            None subscribes plainly (this collector alone hears everything).
        session_expiry_s: how long the broker keeps the session (and queues for it) while
            the collector is away.
        batch_max: most messages written in one transaction.
        batch_wait_s: how long a batch waits for more messages once it has one.
        receive_maximum: most unacknowledged messages the broker may send at once.
        inbox_max: most messages waiting for the worker (a backlog the broker sends at once).
        progress_every_s: how often the progress callback is called.
        retry_s: wait before writing a batch the registry refused again.
        allow_unsigned: believe unsigned device messages (migration period only).
        verify_workers: worker processes that check signatures beside this one (0: none).
        pool_min: fewest messages in a batch whose signatures the workers share.

    Raises:
        ConfigError: a bound that is not positive, or a bad group name.
    """

    client_id: str
    group: str | None = None
    session_expiry_s: int = 86_400
    batch_max: int = 500
    batch_wait_s: float = 0.05
    receive_maximum: int = 1000
    inbox_max: int = 200_000
    progress_every_s: float = 5.0
    retry_s: float = 1.0
    allow_unsigned: bool = False
    verify_workers: int = 0
    pool_min: int = 64

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ConfigError("a collector needs a fixed client id (its session outlives it)", key="client_id")
        if self.group is not None:
            shared(self.group, "x")  # raises ConfigError for a bad group name
        for key in ("session_expiry_s", "batch_max", "receive_maximum", "inbox_max", "pool_min"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, not {value!r}", key=key)
        workers: object = self.verify_workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ConfigError(f"verify_workers must be 0 or more, not {self.verify_workers!r}", key="verify_workers")
        for key in ("batch_wait_s", "progress_every_s", "retry_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be a positive number of seconds", key=key)

    def mqtt_options(self, base: MqttOptions | None = None) -> MqttOptions:
        """The client options a collector needs, over ``base`` (TLS, credentials, timeouts).

        MQTT 5 (shared subscriptions, session expiry, Receive Maximum), a lasting session,
        and acknowledgements sent by the collector after each commit.
        """
        from dataclasses import replace

        given = base if base is not None else MqttOptions(client_id=self.client_id)
        return replace(
            given,
            client_id=self.client_id,
            protocol="5",
            session_expiry_s=self.session_expiry_s,
            manual_ack=True,
            receive_maximum=self.receive_maximum,
            inbox_max=max(self.inbox_max, self.receive_maximum),
        )


def collect_filters(group: str | None) -> list[str]:
    """The subscriptions of a collector: every device's status, events and metrics.

    Args:
        group: the shared-subscription group, or None for plain subscriptions.

    Returns:
        One filter per channel, shared in ``group`` when one is given.

    Raises:
        ConfigError: a bad group name.
    """
    filters = [fleet_filter(channel) for channel in COLLECTED_CHANNELS]
    return [shared(group, f) for f in filters] if group else filters


@dataclass
class CollectCounts:
    """What a collector did so far.

    Attributes:
        received: messages taken from the broker.
        stored: messages the gate let through and the registry now holds.
        dropped: messages the gate dropped (counted per device and reason in the registry).
        batches: transactions committed.
        acked: acknowledgements sent after a commit.
        redelivered: committed messages not acknowledged (their connection had ended): the
            broker sends them again, and they are stored once.
        retries: batches the registry refused, tried again.
        reconnects: connections lost.
    """

    received: int = 0
    stored: int = 0
    dropped: int = 0
    batches: int = 0
    acked: int = 0
    redelivered: int = 0
    retries: int = 0
    reconnects: int = 0

    def to_dict(self) -> dict[str, int]:
        """A JSON-ready dict of every count."""
        return asdict(self)


class Collector:
    """Writes what a connected client receives into the registry until told to stop.

    Args:
        client: a client built with :meth:`CollectOptions.mqtt_options`; started and
            subscribed by :meth:`run`, closed by its owner.
        registry: where rows go; used from the thread that calls :meth:`run` only.
        options: how to batch, retry and report.
        wall_clock: the host's clock (devices' times are judged against it; rows carry it).
        clock: a monotonic clock, for waits.
    """

    def __init__(
        self,
        client: MqttClient,
        registry: Registry,
        options: CollectOptions,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.registry = registry
        self.options = options
        self.counts = CollectCounts()
        self._wall_clock = wall_clock
        self._clock = clock
        self._gate = ReportGate.from_registry(registry, allow_unsigned=options.allow_unsigned, unordered=_UNORDERED)
        self._broker = str(client.address)
        self._pool = SignaturePool(options.verify_workers) if options.verify_workers else None

    def run(self, stop: threading.Event, progress: Callable[[CollectCounts], None] | None = None) -> CollectCounts:
        """Subscribe, then take, write and acknowledge batches until ``stop`` is set.

        A batch in hand when ``stop`` is set is written and acknowledged first; what is
        still in the inbox is left unacknowledged, for the next run of this session.

        Args:
            stop: set it (from a signal handler, another thread) to end the run.
            progress: called with the counts every ``progress_every_s`` and once at the end.

        Returns:
            The counts.

        Raises:
            TransportError: the inbox overflowed (a backlog larger than ``inbox_max``): what
                it held is committed and acknowledged; the dropped messages come again on
                the next connection of the session (run again).
        """
        try:
            return self._run(stop, progress)
        finally:
            if self._pool is not None:
                self._pool.close()

    def _run(self, stop: threading.Event, progress: Callable[[CollectCounts], None] | None) -> CollectCounts:
        for topic_filter in collect_filters(self.options.group):
            self.client.subscribe(topic_filter, qos=1)
        next_progress = self._clock() + self.options.progress_every_s
        in_flight: _Flight | None = None  # a batch whose signatures the workers are checking
        while not stop.is_set():
            batch = self._take(stop, wait=in_flight is None)
            started = self._start(batch) if batch else None
            if in_flight is not None:
                self._commit(in_flight, stop)  # while the workers check ``started``
            in_flight = started
            if in_flight is None and self.client.inbox_dropped and self.client.inbox.empty():
                raise TransportError(
                    f"collector {self.options.client_id} dropped {self.client.inbox_dropped} messages from a "
                    f"full inbox (more than {self.client.options.inbox_max} waiting); they are not acknowledged, "
                    "so the broker sends them again when the collector reconnects: run it again",
                    dropped=self.client.inbox_dropped,
                )
            if progress is not None and self._clock() >= next_progress:
                next_progress = self._clock() + self.options.progress_every_s
                progress(self.counts)
        if in_flight is not None:
            self._commit(in_flight, stop)
        if progress is not None:
            progress(self.counts)
        return self.counts

    def _take(self, stop: threading.Event, wait: bool = True) -> list[Incoming]:
        """Up to ``batch_max`` messages: wait for the first (briefly), then ``batch_wait_s`` for more.

        With ``wait`` False (a batch is in flight, to be committed next), only what the
        inbox holds now is taken: a backlog keeps the pipeline full, and a quiet inbox does
        not hold the batch in flight back.
        """
        batch: list[Incoming] = []
        deadline: float | None = None if wait else self._clock()
        while len(batch) < self.options.batch_max:
            # with no deadline yet, wake now and then to see ``stop``
            timeout = 0.2 if deadline is None else max(0.0, deadline - self._clock())
            items = take_waiting(self.client.inbox, self.options.batch_max - len(batch), timeout)
            for item in items:
                if isinstance(item, ConnectionChange):
                    if not item.connected:
                        self.counts.reconnects += 1
                        log.info("collector %s lost the broker (%s)", self.options.client_id, item.reason)
                    continue
                batch.append(item)
            if deadline is None:
                if not batch:
                    break  # nothing within the wait: see ``stop``
                deadline = self._clock() + self.options.batch_wait_s
            elif not items and timeout <= 0:
                break
        self.counts.received += len(batch)
        return batch

    def _start(self, batch: list[Incoming]) -> _Flight:
        """Decode a backlog's batch and hand its signatures to the workers; a trickle is judged at commit."""
        if self._pool is None or len(batch) < self.options.pool_min:
            return _Flight(batch)
        prepared = self._gate.prepare([(i.topic, i.payload) for i in batch])
        return _Flight(batch, prepared, self._pool.submit(prepared.checks))

    def _commit(self, flight: _Flight, stop: threading.Event) -> None:
        """Judge ``flight`` once, write it in one transaction (again after ``retry_s`` while
        refused), then acknowledge it."""
        results = self._judge(flight)
        while True:
            try:
                stored, dropped = self._write(results)
                break
            except StorageError as exc:
                self.counts.retries += 1
                log.error("collector could not write %d messages (kept, retrying): %s", len(flight.batch), exc.message)
                if stop.wait(self.options.retry_s):
                    return  # stopping: unacknowledged, so the broker sends them again
        self.counts.batches += 1
        self.counts.stored += stored
        self.counts.dropped += dropped
        for item in flight.batch:
            if self.client.ack(item):
                self.counts.acked += 1
            else:
                self.counts.redelivered += 1

    def _judge(self, flight: _Flight) -> list[Verified | Dropped]:
        now = self._wall_clock()
        if flight.prepared is not None and flight.answers is not None:
            return self._gate.judge(flight.prepared, flight.answers(), now)
        return [self._gate.check(i.topic, i.payload, now) for i in flight.batch]

    def _write(self, results: list[Verified | Dropped]) -> tuple[int, int]:
        """Store what the gate let through, and the gate's counts and sequence numbers, in one
        transaction; the gate keeps them should it fail (retried by :meth:`_commit`)."""
        now = self._wall_clock()
        messages = [r.msg for r in results if isinstance(r, Verified)]
        with self.registry.batch():
            record_messages(self.registry, messages, now, self._broker)
            self._gate.flush(self.registry, now)
        return len(messages), len(results) - len(messages)


@dataclass
class _Flight:
    """A batch on its way: taken from the inbox, perhaps decoded with its signatures being checked."""

    batch: list[Incoming]
    prepared: PreparedBatch | None = None
    answers: Callable[[], list[bool]] | None = None
