"""Weight sharing, the packed transport form, and its onnx-free decoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from compress_data import FAST
from onnx import numpy_helper

import host_tools.compress as hc
from edge_sdk.bundle.weights import (
    MAGIC,
    WeightsLimits,
    is_packed_model,
    range_decode_tensor,
    unpack_model,
)
from edge_sdk.errors import BundleFormatError, CompressionError, ConfigError
from edge_sdk.protowire import tensor_proto
from host_tools.compress import WeightSharing, pack_model
from host_tools.compress.passes.weight_sharing import kmeans_1d, range_encode_tensor

ROOT = Path(__file__).resolve().parents[4]


def _pruned(model_bytes: bytes, fraction: float) -> onnx.ModelProto:
    model = onnx.load_model_from_string(model_bytes)
    for init in model.graph.initializer:
        if len(init.dims) == 2:
            values = numpy_helper.to_array(init).copy()
            values[np.abs(values) < np.quantile(np.abs(values), fraction)] = 0
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    return model


def test_kmeans_1d_finds_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-1, 0.01, 100), rng.normal(2, 0.01, 50), rng.normal(5, 0.01, 10)])
    centres, assignment = kmeans_1d(values, 3)
    np.testing.assert_allclose(centres, [-1, 2, 5], atol=0.01)
    assert np.bincount(assignment).tolist() == [100, 50, 10]


def test_sharing_limits_distinct_values_and_keeps_zeros(mlp: bytes, split: hc.DigitsSplit) -> None:
    model = _pruned(mlp, 0.5)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    result = hc.compress(model, [WeightSharing(bits=4)], evaluation=split.test, measure=FAST)
    out = {i.name: numpy_helper.to_array(i) for i in onnx.load_model_from_string(result.model_bytes).graph.initializer}
    for name, values in before.items():
        if values.ndim == 2 and values.size >= 1024:
            assert len(np.unique(out[name][out[name] != 0])) <= 16
            assert np.array_equal(out[name] == 0, values == 0), "zeros stay zero, nonzeros stay nonzero"
        else:
            assert np.array_equal(out[name], values), f"{name} is too small to share and must not change"
    assert result.report.final.sparsity == pytest.approx(result.report.original.sparsity)
    assert result.report.quality_drop <= 0.02
    notes = result.report.steps[0].notes
    assert notes["packed_bytes"] * 5 < result.report.original.size_bytes


def test_packed_model_rebuilds_exactly_and_is_small(mlp: bytes, split: hc.DigitsSplit) -> None:
    shared = hc.compress(_pruned(mlp, 0.8), [WeightSharing(bits=5)], measure=FAST).model_bytes
    packed = pack_model(onnx.load_model_from_string(shared))
    assert is_packed_model(packed.data) and packed.data.startswith(MAGIC)
    assert len(packed.shared_tensors) == 3
    assert packed.size_bytes * 10 < len(mlp)
    rebuilt = unpack_model(packed.data)
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load_model_from_string(rebuilt).graph.initializer}
    for init in onnx.load_model_from_string(shared).graph.initializer:
        assert np.array_equal(got[init.name], numpy_helper.to_array(init))
    assert hc.evaluate_accuracy(rebuilt, split.test) == hc.evaluate_accuracy(shared, split.test)


def test_device_decodes_and_runs_without_onnx(mlp: bytes, split: hc.DigitsSplit, tmp_path: Path) -> None:
    shared = hc.compress(mlp, [WeightSharing(bits=6)], measure=FAST).model_bytes
    (tmp_path / "model.packed").write_bytes(pack_model(onnx.load_model_from_string(shared)).data)
    np.save(tmp_path / "x.npy", split.x_test[:20])
    with hc.evaluate.open_host_session(shared) as session:
        np.save(tmp_path / "expected.npy", session.run({"input": split.x_test[:20]})[0])
    code = (
        "import sys, numpy as np\n"
        "sys.modules['onnx'] = None  # importing onnx now fails\n"
        "from edge_sdk.bundle.weights import unpack_model\n"
        "from edge_sdk.runtime import open_session\n"
        f"d = r'{tmp_path}'\n"
        "model = unpack_model(open(d + '/model.packed', 'rb').read())\n"
        "with open_session(model, 'onnxruntime') as s:\n"
        "    y = s.run({'input': np.load(d + '/x.npy')})[0]\n"
        "np.testing.assert_allclose(y, np.load(d + '/expected.npy'), rtol=1e-5, atol=1e-5)\n"
        "assert not [m for m, v in sys.modules.items()\n"
        "            if v is not None and m.split('.')[0] in ('onnx', 'host_tools')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_corrupt_or_oversized_packed_models_are_refused(mlp: bytes) -> None:
    shared = hc.compress(mlp, [WeightSharing(bits=4)], measure=FAST).model_bytes
    data = pack_model(onnx.load_model_from_string(shared)).data
    with pytest.raises(BundleFormatError, match="magic"):
        unpack_model(b"NOTPACKED" + data)
    with pytest.raises(BundleFormatError):
        unpack_model(data[: len(data) // 2])
    with pytest.raises(BundleFormatError, match="limit"):
        unpack_model(data, WeightsLimits(max_model_bytes=10_000))
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    with pytest.raises(BundleFormatError):
        unpack_model(bytes(flipped))
    with pytest.raises(ConfigError):
        WeightsLimits(max_tensors=0)


def test_tensor_proto_parses_with_onnx() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(tensor_proto("w", onnx.TensorProto.FLOAT, [2, 3], values.tobytes()))
    assert tensor.name == "w" and list(tensor.dims) == [2, 3]
    assert np.array_equal(numpy_helper.to_array(tensor), values)


def test_weight_sharing_errors() -> None:
    with pytest.raises(ConfigError):
        WeightSharing(bits=9)
    tiny = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )  # fmt: skip
    with pytest.raises(CompressionError, match="no float weight tensor"):
        hc.compress(tiny, [WeightSharing()], measure=FAST)


def _decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load_model_from_string(unpack_model(data)).graph.initializer}


@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 256])
def test_range_coder_round_trips(density: float, k: int) -> None:
    rng = np.random.default_rng(k)
    dims = [37, 23]
    mask = rng.random(37 * 23) < density
    indices = rng.integers(0, k, int(mask.sum())).astype(np.uint8)
    stream = range_encode_tensor(dims, mask, indices, k)
    got_mask, got = range_decode_tensor(stream, dims, int(mask.sum()), k, sparse=True)
    assert np.array_equal(got_mask, mask) and np.array_equal(got, indices)
    dense = rng.integers(0, k, 50).astype(np.uint8)
    assert np.array_equal(
        range_decode_tensor(range_encode_tensor([50], None, dense, k), [50], 50, k, sparse=False)[1], dense
    )


def test_range_coding_beats_lzma_on_a_pruned_layer() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random(300 * 64) < 0.05
    indices = rng.integers(0, 16, int(mask.sum())).astype(np.uint8)
    coded = range_encode_tensor([300, 64], mask, indices, 16)
    import lzma

    from edge_sdk.bundle.weights import LZMA_FILTERS

    lz = lzma.compress(np.packbits(mask).tobytes() + indices.tobytes(), format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    assert len(coded) < 0.85 * len(lz)


def test_biases_and_per_layer_bits_are_shared_and_packed(mlp: bytes) -> None:
    model = _pruned(mlp, 0.9)
    names = [i.name for i in model.graph.initializer]
    step = WeightSharing(bits=4, min_params=256, bias_bits=3, layer_bits={"fc1.weight": 2}, float16_codebook=True)
    shared = onnx.load_model_from_string(hc.compress(model, [step], measure=FAST).model_bytes)
    values = {i.name: numpy_helper.to_array(i) for i in shared.graph.initializer}
    assert len(np.unique(values["fc1.weight"][values["fc1.weight"] != 0])) <= 4
    assert len(np.unique(values["fc0.bias"])) <= 8
    packed = pack_model(shared)
    assert set(packed.shared_tensors) == {n for n in names if values[n].size >= 16}
    assert all(t["codebook"] <= 2 + 2 * t["codebook_size"] for t in packed.breakdown["tensors"].values()), (
        "float16 codebooks"
    )
    got = _decode_tensors(packed.data)
    for name, array in values.items():
        assert np.array_equal(got[name], array)
    with pytest.raises(ConfigError):
        WeightSharing(layer_bits={"fc0.weight": 0})
    with pytest.raises(CompressionError, match="unknown"):
        hc.compress(model, [WeightSharing(layer_bits={"nope": 3})], measure=FAST)


def test_packed_file_refuses_old_format_trailing_bytes_and_huge_dims(mlp: bytes) -> None:
    import struct
    import zlib

    data = pack_model(_pruned(mlp, 0.9)).data
    with pytest.raises(BundleFormatError, match="format 1"):
        unpack_model(b"EDGEWTS1" + struct.pack("<I", 2) + b"{}")

    def sealed(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    with pytest.raises(BundleFormatError, match="after its last tensor"):
        unpack_model(sealed(data[:-4] + b"\0"))
    # a skeleton, then one tensor claiming 2**40 x 2**40 values: refused before decoding
    from edge_sdk.protowire import encode_varint

    skeleton_end = len(MAGIC) + 1
    hostile = bytearray(data[:skeleton_end])
    hostile += encode_varint(0) + encode_varint(0) + encode_varint(1)
    hostile += encode_varint(1) + b"w" + encode_varint(1) + encode_varint(2) + encode_varint(1 << 40) * 2
    with pytest.raises(BundleFormatError, match="limit"):
        unpack_model(sealed(bytes(hostile)))
