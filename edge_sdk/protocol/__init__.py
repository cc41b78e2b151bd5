"""The wire protocol between host and devices: topics, messages, codec, chunked transfer.

Everything here is pure: strings and bytes in, values out. The MQTT client lives in
:mod:`edge_sdk.mqtt`.
"""

from edge_sdk.protocol.codec import (
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
from edge_sdk.protocol.messages import (
    SCHEMA_VERSION,
    BenchmarkSpec,
    BundleFacts,
    DeployCommand,
    DeviceStatus,
    ErrorInfo,
    Event,
    EventKind,
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
    DeviceMessage,
    open_enrolment_request,
    open_report,
    seal,
    seal_bytes,
    signed_report_of,
)
from edge_sdk.protocol.topics import (
    Channel,
    DeviceTopics,
    ParsedTopic,
    fleet_filter,
    parse_topic,
    shared,
)
from edge_sdk.protocol.transfer import ChunkReceiver, WriteAt, chunk_spans

__all__ = [
    "SCHEMA_VERSION",
    "BenchmarkSpec",
    "BundleFacts",
    "Channel",
    "Chunk",
    "ChunkReceiver",
    "CodecLimits",
    "Command",
    "CommandPolicy",
    "DeployCommand",
    "DeviceMessage",
    "DeviceStatus",
    "DeviceTopics",
    "ErrorInfo",
    "Event",
    "EventKind",
    "Message",
    "MetricsReport",
    "ParsedTopic",
    "RemoveCommand",
    "RollbackCommand",
    "RootUpdate",
    "SignedCommand",
    "SignedReport",
    "TransferEnd",
    "TransferOffer",
    "WriteAt",
    "chunk_spans",
    "decode",
    "decode_chunk",
    "encode",
    "encode_chunk",
    "fleet_filter",
    "open_command",
    "open_enrolment_request",
    "open_report",
    "parse_topic",
    "peek_command_id",
    "seal",
    "seal_bytes",
    "shared",
    "sign_command",
    "signed_report_of",
]
