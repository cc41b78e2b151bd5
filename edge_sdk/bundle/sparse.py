"""Sparse weights in a bundle: compact CSR on disk, bounded decoding, dense only in memory.

A pruned model's large weight matrices travel as compressed sparse rows (CSR), never
as dense arrays on disk. The host (``host_tools.compress.sparse_pack``) writes one
*sparse weights* file per bundle; the device reads it with numpy and the standard
library only, and hands the matrices to :func:`edge_sdk.runtime.open_sparse_session`
(sparse execution), to :func:`dense_model` (dense execution, float weights rebuilt in
memory) or, when the file stores int8 values, to :func:`dense_int8_model` (dense int8
execution), whichever measures faster there (``device_agent.selection``).

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

Dense int8 execution (:func:`dense_int8_model`) is built on the device from the same two
files the dense execution uses, the dense skeleton and the int8 CSR file: no third
file, no host step, so every bundle packed with int8 values offers it. The skeleton's
nodes are read and rewritten on the protobuf wire format (:mod:`edge_sdk.protowire`;
the device has no ``onnx`` package): each sparse layer's ``MatMul`` or ``Gemm`` becomes
onnxruntime's ``com.microsoft.DynamicQuantizeMatMul`` (the activation quantized to
uint8 per call, an integer matrix product, the result scaled back to float), plus an
``Add`` for a ``Gemm``'s bias. (The alternative, a second skeleton written by the host
with the int8 nodes already in place, would be one more file in every bundle and
would leave bundles packed before it without the candidate; rewriting a handful of
nodes here needs only a small node reader and writer next to the wire-format code the
device already has.)

The weights map without requantizing. The stored matrix is always ``[out, in]`` (it is
``W^T`` of ``x @ W``, or a ``Gemm``'s ``B`` under ``transB``; see ``transposed`` of the
manifest's layers), so its per-row scales are per *output column* of the product, which
is what ``DynamicQuantizeMatMul``'s 1-D ``b_scale`` means: ``B`` is the stored matrix
transposed, ``[in, out]``, and ``b_scale`` the row scales as they are. ``B`` is held as
*uint8 with zero point 128* (each int8 value plus 128; the same numbers): onnxruntime's
uint8 x int8 kernel on x86 without VNNI multiplies with ``vpmaddubsw``, whose 16-bit
sums saturate on full-range int8 weights (measured on this project's AVX2 test VM:
errors up to 25% of the output's magnitude), while its uint8 x uint8 kernel is exact
and was 15-25% slower there (``docs/benchmarks.md``, "Sparse"). ``B`` is dense in
memory only, one byte per weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_sdk.bundle._reader import ByteReader
from edge_sdk.errors import BundleFormatError, ConfigError
from edge_sdk.protowire import (
    Node,
    WireError,
    append_initializers,
    encode_varint,
    graph_nodes,
    node_proto,
    rewrite_model,
    tensor_proto,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CsrMatrix",
    "SparseLimits",
    "decode_sparse_weights",
    "dense_int8_model",
    "dense_model",
    "encode_sparse_weights",
]

MAGIC = b"EDGECSR"
FORMAT_VERSION = 1
_VALUES_F32, _VALUES_I8 = 0, 1
_INDEX_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_MAX_NAME = 256
_FLOAT, _UINT8 = 1, 2  # TensorProto.DataType
_MS_DOMAIN = "com.microsoft"
#: The uint8 value that stands for 0 in the dense int8 execution's weights.
_ZERO_POINT = 128


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
        int8_values: for a file that stores int8 values, those values (``values`` is
            ``int8_values * row_scales[row]``); ``None`` for float32 files.
        row_scales: for int8 values, the float32 scale of each row; ``None`` otherwise.
    """

    name: str
    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    int8_values: np.ndarray | None = None
    row_scales: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        """Whether the file stored the values as int8 with per-row scales."""
        return self.int8_values is not None

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
        out[_value_rows(self.indptr), self.indices] = self.values
        return out


def _value_rows(indptr: np.ndarray) -> np.ndarray:
    """The row of each stored value."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


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
        out += [encode_varint(len(name)), name, encode_varint(rows), encode_varint(cols), encode_varint(m.nnz)]
        kind = _VALUES_I8 if int8_values else _VALUES_F32
        out += [bytes([ptr_width, col_width, kind]), m.indptr.astype(ptr).tobytes(), m.indices.astype(index).tobytes()]
        values = np.asarray(m.values, dtype=np.float32)
        if int8_values:
            row_of = _value_rows(m.indptr)
            peak = np.zeros(rows, dtype=np.float32)
            if values.size:
                np.maximum.at(peak, row_of, np.abs(values))
            scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
            q = np.clip(np.rint(values / scales[row_of]), -127, 127).astype(np.int8)
            out += [q.tobytes(), scales.tobytes()]
        else:
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
    version = reader.byte("version")
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
        ptr_width, col_width = reader.byte("index width"), reader.byte("index width")
        for width, largest in ((ptr_width, nnz), (col_width, max(cols - 1, 0))):
            if width not in _INDEX_DTYPES or largest >= 1 << (8 * width):
                raise BundleFormatError(f"sparse weights: {name!r} has index width {width}, too small or unknown")
        kind = reader.byte("value kind")
        if kind not in (_VALUES_F32, _VALUES_I8):
            raise BundleFormatError(f"sparse weights: {name!r} has unknown value kind {kind}")
        index = _INDEX_DTYPES[col_width]
        indptr = reader.array(_INDEX_DTYPES[ptr_width], rows + 1, "indptr").astype(np.int64)
        indices = reader.array(index, nnz, "indices").astype(np.int64)
        _check_structure(name, cols, indptr, indices)
        q = scales = None
        if kind == _VALUES_F32:
            values = reader.array(np.dtype("<f4"), nnz, "values").astype(np.float32)
        else:
            q = reader.array(np.dtype("i1"), nnz, "values").astype(np.int8)  # copies: the file's bytes can go
            scales = reader.array(np.dtype("<f4"), rows, "scales").astype(np.float32)
            if not np.all(np.isfinite(scales)):
                raise BundleFormatError(f"sparse weights: {name!r} has non-finite scales")
            values = q.astype(np.float32) * np.repeat(scales, np.diff(indptr))
        if not np.all(np.isfinite(values)):
            raise BundleFormatError(f"sparse weights: {name!r} has non-finite values")
        out[name] = CsrMatrix(name, (rows, cols), indptr, indices, values, q, scales)
    if trailing := reader.trailing():
        raise BundleFormatError(f"sparse weights: {trailing} trailing bytes")
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


def _int8_weight(m: CsrMatrix) -> tuple[np.ndarray, np.ndarray]:
    """``B`` (``[cols, rows]``, uint8, zero point 128) and its per-column scales, from an int8 matrix."""
    assert m.int8_values is not None and m.row_scales is not None
    rows, cols = m.shape
    b = np.full((cols, rows), _ZERO_POINT, dtype=np.uint8)
    b[m.indices, _value_rows(m.indptr)] = (m.int8_values.astype(np.int16) + _ZERO_POINT).astype(np.uint8)
    return b, np.ascontiguousarray(m.row_scales, dtype="<f4")


def _int8_layer(name: str, node: Node, transposed: bool) -> list[bytes]:
    """The nodes that replace the ``MatMul``/``Gemm`` fed by weight ``name``.

    Raises:
        BundleFormatError: the node is not one the host writes for a sparse layer.
    """
    where = f"dense int8 model: the node that reads {name!r}"
    attrs = node.attributes
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.outputs) != 1:
        raise BundleFormatError(f"{where} is a {node.domain or 'ai.onnx'} {node.op_type}, not a MatMul or Gemm")
    if node.inputs.index(name) != 1 or not node.inputs[0]:
        raise BundleFormatError(f"{where} does not take it as its second input")
    if node.op_type == "Gemm":
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if not plain or len(node.inputs) > 3:
            raise BundleFormatError(f"{where} is a Gemm with transA, alpha or beta")
        expected = not attrs.get("transB", 0)
    else:
        if len(node.inputs) != 2:
            raise BundleFormatError(f"{where} is a MatMul with {len(node.inputs)} inputs")
        expected = True
    if transposed != expected:
        raise BundleFormatError(f"{where}: the manifest's 'transposed' ({transposed}) does not fit the {node.op_type}")
    out = node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    product = f"{out}__int8" if bias else out
    label = f"{node.name or out}__int8"
    nodes = [
        node_proto(
            "DynamicQuantizeMatMul",
            [node.inputs[0], name, f"{name}__scale", f"{name}__zero_point"],
            [product],
            name=label,
            domain=_MS_DOMAIN,
        )
    ]
    if bias:
        nodes.append(node_proto("Add", [product, bias], [out], name=f"{label}_bias"))
    return nodes


def dense_int8_model(skeleton: bytes, matrices: Mapping[str, CsrMatrix], transposed: Mapping[str, bool]) -> bytes:
    """The dense int8 ONNX model: the skeleton with each sparse layer as ``DynamicQuantizeMatMul``.

    See the module docstring for the graph and why ``B`` is uint8 with zero point 128.
    Each matrix's int8 values become the layer's weight (``{name}``, uint8 ``[in, out]``),
    its row scales the per-column ``{name}__scale``, and ``{name}__zero_point`` is 128.

    Args:
        skeleton: the dense graph without the sparse layers' weights (the bundle's
            ``sparse.dense_model``).
        matrices: the weights, by initializer name; all must hold int8 values.
        transposed: name -> the manifest's ``transposed`` of the layer, checked against
            the node that reads the weight (``MatMul`` and ``Gemm`` without ``transB``
            store the transpose).

    Returns:
        Serialized model bytes onnxruntime can load (with its contrib operators).

    Raises:
        BundleFormatError: a matrix holds float32 values; the skeleton does not parse; a
            weight is not read by exactly one ``MatMul``/``Gemm`` as its second input,
            or that node does not match the manifest's layer; a name the rewrite adds
            is already used by the graph.
    """
    try:
        nodes = graph_nodes(skeleton)
    except WireError as exc:
        raise BundleFormatError(f"dense int8 model: the skeleton is not a usable ONNX model ({exc})") from exc
    used = {t for n in nodes for t in (*n.inputs, *n.outputs)}
    replace: dict[int, list[bytes]] = {}
    inits = []
    for name, m in matrices.items():
        if not m.quantized:
            raise BundleFormatError(f"dense int8 model: {name!r} stores float32 values, not int8")
        reads = sum(n.inputs.count(name) for n in nodes)
        if reads != 1:
            raise BundleFormatError(f"dense int8 model: the skeleton reads {name!r} {reads} times, expected once")
        index = next(i for i, n in enumerate(nodes) if name in n.inputs)
        replace[index] = _int8_layer(name, nodes[index], transposed.get(name, False))
        added = {f"{name}__scale", f"{name}__zero_point", f"{nodes[index].outputs[0]}__int8"}
        if clash := sorted(added & used):
            raise BundleFormatError(f"dense int8 model: the skeleton already uses the name {clash[0]!r}")
        b, scales = _int8_weight(m)
        inits += [
            tensor_proto(name, _UINT8, b.shape, b.tobytes()),
            tensor_proto(f"{name}__scale", _FLOAT, scales.shape, scales.tobytes()),
            tensor_proto(f"{name}__zero_point", _UINT8, (), bytes([_ZERO_POINT])),
        ]
    try:
        return rewrite_model(skeleton, nodes=replace, initializers=inits, opsets={_MS_DOMAIN: 1})
    except WireError as exc:
        raise BundleFormatError(f"dense int8 model: the skeleton is not a usable ONNX model ({exc})") from exc
