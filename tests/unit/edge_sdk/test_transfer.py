"""edge_sdk.protocol.transfer: transfer names, chunk sizes, the chunk index, lists of chunks on the wire.

The device's :class:`ChunkReceiver` is in test_protocol.py; the host's :class:`FanOut` in test_fanout.py.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError, MessageError, TransferError
from edge_sdk.protocol import (
    MAX_CHUNKS,
    TRANSFER_ROOT,
    ChunkIndex,
    Event,
    EventKind,
    TransferOffer,
    choose_chunk_size,
    content_transfer_id,
    decode,
    decode_ranges,
    encode,
    encode_ranges,
    transfer_topic,
)
from edge_sdk.protocol.transfer import CHUNK_DIGEST_SIZE, MAX_RANGES

SHA_A = hashlib.sha256(b"bundle a").hexdigest()
SHA_B = hashlib.sha256(b"bundle b").hexdigest()
KIB = 1024
MIB = 1 << 20


# --- names ------------------------------------------------------------------------------------


def test_a_transfer_is_named_by_its_content_and_chunk_size() -> None:
    tid = content_transfer_id(SHA_A, 64 * KIB)
    assert re.fullmatch(r"[0-9a-f]{32}", tid)
    assert content_transfer_id(SHA_A, 64 * KIB) == tid  # a retry, or a restarted host: the same transfer
    assert content_transfer_id(SHA_A, 128 * KIB) != tid  # other chunks: another transfer
    assert content_transfer_id(SHA_B, 64 * KIB) != tid
    assert transfer_topic(tid) == f"{TRANSFER_ROOT}/{tid}" == f"edge/v1/transfers/{tid}"
    offer = TransferOffer(tid, 10, SHA_A, 64 * KIB, SHA_B)  # a valid transfer id on the wire
    assert offer.transfer_id == tid


@pytest.mark.parametrize(
    "tid", ["", "a" * 31, "a" * 33, "A" * 32, "g" * 32, "+", "#", "a" * 31 + "/", "a" * 32 + "\n", "../" + "a" * 29]
)
def test_a_transfer_topic_needs_a_transfer_id(tid: str) -> None:
    with pytest.raises(ConfigError, match="transfer id"):
        transfer_topic(tid)


# --- chunk sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "wanted", "chosen"),
    [
        (1, 64 * KIB, 64 * KIB),
        (MAX_CHUNKS * 64 * KIB, 64 * KIB, 64 * KIB),  # exactly the most chunks
        (MAX_CHUNKS * 64 * KIB + 1, 64 * KIB, 128 * KIB),  # one byte more: doubled
        (MAX_CHUNKS * 256 * KIB + 1, 64 * KIB, 512 * KIB),  # doubled until it fits
        (MAX_CHUNKS * MIB, KIB, MIB),
        (10 * MIB, KIB, KIB),
        (10 * MIB, MIB, MIB),
    ],
)
def test_choose_chunk_size_doubles_until_the_chunks_are_few_enough(size: int, wanted: int, chosen: int) -> None:
    assert choose_chunk_size(size, wanted) == chosen
    assert -(-size // chosen) <= MAX_CHUNKS


def test_a_file_too_large_even_for_1_mib_chunks_is_refused() -> None:
    with pytest.raises(ConfigError, match="too large"):
        choose_chunk_size(MAX_CHUNKS * MIB + 1, 64 * KIB)


@pytest.mark.parametrize("wanted", [0, 1023, MIB + 1, -KIB])
def test_a_chunk_size_out_of_range_is_refused(wanted: int) -> None:
    with pytest.raises(ConfigError, match="chunk size"):
        choose_chunk_size(10 * KIB, wanted)


# --- the chunk index ------------------------------------------------------------------------


def _offer(chunks: list[bytes], chunks_sha256: str | None = None) -> TransferOffer:
    data = b"".join(chunks)
    index = ChunkIndex.of_chunks(chunks)
    return TransferOffer("a" * 32, len(data), hashlib.sha256(data).hexdigest(), KIB, chunks_sha256 or index.sha256)


def test_the_chunk_index_lists_every_chunk_digest() -> None:
    chunks = [b"a" * KIB, b"b" * KIB, b"c" * 10]
    index = ChunkIndex.of_chunks(chunks)
    assert len(index) == 3 and len(index.digests) == 3 * CHUNK_DIGEST_SIZE
    assert index.digests[32:64] == hashlib.sha256(b"b" * KIB).digest()
    assert index.sha256 == hashlib.sha256(index.digests).hexdigest()
    assert index.matches(1, b"b" * KIB) and not index.matches(1, b"a" * KIB) and not index.matches(1, b"b" * 1023)
    assert ChunkIndex.received(index.digests, _offer(chunks)) == index


def test_an_index_that_is_not_the_signed_one_is_refused() -> None:
    chunks = [b"a" * KIB, b"b" * KIB, b"c" * 10]
    index = ChunkIndex.of_chunks(chunks)
    offer = _offer(chunks)
    forged = ChunkIndex.of_chunks([b"x" * KIB, b"b" * KIB, b"c" * 10])
    with pytest.raises(TransferError, match="chunks_sha256") as info:
        ChunkIndex.received(forged.digests, offer)
    assert info.value.details == {"reason": "index_hash"}
    for wrong in (index.digests[:-32], index.digests + index.digests[:32], index.digests[:-1], b""):
        with pytest.raises(TransferError) as info:
            ChunkIndex.received(wrong, offer)
        assert info.value.details == {"reason": "index_length"}
    with pytest.raises(TransferError):
        ChunkIndex.received(index.digests, _offer(chunks, chunks_sha256=forged.sha256))  # the offer binds another
    with pytest.raises(TransferError, match="whole number"):
        ChunkIndex(b"x" * 33)


# --- lists of chunks on the wire ------------------------------------------------------------


@given(st.sets(st.integers(min_value=0, max_value=MAX_CHUNKS - 1), max_size=400))
def test_ranges_round_trip(indices: set[int]) -> None:
    text = encode_ranges(indices)
    assert decode_ranges(text, MAX_CHUNKS) == sorted(indices)
    assert len(text) <= 8192  # fits an event


@pytest.mark.parametrize(
    ("indices", "text"),
    [([], ""), ([3], "3"), ([0, 1, 2], "0-2"), ([5, 1, 2, 2, 3, 9], "1-3,5,9"), ([0, 2, 4], "0,2,4")],
)
def test_ranges_are_compact(indices: list[int], text: str) -> None:
    assert encode_ranges(indices) == text
    assert decode_ranges(text, 10) == sorted(set(indices))


def test_a_long_list_is_capped_to_its_lowest_ranges() -> None:
    evens = range(0, 4 * MAX_RANGES, 2)  # twice as many ranges as allowed
    text = encode_ranges(evens)
    assert text.count(",") + 1 == MAX_RANGES
    assert decode_ranges(text, 4 * MAX_RANGES) == list(range(0, 2 * MAX_RANGES, 2))
    assert encode_ranges(range(10), max_ranges=1) == "0-9"
    assert encode_ranges([1, 3, 5], max_ranges=2) == "1,3"


def test_the_longest_list_a_device_can_send_fits_an_event() -> None:
    worst = [i for i in range(MAX_CHUNKS - 2 * MAX_RANGES * 2, MAX_CHUNKS) if i % 4 < 2]  # "32765-32766,..."
    text = encode_ranges(worst)
    assert text.count(",") + 1 == MAX_RANGES
    event = Event("pi-1", EventKind.NEED_CHUNKS, 1.0, missing_ranges=text)
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "text",
    [
        "x",
        "1-",
        "-1",
        "1--2",
        " 1",
        "1 ",
        "1,",
        ",1",
        "1,,2",
        "0x1",
        "1.0",
        "+1",
        "1_0",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to Python's int(), not on this wire
        "\uff11-\uff12",  # FULLWIDTH DIGITS
        "1;2",
        "1-2-3",
    ],
    ids=repr,
)
def test_junk_chunk_lists_are_refused(text: str) -> None:
    with pytest.raises(MessageError):
        decode_ranges(text, 100)


@pytest.mark.parametrize(
    "text",
    [
        "5,3",  # descending
        "5-3",
        "1-5,3-7",  # overlapping
        "1-5,5",
        "2,2",
        "10",  # out of range (10 chunks: 0 to 9)
        "0-10",
        "9,10",
        "99999999",  # huge numbers
        "0-99999999999999999999",
        "1" * 5000,
    ],
)
def test_lists_out_of_order_or_range_are_refused(text: str) -> None:
    with pytest.raises(MessageError):
        decode_ranges(text, 10)


def test_too_many_ranges_are_refused() -> None:
    text = ",".join(str(i) for i in range(0, 2 * (MAX_RANGES + 1), 2))
    with pytest.raises(MessageError, match="ranges"):
        decode_ranges(text, MAX_CHUNKS)
    assert len(decode_ranges(text.rsplit(",", 1)[0], MAX_CHUNKS)) == MAX_RANGES
    with pytest.raises(MessageError):
        decode_ranges("0,2,4", 10, max_ranges=2)


def test_an_event_bounds_its_missing_ranges() -> None:
    Event("pi-1", EventKind.NEED_CHUNKS, 1.0, missing_ranges="1" * 8192)  # the length is bounded, not parsed here
    with pytest.raises(MessageError, match="missing_ranges"):
        Event("pi-1", EventKind.NEED_CHUNKS, 1.0, missing_ranges="1" * 8193)
    body = encode(Event("pi-1", EventKind.NEED_CHUNKS, 1.0, missing_ranges="1"))
    with pytest.raises(MessageError):
        decode(body.replace(b'"missing_ranges":"1"', b'"missing_ranges":"' + b"1," * 4097 + b'"'))


def test_encode_ranges_leaves_out_negative_indices() -> None:
    from edge_sdk.protocol import encode_ranges

    assert encode_ranges([-5, -1, 0, 1, 2, 7]) == "0-2,7"
