"""Weight sharing and the packed transport form of a model (Deep Compression, stages 2 and 3).

:class:`WeightSharing` clusters each large weight tensor's nonzero values with k-means
(``2**bits`` clusters, linear initialisation as Han et al. found best) and replaces every
value by its cluster centre. Zeros stay zero, so the sparsity left by pruning survives.
The result is an ordinary float ONNX model: it runs and is measured like any other step,
but each tensor now has at most ``2**bits`` distinct values.

:func:`pack_model` writes such a model in its transport form (see
:mod:`edge_sdk.bundle.weights` for the layout): the ONNX skeleton without the shared
tensors, and per tensor its codebook, bit-packed indices and the gaps between nonzeros,
LZMA-coded. The device rebuilds the ONNX model with
:func:`edge_sdk.bundle.weights.unpack_model`, without the ``onnx`` package.
:func:`pack_model` decodes what it wrote and compares every tensor before returning, so a
packed file that would not rebuild exactly never leaves the host.
"""

from __future__ import annotations

import logging
import lzma
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_sdk.bundle.weights import (
    CODING_LZMA,
    CODING_RANGE,
    COUNT_LIMIT,
    FLOAT_DTYPES,
    FORMAT_VERSION,
    LZMA_FILTERS,
    MAGIC,
    unpack_model,
)
from edge_sdk.errors import CompressionError, ConfigError
from edge_sdk.protowire import encode_varint

from ..pass_manager import PassContext, PassResult

__all__ = ["PackedModel", "WeightSharing", "kmeans_1d", "pack_model"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, centres initialised evenly between min and max.

    Linear initialisation keeps centres on the rare large weights, which matter most
    (Han et al., 2016, section 3.2). In one dimension the nearest centre is found by a
    binary search over the midpoints of the sorted centres.

    Args:
        values: 1-D values to cluster.
        clusters: number of centres (at most the number of values is used).
        iterations: Lloyd iterations at most; stops early when assignments settle.

    Returns:
        ``(centres, assignment)``: sorted float64 centres and, per value, its centre's index.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    k = max(1, min(clusters, len(np.unique(values))))
    centres = np.linspace(values.min(), values.max(), k)
    assignment = np.zeros(len(values), dtype=np.int64)
    for _ in range(iterations):
        new = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        sums = np.bincount(new, weights=values, minlength=k)
        counts = np.bincount(new, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        settled = np.array_equal(new, assignment) and np.allclose(moved, centres)
        assignment, centres = new, moved
        order = np.argsort(centres)
        if not np.all(order == np.arange(k)):
            centres = centres[order]
            assignment = np.argsort(order)[assignment]
        if settled:
            break
    used = np.unique(assignment)
    remap = np.zeros(k, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centres[used], remap[assignment]


def _valid_bits(value: object) -> bool:
    """A bit width weight sharing takes: an int in 1..8."""
    return isinstance(value, int) and 1 <= value <= 8


@dataclass(frozen=True)
class WeightSharing:
    """Cluster each float weight tensor into ``2**bits`` shared values.

    Args:
        bits: index width; ``2**bits`` clusters per tensor (Deep Compression used 8 for
            convolutions and 5 for fully connected layers).
        min_params: leave weight tensors with fewer values than this alone.
        float16_codebook: round the centres to float16, so the codebook costs half.
        layer_bits: per-tensor index widths (initializer name -> bits) that override ``bits``.
        bias_bits: also cluster the rank-1 float tensors (biases) of at least 16 values,
            each into its own ``2**bias_bits`` values; ``None`` leaves them as they are.

    Raises:
        ConfigError: a width outside 1..8 or ``min_params`` below 1.
    """

    bits: int = 5
    min_params: int = 1024
    float16_codebook: bool = False
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    bias_bits: int | None = None

    def __post_init__(self) -> None:
        for key, value in [("bits", self.bits), ("bias_bits", self.bias_bits), *self.layer_bits.items()]:
            if value is not None and not _valid_bits(value):
                raise ConfigError(f"weight sharing bits must be 1..8, not {value} ({key})", key=key)
        if self.min_params < 1:
            raise ConfigError("min_params must be at least 1", key="min_params")
        object.__setattr__(self, "layer_bits", MappingProxyType(dict(self.layer_bits)))

    @property
    def name(self) -> str:
        """The pass name."""
        return f"weight-share-{self.bits}bit"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Replace every eligible tensor's values by their cluster centres.

        Args:
            model: the model, modified in place.
            ctx: progress only.

        Returns:
            The model; notes give per tensor the clusters used and, for the whole model,
            the size of its packed transport form.

        Raises:
            CompressionError: no float weight tensor has ``min_params`` values or more,
                or ``layer_bits`` names a tensor that is not a float initializer.
        """
        floats = {i.name for i in model.graph.initializer if i.data_type in _FLOAT_TYPES}
        unknown = sorted(set(self.layer_bits) - floats)
        if unknown:
            raise CompressionError(f"weight sharing: layer_bits names unknown float tensors {unknown}", tensors=unknown)
        targets = {
            i.name: self.layer_bits.get(i.name, self.bits)
            for i in model.graph.initializer
            if _eligible(i, self.min_params)
        }
        if not targets:
            raise CompressionError(
                f"weight sharing: no float weight tensor with at least {self.min_params} values",
                min_params=self.min_params,
            )
        if self.bias_bits is not None:
            for i in model.graph.initializer:
                if i.data_type in _FLOAT_TYPES and len(i.dims) == 1 and i.dims[0] >= 16:
                    targets.setdefault(i.name, self.layer_bits.get(i.name, self.bias_bits))
        layers: dict[str, int] = {}
        tensors = [i for i in model.graph.initializer if i.name in targets]
        for done, tensor in enumerate(tensors):
            ctx.report(self.name, "cluster", done, len(tensors))
            values = numpy_helper.to_array(tensor)
            flat = values.ravel().astype(np.float64)
            nonzero = flat != 0
            if not nonzero.any():
                continue
            centres, assignment = kmeans_1d(flat[nonzero], 1 << targets[tensor.name])
            if self.float16_codebook:
                centres = centres.astype(np.float16).astype(np.float64)
            shared = np.zeros_like(flat)
            shared[nonzero] = centres[assignment]
            tensor.CopyFrom(numpy_helper.from_array(shared.reshape(values.shape).astype(values.dtype), tensor.name))
            layers[tensor.name] = len(np.unique(centres))
        packed = pack_model(model)
        return PassResult(
            model,
            changed=bool(layers),
            notes={
                "bits": self.bits,
                "layer_bits": {name: targets[name] for name in layers},
                "clusters": layers,
                "packed_bytes": packed.size_bytes,
                "onnx_bytes": model.ByteSize(),
            },
        )


def _eligible(tensor: onnx.TensorProto, min_params: int) -> bool:
    return tensor.data_type in _FLOAT_TYPES and len(tensor.dims) >= 2 and int(np.prod(tensor.dims)) >= min_params


@dataclass(frozen=True)
class PackedModel:
    """A model in its transport form.

    Attributes:
        data: the packed file's bytes (``edge_sdk.bundle.weights`` format).
        shared_tensors: names of the tensors coded with a codebook.
        onnx_bytes: size of the ONNX model it rebuilds.
        breakdown: where the bytes go: ``{"header", "skeleton", "tensors": {name:
            {"header", "codebook", "stream", "coding", "layout", "codebook_size"}}}``.
    """

    data: bytes
    shared_tensors: tuple[str, ...]
    onnx_bytes: int
    breakdown: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Bytes on the wire."""
        return len(self.data)


RANGE_CODING_MAX_VALUES = 1 << 21
"""Tensors up to this many values are range coded; larger ones fall back to LZMA, whose
decoder is C, since the range decoder is pure Python (about 1 s per million values)."""


def pack_model(model: onnx.ModelProto, max_codebook: int = 256) -> PackedModel:
    """Write a model in the packed transport form and check that it decodes exactly.

    Every float initializer with at most ``max_codebook`` distinct values (nonzeros, when
    the zeros are coded as a sparsity mask) is coded as a codebook plus entropy-coded
    indices, if that is smaller than the tensor itself; everything else stays in the
    LZMA-coded skeleton as it is. Per tensor the smallest of the dense and sparse
    layouts and of range and LZMA coding is chosen.

    Args:
        model: the model (typically after :class:`WeightSharing`); not modified.
        max_codebook: largest codebook (at most 256: indices are at most 8 bits).

    Returns:
        The packed bytes, what was coded, and where the bytes go.

    Raises:
        ConfigError: ``max_codebook`` outside 2..256.
        CompressionError: the packed form did not decode to the same tensors.
    """
    if not 2 <= max_codebook <= 256:
        raise ConfigError(f"max_codebook must be 2..256, not {max_codebook}", key="max_codebook")
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    entries: list[bytes] = []
    kept: list[onnx.TensorProto] = []
    expected: dict[str, np.ndarray] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for tensor in skeleton.graph.initializer:
        values = numpy_helper.to_array(tensor) if tensor.data_type in _FLOAT_TYPES else None
        encoded = (
            _encode_tensor(tensor.name, int(tensor.data_type), values, max_codebook) if values is not None else None
        )
        if encoded is None or len(encoded[0]) >= values.nbytes:  # type: ignore[union-attr]
            kept.append(tensor)
            continue
        entries.append(encoded[0])
        tensors[tensor.name] = encoded[1]
        expected[tensor.name] = values  # type: ignore[assignment]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    raw_skeleton = skeleton.SerializeToString()
    coded_skeleton = lzma.compress(raw_skeleton, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    head = MAGIC + bytes([FORMAT_VERSION]) + encode_varint(len(raw_skeleton)) + encode_varint(len(coded_skeleton))
    count = encode_varint(len(entries))
    data = head + coded_skeleton + count + b"".join(entries)
    data += struct.pack("<I", zlib.crc32(data))
    rebuilt = unpack_model(data)
    _check_round_trip(rebuilt, expected)
    breakdown = {"header": len(head) + len(count) + 4, "skeleton": len(coded_skeleton), "tensors": tensors}
    logger.info(
        "packed %d of %d tensors: %d bytes (ONNX %d)",
        len(entries),
        len(model.graph.initializer),
        len(data),
        model.ByteSize(),
    )
    return PackedModel(data, tuple(tensors), len(rebuilt), breakdown)


def _encode_tensor(
    name: str, data_type: int, values: np.ndarray, max_codebook: int
) -> tuple[bytes, dict[str, Any]] | None:
    """The tensor's record in the packed file and its byte breakdown; ``None`` if it cannot be coded."""
    flat = values.ravel()
    if flat.size == 0 or not np.all(np.isfinite(flat)):
        return None
    nonzero = flat != 0
    layouts: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # (layout, codebook, mask)
    distinct = np.unique(flat)
    if len(distinct) <= max_codebook:
        layouts.append((0, distinct, None))
    sparse_book = np.unique(flat[nonzero])
    if not nonzero.all() and 1 <= len(sparse_book) <= max_codebook:
        layouts.append((1, sparse_book, nonzero))
    if not layouts:
        return None
    dims = [int(d) for d in values.shape]
    name_bytes = name.encode("utf-8")
    head = (
        encode_varint(len(name_bytes)) + name_bytes + encode_varint(data_type) + encode_varint(len(dims))
        + b"".join(encode_varint(d) for d in dims)
    )  # fmt: skip
    best: tuple[bytes, dict[str, Any]] | None = None
    for layout, codebook, mask in layouts:
        coded = flat if mask is None else flat[mask]
        indices = np.searchsorted(codebook, coded).astype(np.uint8)
        book_type = data_type
        if data_type == onnx.TensorProto.FLOAT and np.array_equal(
            codebook.astype(np.float16).astype(codebook.dtype), codebook
        ):
            book_type = onnx.TensorProto.FLOAT16
        book_dtype: Any = FLOAT_DTYPES[book_type]
        book = codebook.astype(book_dtype).tobytes()
        book_part = bytes([book_type]) + encode_varint(len(codebook)) + book
        layout_part = bytes([layout]) + (encode_varint(len(coded)) if layout == 1 else b"")
        streams = []
        if flat.size <= RANGE_CODING_MAX_VALUES:
            streams.append((CODING_RANGE, range_encode_tensor(dims, mask, indices, len(codebook))))
        mask_bytes = np.packbits(mask, bitorder="little").tobytes() if mask is not None else b""
        streams.append(
            (CODING_LZMA, lzma.compress(mask_bytes + indices.tobytes(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
        )
        coding, stream = min(streams, key=lambda s: len(s[1]))
        record = head + book_part + layout_part + bytes([coding]) + encode_varint(len(stream)) + stream
        info = {
            "header": len(head) + len(layout_part) + 1 + len(encode_varint(len(stream))),
            "codebook": len(book_part),
            "codebook_size": len(codebook),
            "stream": len(stream),
            "coding": "range" if coding == CODING_RANGE else "lzma",
            "layout": "dense" if layout == 0 else "sparse",
        }
        if best is None or len(record) < len(best[0]):
            best = (record, info)
    return best


class _RangeEncoder:
    """The LZMA range encoder, mirror of ``edge_sdk.bundle.weights._RangeDecoder``."""

    def __init__(self) -> None:
        self.low, self.range, self.cache, self.cache_size = 0, 0xFFFFFFFF, 0, 1
        self.out = bytearray()

    def bit(self, value: int, zeros: list[int], ones: list[int], ctx: int) -> None:
        a, b = zeros[ctx], ones[ctx]
        bound = (self.range >> 16) * max(1, min(0xFFFF, (a << 16) // (a + b)))
        if value:
            self.low += bound
            self.range -= bound
            b += 2
        else:
            self.range = bound
            a += 2
        if a + b > COUNT_LIMIT:
            a, b = (a + 1) >> 1, (b + 1) >> 1
        zeros[ctx], ones[ctx] = a, b
        while self.range < 0x1000000:
            self.range <<= 8
            self._shift_low()

    def _shift_low(self) -> None:
        if self.low < 0xFF000000 or self.low >= 1 << 32:
            carry = self.low >> 32
            temp = self.cache
            while True:
                self.out.append((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if not self.cache_size:
                    break
            self.cache = (self.low >> 24) & 0xFF
        self.cache_size += 1
        self.low = (self.low & 0x00FFFFFF) << 8

    def finish(self) -> bytes:
        for _ in range(5):
            self._shift_low()
        # The first byte is always zero and the decoder reads zeros past the end.
        return bytes(self.out[1:]).rstrip(b"\0")


def range_encode_tensor(dims: list[int], mask: np.ndarray | None, indices: np.ndarray, k: int) -> bytes:
    """Range-code a tensor's nonzero mask (if sparse) and codebook indices (format 2, coding 0).

    Args:
        dims: the tensor's shape.
        mask: flat boolean nonzero mask, or ``None`` for the dense layout.
        indices: the coded values' codebook indices, in order.
        k: codebook entries.

    Returns:
        The stream :func:`edge_sdk.bundle.weights.range_decode_tensor` decodes.
    """
    size = int(np.prod(dims)) if dims else 1
    columns = max(1, size // dims[0]) if dims and dims[0] else 1
    encoder = _RangeEncoder()
    if mask is not None:
        zeros, ones = [1] * columns, [1] * columns
        for i, value in enumerate(mask.astype(np.uint8).tolist()):
            encoder.bit(value, zeros, ones, i % columns)
    width = max(1, (k - 1).bit_length())
    zeros, ones = [1] * (1 << width), [1] * (1 << width)
    for index in indices.tolist():
        node = 1
        for shift in range(width - 1, -1, -1):
            value = (index >> shift) & 1
            encoder.bit(value, zeros, ones, node)
            node = node << 1 | value
    return encoder.finish()


def _check_round_trip(rebuilt: bytes, expected: dict[str, np.ndarray]) -> None:
    model = onnx.load_model_from_string(rebuilt)
    got = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, values in expected.items():
        if name not in got or got[name].shape != values.shape or not np.array_equal(got[name], values):
            raise CompressionError(f"packed model does not rebuild tensor {name!r} exactly", tensor=name)
