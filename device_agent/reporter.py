"""What the agent says: its status (birth and goodbye), heartbeats, events about commands, metrics.

Everything the agent says is signed by the device's own key with the next sequence number
(:class:`~device_agent.identity.DeviceIdentity`) at the moment it is published: a message
buffered while offline is signed when it leaves, so numbers reach the host in the order
they were used. Everything but the status goes through the on-disk outbox (:mod:`device_agent.outbox`)
whenever the broker is unreachable or older messages still wait, and leaves in order
once the broker is back. The status is retained by the broker and always current, so
it is only ever published live; so is a heartbeat (never retained, and worthless late).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from device_agent.identity import DeviceIdentity
from device_agent.installer import Installer
from device_agent.outbox import Outbox
from device_agent.platform import PlatformInfo
from device_agent.transport import InboundQueue, Transport
from edge_sdk import __version__
from edge_sdk.errors import EdgeError, TransportError
from edge_sdk.metrics import PowerSource
from edge_sdk.protocol import (
    DeployCommand,
    DeviceStatus,
    DeviceTopics,
    ErrorInfo,
    Event,
    EventKind,
    Heartbeat,
    MetricsReport,
    RemoveCommand,
    RollbackCommand,
    encode,
    encode_ranges,
)
from edge_sdk.runtime import available_runtimes
from edge_sdk.trust import RecipientPublicKey

__all__ = ["Reporter"]

log = logging.getLogger(__name__)
_OUTBOX_ACK_TIMEOUT_S = 10.0
_OUTBOX_COMMIT_EVERY = 32
#: Metrics reports of one device are dated at least this far apart: the host keys them by
#: device and time, so two taken within one tick of the clock must not share a time.
_METRICS_TS_STEP_S = 1e-6


class Reporter:
    """Publishes one device's status, events and metrics, buffering them while offline.

    Args:
        device_id: this device.
        transport: the connection.
        outbox: the offline buffer.
        installer: what is installed (the status lists the active bundles).
        platform: what this device is (for the status).
        power: where power figures come from (for the status).
        inbound: the agent's inbound queue; the status says how many messages it dropped.
        clock: wall-clock seconds, for timestamps.
        identity: signs every message (the status carries its public key and will number).
        decryption_key: this device's recipient key; the status publishes it
            (``platform.decryption_key``) so the host can encrypt bundles to it.
        labels: this device's labels, carried by its status.
        heartbeat_s: seconds between heartbeats, announced in its status and each heartbeat.
    """

    def __init__(
        self,
        device_id: str,
        transport: Transport,
        outbox: Outbox,
        installer: Installer,
        platform: PlatformInfo,
        power: PowerSource,
        inbound: InboundQueue,
        clock: Callable[[], float],
        identity: DeviceIdentity,
        decryption_key: RecipientPublicKey | None = None,
        labels: Mapping[str, str] | None = None,
        heartbeat_s: float = 60.0,
    ) -> None:
        self.device_id = device_id
        self.labels = dict(labels or {})
        self.heartbeat_s = heartbeat_s
        self.identity = identity
        self.decryption_key = decryption_key
        self.topics = DeviceTopics(device_id)
        self.transport = transport
        self.outbox = outbox
        self.installer = installer
        self.platform = platform
        self.power = power
        self.inbound = inbound
        self.clock = clock
        self._metrics_ts = float("-inf")

    # --- status ---------------------------------------------------------------------

    def status(self, state: str) -> DeviceStatus:
        """This device's status now (``online`` or ``offline``)."""
        extra: dict[str, Any] = {}
        if self.inbound.dropped:
            extra["inbound_dropped"] = self.inbound.dropped
        platform = self.platform.to_dict() | {"power_source": self.power.name, "power_estimated": self.power.estimated}
        if self.decryption_key is not None:
            platform["decryption_key"] = self.decryption_key.to_text()
        return DeviceStatus(
            self.device_id,
            state,
            self.clock(),
            agent_version=__version__,
            platform=platform,
            runtimes=available_runtimes(),
            active={"bundles": [a.to_dict() for a in self.installer.all_active()]},
            public_key=self.identity.public_key.raw.hex(),
            will_seq=self.identity.will_seq,
            labels=self.labels,
            heartbeat_s=self.heartbeat_s,
            extra=extra,
        )

    def publish_status(self) -> None:
        """Publish the ``online`` status (retained): the birth message, and every change of what runs."""
        self.transport.publish(self.topics.status, self._sealed(self.status("online")), retain=True)

    def goodbye(self) -> None:
        """Publish the ``offline`` status and wait for it, if connected (a clean stop sends no will)."""
        if self.transport.connected:
            with contextlib.suppress(EdgeError):
                self.transport.publish_wait(self.topics.status, self._sealed(self.status("offline")), retain=True)

    def heartbeat(self) -> bool:
        """Publish a heartbeat (signed, not retained) if connected; never buffered.

        Returns:
            Whether it was handed to the connection.
        """
        if not self.transport.connected:
            return False
        beat = Heartbeat(self.device_id, self.clock(), self.heartbeat_s)
        try:
            self.transport.publish(self.topics.heartbeat, self._sealed(beat), retain=False)
        except TransportError as exc:
            log.info("heartbeat not sent: %s", exc.message)
            return False
        return True

    def _sealed(self, msg: DeviceStatus | Event | Heartbeat) -> bytes:
        return self.identity.seal(msg, self.clock())

    # --- events and metrics -----------------------------------------------------------

    def event(
        self,
        kind: str,
        cmd: DeployCommand | RollbackCommand | RemoveCommand | None = None,
        error: EdgeError | None = None,
        missing: Iterable[int] | None = None,
        detail: dict[str, Any] | None = None,
        command_id: str = "",
        transfer_id: str = "",
    ) -> None:
        """Report what happened to a command.

        Args:
            kind: an :class:`~edge_sdk.protocol.EventKind`.
            cmd: the command it is about (gives the command and transfer ids).
            error: why it was refused or failed.
            missing: chunk indices the device lacks (sent as ranges, at most
                :data:`~edge_sdk.protocol.transfer.MAX_RANGES` of them: the lowest).
            detail: facts for the host (name, version, reason...).
            command_id: the command id when there is no ``cmd``.
            transfer_id: the transfer it is about, when not the bundle's of ``cmd`` (its delta's).
        """
        if not transfer_id and isinstance(cmd, DeployCommand):
            transfer_id = cmd.transfer.transfer_id
        event = Event(
            device_id=self.device_id,
            kind=kind,
            ts=self.clock(),
            command_id=cmd.command_id if cmd else command_id,
            transfer_id=transfer_id,
            missing_ranges=encode_ranges(missing or ()),
            error=ErrorInfo(error.code, error.message, _jsonable(error.details)) if error else None,
            detail=detail or {},
        )
        self.send(self.topics.events, encode(event))

    def metrics_time(self) -> float:
        """The time for a new metrics report: the clock, but always later than the last one's.

        The host stores a report once per device and time (a report heard twice is one row),
        so two reports (two bundles measured in one round, an install right after a
        periodic report) must never share one.
        """
        self._metrics_ts = max(self.clock(), self._metrics_ts + _METRICS_TS_STEP_S)
        return self._metrics_ts

    def metrics(self, report: MetricsReport, retain: bool = False) -> None:
        """Report a benchmark (retained for the installed version, not for a profile-only run)."""
        self.send(self.topics.metrics, encode(report), retain=retain)

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish now when online and nothing older waits; else buffer on disk, in order."""
        if self.transport.connected and not self.outbox.pending:
            self.transport.publish(topic, self.identity.seal_bytes(payload, self.clock()), retain=retain)
            return
        if not self.outbox.append(topic, payload, retain):
            log.warning("offline buffer full (%d bytes): message to %s dropped", self.outbox.max_bytes, topic)

    # --- offline buffer -------------------------------------------------------------

    def drain_outbox(self) -> None:
        """Deliver buffered messages oldest first, each acknowledged before the next."""
        sent = 0
        try:
            while self.transport.connected and (record := self.outbox.peek()) is not None:
                try:
                    sealed = self.identity.seal_bytes(record.payload, self.clock())
                    self.transport.publish(record.topic, sealed, retain=record.retain).wait(_OUTBOX_ACK_TIMEOUT_S)
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
        if self.outbox.dropped and not self.outbox.pending and self.transport.connected:
            dropped = self.outbox.dropped
            event = Event(
                device_id=self.device_id,
                kind=EventKind.DROPPED,
                ts=self.clock(),
                detail={"count": dropped, "max_bytes": self.outbox.max_bytes},
            )
            try:
                self.transport.publish(self.topics.events, self._sealed(event)).wait(_OUTBOX_ACK_TIMEOUT_S)
            except TransportError:
                return
            log.warning("reported %d message(s) dropped while offline", dropped)
            self.outbox.reset_dropped()

    def close(self) -> None:
        """Close the outbox (its files stay for the next start)."""
        self.outbox.close()


def _jsonable(details: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in details.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out
