"""The few pieces of the protobuf wire format the device needs to read and build ONNX models.

The agent does not import the ``onnx`` package (it is large and host-only), yet it must
look at models (which op types a graph uses) and assemble models from bundle parts (a
skeleton plus weights decoded from a compact file, some of its nodes swapped for
others). ONNX models are protobuf messages, and the handful of wire-format rules needed
for that fit here: varints, field keys, length-delimited fields, a ``TensorProto`` with
raw data, reading and writing a ``NodeProto``, and rewriting a ``ModelProto``'s graph
(nodes replaced, initializers appended, operator sets imported).

Readers raise :class:`WireError` on bytes that do not parse; callers turn it into the
error their caller understands (a bundle format error, or "not a model").

Reference: https://protobuf.dev/programming-guides/encoding/ and ``onnx/onnx.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "GRAPH_INITIALIZER",
    "GRAPH_NODE",
    "MODEL_GRAPH",
    "MODEL_OPSET_IMPORT",
    "Field",
    "Node",
    "WireError",
    "append_initializers",
    "delimited",
    "encode_varint",
    "fields",
    "graph_nodes",
    "node_proto",
    "parse_node",
    "read_varint",
    "rewrite_model",
    "tensor_proto",
]

#: ``ModelProto.graph``, ``GraphProto.node`` and ``GraphProto.initializer`` field numbers.
MODEL_GRAPH, GRAPH_NODE, GRAPH_INITIALIZER = 7, 1, 5
#: ``ModelProto.opset_import`` field number.
MODEL_OPSET_IMPORT = 8
# NodeProto: input 1, output 2, name 3, op_type 4, attribute 5, domain 7.
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
# AttributeProto: name 1, f 2, i 3, type 20 (AttributeType FLOAT 1, INT 2).
_ATTR_NAME, _ATTR_F, _ATTR_I, _ATTR_TYPE, _ATTR_FLOAT, _ATTR_INT = 1, 2, 3, 20, 1, 2
# OperatorSetIdProto: domain 1, version 2.
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2

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
        value: for a varint field its value, for a fixed32 or fixed64 field its
            little-endian bits as an unsigned integer; ``None`` otherwise.
    """

    number: int
    wire_type: int
    start: int
    end: int
    payload: memoryview | None = None
    value: int | None = None


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
        payload = value = None
        if wire_type == _VARINT:
            value, pos = read_varint(view, pos)
        elif wire_type in (_FIXED64, _FIXED32):
            width = 8 if wire_type == _FIXED64 else 4
            if pos + width <= len(view):
                value = int.from_bytes(view[pos : pos + width], "little")
            pos += width
        elif wire_type == _DELIMITED:
            length, body = read_varint(view, pos)
            pos = body + length
            payload = view[body:pos]
        else:
            raise WireError(f"unsupported wire type {wire_type} at byte {start}")
        if pos > len(view):
            raise WireError(f"field {number} at byte {start} runs past the end of the message")
        yield Field(number, wire_type, start, pos, payload, value)


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


@dataclass(frozen=True)
class Node:
    """The parts of an ONNX ``NodeProto`` the device looks at.

    Attributes:
        op_type: the operator, e.g. ``"MatMul"``.
        domain: its domain, ``""`` for the default (``ai.onnx``) one.
        name: the node's name, ``""`` when it has none.
        inputs, outputs: tensor names in order (``""`` for an omitted optional input).
        attributes: the scalar ``int`` and ``float`` attributes by name; attributes of
            other kinds (strings, tensors, graphs, lists) are left out.
    """

    op_type: str
    domain: str = ""
    name: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    attributes: Mapping[str, int | float] = field(default_factory=dict)


def _text(payload: memoryview, what: str) -> str:
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{what} is not UTF-8") from exc


def _scalar_attribute(payload: memoryview) -> tuple[str, int | float | None]:
    name, kind, i, f = "", None, None, None
    for fld in fields(payload):
        if fld.number == _ATTR_NAME and fld.payload is not None:
            name = _text(fld.payload, "an attribute name")
        elif fld.number == _ATTR_TYPE and fld.wire_type == _VARINT:
            kind = fld.value
        elif fld.number == _ATTR_I and fld.wire_type == _VARINT and fld.value is not None:
            i = fld.value - (1 << 64) if fld.value >= 1 << 63 else fld.value  # int64
        elif fld.number == _ATTR_F and fld.wire_type == _FIXED32 and fld.value is not None:
            f = struct.unpack("<f", fld.value.to_bytes(4, "little"))[0]
    if kind == _ATTR_INT or (kind is None and i is not None):
        return name, i or 0
    if kind == _ATTR_FLOAT or (kind is None and f is not None):
        return name, 0.0 if f is None else f
    return name, None


def parse_node(payload: bytes | memoryview) -> Node:
    """Read one serialized ``NodeProto``.

    Raises:
        WireError: the bytes do not parse, or a name is not UTF-8.
    """
    op_type = domain = name = ""
    inputs: list[str] = []
    outputs: list[str] = []
    attributes: dict[str, int | float] = {}
    for fld in fields(payload):
        if fld.payload is None:
            continue
        if fld.number == _NODE_INPUT:
            inputs.append(_text(fld.payload, "a node input"))
        elif fld.number == _NODE_OUTPUT:
            outputs.append(_text(fld.payload, "a node output"))
        elif fld.number == _NODE_NAME:
            name = _text(fld.payload, "a node name")
        elif fld.number == _NODE_OP_TYPE:
            op_type = _text(fld.payload, "an op type")
        elif fld.number == _NODE_DOMAIN:
            domain = _text(fld.payload, "a node domain")
        elif fld.number == _NODE_ATTRIBUTE:
            key, value = _scalar_attribute(fld.payload)
            if value is not None:
                attributes[key] = value
    return Node(op_type, domain, name, tuple(inputs), tuple(outputs), attributes)


def node_proto(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], *, name: str = "", domain: str = ""
) -> bytes:
    """Serialize a ``NodeProto`` without attributes.

    Args:
        op_type: the operator.
        inputs, outputs: tensor names, in order (``""`` for an omitted optional input).
        name: the node's name (left out when empty).
        domain: the operator's domain (left out when empty: the default domain).

    Returns:
        The message bytes (without a field key or length in front).
    """
    parts = [delimited(_NODE_INPUT, s.encode("utf-8")) for s in inputs]
    parts += [delimited(_NODE_OUTPUT, s.encode("utf-8")) for s in outputs]
    if name:
        parts.append(delimited(_NODE_NAME, name.encode("utf-8")))
    parts.append(delimited(_NODE_OP_TYPE, op_type.encode("utf-8")))
    if domain:
        parts.append(delimited(_NODE_DOMAIN, domain.encode("utf-8")))
    return b"".join(parts)


def _single_graph(view: memoryview) -> memoryview:
    graphs = [f.payload for f in fields(view) if f.number == MODEL_GRAPH and f.payload is not None]
    if len(graphs) != 1:
        raise WireError(f"the model has {len(graphs)} graphs, expected 1")
    return graphs[0]


def graph_nodes(model: bytes | memoryview) -> list[Node]:
    """The nodes of a ``ModelProto``'s graph, in graph order (subgraphs are not entered).

    Raises:
        WireError: the bytes do not parse, or hold no graph or more than one.
    """
    graph = _single_graph(memoryview(model))
    return [parse_node(f.payload) for f in fields(graph) if f.number == GRAPH_NODE and f.payload is not None]


def _opset_domain(payload: memoryview) -> str:
    domains = [f.payload for f in fields(payload) if f.number == _OPSET_DOMAIN and f.payload is not None]
    return _text(domains[-1], "an opset domain") if domains else ""


def _rewrite_graph(graph: memoryview, nodes: Mapping[int, Sequence[bytes]], initializers: Sequence[bytes]) -> bytes:
    out = bytearray()
    index = 0
    for fld in fields(graph):
        if fld.number == GRAPH_NODE and fld.payload is not None:
            if index in nodes:
                out += b"".join(delimited(GRAPH_NODE, n) for n in nodes[index])
            else:
                out += graph[fld.start : fld.end]
            index += 1
        else:
            out += graph[fld.start : fld.end]
    if beyond := sorted(i for i in nodes if not 0 <= i < index):
        raise WireError(f"node position {beyond[0]} is beyond the graph's {index} nodes")
    out += b"".join(delimited(GRAPH_INITIALIZER, t) for t in initializers)
    return bytes(out)


def rewrite_model(
    model: bytes | memoryview,
    *,
    nodes: Mapping[int, Sequence[bytes]] | None = None,
    initializers: Sequence[bytes] = (),
    opsets: Mapping[str, int] | None = None,
) -> bytes:
    """The ``ModelProto`` with graph nodes replaced, initializers added and operator sets imported.

    The model is copied field by field; nothing it does not change is decoded. Replaced
    nodes keep their place in the graph, so a replacement that reads the same inputs and
    writes the same outputs keeps the graph in topological order.

    Args:
        model: a serialized ``ModelProto`` with one graph.
        nodes: position of a graph node (as :func:`graph_nodes` lists them, from 0) ->
            the serialized ``NodeProto`` messages that take its place, in order.
        initializers: serialized ``TensorProto`` messages appended to the graph's
            initializers (protobuf merges them into the repeated field).
        opsets: domain -> version, imported where the model does not import that domain yet.

    Returns:
        The new model's bytes.

    Raises:
        WireError: the bytes do not parse, hold no graph or more than one, or a node
            position is beyond the graph's nodes.
    """
    view = memoryview(model)
    out = bytearray()
    graphs = 0
    imported: set[str] = set()
    for fld in fields(view):
        if fld.number == MODEL_GRAPH and fld.payload is not None:
            graphs += 1
            out += delimited(MODEL_GRAPH, _rewrite_graph(fld.payload, nodes or {}, initializers))
        else:
            if fld.number == MODEL_OPSET_IMPORT and fld.payload is not None:
                imported.add(_opset_domain(fld.payload))
            out += view[fld.start : fld.end]
    if graphs != 1:
        raise WireError(f"the model has {graphs} graphs, expected 1")
    for domain, version in (opsets or {}).items():
        if domain not in imported:
            opset = delimited(_OPSET_DOMAIN, domain.encode("utf-8"))
            out += delimited(MODEL_OPSET_IMPORT, opset + _key(_OPSET_VERSION, _VARINT) + encode_varint(version))
    return bytes(out)


def append_initializers(model: bytes | memoryview, initializers: list[bytes]) -> bytes:
    """The ``ModelProto`` with ``initializers`` (serialized ``TensorProto``) added to its graph.

    The model is copied field by field; the graph field gets the new initializers
    appended, which protobuf merges into the repeated field. Nothing is decoded.

    Raises:
        WireError: the bytes do not parse, or hold no graph or more than one.
    """
    return rewrite_model(model, initializers=initializers)
