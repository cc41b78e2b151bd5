"""Bytes <-> messages, with limits checked before parsing.

JSON messages are UTF-8 JSON objects with ``schema`` and ``type``. Bundle chunks are
binary frames, so a 256 KiB chunk costs 256 KiB on the link rather than a third more
as base64::

    b"EDGC" | version (1 byte) | transfer id (16 bytes) | chunk index (u32, big endian) | data
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import MessageError, MessageTooLargeError
from edge_sdk.protocol.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message

__all__ = ["CHUNK_HEADER_SIZE", "Chunk", "CodecLimits", "decode", "decode_chunk", "encode", "encode_chunk"]

_CHUNK_MAGIC = b"EDGC"
_CHUNK_VERSION = 1
_CHUNK_HEADER = struct.Struct(">4sB16sI")
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size


@dataclass(frozen=True)
class CodecLimits:
    """Upper bounds on untrusted payloads."""

    max_json_bytes: int = 64 << 10
    max_json_depth: int = 16
    max_chunk_bytes: int = (1 << 20) + CHUNK_HEADER_SIZE


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(obj: Any, limit: int) -> None:
    stack = [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            raise MessageError(f"message nests deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)


def encode(msg: Message) -> bytes:
    """Serialise a message to compact UTF-8 JSON."""
    return json.dumps(msg.to_wire(), separators=(",", ":"), allow_nan=False).encode()


def decode(payload: bytes, limits: CodecLimits = CodecLimits()) -> Message:
    """Parse and validate a JSON message.

    Raises:
        MessageTooLargeError: payload above ``limits.max_json_bytes`` (checked first).
        MessageError: not JSON, too deep, unknown type or newer schema, invalid fields.
    """
    if len(payload) > limits.max_json_bytes:
        raise MessageTooLargeError(
            f"message of {len(payload)} bytes exceeds {limits.max_json_bytes}", size=len(payload)
        )
    try:
        body = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError("message is not UTF-8 JSON") from exc
    if not isinstance(body, dict):
        raise MessageError("message must be a JSON object")
    _depth(body, limits.max_json_depth)
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
        return cls.from_dict(body)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"invalid {kind} message: {exc}") from exc


@dataclass(frozen=True)
class Chunk:
    transfer_id: str
    index: int
    data: bytes


def encode_chunk(transfer_id: str, index: int, data: bytes) -> bytes:
    """Frame one chunk of a transfer."""
    return _CHUNK_HEADER.pack(_CHUNK_MAGIC, _CHUNK_VERSION, bytes.fromhex(transfer_id), index) + data


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
    return Chunk(tid.hex(), index, payload[CHUNK_HEADER_SIZE:])
