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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device_agent.config import AgentConfig
from device_agent.installer import Installer
from device_agent.platform import PlatformInfo, detect_platform
from device_agent.profiler import profile_model
from edge_sdk import __version__
from edge_sdk.errors import (
    EdgeError,
    HashMismatchError,
    ModelError,
    StorageError,
    TransferError,
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
    TransferEnd,
    decode,
    decode_chunk,
    encode,
    parse_topic,
)
from edge_sdk.runtime import available_runtimes

__all__ = ["Agent"]

log = logging.getLogger(__name__)
_MAX_MISSING_LISTED = 2048


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
        self.installer = Installer(config.data_dir, config.load_trusted(), config.limits)
        removed = self.installer.recover()
        if removed:
            log.info("removed %d leftover(s) of interrupted work", len(removed))
        self.platform: PlatformInfo = detect_platform(config.sysfs_root)
        self.power: PowerSource = detect_power_source(config.sysfs_root, self.platform.kind)
        self.codec_limits = CodecLimits()
        self._transfers: dict[str, _Transfer] = {}
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

    # --- loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; then say goodbye (offline status) and disconnect."""
        self.client.subscribe(self.topics.cmd, qos=1)
        self.client.subscribe(self.topics.data, qos=1)
        log.info("agent %s starting; broker %s", self.config.device_id, self.client.address)
        self.client.start()
        try:
            while not stop.is_set():
                try:
                    item = self.client.inbox.get(timeout=0.5)
                except queue.Empty:
                    self._tick()
                    continue
                self._guarded(item)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for tid in list(self._transfers):
            self._drop_transfer(tid)
        if self.client.connected:
            with contextlib.suppress(EdgeError):
                self.client.publish_wait(self.topics.status, encode(self._status("offline")), retain=True)
        self.client.close()
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
                self._publish_status()
            else:
                log.warning("connection lost (%s); reconnecting with backoff", item.reason)
            return
        channel = parse_topic(item.topic).channel
        if channel is Channel.DATA:
            self._on_chunk(item.payload)
        elif channel is Channel.CMD:
            msg = decode(item.payload, self.codec_limits)
            if isinstance(msg, DeployCommand):
                self._on_deploy(msg)
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

    # --- messages out ---------------------------------------------------------------

    def _status(self, state: str) -> DeviceStatus:
        return DeviceStatus(
            self.config.device_id,
            state,
            self.clock(),
            agent_version=__version__,
            platform=self.platform.to_dict() | {"power_source": self.power.name, "power_estimated": self.power.estimated},
            runtimes=available_runtimes(),
            active={"bundles": [a.to_dict() for a in self.installer.all_active()]},
        )

    def _publish_status(self) -> None:
        self.client.publish(self.topics.status, encode(self._status("online")), retain=True)

    def _event(
        self,
        kind: str,
        cmd: DeployCommand | None = None,
        error: EdgeError | None = None,
        missing: list[int] | None = None,
        detail: dict | None = None,
    ) -> None:
        event = Event(
            device_id=self.config.device_id,
            kind=kind,
            ts=self.clock(),
            command_id=cmd.command_id if cmd else "",
            transfer_id=cmd.transfer.transfer_id if cmd else "",
            missing=tuple((missing or [])[:_MAX_MISSING_LISTED]),
            error=ErrorInfo(error.code, error.message, _jsonable(error.details)) if error else None,
            detail=detail or {},
        )
        self.client.publish(self.topics.events, encode(event))

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
            cmd.bundle_name, cmd.bundle_version, offer.size, receiver.chunk_count,
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
        except (TransferError, OSError) as exc:
            self._drop_transfer(chunk.transfer_id)
            err = exc if isinstance(exc, EdgeError) else StorageError(f"cannot write staging file: {exc.strerror}")
            self._event(EventKind.REFUSED if isinstance(err, UntrustedInputError) else EventKind.FAILED, cmd=t.command, error=err)
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
        staged = self.installer.stage(bundle_path, self.clock())
        manifest = staged.verified.manifest
        self.installer.activate(staged)
        active = self.installer.active(manifest.name)
        assert active is not None
        try:
            profile = profile_model(
                active.model_path,
                manifest.runtime,
                manifest.precision,
                active.sample_path,
                cmd.benchmark,
                self.power,
                self.config.sysfs_root,
            )
        except ModelError as exc:
            restored = self.installer.rollback(manifest.name)
            exc.details["rolled_back_to"] = restored.version if restored else None
            self._publish_status()
            raise
        self._event(
            EventKind.INSTALLED,
            cmd=cmd,
            detail={"name": manifest.name, "version": manifest.version, "checks": list(staged.verified.checks)},
        )
        self._publish_status()
        report = MetricsReport(
            device_id=self.config.device_id,
            bundle_name=manifest.name,
            bundle_version=manifest.version,
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
        )
        self.client.publish(self.topics.metrics, encode(report), retain=True)
        log.info(
            "installed %s v%s: p50 %.3f ms, p99 %.3f ms",
            manifest.name, manifest.version, profile.latency["p50_ms"], profile.latency["p99_ms"],
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
