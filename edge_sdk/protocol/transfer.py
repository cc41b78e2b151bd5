"""Chunked transfer of a bundle over MQTT: the pure state of both ends.

The host offers a transfer (size, sha256, chunk size), sends every chunk once, then
says ``transfer_end``. The device answers with the chunks it still lacks; the host
resends those, for a bounded number of rounds. Because the device keeps the chunks it
has (and reports them when an offer for the same transfer arrives again), a transfer
that was cut off resumes where it stopped.

Neither class here touches a socket or a disk. :class:`ChunkReceiver` turns a chunk
into "write these bytes at this offset" or an error; the agent's shell does the write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edge_sdk.errors import TransferError, TransferIncompleteError
from edge_sdk.protocol.messages import TransferOffer

__all__ = ["ChunkReceiver", "WriteAt", "chunk_spans"]


@dataclass(frozen=True)
class WriteAt:
    """Action for the shell: write ``data`` at byte ``offset`` of the staging file."""

    offset: int
    data: bytes


def chunk_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of a ``size``-byte file."""
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


class ChunkReceiver:
    """The device's view of one transfer; enforces the offer while bytes arrive.

    Args:
        offer: the declared size, hash and chunk size (from a signed or trusted command).
        have: chunk indices already on disk from an earlier, interrupted attempt.
        deadline: time (same clock as ``now`` arguments) after which an idle transfer is dropped.
        idle_timeout_s: how far each new chunk pushes the deadline (a duplicate does not).
    """

    def __init__(
        self, offer: TransferOffer, have: Iterable[int] = (), *, now: float, idle_timeout_s: float = 60.0
    ) -> None:
        self.offer = offer
        self._spans = chunk_spans(offer.size, offer.chunk_size)
        self._have = {i for i in have if 0 <= i < len(self._spans)}
        self._idle_timeout_s = idle_timeout_s
        self.deadline = now + idle_timeout_s
        self.ended = False

    @property
    def chunk_count(self) -> int:
        return len(self._spans)

    @property
    def received_bytes(self) -> int:
        return sum(self._spans[i][1] for i in self._have)

    def missing(self) -> list[int]:
        return [i for i in range(len(self._spans)) if i not in self._have]

    @property
    def complete(self) -> bool:
        return len(self._have) == len(self._spans)

    def accept(self, index: int, data: bytes, now: float) -> WriteAt | None:
        """Check one chunk against the offer.

        Returns:
            Where to write it, or ``None`` for a duplicate (already written; ignore).

        Raises:
            TransferError: index out of range or length different from the declared span
                (the sender is trying to send more, or other, data than it declared).
        """
        if not 0 <= index < len(self._spans):
            raise TransferError(
                f"chunk {index} is outside the declared {len(self._spans)} chunks",
                index=index,
                chunk_count=len(self._spans),
            )
        offset, length = self._spans[index]
        if len(data) != length:
            raise TransferError(
                f"chunk {index} carries {len(data)} bytes, the offer declares {length}",
                index=index,
                expected=length,
                actual=len(data),
            )
        if index in self._have:
            return None  # a duplicate is not progress: it does not push the deadline
        self.deadline = now + self._idle_timeout_s
        self._have.add(index)
        return WriteAt(offset, data)

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def require_complete(self) -> None:
        """Raises TransferIncompleteError naming how many chunks are missing."""
        missing = self.missing()
        if missing:
            raise TransferIncompleteError(
                f"transfer {self.offer.transfer_id} is incomplete: {len(missing)} of "
                f"{len(self._spans)} chunks missing ({self.received_bytes} of {self.offer.size} bytes received)",
                missing=len(missing),
                received_bytes=self.received_bytes,
                size=self.offer.size,
            )
