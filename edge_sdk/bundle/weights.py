"""Decoder for packed weights: rebuild a runnable ONNX model from its transport form.

Weight sharing (Deep Compression, Han et al. 2016) leaves each tensor with a few distinct
values. The host (``host_tools.compress.weight_sharing``) ships such a model as one
*packed model* file: the ONNX model without its shared tensors (the "skeleton",
LZMA-coded), and per shared tensor a codebook of its distinct values and, entropy coded,
which of them sits where. This module turns that file back into ONNX model bytes that
onnxruntime loads, on the device, with numpy and the standard library only (no ``onnx``
package): it writes each tensor as a ``TensorProto`` with ``raw_data`` and appends it to
the skeleton's graph, at the protobuf wire level.

File layout, format 2 (``V`` is an unsigned LEB128 varint, ``u8`` one byte)::

    magic      7 bytes  b"EDGEWTS", then the format version, u8 = 2
    skeleton   V decoded size, V coded length, the ONNX model without the shared
               tensors as a raw LZMA2 stream (:data:`LZMA_FILTERS`)
    tensors    V count, then per tensor:
        name       V length, utf-8 bytes
        data_type  V (1 float32 | 10 float16)
        dims       V rank, V per dimension
        codebook   u8 dtype (1 | 10), V entries k (1..256), k little-endian values
        layout     u8 (0 dense: every value is a codebook index;
                       1 sparse: zeros are implicit, V nonzero count follows)
        coding     u8 (0 range: positions and indices range coded, see below;
                       1 lzma: LZMA2 of the sparsity bitmask (sparse only) then one
                       index byte per coded value)
        stream     V coded length, the bytes
    crc32      u32 little-endian, zlib CRC-32 of every byte before it

Range coding (``coding`` 0) is an adaptive binary arithmetic coder (the LZMA range coder
with 16-bit probabilities whose leading zero byte is left out, and trailing zero bytes
too: reading past the end yields zeros). Probabilities are Krichevsky-Trofimov counts.
The tensor is seen as a matrix ``dims[0] x prod(dims[1:])`` in row-major order. A sparse
tensor first codes, for every element, whether it is nonzero, with one adaptive context
per column (a pruned input feature stays pruned across the rows); then every coded
value's codebook index as ``ceil(log2 k)`` bits, most significant first, through a
binary tree of adaptive contexts. Compared with LZMA on gaps between nonzeros, this
is about a quarter smaller on pruned fully connected layers.

The CRC is checked first, so a damaged file is refused before anything is decoded (the
bundle's signature is what makes it trustworthy; the CRC makes damage a clear error
rather than wrong weights). Every size is checked before anything is decoded: the rebuilt model is charged to a
budget (:class:`WeightsLimits`) as each tensor's dims are read, LZMA output is bounded by
its declared size, and the range decoder does exactly as many steps as the dims and
counts require, so a small file cannot expand without limit or run without end.
"""

from __future__ import annotations

import lzma
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.bundle._reader import ByteReader
from edge_sdk.errors import BundleFormatError, ConfigError
from edge_sdk.protowire import WireError, append_initializers, tensor_proto

__all__ = [
    "CODING_LZMA",
    "CODING_RANGE",
    "FLOAT_DTYPES",
    "FORMAT_VERSION",
    "LZMA_FILTERS",
    "MAGIC",
    "WeightsLimits",
    "is_packed_model",
    "range_decode_tensor",
    "unpack_model",
]

MAGIC = b"EDGEWTS"
"""The first bytes of every packed model; the format version byte follows."""
FORMAT_VERSION = 2
LZMA_FILTERS: tuple[Mapping[str, int], ...] = ({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME},)
"""Raw LZMA2 streams (no container headers): both sides use exactly these filters."""
CODING_RANGE, CODING_LZMA = 0, 1
"""Values of a tensor's ``coding`` byte."""
COUNT_LIMIT = 1 << 16
"""Adaptive counts are halved when their sum passes this (the encoder does the same)."""

#: Float element types the format stores (codebooks, dense values), by ONNX TensorProto type:
#: FLOAT and FLOAT16.
FLOAT_DTYPES: dict[int, np.dtype[np.floating]] = {1: np.dtype("<f4"), 10: np.dtype("<f2")}
_MAX_RANK = 8


@dataclass(frozen=True)
class WeightsLimits:
    """Bounds on what a packed model may expand to, checked before any decompression.

    Attributes:
        max_model_bytes: the rebuilt ONNX model, in bytes.
        max_header_bytes: the names in the file, together (kept for the header of format 1).
        max_tensors: shared tensors listed in the file.
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
        BundleFormatError: not a packed model, an unknown format version, a field or
            stream out of bounds or corrupt, a count or index that does not fit its
            tensor, trailing bytes, or output beyond ``limits``; the message names the
            tensor.
    """
    limits = limits or WeightsLimits()
    view = memoryview(data)
    if not is_packed_model(view):
        raise BundleFormatError("not a packed model (bad magic)")
    if len(view) < len(MAGIC) + 5:  # the version byte and the CRC at least
        raise BundleFormatError("packed model truncated in its header")
    version = view[len(MAGIC)]
    if version != FORMAT_VERSION:
        shown = chr(version) if version == ord("1") else str(version)
        raise BundleFormatError(f"unsupported packed model format {shown} (this decoder reads format {FORMAT_VERSION})")
    (crc,) = struct.unpack_from("<I", view, len(view) - 4)
    if zlib.crc32(view[:-4]) != crc:
        raise BundleFormatError("packed model is damaged (CRC-32 mismatch)")
    view = view[:-4]
    reader = ByteReader(view)
    reader.pos = len(MAGIC) + 1
    budget = _Budget(limits.max_model_bytes)
    skeleton_size = reader.varint("skeleton size")
    budget.charge(skeleton_size, "skeleton")
    skeleton = _lzma(reader.chunk("skeleton"), skeleton_size, "skeleton")
    count = reader.varint("tensor count")
    if count > limits.max_tensors:
        raise BundleFormatError(f"packed model lists {count} tensors, more than the limit of {limits.max_tensors}")
    names = _Budget(limits.max_header_bytes)
    initializers = [_tensor(reader, budget, names) for _ in range(count)]
    if trailing := reader.trailing():
        raise BundleFormatError(f"packed model has {trailing} bytes after its last tensor")
    try:
        return append_initializers(skeleton, initializers)
    except WireError as exc:
        raise BundleFormatError("packed model skeleton is not an ONNX model") from exc


class _Budget:
    """Bytes left; every decoded stream and tensor is charged before it is made."""

    def __init__(self, left: int) -> None:
        self.left = left

    def charge(self, size: int, what: str) -> None:
        if size < 0 or size > self.left:
            raise BundleFormatError(f"{what}: decoded size {size} exceeds the packed model limit")
        self.left -= size


def _lzma(raw: memoryview | bytes, size: int, what: str) -> bytes:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    try:
        out = decoder.decompress(bytes(raw), max_length=size + 1)
    except lzma.LZMAError as exc:
        raise BundleFormatError(f"{what}: corrupt LZMA stream ({exc})") from exc
    if len(out) != size:
        raise BundleFormatError(f"{what}: decoded {len(out)} bytes, expected {size}")
    return out


def _tensor(reader: ByteReader, budget: _Budget, names: _Budget) -> bytes:
    name_bytes = reader.chunk("tensor name")
    names.charge(len(name_bytes), "tensor names")
    try:
        name = bytes(name_bytes).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleFormatError("tensor name is not utf-8") from exc
    what = f"tensor {name!r}"
    data_type = reader.varint(what)
    dtype = FLOAT_DTYPES.get(data_type)
    if dtype is None:
        raise BundleFormatError(f"{what}: unsupported data type {data_type}")
    rank = reader.varint(what)
    if rank > _MAX_RANK:
        raise BundleFormatError(f"{what}: rank {rank} above {_MAX_RANK}")
    dims = [reader.varint(what) for _ in range(rank)]
    size = math.prod(dims)
    budget.charge(size * dtype.itemsize, what)
    book_dtype = FLOAT_DTYPES.get(reader.byte(what))
    k = reader.varint(what)
    if book_dtype is None or not 1 <= k <= 256:
        raise BundleFormatError(f"{what}: codebook type or size {k} out of range")
    codebook = reader.array(book_dtype, k, f"{what} codebook").astype(dtype)
    layout = reader.byte(what)
    if layout not in (0, 1):
        raise BundleFormatError(f"{what}: unknown layout {layout}")
    count = size if layout == 0 else reader.varint(what)
    if count > size:
        raise BundleFormatError(f"{what}: {count} nonzeros in {size} values")
    coding = reader.byte(what)
    stream = reader.chunk(f"{what} stream")
    if coding == CODING_RANGE:
        mask, indices = range_decode_tensor(bytes(stream), dims, count, k, sparse=layout == 1, what=what)
    elif coding == CODING_LZMA:
        mask_bytes = -(-size // 8) if layout == 1 else 0
        raw = _lzma(stream, mask_bytes + count, what)
        indices = np.frombuffer(raw, dtype=np.uint8, offset=mask_bytes)
        mask = None
        if layout == 1:
            mask = np.unpackbits(np.frombuffer(raw, np.uint8, mask_bytes), count=size, bitorder="little").astype(bool)
            if int(np.count_nonzero(mask)) != count:
                raise BundleFormatError(f"{what}: bitmask marks {int(np.count_nonzero(mask))} values, not {count}")
    else:
        raise BundleFormatError(f"{what}: unknown coding {coding}")
    if count and int(indices.max()) >= k:
        raise BundleFormatError(f"{what}: index {int(indices.max())} outside its codebook of {k}")
    if mask is None:
        values = codebook[indices]
    else:
        values = np.zeros(size, dtype=dtype)
        values[mask] = codebook[indices]
    return tensor_proto(name, data_type, dims, values.astype(dtype, copy=False).tobytes())


class _RangeDecoder:
    """The LZMA range decoder with adaptive Krichevsky-Trofimov counts as probabilities."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 4
        self.code = int.from_bytes(data[:4].ljust(4, b"\0"), "big")
        self.range = 0xFFFFFFFF

    def bit(self, zeros: list[int], ones: list[int], ctx: int) -> int:
        """Decode one bit in context ``ctx`` and update its counts (kept doubled: +2 per bit)."""
        a, b = zeros[ctx], ones[ctx]
        bound = (self.range >> 16) * max(1, min(0xFFFF, (a << 16) // (a + b)))
        if self.code < bound:
            self.range = bound
            a, bit = a + 2, 0
        else:
            self.code -= bound
            self.range -= bound
            b, bit = b + 2, 1
        if a + b > COUNT_LIMIT:
            a, b = (a + 1) >> 1, (b + 1) >> 1
        zeros[ctx], ones[ctx] = a, b
        while self.range < 0x1000000:
            self.range = self.range << 8
            byte = self.data[self.pos] if self.pos < len(self.data) else 0
            self.code = ((self.code << 8) | byte) & 0xFFFFFFFF
            self.pos += 1
        return bit


def range_decode_tensor(
    stream: bytes, dims: list[int], count: int, k: int, *, sparse: bool, what: str = "tensor"
) -> tuple[np.ndarray | None, np.ndarray]:
    """Decode one range-coded tensor stream (format 2, ``coding`` 0).

    The work is fixed by ``dims``, ``count`` and ``k`` (one step per element for the
    mask, ``ceil(log2 k)`` per value), whatever the stream holds.

    Args:
        stream: the coded bytes.
        dims: the tensor's shape.
        count: coded values (nonzeros when ``sparse``).
        k: codebook entries, 1..256.
        sparse: whether a nonzero mask precedes the indices.
        what: names the tensor in errors.

    Returns:
        ``(mask, indices)``: the flat boolean nonzero mask (``None`` when dense) and the
        ``count`` codebook indices in order.

    Raises:
        BundleFormatError: the mask does not mark exactly ``count`` values.
    """
    size = math.prod(dims)
    columns = max(1, size // dims[0]) if dims and dims[0] else 1
    decoder = _RangeDecoder(stream)
    mask = None
    if sparse:
        zeros, ones = [1] * columns, [1] * columns
        bits = bytearray(size)
        bit = decoder.bit
        for i in range(size):
            bits[i] = bit(zeros, ones, i % columns)
        mask = np.frombuffer(bytes(bits), dtype=np.uint8).astype(bool)
        found = int(np.count_nonzero(mask))
        if found != count:
            raise BundleFormatError(f"{what}: the coded mask marks {found} values, not {count}")
    width = max(1, (k - 1).bit_length())
    zeros, ones = [1] * (1 << width), [1] * (1 << width)
    indices = np.zeros(count, dtype=np.uint16)
    bit = decoder.bit
    for n in range(count):
        node = 1
        for _ in range(width):
            node = node << 1 | bit(zeros, ones, node)
        indices[n] = node - (1 << width)
    return mask, indices
