"""Deliver one file to many devices at once: each chunk published once, repairs where needed.

The plan is :class:`edge_sdk.protocol.FanOut`'s (pure: which chunk next, to the transfer
topic or to one device, within every device's window); this module is the shell that
publishes what it says and feeds it what the devices answer. See
:mod:`edge_sdk.protocol.transfer` for the conversation.

:func:`prepare_file` reads the file once (its sha256 and the chunk index). A
:class:`TransferRun` then sends each device its signed deploy command, drives the transfer
over one connection, and returns, per device, the first thing it said after the transfer
(``received``, ``installed``, ``deferred``, or a refusal), or the error that ended it there
(a timeout: :class:`~edge_sdk.errors.DeviceTimeoutError`, exit code 4). What a device says
after that is kept for the caller (:attr:`TransferResult.later`).

The file is a bundle, or a delta a command offers besides its bundle
(:class:`~edge_sdk.protocol.DeltaOffer`). A device may answer a command by accepting its
*other* transfer (offered the delta, it takes the bundle whole): it has then left this run
(:attr:`TransferResult.left`), and the caller sends it that file in a run of its own,
passing what it said as ``joined`` so that its command is not sent twice.

A broker that goes away mid-transfer costs what was in flight: the run waits for the
connection to come back (``DeployOptions.reconnect_timeout_s``), the devices say what they
lack when they reconnect, and only that is sent again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from edge_sdk.errors import DeviceTimeoutError, EdgeError, MessageError, StorageError, TransportError
from edge_sdk.mqtt import MqttClient, PublishHandle
from edge_sdk.protocol import (
    INDEX_FRAME,
    ChunkIndex,
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    FanOut,
    MetricsReport,
    TransferEnd,
    TransferOffer,
    choose_chunk_size,
    content_transfer_id,
    decode_ranges,
    encode,
    encode_chunk,
    transfer_topic,
)
from host_tools.fleet.conversation import TERMINAL_KINDS
from host_tools.fleet.pacing import TokenBucket

if TYPE_CHECKING:
    from host_tools.fleet.deployer import DeployOptions

__all__ = ["Inbound", "PreparedFile", "TransferResult", "TransferRun", "prepare_file"]

log = logging.getLogger(__name__)

#: What ends a device's part in the transfer: it has the file, or it stopped.
_AFTER_TRANSFER = frozenset({EventKind.RECEIVED, EventKind.INSTALLED, EventKind.DEFERRED, EventKind.PROFILED})
#: Events about one transfer in particular (the others are about the command).
_OF_A_TRANSFER = frozenset({EventKind.ACCEPTED, EventKind.NEED_CHUNKS, EventKind.PROGRESS})
#: How long the run waits for answers when it has nothing to send.
_IDLE_WAIT_S = 0.05
#: Longest wait for every device's answer to the offer before the first chunk goes out.
_GATHER_S = 5.0

#: Where answers come from: the next (device id, message) before a monotonic deadline, or None.
Inbound = Callable[[float], "tuple[str, Event | MetricsReport] | None"]


@dataclass(frozen=True)
class PreparedFile:
    """A file ready to be offered: its size, sha256, chunk size and chunk index.

    Attributes:
        path: the file.
        size: its bytes.
        sha256: its sha256 (hex).
        chunk_size: bytes per chunk (see :func:`~edge_sdk.protocol.choose_chunk_size`).
        index: the sha256 of every chunk.
    """

    path: Path
    size: int
    sha256: str
    chunk_size: int
    index: ChunkIndex

    @property
    def transfer_id(self) -> str:
        """The transfer's name, derived from the content (a retry is the same transfer)."""
        return content_transfer_id(self.sha256, self.chunk_size)

    @property
    def chunk_count(self) -> int:
        return len(self.index)

    def offer(self, encrypted_for: tuple[str, ...] = ()) -> TransferOffer:
        """The offer a deploy command signs."""
        return TransferOffer(
            self.transfer_id, self.size, self.sha256, self.chunk_size, self.index.sha256, encrypted_for=encrypted_for
        )


def prepare_file(path: Path, chunk_size: int) -> PreparedFile:
    """Read a file once: its sha256 and the sha256 of each chunk.

    Args:
        path: the bundle (or delta) file.
        chunk_size: the chunk size wanted; doubled as needed to keep the chunk count bounded.

    Returns:
        The prepared file.

    Raises:
        StorageError: the file cannot be read, or is empty.
        ConfigError: the chunk size is out of range, or the file too large to send.
    """
    try:
        size = path.stat().st_size
        if size < 1:
            raise StorageError(f"{path} is empty: nothing to send")
        chunk = choose_chunk_size(size, chunk_size)
        whole = hashlib.sha256()
        digests = bytearray()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                whole.update(block)
                digests += hashlib.sha256(block).digest()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    return PreparedFile(path, size, whole.hexdigest(), chunk, ChunkIndex(bytes(digests)))


@dataclass
class TransferResult:
    """How one device's part of a transfer ended.

    Attributes:
        event: the first event after the transfer (``received``, ``installed``, ``deferred``,
            ``profiled``) or the device's refusal; None when ``error`` or ``left`` is set.
        error: what ended it on the host's side (a timeout).
        left: the device accepted the command's other transfer instead (its ``accepted``
            event): it left this run, and needs that file.
        later: what the device said after ``event`` (or ``left``), in order, for the caller
            to read first.
    """

    event: Event | None = None
    error: EdgeError | None = None
    left: Event | None = None
    later: list[Event | MetricsReport] = field(default_factory=list)


@dataclass
class _Device:
    command: DeployCommand
    deadline: float
    accepted: bool = False


class TransferRun:
    """One transfer of one prepared file to a set of devices, over one connection.

    Args:
        client: a connected client.
        prepared: the file.
        options: window, timeouts, repair rounds, authority (:class:`~host_tools.fleet.deployer.DeployOptions`).
        publish_command: sends one device its signed command (the root chain first).
        progress: called with (bytes sent, bytes of the file) as frames are acknowledged.
        monotonic: the clock for deadlines, injectable.
        last_status: what a device was last heard doing (for timeout messages).

    Attributes:
        bytes_sent: chunk bytes published (broadcast and unicast, repairs included).
        frames_sent: frames published.
        malformed: answers that could not be used (bad ranges or fields), ignored.
    """

    def __init__(
        self,
        client: MqttClient,
        prepared: PreparedFile,
        options: DeployOptions,
        publish_command: Callable[[DeviceTopics, DeployCommand], None],
        progress: Callable[[int, int], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        last_status: Callable[[str], str] = lambda _device: "unknown",
    ) -> None:
        self.client = client
        self.prepared = prepared
        self.options = options
        self._publish_command = publish_command
        self._progress = progress
        self._now = monotonic
        self._last_status = last_status
        self.plan = FanOut(
            prepared.chunk_count,
            window=options.window,
            stall_s=options.stall_s,
            max_rounds=options.max_resend_rounds,
        )
        self.bytes_sent = 0
        self.frames_sent = 0
        self.malformed = 0
        self._in_flight: deque[tuple[PublishHandle, int]] = deque()
        self._acked = 0
        rate = options.rate_bytes_per_s
        # A burst of a quarter second's worth, and never less than two chunks (a chunk must fit;
        # the chunk index may overdraw it, and what follows then waits).
        self._bucket = None if rate is None else TokenBucket(rate, max(2.0 * prepared.chunk_size, rate / 4))

    def run(
        self,
        commands: Mapping[str, DeployCommand],
        inbound: Inbound,
        joined: Mapping[str, Sequence[Event | MetricsReport]] | None = None,
    ) -> dict[str, TransferResult]:
        """Send the commands, then the file, until every device has it or has stopped.

        Args:
            commands: each device's deploy command (each offering this file, as its bundle
                or its delta), not yet sent unless the device is in ``joined``.
            inbound: where the devices' answers come from.
            joined: devices whose command went out already and that accepted this file in
                answer (having left another run): what each said since, its ``accepted``
                first. Their commands are not sent again.

        Returns:
            Per device, how its part ended.

        Raises:
            TransportError: the broker connection failed and did not come back in time.
        """
        tid = self.prepared.transfer_id
        joined = joined or {}
        devices: dict[str, _Device] = {}
        results: dict[str, TransferResult] = {}
        for device_id, cmd in commands.items():
            if cmd.offer_named(tid) is None:
                raise ValueError(f"the command for {device_id} offers another transfer")  # a bug, not input
            if device_id not in joined:
                self._guarded(self._publish_command, DeviceTopics(device_id), cmd)
            devices[device_id] = _Device(cmd, self._now() + self.options.accept_timeout_s)
            self.plan.offered(device_id, self._now())
        for device_id, said in joined.items():
            for message in said:
                self._hear(device_id, message, devices, results)
        # Chunks wait until every device has answered the offer (or a few seconds passed), so
        # that one broadcast serves them all; a device that accepts later is sent what it missed.
        gather_until = self._now() + min(self.options.accept_timeout_s, _GATHER_S)
        with open(self.prepared.path, "rb") as fh:
            while len(results) < len(devices):
                now = self._now()
                gathering = now < gather_until and any(not d.accepted and k not in results for k, d in devices.items())
                worked = False if gathering else self._send(fh, devices, now)
                wait_until = now if worked else now + _IDLE_WAIT_S
                while (msg := inbound(wait_until)) is not None:
                    self._hear(msg[0], msg[1], devices, results)
                    wait_until = self._now()
                self._check_deadlines(devices, results)
        self._settle(0)
        return results

    # --- sending ----------------------------------------------------------------------

    def _send(self, fh: BinaryIO, devices: dict[str, _Device], now: float) -> bool:
        limit = self.options.window
        if self._bucket is not None:  # a rate cap: only what the bucket holds goes now
            limit = min(limit, int(self._bucket.tokens(now) // self.prepared.chunk_size))
        sends = self.plan.next_sends(now, limit=limit) if limit > 0 else []
        for send in sends:
            if send.index == INDEX_FRAME:
                data = self.prepared.index.digests
            else:
                offset = send.index * self.prepared.chunk_size
                data = os.pread(fh.fileno(), self.prepared.chunk_size, offset)
            topic = transfer_topic(self.prepared.transfer_id) if send.device is None else DeviceTopics(send.device).data
            frame = encode_chunk(self.prepared.transfer_id, send.index, data)
            if self._bucket is not None:
                self._bucket.spend(len(data), now)
            self._guarded(self._publish, topic, frame, len(data))
        for device_id in self.plan.ends_due():
            cmd = devices[device_id].command
            end = encode(TransferEnd(cmd.command_id, self.prepared.transfer_id))
            self._guarded(self.client.publish, DeviceTopics(device_id).cmd, end)
        return bool(sends)

    def _publish(self, topic: str, frame: bytes, nbytes: int) -> None:
        self._in_flight.append((self.client.publish(topic, frame), nbytes))
        self.bytes_sent += nbytes
        self.frames_sent += 1
        self._settle(self.options.window)

    def _settle(self, keep: int) -> None:
        """Wait for the broker's acknowledgements until at most ``keep`` frames are in flight."""
        while len(self._in_flight) > keep:
            handle, nbytes = self._in_flight.popleft()
            try:
                handle.wait()
            except TransportError as exc:
                log.info("a frame was lost with the connection (%s); the devices will ask for it", exc.message)
                continue
            self._acked += nbytes
            if self._progress is not None:
                self._progress(min(self._acked, self.prepared.size), self.prepared.size)

    def _guarded(self, publish: Callable[..., object], *args: object) -> None:
        """Run one publish; if the connection is gone, wait for it to come back (the frame is lost)."""
        try:
            publish(*args)
        except TransportError as exc:
            log.warning("broker connection lost while sending (%s); waiting for it", exc.message)
            self._in_flight.clear()
            if not self.client.wait_connected(self.options.reconnect_timeout_s):
                raise TransportError(
                    f"the broker connection did not come back within {self.options.reconnect_timeout_s:g} s "
                    f"(transfer {self.prepared.transfer_id})",
                    broker=str(self.client.address),
                ) from exc

    # --- hearing ----------------------------------------------------------------------

    def _hear(
        self,
        device_id: str,
        msg: Event | MetricsReport,
        devices: dict[str, _Device],
        results: dict[str, TransferResult],
    ) -> None:
        if device_id not in devices:
            return
        if device_id in results:
            results[device_id].later.append(msg)
            return
        if not isinstance(msg, Event):
            return  # a metrics report before the transfer ended belongs to an earlier command
        device = devices[device_id]
        now = self._now()
        device.deadline = now + (self.options.finish_timeout_s if device.accepted else self.options.accept_timeout_s)
        count = self.prepared.chunk_count
        if msg.kind in _OF_A_TRANSFER and msg.transfer_id not in ("", self.prepared.transfer_id):
            # About another transfer: accepting the command's other one means leaving this one.
            if msg.kind == EventKind.ACCEPTED and device.command.offer_named(msg.transfer_id) is not None:
                log.info("%s takes transfer %s instead of %s", device_id, msg.transfer_id, self.prepared.transfer_id)
                results[device_id] = TransferResult(left=msg)
                self.plan.finished(device_id)
            else:
                log.debug("ignored a %s event of %s about transfer %s", msg.kind, device_id, msg.transfer_id)
            return
        try:
            if msg.kind in (EventKind.ACCEPTED, EventKind.NEED_CHUNKS):
                missing = decode_ranges(msg.missing_ranges, count)
                have_index = msg.detail.get("have_index") is True
                if msg.kind == EventKind.ACCEPTED:
                    device.accepted = True
                    device.deadline = now + self.options.finish_timeout_s
                    self.plan.accepted(device_id, missing, have_index, now)
                else:
                    self.plan.need(device_id, missing, have_index, now)
                    self._given_up(device_id, results)
            elif msg.kind == EventKind.PROGRESS:
                have = msg.detail.get("have")
                if isinstance(have, bool) or not isinstance(have, int):
                    raise MessageError("progress without an integer 'have'")
                self.plan.progress(device_id, have, now)
            elif msg.kind in _AFTER_TRANSFER or msg.kind in TERMINAL_KINDS:
                results[device_id] = TransferResult(event=msg)
                self.plan.finished(device_id)
        except MessageError as exc:
            self.malformed += 1
            log.info("ignored a %s event from %s: %s", msg.kind, device_id, exc.message)

    def _given_up(self, device_id: str, results: dict[str, TransferResult]) -> None:
        why = self.plan.given_up.get(device_id)
        if why is not None and device_id not in results:
            results[device_id] = TransferResult(
                error=DeviceTimeoutError(f"device {device_id} {why}", device_id=device_id)
            )

    def _check_deadlines(self, devices: dict[str, _Device], results: dict[str, TransferResult]) -> None:
        now = self._now()
        for device_id, device in devices.items():
            if device_id in results or now < device.deadline:
                continue
            what = "receive the bundle" if device.accepted else "accept the offer"
            limit = self.options.finish_timeout_s if device.accepted else self.options.accept_timeout_s
            state = self._last_status(device_id)
            results[device_id] = TransferResult(
                error=DeviceTimeoutError(
                    f"device {device_id} did not {what} within {limit:g} s (its last status: {state})",
                    device_id=device_id,
                    last_status=state,
                )
            )
            self.plan.finished(device_id)
