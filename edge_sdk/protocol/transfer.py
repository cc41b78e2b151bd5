"""Chunked transfer of a bundle to many devices over MQTT: the pure state of both ends.

The conversation (the shells are :mod:`device_agent.receiving` and :mod:`host_tools.fleet.delivery`)::

    host -> each device   signed deploy command; its offer binds size, sha256, chunk size and
                          ``chunks_sha256``, the sha256 of the chunk index
    device -> host        accepted (which chunks it lacks; whether it has the index yet)
    host -> transfer      the index frame, then each chunk once, on edge/v1/transfers/<id>:
                          every targeted device subscribes, the broker fans out
    device -> host        progress (how many chunks it holds), every PROGRESS_EVERY chunks
    host -> each device   transfer_end                  device -> host: need_chunks or received
    host -> transfer      chunks many devices lack      (one re-broadcast)
    host -> one device    chunks only it lacks          (on its own data topic)

A deploy command may offer a delta besides its bundle (:class:`~edge_sdk.protocol.DeltaOffer`):
both are files with offers of their own, sent as above. The device answers ``accepted`` naming
the transfer it takes (its events about a transfer carry that transfer's id), and may switch
to the bundle's transfer later by accepting it; the host sends each file to those that took it.

What makes this safe and resumable:

- **Named by content.** :func:`content_transfer_id` derives the transfer id from the bundle's
  sha256 and the chunk size, so a retry, a second ``edgectl deploy`` or a host restarted
  half-way is the same transfer, and a device that kept the chunks sends only what it lacks.
- **Every chunk checked on arrival.** The index lists the sha256 of every chunk; the signed
  offer binds the index by its own sha256. A device takes the index only when it matches,
  and a chunk only when it matches its entry: a forged, truncated or misplaced chunk is
  discarded (:class:`Discard`) and asked for again, never fatal. Only a signed command ends a
  transfer.
- **Bounded on both ends.** At most :data:`MAX_CHUNKS` chunks, so the index fits one frame of
  1 MiB. Lists of missing chunks travel as ranges (:func:`encode_ranges`), bounded in count;
  the host parses them strictly (:func:`decode_ranges`) and :class:`FanOut` caps the repair
  rounds per device, so no request, however formed, makes the host resend without limit.
- **Paced.** :class:`FanOut` keeps at most ``window`` chunks in flight beyond what each
  receiving device has acknowledged, so no broker queue overflows; a device that stops
  acknowledging is set aside after ``stall_s`` (it does not hold the others back) and is
  repaired at the end.

Neither class here touches a socket, a disk or a clock: the shells pass ``now`` in and do
what the returned actions say.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge_sdk.errors import ConfigError, MessageError, TransferError
from edge_sdk.protocol.codec import INDEX_FRAME
from edge_sdk.protocol.messages import TransferOffer

__all__ = [
    "CHUNK_DIGEST_SIZE",
    "MAX_CHUNKS",
    "MAX_RANGES",
    "PROGRESS_EVERY",
    "ChunkIndex",
    "ChunkReceiver",
    "Discard",
    "FanOut",
    "Send",
    "WriteAt",
    "choose_chunk_size",
    "chunk_spans",
    "content_transfer_id",
    "decode_ranges",
    "encode_ranges",
]

#: Bytes of one chunk's entry in the index (a sha256 digest).
CHUNK_DIGEST_SIZE = 32
#: Most chunks in one transfer: the index (32 bytes a chunk) then fits one 1 MiB frame.
MAX_CHUNKS = 1 << 15
#: Most ranges one list of missing chunks carries; a device with more sends the first ones.
MAX_RANGES = 512
#: A receiving device reports progress each time it holds this many more chunks.
PROGRESS_EVERY = 16

_CONTEXT = b"edge-sdk transfer v1\n"
_RANGE = re.compile(r"^([0-9]{1,7})(?:-([0-9]{1,7}))?$")  # ASCII digits only (\d would take any Unicode digit)


def content_transfer_id(sha256: str, chunk_size: int) -> str:
    """The transfer id of a file: the same bytes in the same chunks are always the same transfer.

    Args:
        sha256: the file's sha256 (64 lowercase hex digits).
        chunk_size: bytes per chunk.

    Returns:
        32 lowercase hex digits.
    """
    return hashlib.sha256(_CONTEXT + f"{sha256}\n{chunk_size}".encode()).hexdigest()[:32]


def choose_chunk_size(size: int, wanted: int) -> int:
    """The chunk size for a file: ``wanted``, doubled until the file needs at most :data:`MAX_CHUNKS` chunks.

    Args:
        size: the file's bytes.
        wanted: the chunk size asked for (1 KiB to 1 MiB).

    Returns:
        The chunk size to use.

    Raises:
        ConfigError: ``wanted`` is out of range, or the file is too large for 1 MiB chunks.
    """
    if not 1024 <= wanted <= 1 << 20:
        raise ConfigError(f"chunk size must be between 1 KiB and 1 MiB, not {wanted}")
    chunk = wanted
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
        if chunk > 1 << 20:
            raise ConfigError(
                f"a file of {size} bytes needs more than {MAX_CHUNKS} chunks even of 1 MiB: too large to send"
            )
    return chunk


def chunk_spans(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of a ``size``-byte file."""
    return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)]


# --- the chunk index ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkIndex:
    """The sha256 of every chunk of a file, in order: what a device checks each chunk against.

    Attributes:
        digests: the digests, concatenated (:data:`CHUNK_DIGEST_SIZE` bytes a chunk).
    """

    digests: bytes

    def __post_init__(self) -> None:
        if len(self.digests) % CHUNK_DIGEST_SIZE:
            raise TransferError(f"a chunk index is a whole number of {CHUNK_DIGEST_SIZE}-byte digests")

    @classmethod
    def of_chunks(cls, chunks: Iterable[bytes]) -> ChunkIndex:
        """The index of a file given as its chunks, in order."""
        return cls(b"".join(hashlib.sha256(c).digest() for c in chunks))

    @classmethod
    def received(cls, data: bytes, offer: TransferOffer) -> ChunkIndex:
        """Take an index frame's bytes, if they are the index the signed offer binds.

        Raises:
            TransferError: wrong length for the offer's chunk count, or not the bound index.
        """
        if len(data) != offer.chunk_count * CHUNK_DIGEST_SIZE:
            raise TransferError(
                f"chunk index of {len(data)} bytes, the offer's {offer.chunk_count} chunks need "
                f"{offer.chunk_count * CHUNK_DIGEST_SIZE}",
                reason="index_length",
            )
        if hashlib.sha256(data).hexdigest() != offer.chunks_sha256:
            raise TransferError("chunk index does not match the offer's chunks_sha256", reason="index_hash")
        return cls(data)

    @property
    def sha256(self) -> str:
        """What the offer names the index by."""
        return hashlib.sha256(self.digests).hexdigest()

    def __len__(self) -> int:
        return len(self.digests) // CHUNK_DIGEST_SIZE

    def matches(self, index: int, data: bytes) -> bool:
        """Whether ``data`` is chunk ``index``."""
        at = index * CHUNK_DIGEST_SIZE
        return hashlib.sha256(data).digest() == self.digests[at : at + CHUNK_DIGEST_SIZE]


# --- lists of chunks on the wire --------------------------------------------------------------


def encode_ranges(indices: Iterable[int], max_ranges: int = MAX_RANGES) -> str:
    """Chunk indices as ranges, ``"0-15,40,42-63"``; at most ``max_ranges`` ranges (the lowest ones).

    Args:
        indices: chunk indices, any order, duplicates allowed.
        max_ranges: most ranges to write.
    """
    out: list[str] = []
    start = prev = -2
    for i in sorted({i for i in indices if i >= 0}):  # chunk indices are never negative
        if i == prev + 1:
            prev = i
            continue
        if start >= 0:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            if len(out) == max_ranges:
                return ",".join(out)
        start = prev = i
    if start >= 0:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def decode_ranges(text: str, chunk_count: int, max_ranges: int = MAX_RANGES) -> list[int]:
    """Parse :func:`encode_ranges` from an untrusted message, strictly.

    Args:
        text: the ranges as received.
        chunk_count: chunks in the transfer (every index must be below it).
        max_ranges: most ranges accepted.

    Returns:
        The indices, ascending, without duplicates.

    Raises:
        MessageError: not ascending ranges of indices below ``chunk_count``, or too many.
    """
    if not text:
        return []
    parts = text.split(",")
    if len(parts) > max_ranges:
        raise MessageError(f"chunk list of {len(parts)} ranges exceeds {max_ranges}")
    out: list[int] = []
    floor = 0
    for part in parts:
        match = _RANGE.fullmatch(part)
        if match is None:
            raise MessageError(f"bad chunk range {part[:20]!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo < floor or hi < lo or hi >= chunk_count:
            raise MessageError(f"chunk range {part!r} is out of order or beyond the {chunk_count} chunks")
        out.extend(range(lo, hi + 1))
        floor = hi + 1
    return out


# --- the device's end -------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteAt:
    """Action for the shell: write ``data`` at byte ``offset`` of the staging file."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class Discard:
    """Action for the shell: drop this chunk (it will be asked for again), and count why."""

    index: int
    reason: str


class ChunkReceiver:
    """The device's view of one transfer; checks every chunk against the offer and the index.

    Args:
        offer: the declared size, hash, chunk size and index hash (from a signed command).
        index: the chunk index, if the device has it already (None until the index frame).
        have: chunk indices already on disk and checked (a resumed transfer).
    """

    def __init__(self, offer: TransferOffer, index: ChunkIndex | None = None, have: Iterable[int] = ()) -> None:
        self.offer = offer
        self.index = index
        self._spans = chunk_spans(offer.size, offer.chunk_size)
        self._have = {i for i in have if 0 <= i < len(self._spans)}
        self.discarded = 0

    @property
    def chunk_count(self) -> int:
        return len(self._spans)

    @property
    def have_count(self) -> int:
        return len(self._have)

    @property
    def received_bytes(self) -> int:
        return sum(self._spans[i][1] for i in self._have)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        return self._spans[index]

    def missing(self) -> list[int]:
        return [i for i in range(len(self._spans)) if i not in self._have]

    @property
    def complete(self) -> bool:
        return len(self._have) == len(self._spans)

    def take_index(self, data: bytes) -> ChunkIndex:
        """Take an index frame (once; a later one is checked and ignored).

        Raises:
            TransferError: not the index the offer binds (the frame is dropped; the transfer goes on).
        """
        index = ChunkIndex.received(data, self.offer)
        if self.index is None:
            self.index = index
        return self.index

    def accept(self, index: int, data: bytes) -> WriteAt | Discard | None:
        """Check one chunk against the offer and the index.

        Returns:
            Where to write it; a :class:`Discard` saying why it is not taken (outside the
            offer, wrong length, not matching its digest, or no index yet); or ``None`` for a
            duplicate of a chunk already written.
        """
        if not 0 <= index < len(self._spans):
            return self._discard(index, "outside_offer")
        offset, length = self._spans[index]
        if len(data) != length:
            return self._discard(index, "length")
        if self.index is None:
            return self._discard(index, "no_index")
        if not self.index.matches(index, data):  # checked for duplicates too: every forgery is counted
            return self._discard(index, "digest")
        if index in self._have:
            return None
        self._have.add(index)
        return WriteAt(offset, data)

    def _discard(self, index: int, reason: str) -> Discard:
        self.discarded += 1
        return Discard(index, reason)


# --- the host's end ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Action for the host's shell: publish chunk ``index`` (or the chunk index, when it is :data:`INDEX_FRAME`).

    ``device`` None: on the transfer topic, to every device; else on that device's data topic.
    """

    index: int
    device: str | None = None


@dataclass
class _Peer:
    state: str = "offered"  # offered -> receiving -> done
    missing: set[int] = field(default_factory=set)  # what it lacked when it last said
    needs_index: bool = True
    have: int = 0  # chunks it holds, as it last said
    have_at_round: int = 0  # ... when this round began (accepted or need)
    sent: int = 0  # chunks it lacked that went out to it this round
    last_heard: float = 0.0
    stalled: bool = False
    unicast: list[int] = field(default_factory=list)
    end_sent: bool = False
    end_seq: int = 0  # broadcast frames sent before its last transfer_end
    rounds: int = 0
    stuck: int = 0  # repair rounds in a row that brought nothing

    @property
    def in_flight(self) -> int:
        return max(0, self.sent - (self.have - self.have_at_round))

    def new_round(self, missing: set[int], have_index: bool, chunk_count: int, now: float) -> None:
        self.state, self.missing, self.needs_index = "receiving", missing, not have_index
        self.have = self.have_at_round = chunk_count - len(missing)
        self.sent, self.last_heard, self.stalled, self.end_sent, self.unicast = 0, now, False, False, []


class FanOut:
    """The host's plan for sending one file to many devices at once: what to send next, and where.

    The shell feeds it what devices say (:meth:`accepted`, :meth:`progress`, :meth:`need`,
    :meth:`finished`) and asks :meth:`next_sends` what to publish and :meth:`ends_due` whom to
    send ``transfer_end``. Chunks any receiving device lacks go out once on the transfer topic;
    repairs go to the devices that asked, or out on the transfer topic once more when at least
    ``rebroadcast_share`` of the receiving devices (and two) lack them, by what their latest
    ``need_chunks`` says. A chunk that went out on the transfer topic after a device's
    ``transfer_end`` is on its way to it: asking for it then sends nothing more.

    Each device has rounds: one from its ``accepted``, then one per ``need_chunks``. Within a
    round everything it lacks goes out once; then it gets ``transfer_end`` and says what is
    still missing. A device past ``max_rounds`` repair rounds is given up (:attr:`given_up`).

    Args:
        chunk_count: chunks in the file.
        window: most chunks in flight beyond any active device's acknowledged progress (at
            least :data:`PROGRESS_EVERY`, how often devices acknowledge).
        stall_s: a device with chunks in flight that says nothing for this long no longer
            holds the others back; it is sent ``transfer_end`` when its chunks have gone out,
            and goes on when it speaks again.
        max_rounds: repair rounds in a row without progress before a device is given up.
        rebroadcast_share: share of receiving devices that must lack a chunk for a repair
            to go to all of them at once.

    Raises:
        ConfigError: a bound out of range.
    """

    def __init__(
        self,
        chunk_count: int,
        *,
        window: int = 64,
        stall_s: float = 10.0,
        max_rounds: int = 8,
        rebroadcast_share: float = 0.25,
    ) -> None:
        if not 1 <= chunk_count <= MAX_CHUNKS:
            raise ConfigError(f"a transfer has 1 to {MAX_CHUNKS} chunks, not {chunk_count}")
        if window < 1 or stall_s <= 0 or max_rounds < 0 or not 0 < rebroadcast_share <= 1:
            raise ConfigError("fan-out window, stall time, rounds or share out of range")
        if window < PROGRESS_EVERY:  # a device would never acknowledge a window: each one would stall
            raise ConfigError(
                f"fan-out window of {window} chunks: it must be at least {PROGRESS_EVERY}, as devices "
                f"report progress every {PROGRESS_EVERY} chunks"
            )
        self.chunk_count = chunk_count
        self.window = window
        self.stall_s = stall_s
        self.max_rounds = max_rounds
        self.rebroadcast_share = rebroadcast_share
        self._peers: dict[str, _Peer] = {}
        self._broadcast: list[int] = []  # ascending indices still to go out on the transfer topic
        self._queued: set[int] = set()
        self._index_broadcast = False
        self._seq = 0  # broadcast frames sent so far
        self._broadcast_at: dict[int, int] = {}  # chunk -> self._seq when it last went out to every device
        self.given_up: dict[str, str] = {}
        self.broadcast_chunks = 0
        self.unicast_chunks = 0
        self.ignored = 0

    # --- what devices say ---------------------------------------------------------------

    def offered(self, device: str, now: float) -> None:
        """The deploy command went out to ``device``."""
        self._peers.setdefault(device, _Peer(last_heard=now))

    def accepted(self, device: str, missing: Iterable[int], have_index: bool, now: float) -> None:
        """``device`` accepted the offer, lacking ``missing`` (and the index unless ``have_index``)."""
        peer = self._peers.get(device)
        if peer is None or peer.state == "done":
            self.ignored += 1
            return
        peer.new_round(self._valid(missing), have_index, self.chunk_count, now)
        late = self.broadcast_chunks > 0  # the broadcast may have passed what it lacks already
        # Late, it may never see the index on the transfer topic (the others may have had it).
        unicast = [INDEX_FRAME] if peer.needs_index and (self._index_broadcast or late) else []
        for i in sorted(peer.missing):
            if i in self._queued:
                continue
            if late:
                unicast.append(i)
            else:
                self._queue_broadcast(i)
        peer.unicast = unicast

    def progress(self, device: str, have: int, now: float) -> None:
        """``device`` holds ``have`` chunks now."""
        peer = self._peers.get(device)
        if peer is None or peer.state != "receiving" or not 0 <= have <= self.chunk_count:
            self.ignored += 1
            return
        if have < peer.have_at_round:
            # It holds fewer than its list of what it lacks implied: the list was capped at
            # MAX_RANGES ranges. Count from what it holds, taking what went out as received.
            peer.have_at_round, peer.have = max(0, have - peer.sent), have
        peer.have = max(peer.have, have)
        if peer.stalled:
            # What it has not acknowledged by now was lost (it asks for it at transfer_end):
            # counted as in flight, it would stall the sending again at once, and so on.
            peer.sent = peer.have - peer.have_at_round
        peer.last_heard, peer.stalled = now, False

    def need(self, device: str, missing: Iterable[int], have_index: bool, now: float) -> None:
        """``device`` says what it still lacks (after ``transfer_end``, or by itself after a restart)."""
        peer = self._peers.get(device)
        if peer is None or peer.state == "done":
            self.ignored += 1
            return
        if peer.state == "offered":  # it restarted, and reports before it accepted again
            self.accepted(device, missing, have_index, now)
            return
        peer.rounds += 1
        lacking = self._valid(missing)
        # Only rounds that brought nothing count toward giving up: a device whose list of
        # missing chunks is capped (MAX_RANGES) may need many rounds, each one progress.
        peer.stuck = 0 if len(lacking) < len(peer.missing) else peer.stuck + 1
        if peer.stuck > self.max_rounds:
            self._give_up(
                device, f"still lacks {len(lacking)} chunk(s) after {self.max_rounds} repair rounds without progress"
            )
            return
        answers_end, end_seq = peer.end_sent, peer.end_seq
        peer.new_round(lacking, have_index, self.chunk_count, now)
        receiving = [p for p in self._peers.values() if p.state == "receiving"]
        threshold = max(2.0, self.rebroadcast_share * len(receiving))
        unicast = [INDEX_FRAME] if peer.needs_index else []
        for i in sorted(lacking):
            if i in self._queued:
                continue
            if answers_end and self._broadcast_at.get(i, -1) > end_seq:
                continue  # re-broadcast after its transfer_end went out: on its way to it already
            # Who lacks it: the devices whose latest need_chunks lists it. What a device lacked
            # when it accepted is stale once the broadcast has passed, and is not counted.
            if sum(1 for p in receiving if p.rounds and i in p.missing) >= threshold:
                self._queue_broadcast(i)
                for p in receiving:  # those waiting for it on their own topic get it this way
                    if i in p.unicast:
                        p.unicast.remove(i)
            else:
                unicast.append(i)
        peer.unicast = unicast

    def finished(self, device: str) -> None:
        """``device`` has the whole file, or its transfer ended otherwise (refused, failed, timed out)."""
        peer = self._peers.get(device)
        if peer is not None:
            peer.state, peer.missing, peer.unicast = "done", set(), []

    def _valid(self, indices: Iterable[int]) -> set[int]:
        """The indices inside the file; a list with others is counted in :attr:`ignored` (once)."""
        given = set(indices)
        valid = {i for i in given if 0 <= i < self.chunk_count}
        if len(valid) != len(given):
            self.ignored += 1
        return valid

    def _give_up(self, device: str, why: str) -> None:
        self.given_up[device] = why
        self.finished(device)

    # --- what to do next ---------------------------------------------------------------

    def _queue_broadcast(self, index: int) -> None:
        self._queued.add(index)
        self._broadcast.append(index)
        self._broadcast.sort()

    def _active(self, now: float) -> list[_Peer]:
        """Receiving devices that pace the sending: those that are not stalled."""
        out = []
        for p in self._peers.values():
            if p.state != "receiving":
                continue
            if p.in_flight and now - p.last_heard >= self.stall_s:
                p.stalled = True
            if not p.stalled:
                out.append(p)
        return out

    def next_sends(self, now: float, limit: int = 64) -> list[Send]:
        """What to publish now, at most ``limit`` frames, within every active device's window.

        Returns:
            The frames to publish, in order; empty when the windows are full or nothing is due.
        """
        sends: list[Send] = []
        active = self._active(now)
        if not self._index_broadcast and self._broadcast and any(p.needs_index for p in active):
            self._index_broadcast = True
            for p in self._peers.values():
                if p.state == "receiving":
                    p.needs_index = False
            sends.append(Send(INDEX_FRAME))
        for device, peer in self._peers.items():
            while peer.unicast and len(sends) < limit and not peer.stalled and peer.in_flight < self.window:
                i = peer.unicast.pop(0)
                if i == INDEX_FRAME:
                    if peer.needs_index:  # not when the index just went out to every device
                        sends.append(Send(i, device))
                        peer.needs_index = False
                    continue
                sends.append(Send(i, device))
                peer.sent += 1
                self.unicast_chunks += 1
        # As many queued chunks as every active device's window takes, each sent while all of
        # them had room: one pass per device over at most ``limit`` chunks, not one per chunk.
        upto = min(limit - len(sends), len(self._broadcast))
        count = min([upto, *(self._room(p, upto) for p in active)]) if upto > 0 else 0
        batch = self._broadcast[:count]
        del self._broadcast[:count]
        for i in batch:
            self._queued.discard(i)
            sends.append(Send(i))
            self._seq += 1
            self._broadcast_at[i] = self._seq
        self.broadcast_chunks += count
        if batch:
            taken = set(batch)
            for p in self._peers.values():
                if p.state == "receiving":
                    p.sent += len(p.missing & taken)
        return sends

    def _room(self, peer: _Peer, upto: int) -> int:
        """How many of the next ``upto`` queued chunks can go out before ``peer``'s window is full.

        A chunk goes out while the device has fewer than ``window`` in flight; each one it
        lacks adds one.
        """
        free = self.window - (peer.sent - (peer.have - peer.have_at_round))  # in_flight, unclamped
        if free <= 0:
            return 0
        ahead = self._broadcast[:upto]
        if free >= len(ahead):
            return upto
        if peer.missing.issuperset(ahead[:free]):  # the usual case: it lacks every one of them
            return free
        lacked = 0
        for n, i in enumerate(ahead):
            if i in peer.missing:
                lacked += 1
                if lacked == free:
                    return n + 1
        return upto

    def ends_due(self) -> list[str]:
        """Devices to send ``transfer_end`` now, once a round: all they lacked went out (or they stalled)."""
        due = []
        for device, peer in self._peers.items():
            if peer.state != "receiving" or peer.end_sent or not self._queued.isdisjoint(peer.missing):
                continue
            if peer.stalled:
                peer.unicast = []  # it says what it lacks when it answers
            if not peer.unicast:
                peer.end_sent, peer.end_seq = True, self._seq
                due.append(device)
        return due

    @property
    def receiving(self) -> list[str]:
        """Devices not done yet (offered and not answered, or receiving)."""
        return [d for d, p in self._peers.items() if p.state != "done"]

    @property
    def idle(self) -> bool:
        """Nothing left to send: every receiving device has had its ``transfer_end`` this round."""
        return not self._broadcast and all(p.state != "receiving" or p.end_sent for p in self._peers.values())

    def in_flight(self, device: str) -> int:
        """Chunks sent to ``device`` this round that it has not acknowledged yet."""
        peer = self._peers.get(device)
        return 0 if peer is None else peer.in_flight
