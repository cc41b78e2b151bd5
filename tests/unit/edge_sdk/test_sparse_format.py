"""The CSR weights format: round trips, compactness, and a bounded decoder that refuses corrupt data."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from sparse_models import pruned

from edge_sdk.bundle import Manifest
from edge_sdk.bundle.manifest import FileEntry, SparseLayer, SparseSpec
from edge_sdk.bundle.sparse import (
    CsrMatrix,
    SparseLimits,
    decode_sparse_weights,
    encode_sparse_weights,
)
from edge_sdk.errors import BundleFormatError, ConfigError, ManifestError


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (64, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_round_trip_fp32_is_exact(shape, sparsity):
    dense = pruned(np.random.default_rng(1), shape, sparsity)
    data = encode_sparse_weights([CsrMatrix.from_dense("w", dense)])
    out = decode_sparse_weights(data)["w"]
    assert out.shape == shape and not out.quantized
    np.testing.assert_array_equal(out.to_dense(), dense)
    assert out.nnz == np.count_nonzero(dense)


def test_int8_values_are_within_half_a_step_of_their_row_scale():
    dense = pruned(np.random.default_rng(2), (50, 80), 0.8)
    out = decode_sparse_weights(encode_sparse_weights([CsrMatrix.from_dense("w", dense)], int8_values=True))["w"]
    assert out.quantized
    step = np.abs(dense).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(out.to_dense() - dense) <= step / 2 + 1e-7)
    assert np.all(out.to_dense()[dense == 0] == 0)  # no new nonzeros (tiny values may round to 0)
    # The int8 values and row scales are kept as stored, for the dense int8 execution.
    assert out.int8_values.dtype == np.int8 and out.row_scales.shape == (50,)
    np.testing.assert_array_equal(out.int8_values * np.repeat(out.row_scales, np.diff(out.indptr)), out.values)
    assert np.abs(out.int8_values).max() == 127


def test_file_is_compact_and_never_dense():
    dense = pruned(np.random.default_rng(3), (512, 512), 0.9)
    m = CsrMatrix.from_dense("w", dense)
    fp32 = encode_sparse_weights([m])
    int8 = encode_sparse_weights([m], int8_values=True)
    # 16-bit column indices (cols < 65536) + 4-byte values; int8: 16-bit + 1 byte.
    assert len(fp32) < m.nnz * 6 + 513 * 4 + 100 < dense.nbytes / 3
    assert len(int8) < m.nnz * 3 + 513 * 4 + 512 * 4 + 100


def test_several_matrices_and_names():
    rng = np.random.default_rng(4)
    ms = [CsrMatrix.from_dense(f"layer.{i}/weight", pruned(rng, (8 + i, 5), 0.5)) for i in range(3)]
    out = decode_sparse_weights(encode_sparse_weights(ms))
    assert list(out) == [m.name for m in ms]
    with pytest.raises(ConfigError):
        encode_sparse_weights([ms[0], ms[0]])


def _one(dense=None) -> bytes:
    dense = pruned(np.random.default_rng(5), (20, 30), 0.7) if dense is None else dense
    return encode_sparse_weights([CsrMatrix.from_dense("w", dense)])


def test_every_truncation_and_trailing_bytes_are_refused():
    data = _one()
    for cut in range(len(data)):
        with pytest.raises(BundleFormatError):
            decode_sparse_weights(data[:cut])
    with pytest.raises(BundleFormatError, match="trailing"):
        decode_sparse_weights(data + b"\0")


def test_random_corruption_raises_only_bundle_format_errors():
    data = bytearray(_one())
    rng = np.random.default_rng(6)
    for _ in range(400):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
            mutated[pos] = int(rng.integers(0, 256))
        with contextlib.suppress(BundleFormatError):
            decode_sparse_weights(bytes(mutated))


def test_limits_are_checked_before_reading():
    data = _one()
    with pytest.raises(BundleFormatError, match="limits"):
        decode_sparse_weights(data, SparseLimits(max_nnz=10))
    with pytest.raises(BundleFormatError, match="limits"):
        decode_sparse_weights(data, SparseLimits(max_dense_elements=599))
    many = encode_sparse_weights([CsrMatrix.from_dense(f"w{i}", np.eye(2, dtype=np.float32)) for i in range(3)])
    with pytest.raises(BundleFormatError, match="matrices"):
        decode_sparse_weights(many, SparseLimits(max_matrices=2))
    # A header that claims a huge matrix is refused without allocating it.
    huge = b"EDGECSR\x01\x01\x01w" + b"\xff\xff\xff\xff\x0f" * 2 + b"\x01\x04\x04\x00"
    with pytest.raises(BundleFormatError):
        decode_sparse_weights(huge)


def _header(rows: int, cols: int, nnz: int) -> bytes:
    return b"EDGECSR\x01\x01\x01w" + bytes([rows, cols, nnz, 1, 1, 0])


@pytest.mark.parametrize(
    ("indptr", "indices", "values", "match"),
    [
        ([1, 1, 2], [0, 1], [1.0, 2.0], "indptr"),
        ([0, 2, 1], [0, 1], [1.0, 2.0], "indptr"),
        ([0, 1, 3], [0, 1], [1.0, 2.0], "indptr"),
        ([0, 1, 2], [0, 9], [1.0, 2.0], "column"),
        ([0, 2, 2], [1, 0], [1.0, 2.0], "order"),
        ([0, 2, 2], [1, 1], [1.0, 2.0], "order"),
        ([0, 1, 2], [0, 1], [1.0, float("nan")], "non-finite"),
    ],
)
def test_malformed_csr_is_refused(indptr, indices, values, match):
    data = _header(2, 3, 2) + bytes(indptr) + bytes(indices) + np.asarray(values, "<f4").tobytes()
    with pytest.raises(BundleFormatError, match=match):
        decode_sparse_weights(data)


def test_bad_magic_version_width_and_kind():
    good = _one()
    for bad in (b"XDGECSR" + good[7:], good[:7] + b"\x09" + good[8:]):
        with pytest.raises(BundleFormatError):
            decode_sparse_weights(bad)
    small = _header(2, 3, 0)[:-3] + b"\x01\x03\x00" + b"\0\0\0"
    with pytest.raises(BundleFormatError, match="width"):
        decode_sparse_weights(small)
    kind = _header(2, 3, 0)[:-1] + b"\x07" + b"\0\0\0"
    with pytest.raises(BundleFormatError, match="kind"):
        decode_sparse_weights(kind)


def _manifest(**kw) -> Manifest:
    files = tuple(FileEntry(p, 1, "0" * 64) for p in ("m.sparse.onnx", "m.dense.onnx", "m.csr"))
    return Manifest("m", 1, 0.0, 10.0, "onnxruntime", "m.sparse.onnx", files, **kw)


def test_manifest_sparse_field_round_trips_and_is_validated():
    spec = SparseSpec("m.csr", "m.dense.onnx", (SparseLayer("fc0", "W0", (16, 8), 12, True),), values="int8")
    m = _manifest(sparse=spec, execution="auto")
    back = Manifest.from_bytes(m.to_bytes(), 1 << 20)
    assert back == m and back.sparse.layers[0].sparsity == pytest.approx(1 - 12 / 128)
    assert "sparse" not in _manifest().to_dict() and "execution" not in _manifest().to_dict()
    with pytest.raises(ManifestError):
        _manifest(sparse=SparseSpec("nope.csr", "m.dense.onnx", spec.layers))
    with pytest.raises(ManifestError):
        _manifest(execution="fastest")
    with pytest.raises(ManifestError):
        _manifest(execution="sparse")  # nothing sparse to run
    with pytest.raises(ManifestError):
        _manifest(execution="dense_int8")
    assert _manifest(sparse=spec, execution="dense_int8").execution == "dense_int8"
    with pytest.raises(ManifestError, match="int8 values"):
        _manifest(sparse=dataclasses.replace(spec, values="fp32"), execution="dense_int8")
    for bad in (
        {"layers": [], "weights": "m.csr", "dense_model": "m.dense.onnx"},
        {**spec.to_dict(), "format": "coo"},
        {**spec.to_dict(), "weights": "../m.csr"},
        {**spec.to_dict(), "surprise": 1},
        {**spec.to_dict(), "layers": [{**spec.layers[0].to_dict(), "nnz": 10**9}]},
        {**spec.to_dict(), "layers": [{**spec.layers[0].to_dict(), "shape": [16]}]},
    ):
        with pytest.raises(ManifestError):
            Manifest.from_dict({**m.to_dict(), "sparse": bad})


def test_non_finite_int8_scales_are_refused():
    data = encode_sparse_weights([CsrMatrix.from_dense("w", np.eye(3, dtype=np.float32))], int8_values=True)
    with pytest.raises(BundleFormatError, match="non-finite scales"):
        decode_sparse_weights(data[:-4] + np.float32("nan").tobytes())
