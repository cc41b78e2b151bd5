"""Sparse weights in a bundle: compact CSR on disk, bounded decoding, dense only in memory.

A pruned model's large weight matrices travel as compressed sparse rows (CSR), never
as dense arrays on disk. The host (``host_tools.compress.sparse_pack``) writes one
*sparse weights* file per bundle; the device reads it with numpy and the standard
library only, and hands the matrices to :func:`edge_sdk.runtime.open_sparse_session`
(sparse execution) or to :func:`dense_model` (dense execution, weights rebuilt in
memory), whichever measures faster there.

File layout, format 1 (``V`` is an unsigned LEB128 varint, ``u8`` one byte, arrays
little-endian)::

    magic      7 bytes  b"EDGECSR", then the format version, u8 = 1
    count      V number of matrices
    per matrix:
        name       V length, utf-8 bytes (the graph input it feeds)
        rows, cols V, V
        nnz        V stored (nonzero) values
        widths     u8, u8: bytes per ``indptr`` entry and per column index, 1, 2 or 4
                   (the smallest unsigned types that hold ``nnz`` and ``cols - 1``)
        values     u8 0: float32 values; 1: int8 values with one float32 scale per row
        indptr     (rows + 1) x its width
        indices    nnz x its width; column of each value, increasing within a row
        values     nnz x 4 (float32) or nnz x 1 (int8)
        scales     rows x 4 (float32), only for int8 values

Every size is charged to :class:`SparseLimits` before the bytes are read, and the
structure is checked (``indptr`` starts at 0, never decreases, ends at ``nnz``; every
column is below ``cols`` and increasing within its row; float values are finite), so a
corrupt or hostile file is refused with a :class:`~edge_sdk.errors.BundleFormatError`
instead of crashing a kernel or exhausting memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.bundle._reader import ByteReader
from edge_sdk.errors import BundleFormatError, ConfigError
from edge_sdk.protowire import WireError, append_initializers, encode_varint, tensor_proto

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CsrMatrix",
    "SparseLimits",
    "decode_sparse_weights",
    "dense_model",
    "encode_sparse_weights",
]

MAGIC = b"EDGECSR"
FORMAT_VERSION = 1
_VALUES_F32, _VALUES_I8 = 0, 1
_INDEX_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_MAX_NAME = 256
# ONNX wire fields: ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto
# dims = 1, data_type = 2, name = 8, raw_data = 9; FLOAT = 1.
_FLOAT = 1  # TensorProto.FLOAT


@dataclass(frozen=True)
class SparseLimits:
    """Bounds on a sparse weights file, checked before anything is allocated.

    Attributes:
        max_matrices: matrices per file.
        max_nnz: stored values in all matrices together.
        max_dense_elements: ``rows * cols`` of all matrices together (what the dense
            execution would hold in memory).
    """

    max_matrices: int = 256
    max_nnz: int = 256 * 1024 * 1024
    max_dense_elements: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_matrices", "max_nnz", "max_dense_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"sparse limits: {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, eq=False)
class CsrMatrix:
    """One weight matrix in compressed sparse row form.

    Attributes:
        name: the graph input (sparse execution) or initializer (dense) it becomes.
        shape: ``(rows, cols)``.
        indptr: ``rows + 1`` offsets into ``indices``/``values``.
        indices: column of each stored value.
        values: stored values, float32 (int8 files are dequantized when read).
        quantized: whether the file stored the values as int8 with per-row scales.
    """

    name: str
    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    quantized: bool = False

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return int(self.values.size)

    @property
    def density(self) -> float:
        """Stored values over ``rows * cols``."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @classmethod
    def from_dense(cls, name: str, dense: np.ndarray) -> CsrMatrix:
        """The nonzeros of a 2-D array, row by row (numpy only; used by the host and tests).

        Raises:
            ConfigError: ``dense`` is not 2-D.
        """
        a = np.asarray(dense, dtype=np.float32)
        if a.ndim != 2:
            raise ConfigError(f"sparse matrix {name!r} must be 2-D, got shape {list(a.shape)}")
        rows, cols = np.nonzero(a)
        indptr = np.zeros(a.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=a.shape[0]), out=indptr[1:])
        return cls(name, (int(a.shape[0]), int(a.shape[1])), indptr, cols.astype(np.int64), a[rows, cols])

    def to_dense(self) -> np.ndarray:
        """The full matrix as float32 (in memory only)."""
        out = np.zeros(self.shape, dtype=np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out


def _index_width(largest: int) -> int:
    return next(w for w in (1, 2, 4) if largest < 1 << (8 * w))


def encode_sparse_weights(matrices: list[CsrMatrix], *, int8_values: bool = False) -> bytes:
    """Serialize matrices in the format above.

    Args:
        matrices: the weights; names must be unique.
        int8_values: store values as int8 with one symmetric float32 scale per row
            (``max |row| / 127``) instead of float32.

    Returns:
        The file's bytes.

    Raises:
        ConfigError: duplicate or over-long names, or a matrix too large for 32-bit indices.
    """
    names = [m.name for m in matrices]
    if len(set(names)) != len(names):
        raise ConfigError("sparse weights: duplicate matrix names")
    out = [MAGIC, bytes([FORMAT_VERSION]), encode_varint(len(matrices))]
    for m in matrices:
        name = m.name.encode("utf-8")
        if not name or len(name) > _MAX_NAME:
            raise ConfigError(f"sparse weights: bad matrix name {m.name!r}")
        rows, cols = m.shape
        if max(m.nnz, cols - 1) >= 1 << 32:
            raise ConfigError(f"sparse weights: {m.name!r} is too large for 32-bit indices")
        ptr_width, col_width = _index_width(m.nnz), _index_width(max(cols - 1, 0))
        ptr, index = _INDEX_DTYPES[ptr_width], _INDEX_DTYPES[col_width]
        out += [encode_varint(len(name)), name, encode_varint(rows), encode_varint(cols), encode_varint(m.nnz), bytes([ptr_width, col_width])]
        values = np.asarray(m.values, dtype=np.float32)
        if int8_values:
            counts = np.diff(m.indptr)
            row_of = np.repeat(np.arange(rows), counts)
            peak = np.zeros(rows, dtype=np.float32)
            if values.size:
                np.maximum.at(peak, row_of, np.abs(values))
            scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
            q = np.clip(np.rint(values / scales[row_of]), -127, 127).astype(np.int8)
            out += [bytes([_VALUES_I8]), m.indptr.astype(ptr).tobytes(), m.indices.astype(index).tobytes()]
            out += [q.tobytes(), scales.tobytes()]
        else:
            out += [bytes([_VALUES_F32]), m.indptr.astype(ptr).tobytes(), m.indices.astype(index).tobytes()]
            out.append(values.astype("<f4").tobytes())
    return b"".join(out)


def decode_sparse_weights(data: bytes | memoryview, limits: SparseLimits = SparseLimits()) -> dict[str, CsrMatrix]:
    """Read and check a sparse weights file.

    Args:
        data: the file's bytes (from a verified bundle, but checked all the same).
        limits: bounds on counts and sizes.

    Returns:
        Name -> matrix, with int64 ``indptr``/``indices`` and float32 values (int8
        values are multiplied by their row's scale).

    Raises:
        BundleFormatError: wrong magic or version, a size beyond ``limits``, truncated
            or trailing bytes, or a structure that is not valid CSR.
    """
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise BundleFormatError("sparse weights: not an edge-sdk sparse weights file (bad magic)")
    reader = ByteReader(view, "sparse weights: ")
    reader.pos = len(MAGIC)
    version = reader.take(1, "version")[0]
    if version != FORMAT_VERSION:
        raise BundleFormatError(f"sparse weights: format version {version} (this build reads {FORMAT_VERSION})")
    count = reader.varint("matrix count")
    if count > limits.max_matrices:
        raise BundleFormatError(f"sparse weights: {count} matrices (limit {limits.max_matrices})")
    nnz_left, dense_left = limits.max_nnz, limits.max_dense_elements
    out: dict[str, CsrMatrix] = {}
    for _ in range(count):
        length = reader.varint("name length")
        if not 0 < length <= _MAX_NAME:
            raise BundleFormatError(f"sparse weights: name length {length} out of range")
        try:
            name = bytes(reader.take(length, "name")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleFormatError("sparse weights: a matrix name is not UTF-8") from exc
        if name in out:
            raise BundleFormatError(f"sparse weights: matrix {name!r} appears twice")
        rows, cols, nnz = reader.varint("rows"), reader.varint("cols"), reader.varint("nnz")
        dense_left -= rows * cols
        nnz_left -= nnz
        if dense_left < 0 or nnz_left < 0:
            raise BundleFormatError(
                f"sparse weights: {name!r} ({rows}x{cols}, {nnz} values) exceeds the limits "
                f"({limits.max_dense_elements} elements, {limits.max_nnz} values in all)"
            )
        if nnz > rows * cols:
            raise BundleFormatError(f"sparse weights: {name!r} stores {nnz} values in a {rows}x{cols} matrix")
        ptr_width, col_width = reader.take(1, "index width")[0], reader.take(1, "index width")[0]
        for width, largest in ((ptr_width, nnz), (col_width, max(cols - 1, 0))):
            if width not in _INDEX_DTYPES or largest >= 1 << (8 * width):
                raise BundleFormatError(f"sparse weights: {name!r} has index width {width}, too small or unknown")
        kind = reader.take(1, "value kind")[0]
        if kind not in (_VALUES_F32, _VALUES_I8):
            raise BundleFormatError(f"sparse weights: {name!r} has unknown value kind {kind}")
        index = _INDEX_DTYPES[col_width]
        indptr = reader.array(_INDEX_DTYPES[ptr_width], rows + 1, "indptr").astype(np.int64)
        indices = reader.array(index, nnz, "indices").astype(np.int64)
        _check_structure(name, cols, indptr, indices)
        if kind == _VALUES_F32:
            values = reader.array(np.dtype("<f4"), nnz, "values").astype(np.float32)
        else:
            q = reader.array(np.dtype("i1"), nnz, "values")
            scales = reader.array(np.dtype("<f4"), rows, "scales")
            values = q.astype(np.float32) * np.repeat(scales, np.diff(indptr))
        if not np.all(np.isfinite(values)):
            raise BundleFormatError(f"sparse weights: {name!r} has non-finite values")
        out[name] = CsrMatrix(name, (rows, cols), indptr, indices, values, quantized=kind == _VALUES_I8)
    if reader.pos != len(view):
        raise BundleFormatError(f"sparse weights: {len(view) - reader.pos} trailing bytes")
    return out


def _check_structure(name: str, cols: int, indptr: np.ndarray, indices: np.ndarray) -> None:
    nnz = indices.size
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise BundleFormatError(f"sparse weights: {name!r} has a malformed indptr")
    if nnz:
        if int(indices.max()) >= cols:
            raise BundleFormatError(f"sparse weights: {name!r} has a column index beyond {cols}")
        # Within a row columns must increase; where a row starts they may drop.
        row_start = np.zeros(nnz, dtype=bool)
        row_start[indptr[:-1][indptr[:-1] < nnz]] = True
        if np.any((np.diff(indices) <= 0) & ~row_start[1:]):
            raise BundleFormatError(f"sparse weights: {name!r} has columns out of order or repeated in a row")


def dense_model(skeleton: bytes, matrices: Mapping[str, CsrMatrix], transposed: Mapping[str, bool]) -> bytes:
    """The dense ONNX model: the skeleton with each matrix appended as a float initializer.

    Works on the protobuf wire format (no ``onnx`` package on the device): the
    ``ModelProto`` is copied field by field and the graph field gets the new
    ``TensorProto`` initializers appended, which protobuf merges into the repeated field.

    Args:
        skeleton: the model without the sparse layers' weights.
        matrices: the weights, by initializer name.
        transposed: name -> whether the stored matrix is the transpose of the initializer
            (the sparse graph keeps ``W`` of ``x @ W`` as ``W^T``).

    Returns:
        Serialized model bytes onnxruntime can load.

    Raises:
        BundleFormatError: the skeleton is not a model with exactly one graph.
    """
    inits = []
    for name, m in matrices.items():
        dense = m.to_dense()
        dense = dense.T if transposed.get(name, False) else dense
        inits.append(tensor_proto(name, _FLOAT, dense.shape, np.ascontiguousarray(dense, dtype="<f4").tobytes()))
    try:
        return append_initializers(skeleton, inits)
    except WireError as exc:
        raise BundleFormatError(f"dense model: the skeleton is not a usable ONNX model ({exc})") from exc
