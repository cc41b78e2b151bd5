"""The device agent: connect, announce, dispatch what arrives to the part that does it.

One worker thread (the caller of :meth:`Agent.run`) does all the work. The transport's
network thread only puts messages into the agent's bounded
:class:`~device_agent.transport.InboundQueue` (what does not fit is dropped and counted).
Every message is handled inside a guard: bad input becomes an ``error``/``refused`` event
back to the host, and the loop goes on.

Periodic work (idle transfers reported, abandoned ones removed, the offline outbox
drained, deferred installs retried, heartbeats, and periodic metrics reports when
``metrics_every_s`` is set: :mod:`device_agent.telemetry`) runs on its own schedule, every
``_TICK_S`` whatever arrives: a trickle of junk cannot starve it. The worker feeds systemd's
watchdog only while the network thread lives (:func:`device_agent.sdnotify.should_feed`); if the network thread dies,
:meth:`Agent.run` stops the agent with an error, so any supervisor restarts it.

Time: every expiry decision uses :meth:`TrustStore.now <device_agent.trust_store.TrustStore.now>`,
the clock but never earlier than the newest signed time seen, and an expired root
refuses commands as it refuses installs (root updates still apply, they carry their own
signatures).

The parts, one job each::

    device_agent.transport   the connection seam (MqttClient or an in-memory one) and the bounded queue
    device_agent.receiving   chunks, each checked -> staging kept across restarts -> a finished bundle
    device_agent.deltas      does an offered delta fit the installed slot; the bundle rebuilt from it
    device_agent.install     the install sequence: stage, activate, health check, confirm or roll back,
                             deferred installs, rollback and remove commands
    device_agent.reporter    status (birth, goodbye), events, metrics, the offline outbox
    device_agent.telemetry   periodic metrics reports: each active bundle measured again

Lifecycle of a deploy::

    deploy cmd  -> REFUSED at once                what the signed offer allows is checked first
                                                  (version vs floor, runtime, expiry, target, storage):
                                                  no chunk moves, no staging file is reserved
                -> ACCEPTED (missing ranges)      staging reserved at its declared size, or the
                                                  transfer of the same content resumed; the
                                                  device subscribes to the transfer's topic.
                                                  With a delta offered that fits the active slot,
                                                  the transfer is the delta's (detail.delta true);
                                                  else the bundle's (detail.delta false, .why)
    index frame -> kept if it is the signed one   (the offer binds its sha256)
    chunks      -> checked against their digest, written at their offsets; a bad one is
                   discarded and asked for again; PROGRESS every PROGRESS_EVERY chunks
    complete    -> RECEIVED                       every chunk matched the signed index: the file is
                                                  the one the offer names (device_agent.receiving)
                -> the install sequence (device_agent.install)
    delta complete -> the bundle rebuilt from the slot (device_agent.deltas), then as above;
                   if it cannot be -> ACCEPTED for the full transfer (detail.delta false, .why)
    transfer_end while chunks are missing -> NEED_CHUNKS (the host sends them)
    (re)connected, or idle for transfer_idle_timeout_s -> NEED_CHUNKS for each transfer held
                   (one whose chunks were all in before a restart waits for the host's offer)
    no chunk for staging_max_age_s -> its staging removed

Installs are two-phase (see :mod:`device_agent.installer`): a version the agent finds
still pending at start was interrupted before it proved itself, and is rolled back and
reported.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from device_agent.config import AgentConfig
from device_agent.decryption_key import load_or_create_decryption_key
from device_agent.deltas import base_refusal, rebuild_bundle
from device_agent.gate import UpdateGate
from device_agent.identity import DeviceIdentity
from device_agent.install import InstallSequence, ProfileHook
from device_agent.installer import Installer
from device_agent.outbox import Outbox
from device_agent.platform import PlatformInfo, detect_platform, power_model_name
from device_agent.receiving import Received, ReceivedBundle, Receiving, Transfer
from device_agent.reporter import Reporter
from device_agent.sdnotify import Liveness, Notifier, should_feed
from device_agent.telemetry import RECEIVING_S, Telemetry
from device_agent.transport import InboundQueue, Transport
from device_agent.trust_store import TrustStore
from edge_sdk import __version__
from edge_sdk.bundle import Manifest
from edge_sdk.errors import (
    DeltaError,
    EdgeError,
    SignatureError,
    StorageError,
    TransferError,
    TransportError,
    UntrustedInputError,
)
from edge_sdk.metrics import PowerSource, detect_power_source
from edge_sdk.mqtt import ConnectionChange, Incoming, MqttClient, MqttOptions, Will
from edge_sdk.protocol import (
    PROGRESS_EVERY,
    TRANSFER_ROOT,
    Channel,
    CodecLimits,
    DeployCommand,
    DeviceTopics,
    EventKind,
    RemoveCommand,
    RollbackCommand,
    RootUpdate,
    SignedCommand,
    TransferEnd,
    decode,
    decode_chunk,
    open_command,
    parse_topic,
    peek_command_id,
    transfer_topic,
)
from edge_sdk.trust import canonical_json

__all__ = ["Agent", "AgentHooks", "mqtt_transport", "open_identity"]

log = logging.getLogger(__name__)
_POLL_S = 0.5
_TRANSFERS = TRANSFER_ROOT + "/"
#: Periodic work runs at least this often, however busy the inbound queue is.
_TICK_S = 0.5
#: How long the network thread may be dead before :meth:`Agent.run` gives up.
_DEAF_GRACE_S = 5.0
#: Error events for messages the agent could not handle: a burst, then this many a second.
_ERROR_EVENT_BURST = 20
_ERROR_EVENTS_PER_S = 5.0


def open_identity(config: AgentConfig) -> DeviceIdentity:
    """The device's own key and sequence counter (made at first start, or the provisioned key).

    Raises:
        KeyStoreError: the key cannot be loaded.
        StorageError: the identity directory cannot be used.
    """
    return DeviceIdentity(config.device_id, config.data_dir / "identity", config.identity_key)


def mqtt_transport(config: AgentConfig, identity: DeviceIdentity | None = None) -> MqttClient:
    """The agent's MQTT connection: its client id, TLS material, and an ``offline`` last will.

    Args:
        config: the agent's configuration.
        identity: signs the last will; pass the one given to :class:`Agent` (each process
            must have one identity, or sequence numbers would repeat). Opened here if None.

    Returns:
        An unstarted client (the agent starts it).

    Raises:
        ConfigError: the TLS material cannot be loaded.
    """
    will = (identity or open_identity(config)).will(__version__, time.time())
    return MqttClient(
        config.broker,
        MqttOptions(
            client_id=f"edge-agent-{config.device_id}",  # stable: the broker keeps its session
            reconnect_max_s=config.reconnect_max_s,
            keepalive_s=config.keepalive_s,
            connack_timeout_s=config.connack_timeout_s,
            protocol=config.mqtt_protocol,
            session_expiry_s=config.session_expiry_s,
            will=Will(DeviceTopics(config.device_id).status, will),
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            username=config.username,
            password=config.password,
        ),
    )


def _crash_hook(point: str | None) -> Callable[[str], None]:
    """The ``debug_crash_at`` option: a real SIGKILL of this process at one named step."""
    if point is None:
        return lambda _reached: None

    def hook(reached: str) -> None:
        if reached == point:
            log.warning("debug_crash_at=%s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _both(first: Callable[[str], None], then: Callable[[str], None]) -> Callable[[str], None]:
    def hook(reached: str) -> None:
        first(reached)
        then(reached)

    return hook


@dataclass(frozen=True)
class AgentHooks:
    """Seams for a host that runs many simulated devices in one process (``edge-agent`` sets none).

    Attributes:
        checkpoint: called with the name of each step of an install as it is reached
            (:data:`device_agent.config.CRASH_POINTS`), after ``debug_crash_at``'s hook; an
            :class:`~edge_sdk.errors.EdgeError` it raises fails the install there, as a real
            failure of that step does.
        profile: health-checks and benchmarks an installed bundle instead of the real
            runtime (:data:`device_agent.install.ProfileHook`), e.g. a stand-in runtime.
        gate: the update gate, instead of the one the config describes.
        activating: called with each verified bundle's manifest just before it is activated;
            an :class:`~edge_sdk.errors.EdgeError` it raises fails the install there.
    """

    checkpoint: Callable[[str], None] | None = None
    profile: ProfileHook | None = None
    gate: UpdateGate | None = None
    activating: Callable[[Manifest], None] | None = None


class Agent:
    """Runs one device: connects, dispatches what arrives, does periodic work.

    Building it recovers the data directory (leftovers removed, interrupted installs
    rolled back and reported); :meth:`run` then serves until stopped.

    Args:
        config: validated configuration.
        transport: the connection (:func:`mqtt_transport` in production); not started yet.
        clock: wall-clock seconds (timestamps; expiry checks through the trust store's time
            floor); injectable. Default: the system clock plus ``config.debug_clock_offset_s``.
        monotonic: monotonic seconds (transfer idle timeouts, gate retries); injectable.
        identity: the device's key and sequence counter (:func:`open_identity` if None).
        hooks: seams for simulated devices (:class:`AgentHooks`); None for a real device.

    Raises:
        StorageError: the data directory cannot be used.
        KeyStoreError: the shipped root of trust is unusable.
    """

    def __init__(
        self,
        config: AgentConfig,
        transport: Transport,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        identity: DeviceIdentity | None = None,
        hooks: AgentHooks | None = None,
    ) -> None:
        hooks = hooks or AgentHooks()
        self.config = config
        self.identity = identity or open_identity(config)
        self.transport = transport
        offset = config.debug_clock_offset_s
        self.clock: Callable[[], float] = clock or (lambda: time.time() + offset)
        self.monotonic = monotonic
        self._error_budget = float(_ERROR_EVENT_BURST)
        self._error_budget_at = monotonic()
        self.errors_not_reported = 0
        self.topics = DeviceTopics(config.device_id)
        self.codec_limits = CodecLimits()
        checkpoint = _crash_hook(config.debug_crash_at)
        if hooks.checkpoint is not None:
            checkpoint = _both(checkpoint, hooks.checkpoint)
        self.trust = TrustStore(config.data_dir / "trust", config.load_root())
        self.installer = Installer(
            config.data_dir, self.trust.root.trusted("bundles"), config.limits, checkpoint=checkpoint
        )
        removed = self.installer.recover()
        if removed:
            log.info("removed %d leftover(s) of interrupted work", len(removed))
        rolled_back = self.installer.roll_back_pending()
        self.decryption_key = load_or_create_decryption_key(config.data_dir)
        self.platform: PlatformInfo = detect_platform(config.sysfs_root)
        self.power: PowerSource = detect_power_source(config.sysfs_root, power_model_name(self.platform))
        self.inbound = InboundQueue(config.inbound_queue_max, max_bytes=config.inbound_max_bytes, bulk=self._is_chunk)
        self.reporter = Reporter(
            config.device_id,
            transport,
            Outbox(config.data_dir / "outbox", config.outbox_max_bytes),
            self.installer,
            self.platform,
            self.power,
            self.inbound,
            self.clock,
            self.identity,
            decryption_key=self.decryption_key.public,
            labels=config.labels,
            heartbeat_s=config.heartbeat_s,
        )
        self.receiving = Receiving(
            self.installer.staging_dir,
            config.limits.max_bundle_bytes,
            max_age_s=config.staging_max_age_s,
            checkpoint=checkpoint,
            limits=self.codec_limits,
        )
        self.receiving.recover(monotonic(), self.clock())
        self.installs = InstallSequence(
            config,
            self.installer,
            self.trust,
            self.reporter,
            self.platform,
            self.power,
            hooks.gate or UpdateGate(config.update_gate_file, config.update_gate_command, config.update_gate_timeout_s),
            clock=self.trusted_now,
            monotonic=monotonic,
            checkpoint=checkpoint,
            decryption_key=self.decryption_key,
            profile=hooks.profile,
            activating=hooks.activating,
        )
        self.telemetry: Telemetry | None = None
        if config.metrics_every_s is not None:
            self.telemetry = Telemetry(
                config.metrics_every_s, config.metrics_runs, self.installer, self.installs, self.reporter
            )
        self._notifier = Notifier()
        self._next_tick = float("-inf")
        self._next_heartbeat = float("inf")  # set when connected: the birth message counts as one
        self._deaf_since: float | None = None
        for rb in rolled_back:
            self.installs.report_interrupted(rb)

    def trusted_now(self) -> float:
        """The time expiry is judged by: the clock, never earlier than the newest signed time seen."""
        return self.trust.now(self.clock())

    # --- loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event, notifier: Notifier | None = None) -> None:
        """Work until ``stop`` is set; then say goodbye (offline status) and disconnect.

        Args:
            stop: set it to stop.
            notifier: systemd notification socket (ready, watchdog, stopping), if any.

        Raises:
            TransportError: the network thread died (the agent could no longer hear); the
                agent has shut down, and its supervisor should start it again.
        """
        self.start(notifier)
        try:
            while not stop.is_set():
                self.step(_POLL_S)
                if self._deaf_since is not None and self.monotonic() - self._deaf_since >= _DEAF_GRACE_S:
                    raise TransportError("the network thread has stopped: the agent cannot receive; restart it")
        finally:
            self._notifier.stopping()
            self.shutdown()

    def start(self, notifier: Notifier | None = None) -> None:
        """Subscribe, and start the transport, delivering into the inbound queue."""
        self._notifier = notifier or Notifier()
        self.transport.subscribe(self.topics.cmd, qos=1)
        self.transport.subscribe(self.topics.data, qos=1)
        for t in self.receiving.held():
            self.transport.subscribe(transfer_topic(t.transfer_id), qos=1)
        log.info("agent %s starting; broker %s", self.config.device_id, self.transport.address)
        self.transport.deliver_to(self.inbound)
        self.transport.start()
        self._notifier.ready(f"device {self.config.device_id}: connecting to {self.transport.address}")

    def step(self, timeout_s: float) -> bool:
        """Handle the next batch of inbound items (waiting up to ``timeout_s``); do periodic work when due.

        A batch is what waits, in order (at most a few dozen items, see
        :meth:`InboundQueue.get_batch <device_agent.transport.InboundQueue.get_batch>`).
        Periodic work runs when nothing came, and at least every ``_TICK_S`` however
        many items come.

        Returns:
            True if an item was handled.
        """
        self._feed_watchdog()
        items = self.inbound.get_batch(timeout_s)
        for item in items:
            self._guarded(item)
        now = self.monotonic()
        if not items or now >= self._next_tick:
            self._next_tick = now + _TICK_S
            self._guarded_tick()
        return bool(items)

    def _is_chunk(self, item: Incoming | ConnectionChange) -> bool:
        """Whether an inbound item is a chunk (bulk: the inbound queue lets a burst of them gather)."""
        return isinstance(item, Incoming) and (item.topic.startswith(_TRANSFERS) or item.topic == self.topics.data)

    def liveness(self) -> Liveness:
        """The state of the threads that bring messages to the worker."""
        return Liveness(network_alive=self.transport.network_alive)

    def _feed_watchdog(self) -> None:
        liveness = self.liveness()
        if should_feed(liveness):
            self._deaf_since = None
            self._notifier.watchdog()
            return
        if self._deaf_since is None:
            self._deaf_since = self.monotonic()
            log.critical("agent cannot receive (%s): watchdog no longer fed", liveness)
            self._notifier.status(f"device {self.config.device_id}: deaf (receiving thread died)")

    def shutdown(self) -> None:
        """Close transfers under way (kept on disk), say goodbye, disconnect, close the outbox."""
        self.receiving.close()
        self.reporter.goodbye()
        self.transport.close()
        self.reporter.close()
        log.info("agent %s stopped", self.config.device_id)

    def _guarded_tick(self) -> None:
        try:
            self._tick()
        except EdgeError as exc:
            log.warning("%s: %s", exc.code, exc.message)
        except Exception:  # the agent must keep running
            log.exception("unexpected failure in periodic work")

    def _guarded(self, item: Incoming | ConnectionChange) -> None:
        try:
            self._handle(item)
        except EdgeError as exc:
            log.warning("%s: %s", exc.code, exc.message)
            self._report_error(exc)
        except Exception as exc:  # the agent must keep running whatever one message does
            log.exception("unexpected failure handling a message")
            self._report_error(EdgeError(f"agent failure: {type(exc).__name__}: {exc}"))

    def _report_error(self, error: EdgeError) -> None:
        """An ``error`` event for a message that could not be handled, at most a few per second.

        A flood of junk must not become a flood of signed events: each one costs a signature
        and a place in the outbound queue ahead of the answers to real commands. What the
        budget holds back is counted (``errors_not_reported``) and logged.
        """
        now = self.monotonic()
        self._error_budget = min(
            _ERROR_EVENT_BURST, self._error_budget + (now - self._error_budget_at) * _ERROR_EVENTS_PER_S
        )
        self._error_budget_at = now
        if self._error_budget < 1:
            self.errors_not_reported += 1
            if self.errors_not_reported % 1000 == 1:
                log.warning(
                    "%d error event(s) not reported: more bad messages than the event budget", self.errors_not_reported
                )
            return
        self._error_budget -= 1
        self.reporter.event(EventKind.ERROR, error=error)

    def _tick(self) -> None:
        now = self.monotonic()
        for t in self.receiving.expire(now):
            self.transport.unsubscribe(transfer_topic(t.transfer_id))
            log.info(
                "removed the partial transfer of %s v%s: no chunk for too long",
                t.command.bundle_name,
                t.command.bundle_version,
            )
        if self.transport.connected:
            for t in self.receiving.idle(now, self.config.transfer_idle_timeout_s):
                if not t.receiver.complete:
                    self._report_lacking(t)
        if self.reporter.outbox.pending and self.transport.connected:
            self.reporter.drain_outbox()
        if now >= self._next_heartbeat and self.reporter.heartbeat():
            self._next_heartbeat = now + self.config.heartbeat_s
        self.installs.retry_deferred()
        if self.telemetry is not None:
            self.telemetry.step(self.monotonic(), self.transport.connected, self._busy)

    def _busy(self) -> bool:
        """Whether work waits that a periodic measurement must not delay: inbound items, a transfer under way."""
        now = self.monotonic()
        return len(self.inbound) > 0 or any(now - t.last_chunk_at < RECEIVING_S for t in self.receiving.held())

    # --- dispatch -------------------------------------------------------------------

    def _handle(self, item: Incoming | ConnectionChange) -> None:
        if isinstance(item, ConnectionChange):
            self._on_connection(item)
            return
        if item.topic.startswith(TRANSFER_ROOT + "/"):
            self._on_chunk(item.payload)
            return
        channel = parse_topic(item.topic).channel
        if channel is Channel.DATA:
            self._on_chunk(item.payload)
        elif channel is Channel.CMD:
            msg = decode(item.payload, self.codec_limits)
            if isinstance(msg, SignedCommand):
                self._on_signed_command(msg)
            elif isinstance(msg, RootUpdate):
                self._on_root_update(msg)
            elif isinstance(msg, (DeployCommand, RollbackCommand, RemoveCommand)):
                raise SignatureError(
                    f"unsigned {msg.TYPE} command refused: commands must be signed by a key the root authorises",
                )
            elif isinstance(msg, TransferEnd):
                self._on_transfer_end(msg)
            else:
                raise TransferError(f"message type {msg.TYPE!r} is not a command")

    def _on_connection(self, change: ConnectionChange) -> None:
        if change.connected:
            log.info("connected to %s", self.transport.address)
            self._notifier.status(f"device {self.config.device_id}: online at {self.transport.address}")
            if self.inbound.dropped:
                log.warning("inbound queue has dropped %d message(s) since start", self.inbound.dropped)
            self.reporter.publish_status()
            self._next_heartbeat = self.monotonic() + self.config.heartbeat_s
            if self.telemetry is not None:
                self.telemetry.start(self.monotonic())
            self.reporter.drain_outbox()
            # After any restart, say what is kept and what is lacking, unless the broker kept
            # this device's session: then what was sent meanwhile is queued and on its way, and
            # the host's transfer_end (or the idle timer) asks soon enough.
            session_kept = change.link is not None and change.link.session_present
            for t in self.receiving.held() if not session_kept else ():
                if not t.receiver.complete:  # a complete one waits for the host to offer it again
                    self._report_lacking(t)
        else:
            self._notifier.status(f"device {self.config.device_id}: offline, reconnecting")
            log.warning("connection lost (%s); reconnecting with backoff", change.reason)

    def _on_signed_command(self, signed: SignedCommand) -> None:
        """Verify signature, addressee, times, root expiry and nonce; then obey. Refusals change nothing."""
        now = self.trusted_now()
        try:
            cmd = open_command(signed, self.trust.root, self.config.device_id, now, limits=self.codec_limits)
            self.trust.root.check_not_expired(now)
            self.trust.admit(cmd.command_id, cmd.expires_at, now)
            self.trust.observe(cmd.ts, self.clock())
        except UntrustedInputError as exc:
            log.warning("refused command: %s: %s", exc.code, exc.message)
            self.reporter.event(EventKind.REFUSED, error=exc, command_id=peek_command_id(signed))
            return
        if isinstance(cmd, DeployCommand):
            self._on_deploy(cmd)
        elif isinstance(cmd, RollbackCommand):
            self.installs.roll_back(cmd)
        else:
            self.installs.remove(cmd)

    def _on_root_update(self, msg: RootUpdate) -> None:
        try:
            adopted = self.trust.update_root(canonical_json(msg.root), self.trusted_now())
        except UntrustedInputError as exc:
            log.warning("refused root update: %s: %s", exc.code, exc.message)
            self.reporter.event(EventKind.REFUSED, error=exc, detail={"root_version": self.trust.root.version})
            return
        if adopted:
            self.installer.trusted = self.trust.root.trusted("bundles")
            self.reporter.event(EventKind.DONE, detail={"root_version": self.trust.root.version})
            self.reporter.publish_status()

    # --- receiving ------------------------------------------------------------------

    def _on_deploy(self, cmd: DeployCommand) -> None:
        why = self._delta_refusal(cmd)
        offer = cmd.delta.transfer if cmd.delta is not None and why is None else cmd.transfer
        try:
            held = self.receiving.get(offer.transfer_id)
            if held is None or held.receiver.offer != offer:  # a resumed transfer was checked already
                self.installs.check_recipient(cmd)
                self.installs.precheck(cmd)
        except (UntrustedInputError, StorageError) as exc:
            log.warning("refused offer of %s v%s before transfer: %s", cmd.bundle_name, cmd.bundle_version, exc.message)
            self.reporter.event(EventKind.REFUSED, cmd=cmd, error=exc)
            return
        if cmd.delta is None:
            self._receive(cmd, delta=False, detail={})
        elif why is None:
            log.info("taking %s v%s as a delta from v%s", cmd.bundle_name, cmd.bundle_version, cmd.delta.base_version)
            self._receive(cmd, delta=True, detail={"delta": True, "base_version": cmd.delta.base_version})
        else:
            log.info("taking %s v%s whole: its delta does not fit (%s)", cmd.bundle_name, cmd.bundle_version, why)
            self._receive(cmd, delta=False, detail={"delta": False, "why": why})

    def _delta_refusal(self, cmd: DeployCommand) -> str | None:
        """Why the delta ``cmd`` offers does not fit the active slot (None: it fits; no delta: a reason)."""
        if cmd.delta is None:
            return "no delta offered"
        try:
            return base_refusal(cmd, self.installer.active(cmd.bundle_name))
        except EdgeError as exc:  # the slot named in state.json cannot be read: not a base to build on
            return f"{exc.code}: {exc.message}"

    def _receive(self, cmd: DeployCommand, *, delta: bool, detail: dict[str, object]) -> None:
        """Begin (or resume) receiving the command's bundle, or its delta; ACCEPTED names the transfer."""
        held_before = {x.transfer_id for x in self.receiving.held()}
        try:
            t = self.receiving.begin(cmd, self.monotonic(), delta=delta)
        except EdgeError as exc:
            self._stop_listening(held_before)
            kind = EventKind.REFUSED if isinstance(exc, UntrustedInputError) else EventKind.FAILED
            self.reporter.event(kind, cmd=cmd, error=exc)
            return
        self._stop_listening(held_before)
        self.transport.subscribe(transfer_topic(t.transfer_id), qos=1)
        receiver = t.receiver
        self.reporter.event(
            EventKind.ACCEPTED,
            cmd=cmd,
            missing=receiver.missing(),
            detail={"have": receiver.have_count, "have_index": receiver.index is not None, **detail},
            transfer_id=t.transfer_id,
        )
        if receiver.complete:  # every chunk was in before a restart: the install goes on from here
            self._finish(t)

    def _stop_listening(self, held_before: set[str]) -> None:
        """Unsubscribe from the transfers no longer held (a new one evicted them for room or count)."""
        for tid in held_before - {x.transfer_id for x in self.receiving.held()}:
            self.transport.unsubscribe(transfer_topic(tid))

    def _take(self, received: Received) -> None:
        """A finished transfer: a bundle goes to the install sequence; a delta is rebuilt into one first."""
        if isinstance(received, ReceivedBundle):
            self.installs.received(received)
            return
        cmd = received.command
        try:
            try:
                bundle = rebuild_bundle(received, self.installer.active(cmd.bundle_name), self.config.limits)
            finally:
                received.discard()  # the delta is used up, whatever came of it
        except (DeltaError, StorageError) as exc:
            log.warning(
                "cannot rebuild %s v%s from its delta (%s: %s); taking it whole",
                cmd.bundle_name,
                cmd.bundle_version,
                exc.code,
                exc.message,
            )
            self._receive(cmd, delta=False, detail={"delta": False, "why": f"{exc.code}: {exc.message}"})
            return
        self.installs.received(bundle)

    def _on_chunk(self, payload: bytes) -> None:
        chunk = decode_chunk(payload, self.codec_limits)
        t = self.receiving.get(chunk.transfer_id)
        if t is None:
            log.debug("chunk for a transfer not held (%s) ignored", chunk.transfer_id)
            return
        cmd = t.command
        try:
            received = self.receiving.accept(chunk, self.monotonic())
        except EdgeError as exc:
            self.transport.unsubscribe(transfer_topic(chunk.transfer_id))
            kind = EventKind.REFUSED if isinstance(exc, UntrustedInputError) else EventKind.FAILED
            log.warning("transfer of %s v%s ended: %s", cmd.bundle_name, cmd.bundle_version, exc.message)
            self.reporter.event(kind, cmd=cmd, error=exc, transfer_id=chunk.transfer_id)
            return
        if received is not None:
            self.transport.unsubscribe(transfer_topic(chunk.transfer_id))
            self._take(received)
            return
        have = self.receiving.progress_due(chunk.transfer_id, PROGRESS_EVERY)
        if have is not None and self.transport.connected:
            self.reporter.event(EventKind.PROGRESS, cmd=t.command, detail={"have": have}, transfer_id=t.transfer_id)

    def _on_transfer_end(self, msg: TransferEnd) -> None:
        t = self.receiving.get(msg.transfer_id)
        if t is not None:
            self._report_lacking(t)
        # else: already finished (or refused, which the host has been told)

    def _finish(self, t: Transfer) -> None:
        """Take a transfer whose chunks are all in to the install sequence."""
        tid = t.transfer_id
        self.transport.unsubscribe(transfer_topic(tid))
        received = self.receiving.finish(tid)
        if received is not None:
            self._take(received)

    def _report_lacking(self, t: Transfer) -> None:
        """NEED_CHUNKS: what a transfer held lacks, and whether it has the chunk index; if nothing, finish it."""
        receiver = t.receiver
        if receiver.complete:
            self._finish(t)
            return
        missing = receiver.missing()
        self.reporter.event(
            EventKind.NEED_CHUNKS,
            cmd=t.command,
            missing=missing,
            detail={"have": receiver.have_count, "missing": len(missing), "have_index": receiver.index is not None},
            transfer_id=t.transfer_id,
        )
