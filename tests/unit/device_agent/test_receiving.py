"""device_agent.receiving: chunks into a staging file, a finished hash-checked bundle out."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from device_agent.receiving import Receiving
from edge_sdk.errors import HashMismatchError, TransferError, TransferIncompleteError
from edge_sdk.protocol import Chunk, DeployCommand, TransferOffer

CHUNK = 1024


def _cmd(data: bytes, sha256: str | None = None) -> DeployCommand:
    offer = TransferOffer(uuid.uuid4().hex, len(data), sha256 or hashlib.sha256(data).hexdigest(), CHUNK)
    return DeployCommand(uuid.uuid4().hex, "tiny", 1, offer, time.time())


def _chunk(cmd: DeployCommand, data: bytes, i: int) -> Chunk:
    return Chunk(cmd.transfer.transfer_id, i, data[i * CHUNK : (i + 1) * CHUNK])


@pytest.fixture
def data() -> bytes:
    return os.urandom(4 * CHUNK + 100)


def _receiving(tmp_path: Path, points: list[str] | None = None) -> Receiving:
    return Receiving(
        lambda tid: tmp_path / f"{tid}.part",
        max_bundle_bytes=1 << 20,
        idle_timeout_s=10.0,
        checkpoint=(points.append if points is not None else lambda _p: None),
    )


def test_chunks_in_any_order_make_the_finished_file(tmp_path: Path, data: bytes) -> None:
    points: list[str] = []
    r = _receiving(tmp_path, points)
    cmd = _cmd(data)
    assert r.begin(cmd, 0.0) == [0, 1, 2, 3, 4]
    assert (tmp_path / f"{cmd.transfer.transfer_id}.part").stat().st_size == len(data)  # reserved
    for i in (4, 0, 2, 2, 1):
        assert r.accept(_chunk(cmd, data, i), 1.0) is None
    assert r.missing(cmd.transfer.transfer_id) == [3]
    assert r.begin(cmd, 2.0) == [3]  # a re-offer resumes
    assert points == ["receiving", "receiving"]  # from the third new chunk of five on
    done = r.accept(_chunk(cmd, data, 3), 3.0)
    assert done is not None and done.command == cmd
    assert done.path.read_bytes() == data
    assert len(r) == 0 and r.command(cmd.transfer.transfer_id) is None
    done.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_the_offered_one_is_refused_and_removed(tmp_path: Path, data: bytes) -> None:
    r = _receiving(tmp_path)
    cmd = _cmd(data, sha256="0" * 64)
    r.begin(cmd, 0.0)
    for i in range(4):
        r.accept(_chunk(cmd, data, i), 1.0)
    with pytest.raises(HashMismatchError):
        r.accept(_chunk(cmd, data, 4), 1.0)
    assert len(r) == 0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("index, size", [(9, CHUNK), (0, CHUNK + 1), (4, 99)])
def test_a_chunk_outside_the_offer_drops_the_transfer(tmp_path: Path, data: bytes, index: int, size: int) -> None:
    r = _receiving(tmp_path)
    cmd = _cmd(data)
    r.begin(cmd, 0.0)
    with pytest.raises(TransferError):
        r.accept(Chunk(cmd.transfer.transfer_id, index, b"x" * size), 1.0)
    assert len(r) == 0 and list(tmp_path.iterdir()) == []


def test_an_offer_above_the_limit_is_refused_before_any_file(tmp_path: Path) -> None:
    r = Receiving(lambda tid: tmp_path / tid, max_bundle_bytes=1000, idle_timeout_s=10.0)
    with pytest.raises(TransferError, match="exceeds"):
        r.begin(_cmd(b"x" * 1001), 0.0)
    assert list(tmp_path.iterdir()) == []


def test_idle_transfers_expire_with_what_they_lacked(tmp_path: Path, data: bytes) -> None:
    r = _receiving(tmp_path)
    cmd = _cmd(data)
    r.begin(cmd, 0.0)
    r.accept(_chunk(cmd, data, 0), 5.0)
    assert r.expire(14.9) == []
    ((expired, err),) = r.expire(15.0)
    assert expired == cmd and isinstance(err, TransferIncompleteError) and err.details["missing"] == 4
    assert len(r) == 0 and list(tmp_path.iterdir()) == []


def test_a_chunk_of_an_unknown_transfer_is_ignored(tmp_path: Path) -> None:
    assert _receiving(tmp_path).accept(Chunk("a" * 32, 0, b"x"), 0.0) is None
