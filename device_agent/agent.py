"""The device agent: connect, announce, receive bundles, install them, report.

One worker thread (the caller of :meth:`Agent.run`) does all the work. paho's network
thread only puts messages on ``client.inbox``. Every message is handled inside a guard:
bad input becomes an ``error``/``refused`` event back to the host, and the loop goes on.

Lifecycle of a deploy::

    deploy cmd  -> ACCEPTED (missing chunks)      staging file reserved at its declared size
    chunks      -> written at their offsets       size and count enforced per chunk
    complete    -> RECEIVED                       whole-file sha256 checked against the offer
                -> verify, stage, activate, health check  (roll back on failure)
                -> INSTALLED, new birth message, metrics report
    transfer_end while chunks are missing -> NEED_CHUNKS (the host resends them)
    idle too long -> REFUSED (transfer_incomplete), staging removed
    update gate closed after RECEIVED -> DEFERRED (reason); bundle kept under deferred/,
                the gate asked again every update_gate_retry_s, then installed as above
    action "profile" -> verify into scratch, benchmark, metrics report (not retained),
                PROFILED, scratch removed; state.json untouched

Events and metrics go through an on-disk outbox (:mod:`device_agent.outbox`) whenever
the broker is unreachable, and leave in order once it is back. Installs are two-phase
(see :mod:`device_agent.installer`): a version the agent finds still pending at start
was interrupted before it proved itself, and is rolled back and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.config import AgentConfig
from device_agent.gate import UpdateGate
from device_agent.installer import Installer, PendingRollback
from device_agent.outbox import Outbox
from device_agent.platform import PlatformInfo, detect_platform, power_model_name
from device_agent.sdnotify import Notifier
from device_agent.trust_store import TrustStore
from edge_sdk import __version__
from edge_sdk.bundle import DeviceFacts, Expected, Manifest
from edge_sdk.errors import (
    EdgeError,
    HashMismatchError,
    HealthCheckError,
    ModelError,
    RollbackError,
    SignatureError,
    StorageError,
    TransferError,
    TransportError,
    UntrustedInputError,
)
from edge_sdk.metrics import PowerSource, detect_power_source
from edge_sdk.mqtt import ConnectionChange, Incoming, MqttClient, MqttOptions, Will
from edge_sdk.protocol import (
    Channel,
    ChunkReceiver,
    CodecLimits,
    DeployCommand,
    DeviceStatus,
    DeviceTopics,
    ErrorInfo,
    Event,
    EventKind,
    MetricsReport,
    RemoveCommand,
    RollbackCommand,
    RootUpdate,
    SignedCommand,
    TransferEnd,
    decode,
    decode_chunk,
    encode,
    open_command,
    parse_topic,
    peek_command_id,
)
from edge_sdk.runtime import available_runtimes
from edge_sdk.trust import canonical_json

__all__ = ["Agent"]

if TYPE_CHECKING:  # numpy and the runtimes are imported only when a model is profiled
    from device_agent.profiler import Profile
    from device_agent.selection import ExecutionChoice

log = logging.getLogger(__name__)
_MAX_MISSING_LISTED = 2048
_OUTBOX_ACK_TIMEOUT_S = 10.0
_OUTBOX_COMMIT_EVERY = 32


def _crash_hook(point: str | None) -> Callable[[str], None]:
    """The ``debug_crash_at`` option: a real SIGKILL of this process at one named step."""
    if point is None:
        return lambda _reached: None

    def hook(reached: str) -> None:
        if reached == point:
            log.warning("debug_crash_at=%s reached: SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


@dataclass
class _Transfer:
    command: DeployCommand
    receiver: ChunkReceiver
    path: Path
    fd: int


class Agent:
    """Runs one device.

    Args:
        config: validated configuration.
        clock: wall-clock seconds (expiry checks, timestamps); injectable.
    """

    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.topics = DeviceTopics(config.device_id)
        self._checkpoint = _crash_hook(config.debug_crash_at)
        self.trust = TrustStore(config.data_dir / "trust", config.load_root())
        self.installer = Installer(
            config.data_dir, self.trust.root.trusted("bundles"), config.limits, checkpoint=self._checkpoint
        )
        removed = self.installer.recover()
        if removed:
            log.info("removed %d leftover(s) of interrupted work", len(removed))
        rolled_back = self.installer.roll_back_pending()
        self.outbox = Outbox(config.data_dir / "outbox", config.outbox_max_bytes)
        self.gate = UpdateGate(config.update_gate_file, config.update_gate_command, config.update_gate_timeout_s)
        self._next_gate_check = 0.0
        self.platform: PlatformInfo = detect_platform(config.sysfs_root)
        self.power: PowerSource = detect_power_source(config.sysfs_root, power_model_name(self.platform))
        self.codec_limits = CodecLimits()
        self._transfers: dict[str, _Transfer] = {}
        self._notifier = Notifier()
        will = DeviceStatus(config.device_id, "offline", 0.0, agent_version=__version__)
        self.client = MqttClient(
            config.broker,
            MqttOptions(
                client_id=f"edge-agent-{config.device_id}",
                reconnect_max_s=config.reconnect_max_s,
                will=Will(self.topics.status, encode(will)),
                ca_file=config.ca_file,
                cert_file=config.cert_file,
                key_file=config.key_file,
            ),
        )
        for rb in rolled_back:
            self._report_interrupted(rb)

    # --- loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event, notifier: Notifier | None = None) -> None:
        """Work until ``stop`` is set; then say goodbye (offline status) and disconnect.

        Args:
            stop: set it to stop.
            notifier: systemd notification socket (ready, watchdog, stopping), if any.
        """
        self._notifier = notifier or Notifier()
        self.client.subscribe(self.topics.cmd, qos=1)
        self.client.subscribe(self.topics.data, qos=1)
        log.info("agent %s starting; broker %s", self.config.device_id, self.client.address)
        self.client.start()
        self._notifier.ready(f"device {self.config.device_id}: connecting to {self.client.address}")
        try:
            while not stop.is_set():
                self._notifier.watchdog()
                try:
                    item = self.client.inbox.get(timeout=0.5)
                except queue.Empty:
                    self._guarded_tick()
                    continue
                self._guarded(item)
        finally:
            self._notifier.stopping()
            self._shutdown()

    def _guarded_tick(self) -> None:
        try:
            self._tick()
        except EdgeError as exc:
            log.warning("%s: %s", exc.code, exc.message)
        except Exception:  # the agent must keep running
            log.exception("unexpected failure in periodic work")

    def _shutdown(self) -> None:
        for tid in list(self._transfers):
            self._drop_transfer(tid)
        if self.client.connected:
            with contextlib.suppress(EdgeError):
                self.client.publish_wait(self.topics.status, encode(self._status("offline")), retain=True)
        self.client.close()
        self.outbox.close()
        log.info("agent %s stopped", self.config.device_id)

    def _guarded(self, item: Incoming | ConnectionChange) -> None:
        try:
            self._handle(item)
        except EdgeError as exc:
            log.warning("%s: %s", exc.code, exc.message)
            self._event(EventKind.ERROR, error=exc)
        except Exception as exc:  # the agent must keep running whatever one message does
            log.exception("unexpected failure handling a message")
            self._event(EventKind.ERROR, error=EdgeError(f"agent failure: {type(exc).__name__}: {exc}"))

    def _handle(self, item: Incoming | ConnectionChange) -> None:
        if isinstance(item, ConnectionChange):
            if item.connected:
                log.info("connected to %s", self.client.address)
                self._notifier.status(f"device {self.config.device_id}: online at {self.client.address}")
                self._publish_status()
                self._drain_outbox()
            else:
                self._notifier.status(f"device {self.config.device_id}: offline, reconnecting")
                log.warning("connection lost (%s); reconnecting with backoff", item.reason)
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

    def _tick(self) -> None:
        now = time.monotonic()
        for tid, t in list(self._transfers.items()):
            if t.receiver.expired(now):
                err = None
                try:
                    t.receiver.require_complete()
                except TransferError as exc:
                    err = exc
                self._drop_transfer(tid)
                self._event(EventKind.REFUSED, cmd=t.command, error=err or TransferError("transfer timed out"))
        if self.outbox.pending and self.client.connected:
            self._drain_outbox()
        if now >= self._next_gate_check:
            self._retry_deferred()

    # --- offline buffer -------------------------------------------------------------

    def _send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish now when online and nothing older waits; else buffer on disk, in order."""
        if self.client.connected and not self.outbox.pending:
            self.client.publish(topic, payload, retain=retain)
            return
        if not self.outbox.append(topic, payload, retain):
            log.warning("offline buffer full (%d bytes): message to %s dropped", self.outbox.max_bytes, topic)

    def _drain_outbox(self) -> None:
        """Deliver buffered messages oldest first, each acknowledged before the next."""
        sent = 0
        try:
            while self.client.connected and (record := self.outbox.peek()) is not None:
                try:
                    self.client.publish(record.topic, record.payload, retain=record.retain).wait(_OUTBOX_ACK_TIMEOUT_S)
                except TransportError as exc:
                    log.info("outbox delivery paused: %s", exc.message)
                    break
                self.outbox.pop()
                sent += 1
                if sent % _OUTBOX_COMMIT_EVERY == 0:
                    self.outbox.commit()
        finally:
            self.outbox.commit()
        if sent:
            log.info("delivered %d buffered message(s)", sent)
        if self.outbox.dropped and not self.outbox.pending and self.client.connected:
            dropped = self.outbox.dropped
            event = Event(
                device_id=self.config.device_id,
                kind=EventKind.DROPPED,
                ts=self.clock(),
                detail={"count": dropped, "max_bytes": self.outbox.max_bytes},
            )
            try:
                self.client.publish(self.topics.events, encode(event)).wait(_OUTBOX_ACK_TIMEOUT_S)
            except TransportError:
                return
            log.warning("reported %d message(s) dropped while offline", dropped)
            self.outbox.reset_dropped()

    # --- messages out ---------------------------------------------------------------

    def _status(self, state: str) -> DeviceStatus:
        return DeviceStatus(
            self.config.device_id,
            state,
            self.clock(),
            agent_version=__version__,
            platform=self.platform.to_dict()
            | {"power_source": self.power.name, "power_estimated": self.power.estimated},
            runtimes=available_runtimes(),
            active={"bundles": [a.to_dict() for a in self.installer.all_active()]},
        )

    def _publish_status(self) -> None:
        self.client.publish(self.topics.status, encode(self._status("online")), retain=True)

    def _event(
        self,
        kind: str,
        cmd: DeployCommand | RollbackCommand | RemoveCommand | None = None,
        error: EdgeError | None = None,
        missing: list[int] | None = None,
        detail: dict | None = None,
        command_id: str = "",
    ) -> None:
        event = Event(
            device_id=self.config.device_id,
            kind=kind,
            ts=self.clock(),
            command_id=cmd.command_id if cmd else command_id,
            transfer_id=cmd.transfer.transfer_id if isinstance(cmd, DeployCommand) else "",
            missing=tuple((missing or [])[:_MAX_MISSING_LISTED]),
            error=ErrorInfo(error.code, error.message, _jsonable(error.details)) if error else None,
            detail=detail or {},
        )
        self._send(self.topics.events, encode(event))

    # --- signed commands and the root of trust ------------------------------------------

    def _on_signed_command(self, signed: SignedCommand) -> None:
        """Verify signature, addressee, times and nonce; then obey. Refusals change nothing."""
        now = self.clock()
        try:
            cmd = open_command(signed, self.trust.root, self.config.device_id, now, limits=self.codec_limits)
            self.trust.admit(cmd.command_id, cmd.expires_at, now)
        except UntrustedInputError as exc:
            log.warning("refused command: %s: %s", exc.code, exc.message)
            self._event(EventKind.REFUSED, error=exc, command_id=peek_command_id(signed))
            return
        if isinstance(cmd, DeployCommand):
            self._on_deploy(cmd)
        elif isinstance(cmd, RollbackCommand):
            self._on_rollback(cmd)
        else:
            self._on_remove(cmd)

    def _on_root_update(self, msg: RootUpdate) -> None:
        try:
            adopted = self.trust.update_root(canonical_json(msg.root), self.clock())
        except UntrustedInputError as exc:
            log.warning("refused root update: %s: %s", exc.code, exc.message)
            self._event(EventKind.REFUSED, error=exc, detail={"root_version": self.trust.root.version})
            return
        if adopted:
            self.installer.trusted = self.trust.root.trusted("bundles")
            self._event(EventKind.DONE, detail={"root_version": self.trust.root.version})
            self._publish_status()

    def _on_rollback(self, cmd: RollbackCommand) -> None:
        """Re-activate the kept previous version, only if it is the one the command names."""
        previous = self.installer.previous(cmd.bundle_name)
        if previous is None or previous.version != cmd.bundle_version:
            kept = f"v{previous.version}" if previous else "no previous version"
            err = RollbackError(
                f"cannot roll {cmd.bundle_name} back to v{cmd.bundle_version}: this device keeps {kept}; "
                f"deploy that version's bundle as a rollback instead",
                offered=cmd.bundle_version,
                installed=previous.version if previous else None,
            )
            self._event(EventKind.REFUSED, cmd=cmd, error=err)
            return
        restored = self.installer.rollback(cmd.bundle_name)
        self._publish_status()
        self._event(
            EventKind.DONE,
            cmd=cmd,
            detail={"action": "rollback", "name": cmd.bundle_name, "version": restored.version if restored else None},
        )

    def _on_remove(self, cmd: RemoveCommand) -> None:
        removed = self.installer.remove(cmd.bundle_name)
        self._publish_status()
        self._event(EventKind.DONE, cmd=cmd, detail={"action": "remove", "name": cmd.bundle_name, "removed": removed})

    def _bundle_checks(self, cmd: DeployCommand) -> dict:
        """What a bundle is verified against: the current root, this device, the signed command."""
        self.trust.root.check_not_expired(self.clock())
        return {
            "trusted": self.trust.root.trusted("bundles"),
            "device": DeviceFacts(self.platform.arch, self.platform.memory_bytes, frozenset(self.config.accelerators)),
            "expect": Expected(cmd.bundle_name, cmd.bundle_version, rollback=cmd.rollback),
        }

    # --- transfer -------------------------------------------------------------------

    def _on_deploy(self, cmd: DeployCommand) -> None:
        offer = cmd.transfer
        existing = self._transfers.get(offer.transfer_id)
        if existing is not None:  # the host re-offered: resume
            self._event(EventKind.ACCEPTED, cmd=cmd, missing=existing.receiver.missing())
            return
        if offer.size > self.config.limits.max_bundle_bytes:
            raise TransferError(
                f"bundle of {offer.size} bytes exceeds this device's limit of {self.config.limits.max_bundle_bytes}"
            )
        path = self.installer.staging_path(offer.transfer_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create staging file {path}: {exc.strerror}") from exc
        try:
            os.posix_fallocate(fd, 0, offer.size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            err = StorageError(
                f"not enough storage for a {offer.size}-byte bundle in {path.parent}: {exc.strerror}",
                size=offer.size,
            )
            self._event(EventKind.FAILED, cmd=cmd, error=err)
            return
        receiver = ChunkReceiver(offer, now=time.monotonic(), idle_timeout_s=self.config.transfer_idle_timeout_s)
        self._transfers[offer.transfer_id] = _Transfer(cmd, receiver, path, fd)
        log.info(
            "receiving %s v%s: %d bytes in %d chunks",
            cmd.bundle_name,
            cmd.bundle_version,
            offer.size,
            receiver.chunk_count,
        )
        self._event(EventKind.ACCEPTED, cmd=cmd, missing=receiver.missing())

    def _on_chunk(self, payload: bytes) -> None:
        chunk = decode_chunk(payload, self.codec_limits)
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            log.debug("chunk for unknown transfer %s ignored", chunk.transfer_id)
            return
        try:
            write = t.receiver.accept(chunk.index, chunk.data, time.monotonic())
            if write is not None:
                os.pwrite(t.fd, write.data, write.offset)
                if (
                    self.config.debug_crash_at == "receiving"
                    and 2 * len(t.receiver.missing()) <= t.receiver.chunk_count
                ):
                    self._checkpoint("receiving")
        except (TransferError, OSError) as exc:
            self._drop_transfer(chunk.transfer_id)
            err = exc if isinstance(exc, EdgeError) else StorageError(f"cannot write staging file: {exc.strerror}")
            self._event(
                EventKind.REFUSED if isinstance(err, UntrustedInputError) else EventKind.FAILED,
                cmd=t.command,
                error=err,
            )
            return
        if t.receiver.complete:
            self._finish_transfer(chunk.transfer_id)

    def _on_transfer_end(self, msg: TransferEnd) -> None:
        t = self._transfers.get(msg.transfer_id)
        if t is None:
            return  # already finished (or refused, which the host has been told)
        missing = t.receiver.missing()
        if missing:
            self._event(EventKind.NEED_CHUNKS, cmd=t.command, missing=missing)

    def _drop_transfer(self, tid: str) -> None:
        t = self._transfers.pop(tid, None)
        if t is None:
            return
        with contextlib.suppress(OSError):
            os.close(t.fd)
        t.path.unlink(missing_ok=True)

    def _finish_transfer(self, tid: str) -> None:
        t = self._transfers[tid]
        cmd = t.command
        try:
            os.fsync(t.fd)
            digest = _sha256_fd(t.fd)
            if digest != cmd.transfer.sha256:
                raise HashMismatchError(
                    f"received file's sha256 {digest[:16]}... differs from the offer's {cmd.transfer.sha256[:16]}...",
                    expected=cmd.transfer.sha256,
                    actual=digest,
                )
            self._event(EventKind.RECEIVED, cmd=cmd)
            self._checkpoint("received")
            if cmd.action == "profile":
                self._profile_only(cmd, t.path)
                return
            decision = self.gate.check()
            if not decision.open:
                self.installer.defer(cmd.transfer.transfer_id, t.path, encode(cmd))
                self._next_gate_check = time.monotonic() + self.config.update_gate_retry_s
                log.info("install of %s v%s deferred: %s", cmd.bundle_name, cmd.bundle_version, decision.reason)
                self._event(
                    EventKind.DEFERRED,
                    cmd=cmd,
                    detail={"reason": decision.reason, "retry_s": self.config.update_gate_retry_s},
                )
                return
            self._install(cmd, t.path)
        except UntrustedInputError as exc:
            log.warning("refused %s v%s: %s", cmd.bundle_name, cmd.bundle_version, exc.message)
            self._event(EventKind.REFUSED, cmd=cmd, error=exc)
        except EdgeError as exc:
            log.warning("install of %s v%s failed: %s", cmd.bundle_name, cmd.bundle_version, exc.message)
            self._event(EventKind.FAILED, cmd=cmd, error=exc)
        finally:
            self._drop_transfer(tid)

    # --- install --------------------------------------------------------------------

    def _install(self, cmd: DeployCommand, bundle_path: Path) -> None:
        staged = self.installer.stage(bundle_path, self.clock(), **self._bundle_checks(cmd))
        manifest = staged.verified.manifest
        self.installer.activate(staged, cmd.command_id)
        active = self.installer.active(manifest.name)
        assert active is not None
        try:
            profile, choice = self._profile(manifest, active.slot / "payload", cmd)
            if choice is not None:
                self.installer.record_execution(active, choice.to_dict())
        except ModelError as exc:
            restored = self.installer.rollback(manifest.name)
            exc.details["rolled_back_to"] = restored.version if restored else None
            log.warning(
                "%s v%s failed its health check (%s); rolled back to %s",
                manifest.name,
                manifest.version,
                exc.message,
                restored.version if restored else "nothing",
            )
            self._publish_status()
            raise
        self._checkpoint("profiled")
        self.installer.confirm(manifest.name)
        self._event(
            EventKind.INSTALLED,
            cmd=cmd,
            detail={"name": manifest.name, "version": manifest.version, "checks": list(staged.verified.checks)},
        )
        self._checkpoint("reported")
        self._publish_status()
        report = self._metrics_report(cmd, manifest.name, manifest.version, profile, choice)
        self._send(self.topics.metrics, encode(report), retain=True)
        log.info(
            "installed %s v%s: p50 %.3f ms, p99 %.3f ms",
            manifest.name,
            manifest.version,
            profile.latency.p50_ms,
            profile.latency.p99_ms,
        )

    def _metrics_report(
        self,
        cmd: DeployCommand,
        name: str,
        version: int,
        profile: Profile,
        choice: ExecutionChoice | None,
        **extra: object,
    ) -> MetricsReport:
        return MetricsReport(
            device_id=self.config.device_id,
            bundle_name=name,
            bundle_version=version,
            runtime=profile.runtime,
            precision=profile.precision,
            ts=self.clock(),
            command_id=cmd.command_id,
            threads=profile.threads,
            providers=profile.providers,
            latency=profile.latency,
            memory=profile.memory,
            cpu=profile.cpu,
            power=profile.power,
            temperature=profile.temperature,
            execution=choice,
            extra=dict(extra),
        )

    def _profile_only(self, cmd: DeployCommand, bundle_path: Path) -> None:
        """Verify, benchmark from a scratch directory, report, remove. Nothing is activated."""
        scratch = self.installer.stage_scratch(bundle_path, self.clock(), **self._bundle_checks(cmd))
        manifest = scratch.verified.manifest
        try:
            profile, choice = self._profile(manifest, scratch.slot / "payload", cmd)
        finally:
            self.installer.discard(scratch)
        report = self._metrics_report(cmd, manifest.name, manifest.version, profile, choice, mode="profile")
        self._send(self.topics.metrics, encode(report))
        self._event(EventKind.PROFILED, cmd=cmd, detail={"name": manifest.name, "version": manifest.version})
        log.info(
            "profiled %s v%s without installing: p50 %.3f ms",
            manifest.name,
            manifest.version,
            profile.latency.p50_ms,
        )

    def _profile(self, manifest: Manifest, payload: Path, cmd: DeployCommand) -> tuple[Profile, ExecutionChoice | None]:
        """Health-check and benchmark the bundle unpacked in ``payload``.

        A bundle with sparse layers first gets its execution chosen (by pin or by
        measurement, :mod:`device_agent.selection`), and the profile runs that one.

        Returns:
            The profile, and the execution choice (``None`` for other bundles).

        Raises:
            ModelError: the model does not load or fails its health check, the sparse
                files are unusable, or no execution can run.
        """
        from device_agent.profiler import profile_model  # numpy and the runtimes only when needed

        sample = payload / manifest.sample_input if manifest.sample_input else None
        choice, opener = None, None
        if manifest.sparse is not None:
            from device_agent.selection import select_execution  # sparse bundles only

            try:
                choice, opener = select_execution(payload, manifest, cmd.benchmark, self.config.execution, sample)
            except ModelError:
                raise
            except EdgeError as exc:
                raise HealthCheckError(f"{exc.code}: {exc.message}", check="execution") from exc
        profile = profile_model(
            payload / manifest.model,
            manifest.runtime,
            manifest.precision,
            sample,
            cmd.benchmark,
            self.power,
            self.config.sysfs_root,
            max_latency_ms=manifest.health.max_latency_ms if manifest.health else None,
            opener=opener,
        )
        return profile, choice

    def _retry_deferred(self) -> None:
        """Ask the gate again for installs it held back; install them oldest first once it opens."""
        self._next_gate_check = time.monotonic() + self.config.update_gate_retry_s
        waiting = self.installer.deferred()
        if not waiting:
            return
        decision = self.gate.check()
        if not decision.open:
            log.debug("update gate still closed (%s); %d install(s) wait", decision.reason, len(waiting))
            return
        for tid, path, raw in waiting:
            try:
                cmd = decode(raw, self.codec_limits)
                if not isinstance(cmd, DeployCommand):
                    raise StorageError(f"deferred command {tid} is not a deploy command")
            except EdgeError as exc:
                log.warning("dropping unreadable deferred install %s: %s", tid, exc.message)
                self.installer.drop_deferred(tid)
                continue
            active = self.installer.active(cmd.bundle_name)
            if active is not None and active.version == cmd.bundle_version:
                # Installed and confirmed before a crash or restart kept us from dropping
                # it; installing it again would only be refused as "not newer".
                log.info("deferred %s v%s is already active; dropping it", cmd.bundle_name, cmd.bundle_version)
                self.installer.drop_deferred(tid)
                continue
            log.info("update gate open: installing deferred %s v%s", cmd.bundle_name, cmd.bundle_version)
            try:
                self._install(cmd, path)
            except UntrustedInputError as exc:
                self._event(EventKind.REFUSED, cmd=cmd, error=exc)
            except EdgeError as exc:
                self._event(EventKind.FAILED, cmd=cmd, error=exc)
            finally:
                self.installer.drop_deferred(tid)

    def _report_interrupted(self, rb: PendingRollback) -> None:
        err = HealthCheckError(
            f"install of {rb.name} v{rb.version} was interrupted before it passed its health check "
            f"(agent restarted); rolled back to {f'v{rb.restored}' if rb.restored else 'nothing'}",
            check="interrupted",
            rolled_back_to=rb.restored,
        )
        log.warning("%s", err.message)
        self._event(
            EventKind.FAILED, error=err, command_id=rb.command_id, detail={"name": rb.name, "version": rb.version}
        )


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, 1 << 20, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _jsonable(details: dict) -> dict:
    out = {}
    for k, v in details.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out
