"""The few pieces of the protobuf wire format the device needs to read and build ONNX models.

The agent does not import the ``onnx`` package (it is large and host-only), yet it must
look at models (which op types a graph uses) and assemble models from bundle parts (a
skeleton plus weights decoded from a compact file). ONNX models are protobuf messages,
and the handful of wire-format rules needed for that fit here: varints, field keys,
length-delimited fields, a ``TensorProto`` with raw data, and appending initializers to
a ``ModelProto``'s graph.

Readers raise :class:`WireError` on bytes that do not parse; callers turn it into the
error their caller understands (a bundle format error, or "not a model").

Reference: https://protobuf.dev/programming-guides/encoding/ and ``onnx/onnx.proto``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "GRAPH_INITIALIZER",
    "GRAPH_NODE",
    "MODEL_GRAPH",
    "Field",
    "WireError",
    "append_initializers",
    "delimited",
    "encode_varint",
    "fields",
    "read_varint",
    "tensor_proto",
]

#: ``ModelProto.graph``, ``GraphProto.node`` and ``GraphProto.initializer`` field numbers.
MODEL_GRAPH, GRAPH_NODE, GRAPH_INITIALIZER = 7, 1, 5

_VARINT, _FIXED64, _DELIMITED, _FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (or not the one expected)."""


@dataclass(frozen=True)
class Field:
    """One top-level field of a message.

    Attributes:
        number: the field number.
        wire_type: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
        start: offset of the field's key.
        end: offset just past the field.
        payload: for a length-delimited field, its bytes (a view, not a copy).
    """

    number: int
    wire_type: int
    start: int
    end: int
    payload: memoryview | None = None


def read_varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    """Decode the base-128 varint at ``pos``; returns ``(value, position after it)``.

    Raises:
        WireError: the buffer ends inside the varint, or it is longer than 64 bits.
    """
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError(f"truncated or overlong varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer (a negative int64 as two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def fields(buf: memoryview | bytes) -> Iterator[Field]:
    """Every top-level field of one message, in order; the last ends exactly at ``len(buf)``.

    Raises:
        WireError: an unknown wire type, or a field running past the end of ``buf``.
    """
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        payload = None
        if wire_type == _VARINT:
            _, pos = read_varint(view, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _DELIMITED:
            length, body = read_varint(view, pos)
            pos = body + length
            payload = view[body:pos]
        else:
            raise WireError(f"unsupported wire type {wire_type} at byte {start}")
        if pos > len(view):
            raise WireError(f"field {number} at byte {start} runs past the end of the message")
        yield Field(number, wire_type, start, pos, payload)


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def delimited(number: int, payload: bytes | memoryview) -> bytes:
    """A length-delimited field (a string, bytes or sub-message) with its key and length."""
    return _key(number, _DELIMITED) + encode_varint(len(payload)) + bytes(payload)


def tensor_proto(name: str, data_type: int, dims: list[int] | tuple[int, ...], raw_data: bytes) -> bytes:
    """Serialize a ``TensorProto`` with ``dims``, ``data_type``, ``name`` and ``raw_data``.

    Args:
        name: the initializer's name.
        data_type: ONNX ``TensorProto.DataType`` value (1 is float32).
        dims: the shape.
        raw_data: little-endian element bytes.

    Returns:
        The message bytes (without a field key or length in front).
    """
    parts = [_key(1, _VARINT) + encode_varint(int(d)) for d in dims]
    parts.append(_key(2, _VARINT) + encode_varint(data_type))
    parts.append(delimited(8, name.encode("utf-8")))
    parts.append(delimited(9, raw_data))
    return b"".join(parts)


def append_initializers(model: bytes | memoryview, initializers: list[bytes]) -> bytes:
    """The ``ModelProto`` with ``initializers`` (serialized ``TensorProto``) added to its graph.

    The model is copied field by field; the graph field gets the new initializers
    appended, which protobuf merges into the repeated field. Nothing is decoded.

    Raises:
        WireError: the bytes do not parse, or hold no graph or more than one.
    """
    view = memoryview(model)
    out = bytearray()
    graphs = 0
    extra = b"".join(delimited(GRAPH_INITIALIZER, t) for t in initializers)
    for field in fields(view):
        if field.number == MODEL_GRAPH and field.payload is not None:
            graphs += 1
            out += delimited(MODEL_GRAPH, bytes(field.payload) + extra)
        else:
            out += view[field.start : field.end]
    if graphs != 1:
        raise WireError(f"the model has {graphs} graphs, expected 1")
    return bytes(out)
