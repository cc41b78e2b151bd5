"""The wire protocol between host and devices: topics, messages, codec, chunked transfer.

Everything here is pure: strings and bytes in, values out. The MQTT client lives in
:mod:`edge_sdk.mqtt`.

Names load their module on first use (PEP 562): a command that needs only the topics or
the labels (``edgectl devices``) does not pay for the messages, the codec and the keys.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_sdk.protocol.codec import (
        INDEX_FRAME,
        Chunk,
        CodecLimits,
        decode,
        decode_chunk,
        encode,
        encode_chunk,
    )
    from edge_sdk.protocol.commands import (
        Command,
        CommandPolicy,
        open_command,
        peek_command_id,
        sign_command,
    )
    from edge_sdk.protocol.labels import check_labels, parse_label, parse_labels
    from edge_sdk.protocol.messages import (
        SCHEMA_VERSION,
        BenchmarkSpec,
        BundleFacts,
        DeltaOffer,
        DeployCommand,
        DeviceStatus,
        ErrorInfo,
        Event,
        EventKind,
        Heartbeat,
        Message,
        MetricsReport,
        RemoveCommand,
        RollbackCommand,
        RootUpdate,
        SignedCommand,
        SignedReport,
        TransferEnd,
        TransferOffer,
    )
    from edge_sdk.protocol.reports import (
        CHANNEL_OF,
        DeviceMessage,
        open_enrolment_request,
        open_report,
        seal,
        seal_bytes,
        signature_input,
        signed_report_of,
    )
    from edge_sdk.protocol.topics import (
        TRANSFER_ROOT,
        Channel,
        DeviceTopics,
        ParsedTopic,
        fleet_filter,
        parse_topic,
        shared,
        transfer_topic,
    )
    from edge_sdk.protocol.transfer import (
        MAX_CHUNKS,
        PROGRESS_EVERY,
        ChunkIndex,
        ChunkReceiver,
        Discard,
        FanOut,
        Send,
        WriteAt,
        choose_chunk_size,
        chunk_spans,
        content_transfer_id,
        decode_ranges,
        encode_ranges,
    )

_HOMES = {
    "INDEX_FRAME": "codec",
    "Chunk": "codec",
    "CodecLimits": "codec",
    "decode": "codec",
    "decode_chunk": "codec",
    "encode": "codec",
    "encode_chunk": "codec",
    "Command": "commands",
    "CommandPolicy": "commands",
    "open_command": "commands",
    "peek_command_id": "commands",
    "sign_command": "commands",
    "check_labels": "labels",
    "parse_label": "labels",
    "parse_labels": "labels",
    "SCHEMA_VERSION": "messages",
    "BenchmarkSpec": "messages",
    "BundleFacts": "messages",
    "DeltaOffer": "messages",
    "DeployCommand": "messages",
    "DeviceStatus": "messages",
    "ErrorInfo": "messages",
    "Event": "messages",
    "EventKind": "messages",
    "Heartbeat": "messages",
    "Message": "messages",
    "MetricsReport": "messages",
    "RemoveCommand": "messages",
    "RollbackCommand": "messages",
    "RootUpdate": "messages",
    "SignedCommand": "messages",
    "SignedReport": "messages",
    "TransferEnd": "messages",
    "TransferOffer": "messages",
    "CHANNEL_OF": "reports",
    "DeviceMessage": "reports",
    "open_enrolment_request": "reports",
    "open_report": "reports",
    "seal": "reports",
    "seal_bytes": "reports",
    "signed_report_of": "reports",
    "signature_input": "reports",
    "TRANSFER_ROOT": "topics",
    "Channel": "topics",
    "DeviceTopics": "topics",
    "ParsedTopic": "topics",
    "fleet_filter": "topics",
    "parse_topic": "topics",
    "shared": "topics",
    "transfer_topic": "topics",
    "MAX_CHUNKS": "transfer",
    "PROGRESS_EVERY": "transfer",
    "ChunkIndex": "transfer",
    "ChunkReceiver": "transfer",
    "Discard": "transfer",
    "FanOut": "transfer",
    "Send": "transfer",
    "WriteAt": "transfer",
    "choose_chunk_size": "transfer",
    "chunk_spans": "transfer",
    "content_transfer_id": "transfer",
    "decode_ranges": "transfer",
    "encode_ranges": "transfer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CHANNEL_OF",
    "INDEX_FRAME",
    "MAX_CHUNKS",
    "PROGRESS_EVERY",
    "SCHEMA_VERSION",
    "TRANSFER_ROOT",
    "BenchmarkSpec",
    "BundleFacts",
    "Channel",
    "Chunk",
    "ChunkIndex",
    "ChunkReceiver",
    "CodecLimits",
    "Command",
    "CommandPolicy",
    "DeltaOffer",
    "DeployCommand",
    "DeviceMessage",
    "DeviceStatus",
    "DeviceTopics",
    "Discard",
    "ErrorInfo",
    "Event",
    "EventKind",
    "FanOut",
    "Heartbeat",
    "Message",
    "MetricsReport",
    "ParsedTopic",
    "RemoveCommand",
    "RollbackCommand",
    "RootUpdate",
    "Send",
    "SignedCommand",
    "SignedReport",
    "TransferEnd",
    "TransferOffer",
    "WriteAt",
    "check_labels",
    "choose_chunk_size",
    "chunk_spans",
    "content_transfer_id",
    "decode",
    "decode_chunk",
    "decode_ranges",
    "encode",
    "encode_chunk",
    "encode_ranges",
    "fleet_filter",
    "open_command",
    "open_enrolment_request",
    "open_report",
    "parse_label",
    "parse_labels",
    "parse_topic",
    "peek_command_id",
    "seal",
    "seal_bytes",
    "shared",
    "sign_command",
    "signature_input",
    "signed_report_of",
    "transfer_topic",
]
