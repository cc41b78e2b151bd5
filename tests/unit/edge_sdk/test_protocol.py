"""edge_sdk.protocol: topic tree, message codec with limits, chunk frames, chunked transfer."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from edge_sdk import protocol
from edge_sdk.errors import (
    ConfigError,
    MessageError,
    MessageTooLargeError,
    TransferError,
)
from edge_sdk.metrics import CpuMeasurement, LatencyStats, ModelMemory, PowerMeasurement, ThermalReading
from edge_sdk.protocol import (
    INDEX_FRAME,
    SCHEMA_VERSION,
    BenchmarkSpec,
    Channel,
    ChunkIndex,
    ChunkReceiver,
    CodecLimits,
    DeltaOffer,
    DeployCommand,
    DeviceStatus,
    DeviceTopics,
    Discard,
    ErrorInfo,
    Event,
    EventKind,
    Heartbeat,
    MetricsReport,
    ParsedTopic,
    RemoveCommand,
    RollbackCommand,
    RootUpdate,
    SignedCommand,
    SignedReport,
    TransferEnd,
    TransferOffer,
    WriteAt,
    chunk_spans,
    decode,
    decode_chunk,
    encode,
    encode_chunk,
    fleet_filter,
    parse_topic,
    shared,
)
from edge_sdk.protocol.codec import CHUNK_HEADER_SIZE
from edge_sdk.protocol.messages import MESSAGE_TYPES
from edge_sdk.protocol.topics import TOPIC_ROOT, check_device_id

TID = "0123456789abcdef0123456789abcdef"
CID = "fedcba9876543210fedcba9876543210"
SHA = "ab" * 32


def test_public_names_are_exactly_the_intended_ones() -> None:
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    assert len(set(protocol.__all__)) == len(protocol.__all__)


# --- topics ------------------------------------------------------------------------------


def test_device_topics() -> None:
    t = DeviceTopics("pi-kitchen.01")
    assert t.status == f"{TOPIC_ROOT}/pi-kitchen.01/status"
    assert t.cmd == "edge/v1/devices/pi-kitchen.01/cmd"
    assert t.data.endswith("/data") and t.events.endswith("/events") and t.metrics.endswith("/metrics")
    for ch in Channel:
        assert parse_topic(t.topic(ch)) == ParsedTopic("pi-kitchen.01", ch)


@pytest.mark.parametrize(
    "device_id",
    ["", "+", "#", "a/b", "dev+", "dev#", "-dev", ".dev", "_dev", "d" * 65, "dev 1", "dev\n", "dév", "a\x00", 7, None],
    ids=repr,
)
def test_bad_device_ids_are_refused(device_id: Any) -> None:
    with pytest.raises(ConfigError):
        DeviceTopics(device_id)
    with pytest.raises(ConfigError):
        check_device_id(device_id)


@pytest.mark.parametrize("device_id", ["a", "d" * 64, "Jetson_Nano-2.local", "0"])
def test_good_device_ids(device_id: str) -> None:
    assert DeviceTopics(device_id).device_id == device_id


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "edge/v1/devices",
        "edge/v1/devices/",
        "edge/v1/devices/dev1",
        "edge/v1/devices/dev1/",
        "edge/v1/devices/dev1/cmd/extra",
        "edge/v1/devices/dev1/unknown",
        "edge/v1/devices/+/cmd",
        "edge/v1/devices/#",
        "edge/v1/devices//cmd",
        "edge/v1/devices/dev\n/cmd",
        "edge/v1/devices/dev1/CMD",
        "edge/v2/devices/dev1/cmd",
        "other/v1/devices/dev1/cmd",
        "/edge/v1/devices/dev1/cmd",
        "$share/g/edge/v1/devices/dev1/cmd",
        "edge/v1/devices/" + "d" * 65 + "/cmd",
    ],
    ids=repr,
)
def test_foreign_or_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(MessageError):
        parse_topic(topic)


def test_fleet_filter_and_shared_subscriptions() -> None:
    assert fleet_filter(Channel.STATUS) == "edge/v1/devices/+/status"
    assert shared("collectors", fleet_filter(Channel.METRICS)) == "$share/collectors/edge/v1/devices/+/metrics"
    for bad in ("", "a/b", "+", "#", "g+"):
        with pytest.raises(ConfigError):
            shared(bad, "x")


# --- messages ------------------------------------------------------------------------------


def _offer(**kw: Any) -> TransferOffer:
    args: dict[str, Any] = {
        "transfer_id": TID,
        "size": 10_000,
        "sha256": SHA,
        "chunk_size": 4096,
        "chunks_sha256": "cd" * 32,
    }
    args.update(kw)
    return TransferOffer(**args)


def _examples() -> list[Any]:
    return [
        DeviceStatus(
            "pi-1",
            "online",
            1.5,
            agent_version="0.1.0",
            platform={"kind": "raspberry-pi"},
            runtimes={"onnxruntime": "1.18"},
            active={"digits": {"version": 3}},
        ),
        DeviceStatus("pi-1", "offline", 2.0),
        DeployCommand(
            CID, "digits", 3, _offer(), 10.0, BenchmarkSpec(runs=50, warmup=5, threads=2, min_duration_s=1.5)
        ),
        DeployCommand(CID, "digits", 1, _offer(size=1, chunk_size=1024), 10.0),
        TransferEnd(CID, TID),
        Event("pi-1", EventKind.NEED_CHUNKS, 3.0, command_id=CID, transfer_id=TID, missing_ranges="1,5-9"),
        Event("pi-1", EventKind.REFUSED, 3.0, error=ErrorInfo("rollback", "v1 is not newer", {"offered": 1})),
        Event("pi-1", EventKind.INSTALLED, 3.0, detail={"slot": "v3"}),
        MetricsReport(
            "pi-1",
            "digits",
            3,
            "onnxruntime",
            "int8",
            4.0,
            command_id=CID,
            threads=4,
            providers=("CPUExecutionProvider",),
            latency=LatencyStats(50, 1.3, 0.2, 1.0, 2.5, 1.2, 1.6, 2.4, 769.2),
            memory=ModelMemory(10 << 20, 12 << 20, 2 << 20, 12 << 20, 13 << 20, 13 << 20, None, 40),
            cpu=CpuMeasurement.from_deltas(2.0, 1.0, 4),
            power=PowerMeasurement(6.0, 2.0, 3.0, "estimate:generic", True, 0.1),
            temperature=(ThermalReading("thermal_zone0", "cpu-thermal", 45.0),),
        ),
        DeployCommand(CID, "digits", 2, _offer(), 10.0, device_id="pi-1", expires_at=70.0, rollback=True),
        RollbackCommand(CID, "digits", 2, 10.0, device_id="pi-1", expires_at=70.0),
        RemoveCommand(CID, "digits", 10.0, device_id="pi-1", expires_at=70.0),
        SignedCommand('{"type":"remove"}', ({"keyid": "k", "sig": "AA=="},)),
        RootUpdate({"signed": {"version": 2}, "signatures": []}),
        SignedReport("pi-1", 7, 3.0, '{"type":"event"}', "0" * 32, "AA=="),
        DeviceStatus("pi-1", "online", 2.5, labels={"site": "depot-3", "hw": "pi5"}, heartbeat_s=60.0),
        Heartbeat("pi-1", 3.5, 60.0),
    ]


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg: Any) -> None:
    wire = encode(msg)
    body = json.loads(wire)
    assert body["schema"] == SCHEMA_VERSION
    assert body["type"] == msg.TYPE
    assert decode(wire) == msg
    assert encode(decode(wire)) == wire


def test_every_registered_type_has_an_example() -> None:
    assert {type(m).TYPE for m in _examples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: type(m).__name__)
def test_unknown_fields_survive_a_round_trip_in_extra(msg: Any) -> None:
    body = json.loads(encode(msg))
    body["from_newer_peer"] = {"nested": [1, 2]}
    body["zz"] = "kept"
    decoded = decode(json.dumps(body).encode())
    assert decoded.extra == {"from_newer_peer": {"nested": [1, 2]}, "zz": "kept"}
    assert json.loads(encode(decoded)) == body


def test_extra_cannot_override_schema_or_type() -> None:
    msg = TransferEnd(CID, TID, extra={"type": "deploy", "schema": 99, "note": "x"})
    body = json.loads(encode(msg))
    assert body["type"] == "transfer_end"
    assert body["schema"] == SCHEMA_VERSION
    assert body["note"] == "x"


def _wire(msg: Any) -> dict[str, Any]:
    return json.loads(encode(msg))


def _deploy() -> dict[str, Any]:
    return _wire(_examples()[2])


@pytest.mark.parametrize("schema", [0, 2, 99, "1", 1.0, True, None])
def test_other_schemas_are_refused(schema: Any) -> None:
    body = _deploy()
    body["schema"] = schema
    with pytest.raises(MessageError):
        decode(json.dumps(body).encode())


def test_missing_schema_is_refused() -> None:
    body = _deploy()
    del body["schema"]
    with pytest.raises(MessageError, match="schema"):
        decode(json.dumps(body).encode())


@pytest.mark.parametrize("kind", ["unknown", "", None, 3, ["deploy"], "Deploy"])
def test_unknown_types_are_refused(kind: Any) -> None:
    body = _deploy()
    body["type"] = kind
    with pytest.raises(MessageError, match="unknown message type"):
        decode(json.dumps(body).encode())


@pytest.mark.parametrize("field", ["command_id", "bundle_name", "bundle_version", "transfer", "ts"])
def test_missing_required_field_is_refused(field: str) -> None:
    body = _deploy()
    del body[field]
    with pytest.raises(MessageError, match=field):
        decode(json.dumps(body).encode())


def test_missing_optional_field_takes_its_default() -> None:
    body = _deploy()
    del body["benchmark"]
    assert decode(json.dumps(body).encode()).benchmark == BenchmarkSpec()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("bundle_version",), True),  # bool is not an int
        (("bundle_version",), "3"),
        (("bundle_version",), 3.0),
        (("ts",), "now"),
        (("ts",), False),
        (("command_id",), 123),
        (("command_id",), "F" * 32),
        (("command_id",), CID + "\n"),
        (("bundle_name",), None),
        (("transfer",), "offer"),
        (("transfer",), [1]),
        (("transfer", "size"), True),
        (("transfer", "size"), 0),
        (("transfer", "size"), "10"),
        (("transfer", "chunk_size"), 1023),
        (("transfer", "chunk_size"), (1 << 20) + 1),
        (("transfer", "transfer_id"), "xyz"),
        (("transfer", "transfer_id"), TID + "\n"),
        (("transfer", "sha256"), "AB" * 32),
        (("transfer", "sha256"), SHA + "\n"),
        (("transfer", "chunks_sha256"), "CD" * 32),
        (("transfer", "chunks_sha256"), "cd" * 31),
        (("transfer", "chunks_sha256"), None),
        (("transfer", "size"), 4096 * (1 << 15) + 1),  # one chunk more than MAX_CHUNKS (2^15)
        (("benchmark", "runs"), 0),
        (("benchmark", "runs"), True),
        (("benchmark", "threads"), 1000),
        (("benchmark", "min_duration_s"), 601),
        (("benchmark", "min_duration_s"), "1"),
    ],
    ids=repr,
)
def test_wrong_field_values_are_refused(path: tuple[str, ...], value: Any) -> None:
    body = _deploy()
    target = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(MessageError):
        decode(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("msg_index", "field", "value"),
    [
        (0, "state", "rebooting"),
        (0, "platform", [1]),
        (0, "active", "digits"),
        (0, "agent_version", 1),
        (5, "kind", "exploded"),
        (5, "missing_ranges", [1, 2]),
        (5, "missing_ranges", 12),
        (5, "missing_ranges", None),
        (5, "missing_ranges", "0-" + "9" * 8192),
        (6, "error", "boom"),
        (6, "error", {"code": "x"}),
        (8, "providers", "CPU"),
        (8, "temperature", [1]),
        (8, "threads", 1.5),
    ],
    ids=repr,
)
def test_wrong_field_types_in_other_messages_are_refused(msg_index: int, field: str, value: Any) -> None:
    body = _wire(_examples()[msg_index])
    body[field] = value
    with pytest.raises(MessageError):
        decode(json.dumps(body).encode())


def test_optional_fields_accept_null() -> None:
    body = _wire(_examples()[0])
    body["active"] = None
    assert decode(json.dumps(body).encode()).active is None
    ev = _wire(_examples()[5])
    ev["error"] = None
    assert decode(json.dumps(ev).encode()).error is None


def test_oversize_payload_is_refused_before_parsing() -> None:
    limits = CodecLimits(max_json_bytes=100)
    with pytest.raises(MessageTooLargeError) as info:
        decode(b"\xff" * 101, limits)  # not even UTF-8: the size check comes first
    assert info.value.details == {"size": 101}
    with pytest.raises(MessageTooLargeError):
        decode(b" " * (64 << 10) + b"{}")
    small = encode(TransferEnd(CID, TID))
    assert decode(small, CodecLimits(max_json_bytes=len(small))) == TransferEnd(CID, TID)


def test_deep_nesting_is_refused() -> None:
    body = _wire(_examples()[7])
    nested: Any = 1
    for _ in range(20):
        nested = {"n": nested}
    body["detail"] = nested
    with pytest.raises(MessageError, match="deeper"):
        decode(json.dumps(body).encode())
    # Within the limit it is fine.
    body["detail"] = {"a": {"b": {"c": 1}}}
    decode(json.dumps(body).encode())


def test_nesting_that_would_exhaust_the_parser_is_refused() -> None:
    payload = b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with pytest.raises(MessageError):
        decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe\x00",
        b"\xc3\x28",
        b"not json",
        b"[]",
        b"null",
        b"1",
        b'"deploy"',
        b"{",
        b'{"schema":1,"type":"status","device_id":"d","state":"online","ts":NaN}',
        b'{"schema":1,"type":"status","device_id":"d","state":"online","ts":Infinity}',
        b'{"schema":1,"type":"status","device_id":"d","state":"online","ts":-Infinity}',
    ],
    ids=repr,
)
def test_non_json_and_non_objects_are_refused(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode(payload)


def test_message_classes_are_frozen() -> None:
    msg = TransferEnd(CID, TID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.command_id = "x"  # type: ignore[misc]


# --- chunk frames --------------------------------------------------------------------------


def test_chunk_frame_round_trip() -> None:
    frame = encode_chunk(TID, 7, b"payload")
    assert len(frame) == CHUNK_HEADER_SIZE + 7
    assert frame[:4] == b"EDGC"
    chunk = decode_chunk(frame)
    assert (chunk.transfer_id, chunk.index, chunk.data) == (TID, 7, b"payload")
    empty = decode_chunk(encode_chunk(TID, 2**32 - 2, b""))
    assert (empty.index, empty.data) == (2**32 - 2, b"")


def test_index_frame_round_trip() -> None:
    digests = bytes(range(64))
    frame = encode_chunk(TID, INDEX_FRAME, digests)
    assert frame[CHUNK_HEADER_SIZE - 4 : CHUNK_HEADER_SIZE] == b"\xff\xff\xff\xff"  # on the wire: 2^32 - 1
    chunk = decode_chunk(frame)
    assert INDEX_FRAME == -1
    assert (chunk.transfer_id, chunk.index, chunk.data) == (TID, INDEX_FRAME, digests)
    assert decode_chunk(encode_chunk(TID, 0, digests)).index == 0  # chunk 0 is not the index


def test_chunk_frame_errors() -> None:
    frame = encode_chunk(TID, 1, b"x" * 10)
    with pytest.raises(MessageError, match="magic"):
        decode_chunk(b"XDGC" + frame[4:])
    with pytest.raises(MessageError, match="version"):
        decode_chunk(frame[:4] + b"\x02" + frame[5:])
    for n in range(CHUNK_HEADER_SIZE):
        with pytest.raises(MessageError, match="shorter"):
            decode_chunk(frame[:n])
    limits = CodecLimits(max_chunk_bytes=CHUNK_HEADER_SIZE + 9)
    with pytest.raises(MessageTooLargeError):
        decode_chunk(frame, limits)
    assert decode_chunk(frame, CodecLimits(max_chunk_bytes=len(frame))).data == b"x" * 10
    with pytest.raises(MessageTooLargeError):
        decode_chunk(encode_chunk(TID, 0, b"\x00" * ((1 << 20) + 1)))


# --- chunked transfer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk", "expected"),
    [
        (1, 1024, [(0, 1)]),
        (1024, 1024, [(0, 1024)]),
        (1025, 1024, [(0, 1024), (1024, 1)]),
        (3072, 1024, [(0, 1024), (1024, 1024), (2048, 1024)]),
        (3000, 1024, [(0, 1024), (1024, 1024), (2048, 952)]),
        (0, 1024, []),
    ],
)
def test_chunk_spans(size: int, chunk: int, expected: list[tuple[int, int]]) -> None:
    assert chunk_spans(size, chunk) == expected
    assert sum(n for _, n in expected) == size


def test_offer_chunk_count_matches_spans() -> None:
    for size in (1, 1023, 1024, 1025, 4096 * 3, 4096 * 3 + 1):
        offer = _offer(size=size, chunk_size=1024)
        assert offer.chunk_count == len(chunk_spans(size, 1024))


def _receiver(size: int = 3000, have: Any = ()) -> tuple[ChunkReceiver, list[bytes]]:
    """A receiver of ``size`` random-looking bytes in 1 KiB chunks, with its index already taken."""
    data = bytes((i * 7 + i // 1024) % 251 for i in range(size))
    parts = [data[off : off + 1024] for off in range(0, size, 1024)]
    index = ChunkIndex.of_chunks(parts)
    r = ChunkReceiver(_offer(size=size, chunk_size=1024, chunks_sha256=index.sha256), index, have)
    return r, parts


def test_receiver_accepts_every_chunk_once() -> None:
    r, parts = _receiver()
    assert r.chunk_count == 3 and r.missing() == [0, 1, 2] and not r.complete
    assert r.accept(2, parts[2]) == WriteAt(2048, parts[2])
    assert r.accept(0, parts[0]) == WriteAt(0, parts[0])
    assert r.missing() == [1] and r.have_count == 2
    assert r.received_bytes == 1024 + 952
    assert r.accept(1, parts[1]) == WriteAt(1024, parts[1])
    assert r.complete and r.missing() == [] and r.received_bytes == 3000 and r.discarded == 0


def test_duplicates_are_ignored() -> None:
    r, parts = _receiver()
    assert r.accept(0, parts[0]) is not None
    assert r.accept(0, parts[0]) is None
    assert r.discarded == 0
    # A forgery of a chunk already on disk never rewrites it, and is counted like any other.
    assert r.accept(0, b"z" * 1024) == Discard(0, "digest")
    assert r.missing() == [1, 2] and r.discarded == 1


@pytest.mark.parametrize("index", [-1, 3, 4, 2**32 - 1])
def test_out_of_range_index_is_discarded(index: int) -> None:
    r, _ = _receiver()
    assert r.accept(index, b"x" * 1024) == Discard(index, "outside_offer")
    assert r.missing() == [0, 1, 2] and r.discarded == 1


@pytest.mark.parametrize(("index", "length"), [(0, 1023), (0, 1025), (0, 0), (2, 1024), (2, 951), (2, 953)])
def test_wrong_length_chunk_is_discarded(index: int, length: int) -> None:
    r, parts = _receiver()
    assert r.accept(index, b"x" * length) == Discard(index, "length")
    assert r.missing() == [0, 1, 2] and r.discarded == 1
    assert r.accept(index, parts[index]) is not None  # the real one still goes in


def test_a_forged_chunk_of_the_right_length_is_discarded_and_the_real_one_taken_after() -> None:
    r, parts = _receiver()
    forged = bytes([parts[1][0] ^ 1]) + parts[1][1:]  # one bit off, same length
    assert r.accept(1, forged) == Discard(1, "digest")
    assert r.accept(1, parts[0]) == Discard(1, "digest")  # a real chunk in the wrong place
    assert r.missing() == [0, 1, 2] and r.discarded == 2
    assert r.accept(1, parts[1]) == WriteAt(1024, parts[1])
    assert r.missing() == [0, 2]


def test_a_chunk_before_the_index_is_discarded_then_taken_once_the_index_is_in() -> None:
    r, parts = _receiver()
    bare = ChunkReceiver(r.offer)
    assert bare.index is None
    assert bare.accept(0, parts[0]) == Discard(0, "no_index")
    assert bare.missing() == [0, 1, 2]
    assert r.index is not None
    assert bare.take_index(r.index.digests) == r.index
    assert bare.accept(0, parts[0]) == WriteAt(0, parts[0])


def test_only_the_bound_index_is_taken() -> None:
    r, parts = _receiver()
    bare = ChunkReceiver(r.offer)
    other = ChunkIndex.of_chunks([b"o" * 1024, b"t" * 1024, b"h" * 952])  # the right length, not the signed one
    with pytest.raises(TransferError) as info:
        bare.take_index(other.digests)
    assert info.value.details["reason"] == "index_hash"
    assert r.index is not None
    with pytest.raises(TransferError) as info:
        bare.take_index(r.index.digests[:-1])
    assert info.value.details["reason"] == "index_length"
    with pytest.raises(TransferError):
        bare.take_index(r.index.digests + other.digests[:32])
    assert bare.index is None and bare.accept(0, parts[0]) == Discard(0, "no_index")
    bare.take_index(r.index.digests)
    assert bare.take_index(r.index.digests) is bare.index  # a later copy is checked and ignored
    with pytest.raises(TransferError):
        bare.take_index(other.digests)  # a later forgery is still refused
    assert bare.index == r.index


def test_size_an_exact_multiple_of_chunk_size() -> None:
    r, parts = _receiver(size=3072)
    assert r.chunk_count == 3
    assert r.accept(3, b"") == Discard(3, "outside_offer")  # no empty trailing chunk
    for i in range(3):
        assert r.accept(i, parts[i]) == WriteAt(i * 1024, parts[i])
    assert r.complete


def test_resume_with_have() -> None:
    r, parts = _receiver(have=[0, 2, 2, 7, -1])  # out-of-range indices from a stale file are dropped
    assert r.missing() == [1] and r.have_count == 2
    assert r.received_bytes == 1024 + 952
    assert r.accept(0, parts[0]) is None
    assert r.accept(1, parts[1]) == WriteAt(1024, parts[1])
    assert r.complete


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "x" * 65, "dev\n"])
def test_device_messages_refuse_bad_device_ids(device_id: str) -> None:
    with pytest.raises(MessageError):
        DeviceStatus(device_id, "online", 1.0)
    with pytest.raises(MessageError):
        Event(device_id, EventKind.ERROR, 1.0)


def test_metrics_report_reads_todays_wire_and_writes_it_back_unchanged() -> None:
    bare = MetricsReport("pi-1", "digits", 3, "onnxruntime", "int8", 4.0)
    body = json.loads(encode(bare))
    assert {k: body[k] for k in ("latency", "memory", "cpu", "power", "temperature")} == {
        "latency": {},
        "memory": {},
        "cpu": {},
        "power": {},
        "temperature": [],
    }
    assert "execution" not in body and decode(encode(bare)) == bare
    choice = {"chosen": "sparse", "reason": "pinned", "pinned_by": "config", "candidates": []}
    sent = {**body, "execution": choice, "mode": "profile"}
    report = decode(json.dumps(sent).encode())
    assert isinstance(report, MetricsReport) and report.latency is None
    assert report.execution is not None and report.execution.pinned_by == "config"
    assert report.extra == {"mode": "profile"} and json.loads(encode(report)) == sent
    with pytest.raises(MessageError, match="latency field 'count'"):
        decode(json.dumps({**body, "latency": {"p50_ms": 1.2}}).encode())
    assert "arch" not in body and "emulated" not in body  # older hosts read the same report


def test_metrics_report_says_where_it_was_measured_and_whether_emulated() -> None:
    report = MetricsReport("pi-1", "digits", 3, "onnxruntime", "int8", 4.0, arch="aarch64", emulated=True)
    body = json.loads(encode(report))
    assert (body["arch"], body["emulated"]) == ("aarch64", True) and decode(encode(report)) == report
    with pytest.raises(MessageError, match="emulated"):
        decode(json.dumps({**body, "emulated": "yes"}).encode())


# --- the deploy command's offer of manifest facts (added fields; old commands unchanged) --------


def test_a_deploy_without_bundle_facts_is_on_the_wire_as_before() -> None:
    body = _deploy()
    cmd = decode(json.dumps(body).encode())
    assert isinstance(cmd, DeployCommand) and cmd.bundle is None
    assert "bundle" not in cmd.to_wire() and json.loads(encode(cmd)) == body  # byte-for-byte what old agents read


def test_bundle_facts_round_trip_and_keep_unknown_fields() -> None:
    from edge_sdk.protocol import BundleFacts

    facts = {
        "runtime": "litert",
        "expires_at": 1.7e9,
        "content": "c" * 64,
        "unpacked_bytes": 12_000_000,
        "arch": ["aarch64"],
        "min_memory_bytes": 1 << 30,
        "accelerators": ["npu"],
        "from_a_newer_host": {"kept": True},
    }
    cmd = decode(json.dumps({**_deploy(), "bundle": facts}).encode())
    assert isinstance(cmd, DeployCommand) and cmd.bundle is not None
    assert (
        cmd.bundle.runtime == "litert" and cmd.bundle.arch == ("aarch64",) and cmd.bundle.unpacked_bytes == 12_000_000
    )
    assert cmd.bundle.extra == {"from_a_newer_host": {"kept": True}}  # kept, never acted on
    assert json.loads(encode(cmd))["bundle"] == facts
    assert BundleFacts() == BundleFacts.from_dict({})  # every fact is optional


@pytest.mark.parametrize(
    "facts",
    [{"content": "XYZ"}, {"unpacked_bytes": -1}, {"unpacked_bytes": "9"}, {"arch": ["../x"]}, {"arch": "aarch64"}],
    ids=repr,
)
def test_malformed_bundle_facts_are_refused(facts: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        decode(json.dumps({**_deploy(), "bundle": facts}).encode())


# --- the deploy command's delta offer (an added field; old commands unchanged) -------------------

DELTA_TID = "aa" * 16


def _delta(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "transfer": {
            "transfer_id": DELTA_TID,
            "size": 900,
            "sha256": "ee" * 32,
            "chunk_size": 1024,
            "chunks_sha256": "ff" * 32,
        },
        "base_version": 1,
        "base_content": "c" * 64,
    }
    body.update(kw)
    return body


def test_a_deploy_without_a_delta_is_on_the_wire_as_before() -> None:
    body = _deploy()
    cmd = decode(json.dumps(body).encode())
    assert isinstance(cmd, DeployCommand) and cmd.delta is None
    assert "delta" not in cmd.to_wire() and json.loads(encode(cmd)) == body


def test_a_delta_offer_round_trips_and_keeps_unknown_fields() -> None:
    sent = {**_deploy(), "delta": _delta(from_a_newer_host=[1, 2])}
    cmd = decode(json.dumps(sent).encode())
    assert isinstance(cmd, DeployCommand) and isinstance(cmd.delta, DeltaOffer)
    assert (cmd.delta.base_version, cmd.delta.base_content) == (1, "c" * 64)
    assert cmd.delta.transfer == TransferOffer(DELTA_TID, 900, "ee" * 32, 1024, "ff" * 32)
    assert cmd.delta.extra == {"from_a_newer_host": [1, 2]}  # kept, never acted on
    assert json.loads(encode(cmd)) == sent
    assert cmd.offer_named(DELTA_TID) == cmd.delta.transfer and cmd.offer_named(TID) == cmd.transfer
    assert cmd.offer_named("bb" * 16) is None
    assert dataclasses.replace(cmd, delta=None).offer_named(DELTA_TID) is None


@pytest.mark.parametrize(
    "delta",
    [
        _delta(base_version=0),
        _delta(base_version=-1),
        _delta(base_version="1"),
        _delta(base_version=True),
        _delta(base_version=1.0),
        _delta(base_content="C" * 64),
        _delta(base_content="c" * 63),
        _delta(base_content=None),
        _delta(transfer=None),
        _delta(transfer={**_delta()["transfer"], "size": 0}),
        _delta(transfer={**_delta()["transfer"], "transfer_id": TID}),  # the bundle's own transfer
        _delta(transfer={**_delta()["transfer"], "encrypted_for": ["ab" * 16]}),  # never for an encrypted bundle
        {k: v for k, v in _delta().items() if k != "base_content"},
        "delta",
        [],
    ],
    ids=repr,
)
def test_malformed_delta_offers_are_refused(delta: Any) -> None:
    with pytest.raises(MessageError):
        decode(json.dumps({**_deploy(), "delta": delta}).encode())


def test_a_null_delta_is_no_delta() -> None:
    cmd = decode(json.dumps({**_deploy(), "delta": None}).encode())
    assert isinstance(cmd, DeployCommand) and cmd.delta is None
