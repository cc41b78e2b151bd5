"""Decoder for packed weights: rebuild a runnable ONNX model from its transport form.

Weight sharing (Deep Compression, Han et al. 2016) leaves each layer with a few distinct
values. The host (``host_tools.compress.weight_sharing``) ships such a model as one
*packed model* file: the ONNX model without its shared weights (the "skeleton"), and per
shared tensor a codebook of its distinct values, one small index per value, and, for a
sparse tensor, the positions of its nonzeros as gaps between them; each stream is
compressed with LZMA, an entropy coder. This module turns that file back into ONNX model
bytes that onnxruntime loads, on the device, with numpy and the standard library only
(no ``onnx`` package): it writes each tensor as a ``TensorProto`` with ``raw_data`` and
appends it to the skeleton's graph, at the protobuf wire level.

File layout (all integers little-endian)::

    magic      8 bytes  b"EDGEWTS1"
    header_len u32
    header     JSON, header_len bytes (utf-8)
    data       the streams, at offsets given in the header (relative to data start)

Header::

    {"format": 1,
     "skeleton": STREAM,
     "tensors": [{"name": str, "data_type": 1 | 10, "dims": [int, ...],
                  "codebook": STREAM, "bits": 1..8, "layout": "dense" | "sparse",
                  "count": int,              # values coded (nonzeros when sparse)
                  "indices": STREAM,
                  "positions": STREAM | null, "position_coding": "gaps-u1" | "gaps-u2" | "gaps-u4" | "bitmask"}]}
    STREAM = {"offset": int, "length": int, "codec": "raw" | "lzma", "size": int, "packing": "bits" | "bytes"}

``size`` is the decoded length of a stream, so every decompression is bounded before it
starts (a small file cannot expand without limit), and every count and index is checked
against the tensor's shape.
"""

from __future__ import annotations

import json
import lzma
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.errors import BundleFormatError, ConfigError
from edge_sdk.runtime._onnx import _Malformed, _varint

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "LZMA_FILTERS",
    "WeightsLimits",
    "is_packed_model",
    "unpack_model",
    "encode_varint",
    "tensor_proto_bytes",
]

MAGIC = b"EDGEWTS1"
FORMAT_VERSION = 1
LZMA_FILTERS: tuple[Mapping[str, int], ...] = ({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME},)
"""Raw LZMA2 streams (no container headers): both sides use exactly these filters."""

_DTYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2")}  # TensorProto.FLOAT, FLOAT16
_GAP_DTYPES = {"gaps-u1": np.dtype("u1"), "gaps-u2": np.dtype("<u2"), "gaps-u4": np.dtype("<u4")}
# ModelProto.graph = 7; GraphProto.initializer = 5;
# TensorProto.dims = 1, .data_type = 2, .name = 8, .raw_data = 9.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


@dataclass(frozen=True)
class WeightsLimits:
    """Bounds on what a packed model may expand to, checked before any decompression.

    Attributes:
        max_model_bytes: the rebuilt ONNX model, in bytes.
        max_header_bytes: the JSON header.
        max_tensors: shared tensors listed in the header.
    """

    max_model_bytes: int = 1 << 30
    max_header_bytes: int = 4 << 20
    max_tensors: int = 100_000

    def __post_init__(self) -> None:
        if min(self.max_model_bytes, self.max_header_bytes, self.max_tensors) < 1:
            raise ConfigError("weights limits must be positive")


def is_packed_model(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts like a packed model (cheap; does not validate it)."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def unpack_model(data: bytes | memoryview, limits: WeightsLimits | None = None) -> bytes:
    """Rebuild ONNX model bytes from a packed model.

    Args:
        data: the packed model file's content.
        limits: expansion bounds; :class:`WeightsLimits` defaults when omitted.

    Returns:
        Serialized ONNX ``ModelProto`` that onnxruntime can load.

    Raises:
        BundleFormatError: not a packed model, an unknown format version, a stream or
            header out of bounds or corrupt, a count or index that does not fit its
            tensor, or output beyond ``limits``; the message names the tensor.
    """
    limits = limits or WeightsLimits()
    view = memoryview(data)
    if not is_packed_model(view):
        raise BundleFormatError("not a packed model (bad magic)")
    if len(view) < len(MAGIC) + 4:
        raise BundleFormatError("packed model truncated in its header")
    (header_len,) = struct.unpack_from("<I", view, len(MAGIC))
    start = len(MAGIC) + 4
    if header_len > limits.max_header_bytes or start + header_len > len(view):
        raise BundleFormatError(f"packed model header of {header_len} bytes is too large or truncated")
    try:
        header = json.loads(bytes(view[start : start + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleFormatError(f"packed model header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise BundleFormatError(f"unsupported packed model format {header.get('format') if isinstance(header, dict) else header!r}")
    body = view[start + header_len :]
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or len(tensors) > limits.max_tensors:
        raise BundleFormatError("packed model header has no valid tensor list")
    budget = _Budget(limits.max_model_bytes)
    skeleton = _stream(body, header.get("skeleton"), "skeleton", budget)
    initializers = [_tensor(body, entry, budget) for entry in tensors]
    try:
        return _append_initializers(skeleton, initializers)
    except _Malformed as exc:
        raise BundleFormatError("packed model skeleton is not an ONNX model") from exc


class _Budget:
    """Output bytes left; every decoded stream and tensor is charged before it is made."""

    def __init__(self, left: int) -> None:
        self.left = left

    def charge(self, size: int, what: str) -> None:
        if size < 0 or size > self.left:
            raise BundleFormatError(f"{what}: decoded size {size} exceeds the packed model limit")
        self.left -= size


def _field(entry: Any, key: str, kind: type, what: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BundleFormatError(f"{what}: field {key!r} missing or not {kind.__name__}")
    return value


def _stream(body: memoryview, spec: Any, what: str, budget: _Budget) -> bytes:
    offset, length = _field(spec, "offset", int, what), _field(spec, "length", int, what)
    size, codec = _field(spec, "size", int, what), _field(spec, "codec", str, what)
    if offset < 0 or length < 0 or offset + length > len(body):
        raise BundleFormatError(f"{what}: stream [{offset}, +{length}) lies outside the file")
    budget.charge(size, what)
    raw = body[offset : offset + length]
    if codec == "raw":
        out = bytes(raw)
    elif codec == "lzma":
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        try:
            out = decoder.decompress(bytes(raw), max_length=size + 1)
        except lzma.LZMAError as exc:
            raise BundleFormatError(f"{what}: corrupt LZMA stream ({exc})") from exc
    else:
        raise BundleFormatError(f"{what}: unknown codec {codec!r}")
    if len(out) != size:
        raise BundleFormatError(f"{what}: decoded {len(out)} bytes, header says {size}")
    return out


def _tensor(body: memoryview, entry: Any, budget: _Budget) -> bytes:
    name = _field(entry, "name", str, "tensor")
    what = f"tensor {name!r}"
    dtype = _DTYPES.get(_field(entry, "data_type", int, what))
    if dtype is None:
        raise BundleFormatError(f"{what}: unsupported data type {entry['data_type']}")
    dims = _field(entry, "dims", list, what)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise BundleFormatError(f"{what}: dims must be non-negative integers")
    size = int(np.prod(dims, dtype=np.int64)) if dims else 1
    budget.charge(size * dtype.itemsize, what)
    bits, count = _field(entry, "bits", int, what), _field(entry, "count", int, what)
    layout = _field(entry, "layout", str, what)
    if not 1 <= bits <= 8 or not 0 <= count <= size or layout not in ("dense", "sparse"):
        raise BundleFormatError(f"{what}: bits {bits}, count {count} or layout {layout!r} out of range")
    if layout == "dense" and count != size:
        raise BundleFormatError(f"{what}: dense layout codes {count} of {size} values")
    codebook = np.frombuffer(_stream(body, entry.get("codebook"), f"{what} codebook", budget), dtype=dtype)
    if not 1 <= len(codebook) <= 1 << bits:
        raise BundleFormatError(f"{what}: codebook of {len(codebook)} values does not fit {bits}-bit indices")
    indices = _indices(_stream(body, entry.get("indices"), f"{what} indices", budget), entry["indices"], bits, count, what)
    if count and int(indices.max()) >= len(codebook):
        raise BundleFormatError(f"{what}: index {int(indices.max())} outside its codebook of {len(codebook)}")
    values = codebook[indices]
    if layout == "dense":
        dense = values
    else:
        positions = _positions(body, entry, size, count, what, budget)
        dense = np.zeros(size, dtype=dtype)
        dense[positions] = values
    return tensor_proto_bytes(name, entry["data_type"], dims, dense.astype(dtype, copy=False).tobytes())


def _indices(raw: bytes, spec: Mapping[str, Any], bits: int, count: int, what: str) -> np.ndarray:
    packing = spec.get("packing", "bytes")
    if packing == "bytes":
        if len(raw) != count:
            raise BundleFormatError(f"{what}: {len(raw)} index bytes for {count} values")
        return np.frombuffer(raw, dtype=np.uint8)
    if packing != "bits":
        raise BundleFormatError(f"{what}: unknown index packing {packing!r}")
    if len(raw) != -(-count * bits // 8):
        raise BundleFormatError(f"{what}: {len(raw)} index bytes for {count} {bits}-bit values")
    unpacked = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (unpacked.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint16)


def _positions(body: memoryview, entry: Mapping[str, Any], size: int, count: int, what: str, budget: _Budget) -> np.ndarray:
    coding = entry.get("position_coding")
    raw = _stream(body, entry.get("positions"), f"{what} positions", budget)
    if coding == "bitmask":
        if len(raw) != -(-size // 8):
            raise BundleFormatError(f"{what}: bitmask of {len(raw)} bytes for {size} values")
        mask = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=size, bitorder="little").astype(bool)
        positions = np.flatnonzero(mask)
        if len(positions) != count:
            raise BundleFormatError(f"{what}: bitmask marks {len(positions)} values, header says {count}")
        return positions
    gap_dtype = _GAP_DTYPES.get(coding) if isinstance(coding, str) else None
    if gap_dtype is None:
        raise BundleFormatError(f"{what}: unknown position coding {coding!r}")
    if len(raw) != count * gap_dtype.itemsize:
        raise BundleFormatError(f"{what}: {len(raw)} position bytes for {count} gaps")
    gaps = np.frombuffer(raw, dtype=gap_dtype).astype(np.int64)
    if count and np.any(gaps[1:] < 1):
        raise BundleFormatError(f"{what}: positions are not strictly increasing")
    positions = np.cumsum(gaps)
    if count and (positions[0] < 0 or positions[-1] >= size):
        raise BundleFormatError(f"{what}: a position lies outside the tensor's {size} values")
    return positions


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer (negative int64 as two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def _delimited(field: int, payload: bytes | memoryview) -> bytes:
    return _key(field, 2) + encode_varint(len(payload)) + bytes(payload)


def tensor_proto_bytes(name: str, data_type: int, dims: list[int], raw_data: bytes) -> bytes:
    """Serialize a ``TensorProto`` with ``dims``, ``data_type``, ``name`` and ``raw_data``.

    Args:
        name: the initializer's name.
        data_type: ONNX ``TensorProto.DataType`` value.
        dims: the shape.
        raw_data: little-endian element bytes.

    Returns:
        The message bytes (without a field key or length in front).
    """
    parts = [_key(1, 0) + encode_varint(d) for d in dims]
    parts.append(_key(2, 0) + encode_varint(data_type))
    parts.append(_delimited(8, name.encode("utf-8")))
    parts.append(_delimited(9, raw_data))
    return b"".join(parts)


def _spans(buf: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire_type, start, payload_start)`` of each top-level field; ends at ``len(buf)``."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        payload = pos
        if wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, payload = _varint(buf, pos)
            pos = payload + length
        else:
            raise _Malformed
        if pos > len(buf):
            raise _Malformed
        yield field, wire_type, start, payload


def _append_initializers(skeleton: bytes, initializers: list[bytes]) -> bytes:
    """Copy the ``ModelProto`` field by field, appending ``initializers`` to its graph."""
    view = memoryview(skeleton)
    out = bytearray()
    spans = list(_spans(view))
    ends = [s[2] for s in spans[1:]] + [len(view)]
    graphs = 0
    for (field, wire_type, start, payload), end in zip(spans, ends):
        if field == _MODEL_GRAPH and wire_type == 2:
            graphs += 1
            graph = bytes(view[payload:end]) + b"".join(_delimited(_GRAPH_INITIALIZER, t) for t in initializers)
            out += _delimited(_MODEL_GRAPH, graph)
        else:
            out += view[start:end]
    if graphs != 1:
        raise _Malformed
    return bytes(out)
