"""device_agent.outbox: order, durability across reopen, torn tails, the bound and its count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device_agent.outbox import Outbox, OutboxRecord
from edge_sdk.errors import StorageError


def _drain(box: Outbox) -> list[OutboxRecord]:
    out = []
    while (rec := box.peek()) is not None:
        out.append(rec)
        box.pop()
    box.commit()
    return out


def test_messages_leave_in_order_and_the_log_empties(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    for i in range(5):
        assert box.append(f"t/{i}", f"payload {i}".encode(), retain=i == 4)
    assert box.pending == 5
    got = _drain(box)
    assert [(r.topic, r.payload, r.retain) for r in got] == [
        (f"t/{i}", f"payload {i}".encode(), i == 4) for i in range(5)
    ]
    assert box.pending == 0 and (tmp_path / "ob" / "log").stat().st_size == 0


def test_undelivered_messages_survive_a_reopen_and_delivered_ones_do_not_return(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    for i in range(4):
        box.append("t", bytes([i]))
    box.pop()  # delivered 0 and 1
    box.pop()
    box.commit()
    box.close()
    again = Outbox(tmp_path / "ob")
    assert [r.payload for r in _drain(again)] == [bytes([2]), bytes([3])]


def test_delivery_not_committed_is_repeated_at_least_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    box.append("t", b"a")
    box.append("t", b"b")
    box.peek()
    box.pop()  # crash before commit
    again = Outbox(tmp_path / "ob")
    assert [r.payload for r in _drain(again)] == [b"a", b"b"]


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_a_torn_last_record_is_cut_off(tmp_path: Path, cut: int) -> None:
    box = Outbox(tmp_path / "ob")
    box.append("t", b"whole")
    size_one = (tmp_path / "ob" / "log").stat().st_size
    box.append("t", b"torn by a power cut")
    box.close()
    log = tmp_path / "ob" / "log"
    with open(log, "r+b") as fh:
        fh.truncate(size_one + cut)
    again = Outbox(tmp_path / "ob")
    assert [r.payload for r in _drain(again)] == [b"whole"]


def test_a_corrupt_record_ends_the_log(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    box.append("t", b"good")
    box.append("t", b"flipped")
    box.append("t", b"after")
    box.close()
    log = tmp_path / "ob" / "log"
    data = bytearray(log.read_bytes())
    data[data.index(b"flipped")] ^= 0xFF
    log.write_bytes(bytes(data))
    assert [r.payload for r in _drain(Outbox(tmp_path / "ob"))] == [b"good"]


def test_the_bound_drops_the_newest_and_counts_them_durably(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob", max_bytes=200)
    results = [box.append("t", b"x" * 50) for _ in range(6)]
    assert results[:3] == [True, True, True] and results[3:] == [False, False, False]
    assert box.dropped == 3 and box.pending_bytes <= 200
    box.close()
    again = Outbox(tmp_path / "ob", max_bytes=200)
    assert again.dropped == 3 and again.pending == 3
    _drain(again)
    assert again.append("t", b"x" * 50)  # room again once delivered
    again.reset_dropped()
    assert Outbox(tmp_path / "ob", max_bytes=200).dropped == 0


def test_a_cursor_past_the_end_is_reset(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    box.append("t", b"a")
    _drain(box)
    box.close()
    (tmp_path / "ob" / "cursor").write_text('{"offset": 999, "dropped": 0}')
    again = Outbox(tmp_path / "ob")
    again.append("t", b"b")
    assert [r.payload for r in _drain(again)] == [b"b"]


def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError):
        Outbox(blocker / "ob")
    assert os.path.exists(blocker)
