"""The offline buffer: events and metrics kept on disk while the broker is unreachable.

Layout under ``<data_dir>/outbox/``::

    log       append-only records: [u32 length][u32 crc32] body; body = [u16 topic length]
              [u8 retain] topic payload. Each append is fsynced before it counts.
    cursor    {"offset": n, "dropped": d}: bytes of ``log`` already delivered, and how
              many messages were lost to the bound; replaced atomically.

Messages leave in the order they were appended, at least once: a crash between a
delivery and the next cursor write sends the tail again after restart. A record torn
by a power cut (short, or a bad checksum) ends the log and is cut off at load. Once
everything is delivered the log is truncated to zero.

The buffer is bounded by the bytes still undelivered (``max_bytes``). What does not fit
is not written: the oldest messages survive (they explain what happened first) and
the newest are counted in ``dropped``, which the agent reports when it is back online.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.durable import atomic_write_bytes, fsync_dir, read_json
from edge_sdk.errors import StorageError

__all__ = ["Outbox", "OutboxRecord"]

log = logging.getLogger(__name__)
_HEADER = struct.Struct(">II")
_BODY_HEAD = struct.Struct(">HB")
#: The largest record accepted; the codec's own limits keep real messages far below it.
MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class OutboxRecord:
    """One buffered message."""

    topic: str
    payload: bytes
    retain: bool


class Outbox:
    """An append-only, fsynced, bounded queue of messages on disk.

    Args:
        directory: where ``log`` and ``cursor`` live (created if missing).
        max_bytes: bound on undelivered bytes (records with their headers).

    Raises:
        StorageError: the directory or its files cannot be read or written.
    """

    def __init__(self, directory: Path, max_bytes: int = 8 << 20) -> None:
        if max_bytes < 1:
            raise StorageError(f"outbox bound must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._log_path = self.directory / "log"
        self._cursor_path = self.directory / "cursor"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open outbox in {self.directory}: {exc.strerror}") from exc
        self._offset, self.dropped = self._read_cursor()
        self._records: list[tuple[int, int]] = []  # (offset, total length) of undelivered records
        self._delivered_to = self._offset
        self._scan()

    # --- load -----------------------------------------------------------------------

    def _read_cursor(self) -> tuple[int, int]:
        try:
            raw = read_json(self._cursor_path, {"offset": 0, "dropped": 0})
            return int(raw["offset"]), int(raw["dropped"])
        except (StorageError, KeyError, TypeError, ValueError) as exc:
            # A lost cursor costs re-delivery of what was sent, never a lost message.
            log.warning("outbox cursor unreadable (%s); delivering the whole log again", exc)
            return 0, 0

    def _scan(self) -> None:
        size = os.fstat(self._fd).st_size
        if self._offset > size:  # cut short between truncating the log and resetting the cursor
            self._offset = self._delivered_to = 0
        pos = self._offset
        while pos < size:
            header = os.pread(self._fd, _HEADER.size, pos)
            if len(header) < _HEADER.size:
                break
            length, crc = _HEADER.unpack(header)
            if length > MAX_RECORD_BYTES or pos + _HEADER.size + length > size:
                break
            body = os.pread(self._fd, length, pos + _HEADER.size)
            if zlib.crc32(body) != crc:
                break
            self._records.append((pos, _HEADER.size + length))
            pos += _HEADER.size + length
        if pos < size:
            log.warning("outbox: cutting a torn record at byte %d of %d", pos, size)
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)

    # --- queue ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages not yet delivered."""
        return len(self._records)

    @property
    def pending_bytes(self) -> int:
        return sum(n for _, n in self._records)

    def append(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Buffer a message durably.

        Returns:
            False when it did not fit under the bound and was dropped (and counted).

        Raises:
            StorageError: the disk refused the write.
        """
        t = topic.encode()
        body = _BODY_HEAD.pack(len(t), int(retain)) + t + payload
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        if len(body) > MAX_RECORD_BYTES or self.pending_bytes + len(record) > self.max_bytes:
            self.dropped += 1
            self._write_cursor()
            return False
        try:
            start = os.fstat(self._fd).st_size
            os.write(self._fd, record)
            os.fsync(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot append to outbox: {exc.strerror}") from exc
        self._records.append((start, len(record)))
        return True

    def peek(self) -> OutboxRecord | None:
        """The oldest undelivered message, or None."""
        if not self._records:
            return None
        offset, length = self._records[0]
        body = os.pread(self._fd, length - _HEADER.size, offset + _HEADER.size)
        topic_len, retain = _BODY_HEAD.unpack_from(body)
        start = _BODY_HEAD.size
        return OutboxRecord(body[start : start + topic_len].decode(), body[start + topic_len :], bool(retain))

    def pop(self) -> None:
        """Mark the message :meth:`peek` returned as delivered (durable at :meth:`commit`)."""
        offset, length = self._records.pop(0)
        self._delivered_to = offset + length

    def commit(self) -> None:
        """Persist delivery progress; truncate the log once everything is delivered."""
        if self._records:
            if self._delivered_to != self._offset:
                self._offset = self._delivered_to
                self._write_cursor()
            return
        if os.fstat(self._fd).st_size == 0 and self._offset == 0:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot truncate outbox: {exc.strerror}") from exc
        self._offset = self._delivered_to = 0
        self._write_cursor()

    def reset_dropped(self) -> None:
        """The loss has been reported; start counting again."""
        if self.dropped:
            self.dropped = 0
            self._write_cursor()

    def _write_cursor(self) -> None:
        atomic_write_bytes(
            self._cursor_path, json.dumps({"offset": self._offset, "dropped": self.dropped}).encode(), mode=0o600
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        fsync_dir(self.directory)
