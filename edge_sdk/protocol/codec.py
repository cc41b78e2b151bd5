"""Bytes <-> messages, with limits checked before parsing.

JSON messages are UTF-8 JSON objects with ``schema`` and ``type``. Bundle chunks are
binary frames, so a 256 KiB chunk costs 256 KiB on the link rather than a third more
as base64::

    b"EDGC" | version (1 byte) | transfer id (16 bytes) | chunk index (u32, big endian) | data

A frame whose index is ``0xFFFFFFFF`` carries the transfer's chunk index (the sha256 of
every chunk) instead of a chunk; :class:`Chunk` gives it index :data:`INDEX_FRAME` (-1).
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass

from edge_sdk.errors import JsonError, JsonTooLargeError, MessageError, MessageTooLargeError
from edge_sdk.protocol.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message
from edge_sdk.untrusted_json import DEFAULT_MAX_DEPTH, JsonLimits, parse_json_object

__all__ = [
    "CHUNK_HEADER_SIZE",
    "INDEX_FRAME",
    "Chunk",
    "CodecLimits",
    "decode",
    "decode_chunk",
    "encode",
    "encode_chunk",
]

_CHUNK_MAGIC = b"EDGC"
_CHUNK_VERSION = 1
_CHUNK_HEADER = struct.Struct(">4sB16sI")
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size
#: The index of a frame that carries the chunk index rather than a chunk.
INDEX_FRAME = -1
_INDEX_FRAME_WIRE = 0xFFFFFFFF


@dataclass(frozen=True)
class CodecLimits:
    """Upper bounds on untrusted payloads."""

    max_json_bytes: int = 64 << 10
    max_json_depth: int = DEFAULT_MAX_DEPTH
    max_chunk_bytes: int = (1 << 20) + CHUNK_HEADER_SIZE

    @functools.cached_property
    def json_limits(self) -> JsonLimits:
        """The bounds on one JSON message, for :func:`~edge_sdk.untrusted_json.parse_json_object`."""
        return JsonLimits(self.max_json_bytes, self.max_json_depth)


def encode(msg: Message) -> bytes:
    """Serialise a message to compact UTF-8 JSON."""
    return json.dumps(msg.to_wire(), separators=(",", ":"), allow_nan=False).encode()


def decode(payload: bytes, limits: CodecLimits = CodecLimits()) -> Message:
    """Parse and validate a JSON message.

    Raises:
        MessageTooLargeError: payload above ``limits.max_json_bytes`` (checked first).
        MessageError: not JSON, too deep, unknown type or newer schema, invalid fields.
    """
    try:
        body = parse_json_object(payload, limits.json_limits, what="message")
    except JsonTooLargeError as exc:
        raise MessageTooLargeError(exc.message, size=len(payload)) from exc
    except JsonError as exc:
        raise MessageError(exc.message) from exc
    schema = body.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise MessageError("message has no integer 'schema'")
    if schema != SCHEMA_VERSION:
        raise MessageError(f"message schema {schema} is not supported (this build speaks {SCHEMA_VERSION})")
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}")
    try:
        message: Message = cls.from_dict(body)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"invalid {kind} message: {exc}") from exc
    return message


@dataclass(frozen=True)
class Chunk:
    transfer_id: str
    index: int
    data: bytes


def encode_chunk(transfer_id: str, index: int, data: bytes) -> bytes:
    """Frame one chunk of a transfer (or, with ``index`` :data:`INDEX_FRAME`, its chunk index)."""
    wire_index = _INDEX_FRAME_WIRE if index == INDEX_FRAME else index
    return _CHUNK_HEADER.pack(_CHUNK_MAGIC, _CHUNK_VERSION, bytes.fromhex(transfer_id), wire_index) + data


def decode_chunk(payload: bytes, limits: CodecLimits = CodecLimits()) -> Chunk:
    """Parse a chunk frame.

    Raises:
        MessageTooLargeError: frame above ``limits.max_chunk_bytes``.
        MessageError: short frame, wrong magic or unknown version.
    """
    if len(payload) > limits.max_chunk_bytes:
        raise MessageTooLargeError(f"chunk frame of {len(payload)} bytes exceeds {limits.max_chunk_bytes}")
    if len(payload) < CHUNK_HEADER_SIZE:
        raise MessageError("chunk frame shorter than its header")
    magic, version, tid, index = _CHUNK_HEADER.unpack_from(payload)
    if magic != _CHUNK_MAGIC:
        raise MessageError("not a chunk frame (bad magic)")
    if version != _CHUNK_VERSION:
        raise MessageError(f"chunk frame version {version} is not supported")
    return Chunk(tid.hex(), INDEX_FRAME if index == _INDEX_FRAME_WIRE else index, payload[CHUNK_HEADER_SIZE:])
