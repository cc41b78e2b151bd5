"""Receiving bundles: chunks in, a finished and hash-checked file out.

The decisions are :class:`edge_sdk.protocol.ChunkReceiver`'s (pure: is this chunk in the
offer, where does it go, what is missing, has the transfer gone idle); this module is the
shell that does what it says to a staging file on disk::

    begin(offer)     staging file created and reserved at its declared size (fallocate)
    accept(chunk)    ChunkReceiver.accept -> pwrite at the offset it names
    last chunk       fsync, whole-file sha256 checked against the offer -> ReceivedBundle
    expire(now)      transfers idle too long are dropped and their files removed

A transfer that fails in any way is dropped (file closed and removed) before the error
reaches the caller, so nothing half-received outlives its error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import EdgeError, HashMismatchError, StorageError, TransferError
from edge_sdk.protocol import Chunk, ChunkReceiver, DeployCommand

__all__ = ["ReceivedBundle", "Receiving", "StagingFile"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedBundle:
    """A bundle file received whole, its sha256 matching the signed offer.

    Attributes:
        command: the deploy command that offered it.
        path: the file (under ``staging/``); :meth:`discard` removes it unless it was moved.
    """

    command: DeployCommand
    path: Path

    def discard(self) -> None:
        """Remove the file, if it is still there (a deferred install moves it away)."""
        self.path.unlink(missing_ok=True)


class StagingFile:
    """One staging file, open for positioned writes.

    Use :meth:`create`; the constructor only wraps an open descriptor.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, path: Path, size: int) -> StagingFile:
        """Create (or truncate) ``path`` and reserve ``size`` bytes for it.

        Raises:
            StorageError: the file cannot be created, or there is no room for ``size`` bytes
                (``details["size"]`` then says how many were asked for).
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create staging file {path}: {exc.strerror}") from exc
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise StorageError(
                f"not enough storage for a {size}-byte bundle in {path.parent}: {exc.strerror}", size=size
            ) from exc
        return cls(path, fd)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``.

        Raises:
            StorageError: the disk refused it.
        """
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise StorageError(f"cannot write staging file: {exc.strerror}") from exc

    def finish(self) -> str:
        """fsync the file and close it.

        Returns:
            The sha256 of its content (hex).

        Raises:
            StorageError: it cannot be synced or read back.
        """
        try:
            os.fsync(self._fd)
            digest = hashlib.sha256()
            offset = 0
            while block := os.pread(self._fd, 1 << 20, offset):
                digest.update(block)
                offset += len(block)
        except OSError as exc:
            raise StorageError(f"cannot read back staging file {self.path}: {exc.strerror}") from exc
        finally:
            self.close()
        return digest.hexdigest()

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the file."""
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass
class _Transfer:
    command: DeployCommand
    receiver: ChunkReceiver
    file: StagingFile
    written: int = 0


class Receiving:
    """The transfers this device is receiving, each into its own staging file.

    Args:
        staging_path: where the file of a transfer id goes.
        max_bundle_bytes: largest offer accepted.
        idle_timeout_s: drop a transfer after this long without a chunk.
        checkpoint: called with ``"receiving"`` once a transfer is at least half written
            (the agent's ``debug_crash_at`` option).
    """

    def __init__(
        self,
        staging_path: Callable[[str], Path],
        max_bundle_bytes: int,
        idle_timeout_s: float,
        checkpoint: Callable[[str], None] = lambda _point: None,
    ) -> None:
        self._staging_path = staging_path
        self.max_bundle_bytes = max_bundle_bytes
        self.idle_timeout_s = idle_timeout_s
        self._checkpoint = checkpoint
        self._transfers: dict[str, _Transfer] = {}

    def __len__(self) -> int:
        return len(self._transfers)

    def begin(self, cmd: DeployCommand, now: float) -> list[int]:
        """Start receiving the bundle ``cmd`` offers, or resume it if it is already under way.

        Args:
            cmd: a verified deploy command.
            now: monotonic seconds.

        Returns:
            The chunk indices still missing (all of them for a new transfer).

        Raises:
            TransferError: the offer exceeds this device's bundle size limit.
            StorageError: the staging file cannot be created or reserved.
        """
        offer = cmd.transfer
        existing = self._transfers.get(offer.transfer_id)
        if existing is not None:  # the host re-offered: resume
            return existing.receiver.missing()
        if offer.size > self.max_bundle_bytes:
            raise TransferError(f"bundle of {offer.size} bytes exceeds this device's limit of {self.max_bundle_bytes}")
        file = StagingFile.create(self._staging_path(offer.transfer_id), offer.size)
        receiver = ChunkReceiver(offer, now=now, idle_timeout_s=self.idle_timeout_s)
        self._transfers[offer.transfer_id] = _Transfer(cmd, receiver, file)
        log.info(
            "receiving %s v%s: %d bytes in %d chunks",
            cmd.bundle_name,
            cmd.bundle_version,
            offer.size,
            receiver.chunk_count,
        )
        return receiver.missing()

    def command(self, transfer_id: str) -> DeployCommand | None:
        """The command of a transfer under way, or None."""
        t = self._transfers.get(transfer_id)
        return None if t is None else t.command

    def missing(self, transfer_id: str) -> list[int]:
        """Chunks a transfer under way still lacks (empty for an unknown transfer)."""
        t = self._transfers.get(transfer_id)
        return [] if t is None else t.receiver.missing()

    def accept(self, chunk: Chunk, now: float) -> ReceivedBundle | None:
        """Write one chunk of a transfer under way.

        Args:
            chunk: as decoded from the wire (its transfer must be under way, see :meth:`command`).
            now: monotonic seconds.

        Returns:
            The finished file once the last chunk is in and the whole file's hash matches;
            None while chunks are missing (or for a chunk of an unknown transfer).

        Raises:
            TransferError: the chunk breaks the offer (index, length).
            HashMismatchError: the finished file is not the one the offer declared.
            StorageError: the staging file cannot be written or read back.
        """
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            log.debug("chunk for unknown transfer %s ignored", chunk.transfer_id)
            return None
        try:
            write = t.receiver.accept(chunk.index, chunk.data, now)
            if write is not None:
                t.file.write(write.offset, write.data)
                t.written += 1
                if 2 * t.written >= t.receiver.chunk_count:
                    self._checkpoint("receiving")
            if not t.receiver.complete:
                return None
            digest = t.file.finish()
            expected = t.command.transfer.sha256
            if digest != expected:
                raise HashMismatchError(
                    f"received file's sha256 {digest[:16]}... differs from the offer's {expected[:16]}...",
                    expected=expected,
                    actual=digest,
                )
        except EdgeError:
            self.drop(chunk.transfer_id)
            raise
        del self._transfers[chunk.transfer_id]
        return ReceivedBundle(t.command, t.file.path)

    def expire(self, now: float) -> list[tuple[DeployCommand, TransferError]]:
        """Drop the transfers that have gone idle.

        Returns:
            Each dropped transfer's command, and why (which chunks it still lacked).
        """
        dropped = []
        for tid, t in list(self._transfers.items()):
            if t.receiver.expired(now):
                err: TransferError = TransferError("transfer timed out")
                try:
                    t.receiver.require_complete()
                except TransferError as exc:
                    err = exc
                self.drop(tid)
                dropped.append((t.command, err))
        return dropped

    def drop(self, transfer_id: str) -> None:
        """Forget a transfer and remove its file (nothing happens for an unknown one)."""
        t = self._transfers.pop(transfer_id, None)
        if t is not None:
            t.file.remove()

    def close(self) -> None:
        """Drop every transfer under way (at shutdown)."""
        for tid in list(self._transfers):
            self.drop(tid)
