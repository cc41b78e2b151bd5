"""Receiving bundles: chunks in, each checked, kept on disk across restarts, a finished file out.

The decisions are :class:`edge_sdk.protocol.ChunkReceiver`'s (pure: is this the index the
signed offer binds, is this chunk the one its digest names, where does it go, what is
missing); this module is the shell that does what it says to the staging directory::

    staging/<transfer_id>.cmd     the verified deploy command (JSON), written first
    staging/<transfer_id>.part    the file's bytes, reserved at its declared size (fallocate)
    staging/<transfer_id>.index   the chunk index, once it arrived and matched the offer

    begin(cmd)       files created (or, for a transfer already held, the command replaced)
    accept(frame)    index frame -> kept; chunk -> digest checked -> pwrite at its offset;
                     a frame that fails a check is discarded and counted, never fatal
    last chunk       the file is closed and comes out -> ReceivedBundle (see "Why no whole-file
                     hash" below)
    recover()        at start: every held transfer is reopened, and the chunks on disk that
                     match their digests count as received (the bitmap is rebuilt from the
                     bytes themselves, so nothing unverified is ever trusted)

The file is the bundle the command offers, or the delta it offers instead
(``DeployCommand.delta``, see :mod:`device_agent.deltas`): the transfer id the files are
named by says which, so both resume alike. A finished bundle comes out as a
:class:`ReceivedBundle`, a finished delta as a :class:`ReceivedDelta`.

Why no whole-file hash at the end. The signed offer binds both the file's sha256 and
``chunks_sha256``, the sha256 of the chunk index. A finished file is already the file the
signed offer describes, without reading it back:

1. the index is taken only when its length is the offer's chunk count times 32 and its
   sha256 is ``chunks_sha256`` (:meth:`ChunkIndex.received`);
2. the staging file is created (``O_TRUNC``, mode 0600) at exactly the offer's size, and the
   offer's chunk spans cover it with no gap and no overlap;
3. a chunk counts as received only once its bytes matched their index entry: in memory
   just before they were written at their span, or read back from disk after a restart
   (:meth:`Receiving.recover`); nothing else writes the file;
4. so a complete file is, span by span, the bytes the signed index names, unless someone
   can find a second sha256 preimage of a chunk: the assumption the whole-file sha256
   itself rests on.

Comparing the file's sha256 with the offer's would only check that the command's signer
agrees with itself (its index and its sha256 describe the same bytes). A signer that does
not gains nothing it could not sign outright, and the file still faces every later check:
the install verifies the bundle's own signatures (another role's key), its manifest's
hashes and the name, version and content the command expects; a delta must name
``command.transfer``'s sha256 and size in its header, and its output is hashed against
them. Reading 10 MB back and hashing it again cost a receiving agent more CPU than all
of its chunk checks together.

A transfer is named by its content, so a host that offers the same bundle again (a retry,
a restarted ``edgectl``) resumes it. What is held is bounded: a transfer without a chunk
for ``max_age_s`` is removed, at most ``max_transfers`` are kept (the oldest idle one goes
first), and when a new transfer cannot reserve its bytes, idle transfers are removed,
oldest first, until it can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.durable import atomic_write_bytes, fsync_dir
from edge_sdk.errors import EdgeError, MessageError, StorageError, TransferError
from edge_sdk.protocol import (
    INDEX_FRAME,
    Chunk,
    ChunkReceiver,
    CodecLimits,
    DeployCommand,
    Discard,
    TransferOffer,
    decode,
    encode,
)

__all__ = ["Received", "ReceivedBundle", "ReceivedDelta", "Receiving", "StagingFile", "Transfer"]

log = logging.getLogger(__name__)

_SUFFIXES = (".cmd", ".part", ".index")
_KEPT_FILE = re.compile(r"^([0-9a-f]{32})\.(?:cmd|part|index)$")


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _same_bytes(a: TransferOffer, b: TransferOffer) -> bool:
    """Whether two offers describe the same file in the same chunks."""
    return (a.size, a.sha256, a.chunk_size, a.chunks_sha256) == (b.size, b.sha256, b.chunk_size, b.chunks_sha256)


@dataclass(frozen=True)
class ReceivedBundle:
    """A bundle file received whole, every chunk of it matching the signed offer's index.

    Attributes:
        command: the deploy command that offered it.
        path: the file (under ``staging/``); :meth:`discard` removes it unless it was moved.
        discarded: frames of this transfer that failed a check and were dropped (forged,
            damaged or misplaced chunks, or a chunk index that was not the signed one) since
            this agent started.
    """

    command: DeployCommand
    path: Path
    discarded: int = 0

    def discard(self) -> None:
        """Remove the file, if it is still there (a deferred install moves it away)."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ReceivedDelta:
    """A delta file received whole, every chunk matching the signed offer's index (``command.delta.transfer``).

    It is not a bundle yet: :func:`device_agent.deltas.rebuild_bundle` makes one from it
    and the installed base slot.

    Attributes:
        command: the deploy command that offered it.
        path: the file (under ``staging/``); :meth:`discard` removes it.
    """

    command: DeployCommand
    path: Path

    def discard(self) -> None:
        """Remove the file, if it is still there."""
        self.path.unlink(missing_ok=True)


#: What a finished transfer gives: the bundle, or the delta that rebuilds it.
Received = ReceivedBundle | ReceivedDelta


class StagingFile:
    """One staging file, open for positioned writes.

    Use :meth:`create` or :meth:`reopen`; the constructor only wraps an open descriptor.
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

    @classmethod
    def reopen(cls, path: Path, size: int) -> StagingFile:
        """Open a staging file kept from before a restart.

        Raises:
            StorageError: it is missing, unreadable, or not ``size`` bytes long.
        """
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise StorageError(f"cannot reopen staging file {path}: {exc.strerror}") from exc
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise StorageError(f"staging file {path} is not the {size} bytes its offer declares")
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

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (short at the end of the file)."""
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise StorageError(f"cannot read staging file {self.path}: {exc.strerror}") from exc

    def finish(self) -> None:
        """Close the file: every chunk of it is in and checked (see the module's "Why no whole-file hash").

        No fsync here. A power cut cannot make a chunk count as received without its bytes:
        after a restart, a chunk counts only if the bytes on disk match its digest. What the
        file becomes is made durable where it goes next: the install fsyncs the slot it
        unpacks into, and a deferred install fsyncs the file before keeping it. So the
        bundle goes to storage once, not twice, which matters on an SD card.
        """
        self.close()

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


@dataclass
class Transfer:
    """One transfer this device holds.

    Attributes:
        command: the deploy command it answers (the latest offer of this content).
        receiver: the pure state: what is in, what is missing.
        file: the staging file.
        last_chunk_at: monotonic time of the last chunk taken (or of the start, or of the
            latest offer of it).
        reported: chunks held when progress was last reported.
        idle_reported_at: monotonic time it was last reported idle (see :meth:`Receiving.idle`).
    """

    command: DeployCommand
    receiver: ChunkReceiver
    file: StagingFile
    last_chunk_at: float
    reported: int = 0
    idle_reported_at: float = float("-inf")
    index_discarded: int = 0

    @property
    def offer(self) -> TransferOffer:
        """What is received: the command's bundle offer, or its delta's."""
        return self.receiver.offer

    @property
    def transfer_id(self) -> str:
        return self.receiver.offer.transfer_id

    @property
    def is_delta(self) -> bool:
        """Whether the file is the command's delta rather than its bundle."""
        return self.receiver.offer.transfer_id != self.command.transfer.transfer_id


class Receiving:
    """The transfers this device holds, each in its own files under ``staging_dir``.

    Args:
        staging_dir: where transfers are kept (the installer's ``staging/``).
        max_bundle_bytes: largest offer accepted.
        max_age_s: remove a transfer after this long without a chunk.
        max_transfers: most transfers held at once.
        checkpoint: called with ``"receiving"`` once a transfer is at least half written
            (the agent's ``debug_crash_at`` option).
        limits: bounds for reading a kept command back.
    """

    def __init__(
        self,
        staging_dir: Path,
        max_bundle_bytes: int,
        *,
        max_age_s: float = 7 * 86400.0,
        max_transfers: int = 4,
        checkpoint: Callable[[str], None] = lambda _point: None,
        limits: CodecLimits | None = None,
    ) -> None:
        self.staging_dir = staging_dir
        self.max_bundle_bytes = max_bundle_bytes
        self.max_age_s = max_age_s
        self.max_transfers = max_transfers
        self._checkpoint = checkpoint
        self._limits = limits or CodecLimits()
        self._transfers: dict[str, Transfer] = {}
        self.discarded: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._transfers)

    def _path(self, transfer_id: str, suffix: str) -> Path:
        return self.staging_dir / f"{transfer_id}{suffix}"

    # --- start ----------------------------------------------------------------------

    def recover(self, now: float, wall_now: float) -> list[Transfer]:
        """Reopen the transfers kept from before a restart; remove what cannot be resumed.

        Args:
            now: monotonic seconds (the reopened transfers' idle clocks start here).
            wall_now: the wall clock, to judge the files' age against ``max_age_s``.

        Returns:
            The transfers held now, to subscribe to and report.
        """
        names = set()
        for path in self.staging_dir.iterdir():
            match = _KEPT_FILE.fullmatch(path.name)
            if match is None:  # a temporary file of a write cut short, or anything else
                _remove_path(path)
            else:
                names.add(match.group(1))
        for tid in sorted(names):
            try:
                t = self._reopen(tid, now, wall_now)
            except (EdgeError, OSError) as exc:
                log.info("removed kept transfer %s: %s", tid, getattr(exc, "message", exc))
                t = None
            if t is None:
                self._remove_files(tid)
                continue
            self._transfers[tid] = t
            log.info(
                "resuming %s v%s: %d of %d chunks kept",
                t.command.bundle_name,
                t.command.bundle_version,
                t.receiver.have_count,
                t.receiver.chunk_count,
            )
        return list(self._transfers.values())

    def _reopen(self, tid: str, now: float, wall_now: float) -> Transfer | None:
        cmd_path, part, index_path = (self._path(tid, s) for s in _SUFFIXES)
        if not cmd_path.is_file() or not part.is_file():
            return None
        if wall_now - part.stat().st_mtime > self.max_age_s:
            log.info("transfer %s has had no chunk for over %g s", tid, self.max_age_s)
            return None
        cmd = decode(cmd_path.read_bytes(), self._limits)
        offer = cmd.offer_named(tid) if isinstance(cmd, DeployCommand) else None
        if not isinstance(cmd, DeployCommand) or offer is None:
            raise MessageError(f"{cmd_path} does not hold the deploy command of transfer {tid}")
        file = StagingFile.reopen(part, offer.size)
        receiver = ChunkReceiver(offer)
        if index_path.is_file():
            try:
                receiver.take_index(index_path.read_bytes())
            except TransferError:
                index_path.unlink()
        index = receiver.index
        if index is not None:
            have = [i for i in range(receiver.chunk_count) if index.matches(i, file.read(*receiver.span(i)))]
            receiver = ChunkReceiver(offer, index, have)
        return Transfer(cmd, receiver, file, now, reported=receiver.have_count)

    # --- a transfer -----------------------------------------------------------------

    def begin(self, cmd: DeployCommand, now: float, *, delta: bool = False) -> Transfer:
        """Start receiving the bundle ``cmd`` offers (or its delta), or go on with it if it is already held.

        Args:
            cmd: a verified deploy command. For a transfer already held, it replaces the
                command kept (a newer offer of the same content: its answers carry its id).
            now: monotonic seconds.
            delta: receive the delta the command offers (``cmd.delta.transfer``) instead
                of the bundle.

        Returns:
            The transfer (what it lacks: ``transfer.receiver.missing()``).

        Raises:
            TransferError: the offer exceeds this device's bundle size limit.
            StorageError: the staging files cannot be written, or there is no room even after
                removing the idle transfers.
            ValueError: ``delta`` for a command that offers none (a bug, not input).
        """
        if delta and cmd.delta is None:
            raise ValueError("begin(delta=True) for a command without a delta")
        offer = cmd.delta.transfer if delta and cmd.delta is not None else cmd.transfer
        tid = offer.transfer_id
        existing = self._transfers.get(tid)
        if existing is not None and not _same_bytes(existing.receiver.offer, offer):
            # Another file under a held id (a host that does not name transfers by content):
            # what is held cannot be part of it.
            log.info("transfer %s is offered again with other content; starting over", tid)
            self.drop(tid)
            existing = None
        if existing is not None:
            if existing.command != cmd:
                atomic_write_bytes(self._path(tid, ".cmd"), encode(cmd), mode=0o600)
                existing.command = cmd
            existing.last_chunk_at = now
            return existing
        if offer.size > self.max_bundle_bytes:
            raise TransferError(f"bundle of {offer.size} bytes exceeds this device's limit of {self.max_bundle_bytes}")
        while len(self._transfers) >= self.max_transfers:
            self._evict_oldest(f"at most {self.max_transfers} transfers are kept")
        atomic_write_bytes(self._path(tid, ".cmd"), encode(cmd), mode=0o600)
        while True:
            try:
                file = StagingFile.create(self._path(tid, ".part"), offer.size)
                break
            except StorageError:
                if not self._transfers:
                    self._remove_files(tid)
                    raise
                self._evict_oldest(f"room for a {offer.size}-byte bundle")
        fsync_dir(self.staging_dir)
        t = Transfer(cmd, ChunkReceiver(offer), file, now)
        self._transfers[tid] = t
        log.info(
            "receiving %s v%s%s: %d bytes in %d chunks",
            cmd.bundle_name,
            cmd.bundle_version,
            " as a delta" if t.is_delta else "",
            offer.size,
            t.receiver.chunk_count,
        )
        return t

    def get(self, transfer_id: str) -> Transfer | None:
        """A transfer held, or None."""
        return self._transfers.get(transfer_id)

    def held(self) -> list[Transfer]:
        """Every transfer held."""
        return list(self._transfers.values())

    def accept(self, chunk: Chunk, now: float) -> Received | None:
        """Take one frame of a transfer held: the chunk index, or a chunk.

        A frame that fails a check (not the bound index; a chunk outside the offer, of the
        wrong length or not matching its digest; a chunk before the index) is discarded and
        counted in :attr:`discarded`: the device asks for it again.

        Args:
            chunk: as decoded from the wire.
            now: monotonic seconds.

        Returns:
            The finished file once the last chunk is in; None otherwise (also for a frame
            of a transfer not held).

        Raises:
            StorageError: the staging files cannot be written (the transfer is removed).
        """
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            return None
        if chunk.index == INDEX_FRAME:
            self._take_index(t, chunk.data)
            return None
        action = t.receiver.accept(chunk.index, chunk.data)
        if action is None:
            return None
        if isinstance(action, Discard):
            self.discarded[action.reason] += 1
            log.debug("discarded chunk %d of %s: %s", action.index, chunk.transfer_id, action.reason)
            return None
        try:
            t.file.write(action.offset, action.data)
        except StorageError:
            self.drop(chunk.transfer_id)
            raise
        t.last_chunk_at = now
        if 2 * t.receiver.have_count >= t.receiver.chunk_count:
            self._checkpoint("receiving")
        if not t.receiver.complete:
            return None
        return self._finish(t)

    def _take_index(self, t: Transfer, data: bytes) -> None:
        if t.receiver.index is not None:
            return
        try:
            index = t.receiver.take_index(data)
        except TransferError as exc:
            self.discarded["index"] += 1
            t.index_discarded += 1
            log.info("discarded a chunk index for %s: %s", t.transfer_id, exc.message)
            return
        atomic_write_bytes(self._path(t.transfer_id, ".index"), index.digests, mode=0o600)

    def finish(self, transfer_id: str) -> Received | None:
        """The finished file of a transfer held whose chunks are all in (one completed before a restart).

        Returns:
            The file, or None when the transfer is not held or still lacks chunks.
        """
        t = self._transfers.get(transfer_id)
        if t is None or not t.receiver.complete:
            return None
        return self._finish(t)

    def _finish(self, t: Transfer) -> Received:
        tid = t.transfer_id
        t.file.finish()
        del self._transfers[tid]
        for suffix in (".cmd", ".index"):
            self._path(tid, suffix).unlink(missing_ok=True)
        discarded = t.receiver.discarded + t.index_discarded
        if t.is_delta:
            return ReceivedDelta(t.command, t.file.path)
        return ReceivedBundle(t.command, t.file.path, discarded)

    def progress_due(self, transfer_id: str, every: int) -> int | None:
        """Chunks held, if ``every`` more arrived since progress was last reported (then marked reported)."""
        t = self._transfers.get(transfer_id)
        if t is None or t.receiver.have_count - t.reported < every:
            return None
        t.reported = t.receiver.have_count
        return t.reported

    def idle(self, now: float, after_s: float) -> list[Transfer]:
        """Transfers without a chunk for ``after_s``, each at most once every ``after_s``."""
        out = []
        for t in self._transfers.values():
            if now - max(t.last_chunk_at, t.idle_reported_at) >= after_s:
                t.idle_reported_at = now
                out.append(t)
        return out

    def expire(self, now: float) -> list[Transfer]:
        """Remove transfers without a chunk for ``max_age_s``.

        Returns:
            The transfers removed.
        """
        gone = [t for t in self._transfers.values() if now - t.last_chunk_at >= self.max_age_s]
        for t in gone:
            self.drop(t.transfer_id)
        return gone

    def _evict_oldest(self, why: str) -> None:
        oldest = min(self._transfers.values(), key=lambda t: t.last_chunk_at)
        tid = oldest.transfer_id
        log.info("removed idle transfer %s for %s", tid, why)
        self.drop(tid)

    def drop(self, transfer_id: str) -> None:
        """Forget a transfer and remove its files (nothing happens for an unknown one)."""
        t = self._transfers.pop(transfer_id, None)
        if t is not None:
            t.file.close()
        self._remove_files(transfer_id)

    def _remove_files(self, transfer_id: str) -> None:
        for suffix in _SUFFIXES:
            self._path(transfer_id, suffix).unlink(missing_ok=True)

    def close(self) -> None:
        """Close every transfer's file; the files stay, to be resumed at the next start."""
        for t in self._transfers.values():
            t.file.close()
        self._transfers.clear()
