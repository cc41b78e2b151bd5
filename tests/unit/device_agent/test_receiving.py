"""device_agent.receiving: chunks checked into staging kept across restarts, a finished bundle out."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from device_agent.receiving import ReceivedDelta, Receiving
from edge_sdk.errors import StorageError, TransferError
from edge_sdk.protocol import (
    INDEX_FRAME,
    Chunk,
    ChunkIndex,
    DeltaOffer,
    DeployCommand,
    TransferOffer,
    content_transfer_id,
    encode,
)

CHUNK = 1024


def _parts(data: bytes) -> list[bytes]:
    return [data[off : off + CHUNK] for off in range(0, len(data), CHUNK)]


def _cmd(data: bytes, sha256: str | None = None, version: int = 1) -> DeployCommand:
    """A deploy command as the host builds it: named by content, the chunk index bound by its hash."""
    digest = sha256 or hashlib.sha256(data).hexdigest()
    offer = TransferOffer(
        content_transfer_id(digest, CHUNK), len(data), digest, CHUNK, ChunkIndex.of_chunks(_parts(data)).sha256
    )
    return DeployCommand(uuid.uuid4().hex, "tiny", version, offer, time.time())


def _index(cmd: DeployCommand, data: bytes) -> Chunk:
    return Chunk(cmd.transfer.transfer_id, INDEX_FRAME, ChunkIndex.of_chunks(_parts(data)).digests)


def _chunk(cmd: DeployCommand, data: bytes, i: int) -> Chunk:
    return Chunk(cmd.transfer.transfer_id, i, data[i * CHUNK : (i + 1) * CHUNK])


@pytest.fixture
def data() -> bytes:
    return os.urandom(4 * CHUNK + 100)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    d = tmp_path / "staging"
    d.mkdir()
    return d


def _receiving(staging: Path, points: list[str] | None = None, **kw: object) -> Receiving:
    return Receiving(
        staging,
        1 << 20,
        checkpoint=(points.append if points is not None else lambda _p: None),
        **kw,  # type: ignore[arg-type]
    )


def _names(staging: Path) -> list[str]:
    return sorted(p.name for p in staging.iterdir())


def test_chunks_in_any_order_make_the_finished_file(staging: Path, data: bytes) -> None:
    points: list[str] = []
    r = _receiving(staging, points)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    t = r.begin(cmd, 0.0)
    assert t.receiver.missing() == [0, 1, 2, 3, 4] and t.receiver.index is None
    assert (staging / f"{tid}.part").stat().st_size == len(data)  # reserved
    assert encode(cmd) == (staging / f"{tid}.cmd").read_bytes()  # the command is kept first
    assert r.accept(_index(cmd, data), 0.5) is None
    assert (staging / f"{tid}.index").read_bytes() == ChunkIndex.of_chunks(_parts(data)).digests
    for i in (4, 0, 2, 2, 1):
        assert r.accept(_chunk(cmd, data, i), 1.0) is None
    assert r.get(tid) is t and t.receiver.missing() == [3]
    assert r.begin(cmd, 2.0) is t and t.receiver.missing() == [3]  # a re-offer resumes
    assert points == ["receiving", "receiving"]  # from the third new chunk of five on
    done = r.accept(_chunk(cmd, data, 3), 3.0)
    assert done is not None and done.command == cmd
    assert done.path.read_bytes() == data
    assert len(r) == 0 and r.get(tid) is None and sum(r.discarded.values()) == 0
    assert _names(staging) == [f"{tid}.part"]  # the command and the index are gone with the transfer
    done.discard()
    assert _names(staging) == []


def test_a_finished_file_is_the_bytes_the_signed_index_names_and_is_not_read_back(
    staging: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No whole-file hash at the end (the module's "Why no whole-file hash"): each chunk was
    # checked against the index the offer binds, so the file is those bytes. An offer whose
    # sha256 disagrees with its own index yields them too; the install's checks judge them
    # (test_agent: an offer whose index names another bundle is refused at the install).
    r = _receiving(staging)
    cmd = _cmd(data, sha256="0" * 64)
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 1.0)
    for i in range(4):
        r.accept(_chunk(cmd, data, i), 1.0)
    reads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    done = r.accept(_chunk(cmd, data, 4), 1.0)
    monkeypatch.undo()
    assert done is not None and reads == []  # finished without reading the file back
    assert done.path.read_bytes() == data and len(r) == 0
    assert _names(staging) == [f"{cmd.transfer.transfer_id}.part"]


@pytest.mark.parametrize(
    "index, size, reason", [(9, CHUNK, "outside_offer"), (0, CHUNK + 1, "length"), (4, 99, "length")]
)
def test_a_chunk_outside_the_offer_is_discarded_and_the_transfer_goes_on(
    staging: Path, data: bytes, index: int, size: int, reason: str
) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    assert r.accept(Chunk(cmd.transfer.transfer_id, index, b"x" * size), 1.0) is None
    assert r.discarded == {reason: 1}
    t = r.get(cmd.transfer.transfer_id)
    assert t is not None and t.receiver.missing() == [0, 1, 2, 3, 4]
    assert t.last_chunk_at == 0.0  # a discarded chunk is not progress
    done = [r.accept(_chunk(cmd, data, i), 2.0) for i in range(5)][-1]
    assert done is not None and done.path.read_bytes() == data


def test_a_forged_chunk_is_discarded_and_never_written(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    r.begin(cmd, 0.0)
    assert r.accept(_chunk(cmd, data, 1), 0.5) is None  # before the index: cannot be checked
    assert r.discarded == {"no_index": 1}
    r.accept(_index(cmd, data), 1.0)
    real = data[CHUNK : 2 * CHUNK]
    forged = bytes(b ^ 0x5A for b in real)  # the right length, other bytes
    assert r.accept(Chunk(tid, 1, forged), 2.0) is None
    assert r.discarded == {"no_index": 1, "digest": 1}
    assert (staging / f"{tid}.part").read_bytes()[CHUNK : 2 * CHUNK] == b"\0" * CHUNK
    t = r.get(tid)
    assert t is not None and 1 in t.receiver.missing()
    for i in range(5):
        done = r.accept(_chunk(cmd, data, i), 3.0)
    assert done is not None and done.path.read_bytes() == data


def test_a_forged_index_is_discarded_and_the_signed_one_taken_after(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    r.begin(cmd, 0.0)
    forged = data[: 5 * 32]  # the right length for five chunks, not the index the offer binds
    assert r.accept(Chunk(tid, INDEX_FRAME, forged), 1.0) is None
    assert r.accept(Chunk(tid, INDEX_FRAME, b"short"), 1.0) is None
    assert r.discarded == {"index": 2}
    t = r.get(tid)
    assert t is not None and t.receiver.index is None and not (staging / f"{tid}.index").exists()
    r.accept(_index(cmd, data), 2.0)
    assert t.receiver.index is not None and (staging / f"{tid}.index").exists()
    for i in range(5):
        done = r.accept(_chunk(cmd, data, i), 3.0)
    assert done is not None and done.path.read_bytes() == data


def test_an_offer_above_the_limit_is_refused_before_any_file(staging: Path) -> None:
    r = Receiving(staging, max_bundle_bytes=1000)
    with pytest.raises(TransferError, match="exceeds"):
        r.begin(_cmd(b"x" * 1001), 0.0)
    assert _names(staging) == []


def test_a_chunk_of_an_unknown_transfer_is_ignored(staging: Path) -> None:
    r = _receiving(staging)
    assert r.accept(Chunk("a" * 32, 0, b"x"), 0.0) is None
    assert r.accept(Chunk("a" * 32, INDEX_FRAME, b"x" * 32), 0.0) is None
    assert _names(staging) == [] and sum(r.discarded.values()) == 0


# --- what is held, and for how long -------------------------------------------------------


def test_idle_transfers_are_reported_once_a_period_and_kept(staging: Path, data: bytes) -> None:
    r = _receiving(staging, max_age_s=100.0)
    cmd = _cmd(data)
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    r.accept(_chunk(cmd, data, 0), 5.0)
    assert r.idle(14.9, after_s=10.0) == []
    (t,) = r.idle(15.0, after_s=10.0)
    assert t.command == cmd and t.receiver.missing() == [1, 2, 3, 4]
    assert r.idle(24.9, after_s=10.0) == []  # once a period
    assert r.idle(25.0, after_s=10.0) == [t]
    r.accept(_chunk(cmd, data, 0), 30.0)  # a duplicate is not progress
    assert r.idle(35.0, after_s=10.0) == [t]
    assert len(r) == 1 and r.expire(99.0) == []  # idle, not abandoned: kept


def test_abandoned_transfers_expire(staging: Path, data: bytes) -> None:
    r = _receiving(staging, max_age_s=100.0)
    cmd = _cmd(data)
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    r.accept(_chunk(cmd, data, 0), 5.0)
    assert r.expire(104.9) == []
    assert [t.command for t in r.expire(105.0)] == [cmd]
    assert len(r) == 0 and _names(staging) == []


def test_progress_is_due_every_so_many_chunks(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    r.accept(_chunk(cmd, data, 0), 1.0)
    assert r.progress_due(tid, 2) is None
    r.accept(_chunk(cmd, data, 0), 1.0)  # a duplicate does not count
    assert r.progress_due(tid, 2) is None
    r.accept(_chunk(cmd, data, 1), 1.0)
    assert r.progress_due(tid, 2) == 2
    assert r.progress_due(tid, 2) is None  # reported
    assert r.progress_due("f" * 32, 1) is None


def test_max_transfers_evicts_the_oldest_idle_one(staging: Path) -> None:
    r = _receiving(staging, max_transfers=2)
    a, b, c = (os.urandom(2 * CHUNK) for _ in range(3))
    ca, cb, cc = _cmd(a), _cmd(b), _cmd(c)
    r.begin(ca, 0.0)
    r.begin(cb, 1.0)
    r.accept(_index(ca, a), 0.0)
    r.accept(_chunk(ca, a, 0), 2.0)  # a had a chunk since b began: b is the oldest idle one
    r.begin(cc, 3.0)
    assert len(r) == 2 and r.get(cb.transfer.transfer_id) is None
    assert [t.command for t in r.held()] == [ca, cc]
    assert not any(p.name.startswith(cb.transfer.transfer_id) for p in staging.iterdir())
    assert (staging / f"{ca.transfer.transfer_id}.part").exists()


def test_a_new_offer_of_the_same_content_replaces_the_kept_command(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    first = _cmd(data)
    tid = first.transfer.transfer_id
    r.begin(first, 0.0)
    r.accept(_index(first, data), 0.0)
    r.accept(_chunk(first, data, 0), 1.0)
    second = dataclasses.replace(first, command_id=uuid.uuid4().hex, ts=first.ts + 60)  # a retry of the deploy
    assert second.transfer.transfer_id == tid
    t = r.begin(second, 2.0)
    assert t.command == second and t.receiver.missing() == [1, 2, 3, 4]  # resumed, not restarted
    assert (staging / f"{tid}.cmd").read_bytes() == encode(second)
    r.close()
    again = _receiving(staging)
    (kept,) = again.recover(10.0, time.time())
    assert kept.command == second and kept.receiver.missing() == [1, 2, 3, 4]
    again.close()


def test_another_file_offered_under_a_held_transfer_id_starts_over(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    first = _cmd(data)
    tid = first.transfer.transfer_id
    r.begin(first, 0.0)
    r.accept(_index(first, data), 0.0)
    r.accept(_chunk(first, data, 0), 1.0)
    other = os.urandom(3 * CHUNK)  # a host that names transfers otherwise reuses the id for other bytes
    second = _cmd(other)
    second = dataclasses.replace(second, transfer=dataclasses.replace(second.transfer, transfer_id=tid))
    t = r.begin(second, 2.0)
    assert t.command == second and t.receiver.offer == second.transfer
    assert t.receiver.index is None and t.receiver.missing() == [0, 1, 2]
    assert (staging / f"{tid}.part").stat().st_size == len(other) and not (staging / f"{tid}.index").exists()
    r.accept(Chunk(tid, INDEX_FRAME, ChunkIndex.of_chunks(_parts(other)).digests), 3.0)
    for i in range(3):
        done = r.accept(Chunk(tid, i, other[i * CHUNK : (i + 1) * CHUNK]), 3.0)
    assert done is not None and done.command == second and done.path.read_bytes() == other


# --- restarts -------------------------------------------------------------------------------


def test_a_transfer_resumes_after_a_restart_with_the_chunks_it_had(staging: Path) -> None:
    data = os.urandom(10 * CHUNK + 7)
    r = _receiving(staging)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    half = [0, 2, 4, 6, 8, 10]
    for i in half:
        r.accept(_chunk(cmd, data, i), 1.0)
    r.close()  # the agent stops (or the power is cut after these writes)
    assert _names(staging) == sorted(f"{tid}{s}" for s in (".cmd", ".index", ".part"))
    again = _receiving(staging)
    (t,) = again.recover(50.0, time.time())
    assert t.command == cmd and t.last_chunk_at == 50.0
    assert t.receiver.index is not None and t.receiver.have_count == len(half)
    assert t.receiver.missing() == [1, 3, 5, 7, 9]
    assert again.get(tid) is t and again.begin(cmd, 51.0) is t
    for i in (1, 3, 5, 7):
        assert again.accept(_chunk(cmd, data, i), 52.0) is None
    done = again.accept(_chunk(cmd, data, 9), 53.0)
    assert done is not None and done.path.read_bytes() == data


def test_a_chunk_corrupted_on_disk_is_not_counted_as_had(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    for i in (0, 1, 2):
        r.accept(_chunk(cmd, data, i), 1.0)
    r.close()
    fd = os.open(staging / f"{tid}.part", os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff", CHUNK + 17)  # one byte of chunk 1 rots on the SD card
    finally:
        os.close(fd)
    again = _receiving(staging)
    (t,) = again.recover(0.0, time.time())
    assert t.receiver.missing() == [1, 3, 4]
    for i in (1, 3, 4):
        done = again.accept(_chunk(cmd, data, i), 1.0)
    assert done is not None and done.path.read_bytes() == data


def test_chunks_kept_without_their_index_are_received_again(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    tid = cmd.transfer.transfer_id
    r.begin(cmd, 0.0)
    r.accept(_index(cmd, data), 0.0)
    r.accept(_chunk(cmd, data, 0), 1.0)
    r.close()
    (staging / f"{tid}.index").write_bytes(b"\0" * (5 * 32))  # not the index the offer binds
    again = _receiving(staging)
    (t,) = again.recover(0.0, time.time())
    assert t.receiver.index is None and t.receiver.missing() == [0, 1, 2, 3, 4]  # nothing unchecked is trusted
    assert not (staging / f"{tid}.index").exists()
    again.close()


def test_recover_removes_stray_and_unusable_files(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    kept = _cmd(data)
    r.begin(kept, 0.0)
    r.close()
    torn = _cmd(os.urandom(3 * CHUNK))  # its .part is not the declared size
    r2 = _receiving(staging)
    r2.begin(torn, 0.0)
    r2.close()
    os.truncate(staging / f"{torn.transfer.transfer_id}.part", 10)
    lonely = "c" * 32  # a .part without its command
    (staging / f"{lonely}.part").write_bytes(b"x" * 10)
    liar = _cmd(os.urandom(2 * CHUNK))  # a command kept under another transfer's name
    (staging / f"{'d' * 32}.cmd").write_bytes(encode(liar))
    (staging / f"{'d' * 32}.part").write_bytes(b"x" * (2 * CHUNK))
    (staging / f"{'e' * 32}.cmd").write_bytes(b"{not json")
    (staging / f"{'e' * 32}.part").write_bytes(b"x")
    (staging / f".{kept.transfer.transfer_id}.cmd.abc123.tmp").write_bytes(b"half a write")
    (staging / "notes.txt").write_bytes(b"?")
    (staging / f"{'f' * 32}.part.old").write_bytes(b"?")
    (staging / "somedir").mkdir()
    (staging / "somedir" / "x").write_bytes(b"?")
    again = _receiving(staging)
    (t,) = again.recover(0.0, time.time())
    assert t.command == kept
    tid = kept.transfer.transfer_id
    assert _names(staging) == [f"{tid}.cmd", f"{tid}.part"]
    again.close()


def test_recover_removes_transfers_older_than_max_age(staging: Path) -> None:
    old_data, new_data = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK)
    r = _receiving(staging)
    old, new = _cmd(old_data), _cmd(new_data)
    for cmd, d in ((old, old_data), (new, new_data)):
        r.begin(cmd, 0.0)
        r.accept(_index(cmd, d), 0.0)
        r.accept(_chunk(cmd, d, 0), 0.0)
    r.close()
    now = time.time()
    week = 7 * 86400.0
    part = staging / f"{old.transfer.transfer_id}.part"
    os.utime(part, (now - week - 60, now - week - 60))  # its last chunk came over a week ago
    recent = staging / f"{new.transfer.transfer_id}.part"
    os.utime(recent, (now - week + 60, now - week + 60))
    again = _receiving(staging, max_age_s=week)
    (t,) = again.recover(0.0, now)
    assert t.command == new and t.receiver.missing() == [1]
    assert not any(p.name.startswith(old.transfer.transfer_id) for p in staging.iterdir())
    again.close()


def test_no_room_for_a_new_transfer_removes_idle_ones_first(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from device_agent import receiving as module

    r = _receiving(staging, max_transfers=4)
    a, b, c = os.urandom(2 * CHUNK), os.urandom(3 * CHUNK), os.urandom(CHUNK)
    ca, cb, cc = _cmd(a), _cmd(b), _cmd(c)
    r.begin(ca, 0.0)
    real = module.StagingFile.create
    room = [1]  # transfers the disk has room for

    def fussy(path: Path, size: int) -> module.StagingFile:
        if len(r) >= room[0]:
            raise StorageError("no room", size=size)
        return real(path, size)

    monkeypatch.setattr(module.StagingFile, "create", staticmethod(fussy))
    t = r.begin(cb, 1.0)
    assert t.command == cb and [x.command for x in r.held()] == [cb]
    assert not any(p.name.startswith(ca.transfer.transfer_id) for p in staging.iterdir())
    room[0] = 0  # no room even on an empty disk
    with pytest.raises(StorageError):
        r.begin(cc, 2.0)
    assert len(r) == 0 and _names(staging) == []  # nothing of the new one is left either


def test_a_delta_transfer_is_named_by_the_delta_and_resumes_as_one(staging: Path) -> None:
    bundle, delta = os.urandom(8 * CHUNK), os.urandom(3 * CHUNK + 5)
    full = _cmd(bundle, version=2)
    digest = hashlib.sha256(delta).hexdigest()
    offer = TransferOffer(
        content_transfer_id(digest, CHUNK), len(delta), digest, CHUNK, ChunkIndex.of_chunks(_parts(delta)).sha256
    )
    cmd = dataclasses.replace(full, delta=DeltaOffer(offer, 1, "c" * 64))
    tid = offer.transfer_id
    r = _receiving(staging)
    t = r.begin(cmd, 0.0, delta=True)
    assert (t.transfer_id, t.offer, t.is_delta) == (tid, offer, True)
    assert r.get(cmd.transfer.transfer_id) is None  # the bundle's own transfer is not begun
    r.accept(Chunk(tid, INDEX_FRAME, ChunkIndex.of_chunks(_parts(delta)).digests), 0.0)
    r.accept(Chunk(tid, 0, delta[:CHUNK]), 1.0)
    r.close()
    assert _names(staging) == sorted(f"{tid}{s}" for s in (".cmd", ".index", ".part"))
    again = _receiving(staging)
    (kept,) = again.recover(5.0, time.time())
    assert (kept.command, kept.is_delta, kept.receiver.missing()) == (cmd, True, [1, 2, 3])
    for i in (1, 2):
        assert again.accept(Chunk(tid, i, delta[i * CHUNK : (i + 1) * CHUNK]), 6.0) is None
    done = again.accept(Chunk(tid, 3, delta[3 * CHUNK :]), 7.0)
    assert isinstance(done, ReceivedDelta) and done.command == cmd and done.path.read_bytes() == delta
    done.discard()
    assert _names(staging) == []
    with pytest.raises(ValueError, match="without a delta"):
        again.begin(full, 8.0, delta=True)


def test_a_kept_command_that_offers_neither_file_is_removed_at_start(staging: Path, data: bytes) -> None:
    r = _receiving(staging)
    cmd = _cmd(data)
    r.begin(cmd, 0.0)
    r.close()
    stranger = "f" * 32  # files named by a transfer id the kept command does not offer
    for suffix in (".cmd", ".part"):
        (staging / f"{cmd.transfer.transfer_id}{suffix}").rename(staging / f"{stranger}{suffix}")
    assert _receiving(staging).recover(1.0, time.time()) == []
    assert _names(staging) == []
