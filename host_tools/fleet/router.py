"""One host connection, many conversations: deliver each device message to the command it answers.

A :class:`Router` owns the draining of one :class:`~edge_sdk.mqtt.MqttClient`'s inbox. Its
worker thread (paho's network thread only converts and hands over) decodes each message
once and delivers it:

- an event or metrics report goes to the conversation registered for its device (the
  device named by the topic, which the broker's ACL binds) and its command id, or, when
  the device sent no command id, its transfer id;
- a device's status goes to every conversation of that device, and is remembered, so a
  conversation opened later starts knowing what the device was last doing.

Nothing reaches a conversation unverified: each message passes the router's
:class:`~host_tools.fleet.enrolment.ReportGate` first (signed by the device's enrolled key, for
the device the topic names, in sequence, plausibly dated). What fails is counted in
``rejected`` and in the gate's per-device drop counts; a router built without a gate has no
enrolled device and believes nothing. :func:`gated` runs a router whose gate comes from the
registry and writes the gate's counts back when it ends.

Each conversation has a bounded mailbox. What cannot be delivered is counted in the
router's attributes and logged: ``dropped_full`` (the conversation's mailbox was full; a
warning), ``dropped_unknown`` (no conversation waits for it, e.g. the retained report of an
earlier deploy, or the answer to a root update; logged at debug level, since it is normal)
and ``malformed`` (undecodable, or on a topic outside the device tree; a warning). A device,
or anyone on the broker, cannot stop a conversation with junk or a flood.

Several threads may each run a deploy over one connection::

    with Router(client) as router, ThreadPoolExecutor(8) as pool:
        outcomes = pool.map(lambda d: deploy_bundle(client, d, bundle, router=router), devices)

A call given no router gets its own for the duration of the call (see :func:`routed`),
which is what a single deploy from the CLI does. While a router runs, nothing else may read
the client's inbox.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import ConnectionChange, Incoming, MqttClient
from edge_sdk.protocol import CodecLimits, DeviceStatus, Event, Heartbeat, MetricsReport
from host_tools.fleet.enrolment import Dropped, ReportGate
from host_tools.fleet.registry import Registry

__all__ = ["DEFAULT_MAILBOX_MAX", "Listener", "Router", "gated", "routed"]

log = logging.getLogger(__name__)

#: Default bound of one conversation's mailbox, in messages. A deploy hears a handful.
DEFAULT_MAILBOX_MAX = 64

#: The inbox bound (messages) of a host client that talks to a fleet: every device of a wave
#: answers at once (statuses, progress and install events, metrics), and a host that shares
#: its CPU falls behind for a while. The client's default (1,000) dropped the ``installed``
#: events of a 1,000-device rollout; the byte bound (256 MiB) still caps the memory.
FLEET_INBOX_MAX = 50_000

#: How long the worker waits on the inbox before looking whether it should stop.
_POLL_S = 0.05


class Listener(Protocol):
    """What the router delivers to: one conversation (see :class:`~host_tools.fleet.conversation.Conversation`)."""

    def offer(self, msg: Event | MetricsReport) -> bool:
        """Take ``msg`` into the mailbox without blocking; False when the mailbox is full."""
        ...

    def note_status(self, status: DeviceStatus) -> None:
        """Remember the device's latest status."""
        ...


class Router:
    """Drains one client's inbox and delivers each message to the conversation it belongs to.

    Attributes:
        client: the connection it serves.
        limits: size limits for decoding.
        mailbox_max: the mailbox bound conversations opened on this router get.
        delivered: messages handed to a conversation (statuses once per conversation).
        dropped_full: messages dropped because their conversation's mailbox was full.
        dropped_unknown: events and reports no conversation was waiting for.
        malformed: messages that could not be decoded or are not from a device's topic.
        rejected: messages the gate dropped (unsigned, unenrolled, forged, replayed...).
        gate: what decides which device messages are believed.

    Args:
        client: a client; the router subscribes nothing itself (conversations do).
        mailbox_max: bound of each conversation's mailbox, in messages.
        limits: size limits for decoding.
        gate: the enrolled keys; None: a gate with none, which believes nothing.
        clock: wall clock, for judging devices' times.

    Raises:
        ConfigError: a mailbox bound that is not positive.
    """

    def __init__(
        self,
        client: MqttClient,
        *,
        mailbox_max: int = DEFAULT_MAILBOX_MAX,
        limits: CodecLimits | None = None,
        gate: ReportGate | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mailbox_max < 1:
            raise ConfigError(f"a conversation's mailbox must hold at least 1 message, not {mailbox_max}")
        self.client = client
        self.limits = limits or CodecLimits()
        self.gate = gate or ReportGate(limits=self.limits)
        self.clock = clock
        self.mailbox_max = mailbox_max
        self.delivered = 0
        self.dropped_full = 0
        self.dropped_unknown = 0
        self.malformed = 0
        self.rejected = 0
        self._lock = threading.Lock()
        self._by_id: dict[tuple[str, str], Listener] = {}
        self._by_device: dict[str, list[Listener]] = {}
        self._status: dict[str, DeviceStatus] = {}
        self._heartbeats: dict[str, tuple[Heartbeat, float]] = {}  # the latest per device, until taken
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # --- registration (any thread) ----------------------------------------------------

    def register(self, device_id: str, ids: Iterable[str], listener: Listener) -> None:
        """Deliver the device's messages with any of ``ids`` to ``listener``, and all its statuses.

        The device's last known status, if any, is noted at once.

        Raises:
            ConfigError: another listener already waits for one of these ids.
        """
        keys = [(device_id, i) for i in ids if i]
        with self._lock:
            taken = [k for k in keys if k in self._by_id]
            if taken:
                raise ConfigError(f"device {device_id}: a conversation already waits for id {taken[0][1]}")
            for key in keys:
                self._by_id[key] = listener
            self._by_device.setdefault(device_id, []).append(listener)
            status = self._status.get(device_id)
        if status is not None:
            listener.note_status(status)

    def unregister(self, device_id: str, listener: Listener) -> None:
        """Stop delivering to ``listener``; later messages for it count as unknown. Idempotent."""
        with self._lock:
            for key in [k for k, v in self._by_id.items() if v is listener and k[0] == device_id]:
                del self._by_id[key]
            rest = [x for x in self._by_device.get(device_id, []) if x is not listener]
            if rest:
                self._by_device[device_id] = rest
            else:
                self._by_device.pop(device_id, None)

    @property
    def conversations(self) -> int:
        """How many conversations are registered now."""
        with self._lock:
            return sum(len(v) for v in self._by_device.values())

    @property
    def running(self) -> bool:
        """Whether the worker drains the client's inbox now."""
        return self._worker is not None

    def last_status(self, device_id: str) -> DeviceStatus | None:
        """The latest status this router heard from the device, if any."""
        with self._lock:
            return self._status.get(device_id)

    def take_heartbeats(self) -> list[tuple[Heartbeat, float]]:
        """The latest heartbeat heard from each device since the last call, with when it was heard.

        Heartbeats arrive only where the client subscribed to them (a rollout's runner does,
        to judge liveness); at most one is kept per device.
        """
        with self._lock:
            out = list(self._heartbeats.values())
            self._heartbeats.clear()
        return out

    # --- delivery (the worker's thread, or a test's) ------------------------------------

    def dispatch(self, item: Incoming | ConnectionChange) -> None:
        """Decode one inbox item and deliver it; what cannot be delivered is counted and logged.

        The worker calls this for every item; tests call it directly with fake messages.
        """
        if not isinstance(item, Incoming):
            log.info("connection %s: %s", "up" if item.connected else "down", item.reason)
            return
        verified = self.gate.check(item.topic, item.payload, self.clock())
        if isinstance(verified, Dropped):
            if verified.reason == "malformed":
                self.malformed += 1
                log.warning("ignoring malformed message on %s", item.topic)
            else:
                self.rejected += 1
            return
        msg = verified.msg
        device_id = msg.device_id
        if isinstance(msg, DeviceStatus):
            with self._lock:
                self._status[device_id] = msg
                listeners = list(self._by_device.get(device_id, ()))
            for listener in listeners:
                listener.note_status(msg)
            self.delivered += len(listeners)
            return
        if isinstance(msg, Heartbeat):
            with self._lock:  # no conversation waits for one; kept for take_heartbeats
                self._heartbeats[device_id] = (msg, self.clock())
            return
        if not verified.fresh:
            self.dropped_unknown += 1
            log.debug("%s %s from %s heard again; already delivered", msg.TYPE, msg.command_id, device_id)
            return
        ids = (msg.command_id, msg.transfer_id) if isinstance(msg, Event) else (msg.command_id,)
        with self._lock:
            target = next((t for t in (self._by_id.get((device_id, i)) for i in ids if i) if t is not None), None)
        if target is None:
            self.dropped_unknown += 1
            log.debug("no conversation waits for %s %s from %s", msg.TYPE, msg.command_id or "(no id)", device_id)
        elif target.offer(msg):
            self.delivered += 1
        else:
            self.dropped_full += 1
            log.warning(
                "conversation with %s for command %s is full: dropped a %s (%d dropped so far)",
                device_id,
                msg.command_id,
                msg.TYPE,
                self.dropped_full,
            )

    # --- the worker -------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread that drains the client's inbox. Idempotent."""
        if self._worker is not None:
            return
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name="fleet-router", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the worker (within a fraction of a second); the client stays connected. Idempotent."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        self._stop.set()
        worker.join()

    def __enter__(self) -> Router:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        inbox = self.client.inbox
        while not self._stop.is_set():
            try:
                item = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            try:
                self.dispatch(item)
            except Exception:  # one bad message must not stop every conversation on this connection
                log.exception("unexpected failure routing a message on %s", getattr(item, "topic", "?"))


@contextmanager
def gated(
    client: MqttClient, registry: Registry, router: Router | None = None, *, allow_unsigned: bool = False
) -> Iterator[Router]:
    """``router`` if given, else a running router whose gate holds the registry's enrolments.

    When the block ends, the gate's drop counts, sequence numbers and enrolment requests
    are written to the registry (from the calling thread, which owns the registry).

    Args:
        client: the connection.
        registry: where the enrolments are, and where the counts go.
        router: a caller's running router (its owner flushes its gate).
        allow_unsigned: believe unsigned device messages (migration period only).

    Returns:
        A context whose value is a running router for ``client``.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    if router is not None:
        with routed(client, router) as shared:
            yield shared
        return
    gate = ReportGate.from_registry(registry, allow_unsigned=allow_unsigned)
    own = Router(client, gate=gate)
    try:
        with own:
            yield own
    finally:
        with registry.batch():  # one commit for every device's counts, not one per row
            gate.flush(registry, time.time())


@contextmanager
def routed(client: MqttClient, router: Router | None) -> Iterator[Router]:
    """``router`` if given (it must serve ``client``), else a new one running for the ``with`` block.

    Args:
        client: the connection the caller publishes on.
        router: the router of a caller that shares the connection, or None.

    Returns:
        A context whose value is a running router for ``client``.

    Raises:
        ConfigError: ``router`` serves another client.
    """
    if router is not None:
        if router.client is not client:
            raise ConfigError("the router given serves another connection than the client given")
        router.start()  # a no-op when it runs, as it should; its owner closes it
        yield router
        return
    with Router(client) as own:
        yield own
