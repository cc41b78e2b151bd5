"""Sparse and dense int8 executions agree with the dense model; the host-side split; selection logic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sparse_models import mlp, pruned

from edge_sdk.bundle import FileEntry, Manifest, file_sha256
from edge_sdk.bundle.sparse import decode_sparse_weights, dense_int8_model, dense_model, encode_sparse_weights
from edge_sdk.errors import BundleFormatError, CompressionError, EdgeError, ModelError, ModelLoadError
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.runtime import SessionOptions, open_session, open_sparse_session
from host_tools.compress.sparse_pack import sparsify, write_sparse_files


def _split(model: onnx.ModelProto, int8: bool = False):
    pack = sparsify(model, min_sparsity=0.3)
    weights = decode_sparse_weights(encode_sparse_weights(pack.matrices, int8_values=int8))
    return pack, weights


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
@pytest.mark.parametrize(
    ("dims", "gemm", "trans_b"),
    [([64, 96, 10], False, False), ([33, 17, 50, 3], True, False), ([40, 24, 8], True, True)],
)
@pytest.mark.parametrize("batch", [1, 8])
def test_sparse_and_rebuilt_dense_equal_the_original(sparsity, dims, gemm, trans_b, batch):
    model = mlp(dims, sparsity, seed=batch, gemm=gemm, trans_b=trans_b)
    pack, weights = _split(model)
    assert len(pack.layers) == len(dims) - 1 and not pack.skipped
    x = np.random.default_rng(0).standard_normal((batch, dims[0])).astype(np.float32)
    want = open_session(model.SerializeToString(), "onnxruntime").run({"x": x})[0]
    with open_sparse_session(pack.sparse_graph.SerializeToString(), weights) as s:
        assert [i.name for i in s.inputs()] == ["x"]
        got = s.run({"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    dense = dense_model(
        pack.dense_graph.SerializeToString(), weights, {layer.tensor: layer.transposed for layer in pack.layers}
    )
    np.testing.assert_allclose(open_session(dense, "onnxruntime").run({"x": x})[0], want, rtol=1e-5, atol=1e-6)


def test_int8_values_stay_close_to_the_float_model():
    model = mlp([128, 64, 10], 0.9)
    pack, weights = _split(model, int8=True)
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    want = open_session(model.SerializeToString(), "onnxruntime").run({"x": x})[0]
    got = open_sparse_session(pack.sparse_graph.SerializeToString(), weights).run({"x": x})[0]
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_weights_that_do_not_match_the_graph_are_refused():
    pack, weights = _split(mlp([16, 8, 4], 0.5))
    with pytest.raises(ModelLoadError, match="do not match"):
        open_sparse_session(pack.sparse_graph.SerializeToString(), {"W0": weights["W0"]})
    wrong = dict(weights)
    wrong["W0"] = decode_sparse_weights(encode_sparse_weights([pack.matrices[1]]))["W1"]
    object.__setattr__(wrong["W0"], "name", "W0")
    with pytest.raises(ModelError, match="inner dimension"):  # the graph's sparse inputs are shapeless
        open_sparse_session(pack.sparse_graph.SerializeToString(), wrong).run({"x": np.ones((1, 16), np.float32)})


def test_sparsify_says_why_layers_stay_dense():
    rng = np.random.default_rng(2)
    w_dense = rng.standard_normal((8, 8)).astype(np.float32)
    w_shared = pruned(rng, (8, 8), 0.9)
    w_3d = pruned(rng, (8, 8), 0.9)
    nodes = [
        helper.make_node("MatMul", ["x", "Wd"], ["a"], name="dense"),
        helper.make_node("MatMul", ["a", "Ws"], ["b"], name="shared1"),
        helper.make_node("MatMul", ["b", "Ws"], ["c"], name="shared2"),
        helper.make_node("Unsqueeze", ["c", "axes"], ["c3"]),
        helper.make_node("MatMul", ["c3", "W3"], ["y"], name="rank3"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w_dense, "Wd"),
            numpy_helper.from_array(w_shared, "Ws"),
            numpy_helper.from_array(w_3d, "W3"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompressionError) as info:
        sparsify(model)
    skipped = info.value.details["skipped"]
    assert "below" in skipped["dense"] and "shared" in skipped["shared1"] and "2-D" in skipped["rank3"]


# --- dense int8 ----------------------------------------------------------------------


def _int8_parts(model: onnx.ModelProto):
    pack, weights = _split(model, int8=True)
    return pack.dense_graph, weights, {layer.tensor: layer.transposed for layer in pack.layers}


@pytest.mark.parametrize(
    ("dims", "gemm", "trans_b"),
    [([64, 96, 10], False, False), ([33, 17, 50, 3], True, False), ([40, 24, 8], True, True)],
)
@pytest.mark.parametrize("batch", [1, 8])
def test_dense_int8_model_is_close_to_the_dense_fp32_model(dims, gemm, trans_b, batch):
    skeleton, weights, transposed = _int8_parts(mlp(dims, 0.8, seed=batch, gemm=gemm, trans_b=trans_b))
    x = np.random.default_rng(3).standard_normal((batch, dims[0])).astype(np.float32)
    want = open_session(dense_model(skeleton.SerializeToString(), weights, transposed), "onnxruntime").run({"x": x})[0]
    data = dense_int8_model(skeleton.SerializeToString(), weights, transposed)
    with open_session(data, "onnxruntime") as session:
        assert session.precision == "int8" and [i.name for i in session.inputs()] == ["x"]
        got = session.run({"x": x})[0]
    assert got.shape == want.shape == (batch, dims[-1])
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    model = onnx.load_from_string(data)
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in model.graph.node) == len(dims) - 1
    assert not any(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)
    w0 = next(i for i in model.graph.initializer if i.name == "W0")
    assert w0.data_type == TensorProto.UINT8 and list(w0.dims) == dims[:2]  # [in, out]: the stored matrix transposed


def test_dense_int8_weights_are_the_files_int8_values_not_requantized():
    skeleton, weights, transposed = _int8_parts(mlp([16, 8], 0.5, gemm=True))
    model = onnx.load_from_string(dense_int8_model(skeleton.SerializeToString(), weights, transposed))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = weights["W0"]  # stored [out, in]; per-row scales are per output column of B
    np.testing.assert_array_equal((init["W0"].astype(np.int16) - 128).T * w.row_scales[:, None], w.to_dense())
    np.testing.assert_array_equal(init["W0__scale"], w.row_scales)
    assert init["W0__zero_point"].shape == () and init["W0__zero_point"] == 128


def test_dense_int8_model_refuses_float_values_and_skeletons_that_do_not_match():
    model = mlp([32, 16, 4], 0.8, gemm=True)
    skeleton, weights, transposed = _int8_parts(model)
    data = skeleton.SerializeToString()
    _, float_weights = _split(model)
    with pytest.raises(BundleFormatError, match="float32"):
        dense_int8_model(data, float_weights, transposed)
    with pytest.raises(BundleFormatError, match="transposed"):
        dense_int8_model(data, weights, {name: not t for name, t in transposed.items()})
    with pytest.raises(BundleFormatError, match="not a usable ONNX model"):
        dense_int8_model(data[: len(data) // 2], weights, transposed)
    with pytest.raises(BundleFormatError, match="0 times"):  # a weight no node reads
        dense_int8_model(data, {**weights, "W9": weights["W0"]}, transposed)
    shared = onnx.ModelProto()
    shared.CopyFrom(skeleton)
    shared.graph.node.append(helper.make_node("Identity", ["W0"], ["w0_copy"]))
    with pytest.raises(BundleFormatError, match="2 times"):
        dense_int8_model(shared.SerializeToString(), weights, transposed)
    scaled = onnx.ModelProto()
    scaled.CopyFrom(skeleton)
    scaled.graph.node[0].attribute.append(helper.make_attribute("alpha", 2.0))
    with pytest.raises(BundleFormatError, match="alpha"):
        dense_int8_model(scaled.SerializeToString(), weights, transposed)
    clash = onnx.ModelProto()
    clash.CopyFrom(skeleton)
    clash.graph.node.append(helper.make_node("Identity", ["y"], ["W1__scale"]))
    with pytest.raises(BundleFormatError, match="already uses"):
        dense_int8_model(clash.SerializeToString(), weights, transposed)


# --- selection -----------------------------------------------------------------------

from device_agent.selection import CandidateTiming, agreement, choose, select_execution  # noqa: E402


def test_choose_takes_the_fastest_that_ran():
    timings = [CandidateTiming("dense", 2.0), CandidateTiming("sparse", 1.0), CandidateTiming("x", error="boom")]
    assert choose(timings)[0] == "sparse"
    assert choose([CandidateTiming("dense", 2.0), CandidateTiming("sparse", error="no kernel")])[0] == "dense"
    assert (
        choose([CandidateTiming("dense_int8", 0.5), CandidateTiming("sparse_int8", not_applicable="no kernel")])[0]
        == "dense_int8"
    )
    with pytest.raises(EdgeError, match="no kernel"):
        choose([CandidateTiming("sparse", error="no kernel")])


def test_agreement_allows_the_tolerance_and_no_more():
    ref = [np.array([[1.0, -2.0]], np.float32), np.array([1], np.int64)]
    # Differences count against the largest magnitude of the reference (2 here).
    assert agreement(ref, [ref[0] + 0.019, np.array([0], np.int64)], 0.01) is None  # labels may flip
    assert "by 1.50% of their size (limit 1.00%)" in agreement(ref, [ref[0] + 0.03, ref[1]], 0.01)
    assert "shape" in agreement(ref, [ref[0].T, ref[1]], 0.5)
    assert "outputs" in agreement(ref, ref[:1], 0.5)
    assert agreement(ref, [ref[0] * np.nan, ref[1]], 0.5) is not None


def _bundle_dir(tmp_path: Path, execution: str | None = None, int8: bool = False) -> tuple[Path, Manifest]:
    pack = sparsify(mlp([64, 128, 10], 0.9))
    model_path, files, spec = write_sparse_files(pack, tmp_path, "m", int8_values=int8)
    entries = []
    for p in (model_path, *files.values()):
        digest, size = file_sha256(p)
        entries.append(FileEntry(p.name, size, digest))
    manifest = Manifest(
        "m", 1, 0.0, 10.0, "onnxruntime", model_path.name, tuple(entries), sparse=spec, execution=execution
    )
    return tmp_path, manifest


SPEC = BenchmarkSpec(runs=12, warmup=2)


@pytest.mark.parametrize("int8", [False, True])
def test_selection_measures_every_candidate_that_applies_and_picks_the_minimum(tmp_path, int8):
    payload, manifest = _bundle_dir(tmp_path, int8=int8)
    choice, opener = select_execution(payload, manifest, SPEC)
    by_name = {c.name: c for c in choice.candidates}
    assert list(by_name) == ["dense", "dense_int8", "sparse", "sparse_int8"] and choice.pinned_by is None
    measured = {"dense", "sparse", "dense_int8"} if int8 else {"dense", "sparse"}
    assert all(by_name[n].error is None and by_name[n].runs >= 12 for n in measured)
    assert choice.chosen == min((by_name[n] for n in measured), key=lambda c: c.p50_ms).name
    assert "no int8 kernel" in by_name["sparse_int8"].not_applicable and by_name["sparse_int8"].p50_ms is None
    if not int8:
        assert "--sparse-int8" in by_name["dense_int8"].not_applicable and by_name["dense_int8"].runs == 0
    assert json.loads(json.dumps(choice.to_dict()))["candidates"][3]["not_applicable"]
    with opener(SessionOptions()) as session:
        assert session.run({"x": np.ones((1, 64), np.float32)})[0].shape == (1, 10)


@pytest.mark.parametrize(
    ("manifest_pin", "config_pin", "want", "by"),
    [
        ("dense", "auto", "dense", "manifest"),
        ("sparse", "auto", "sparse", "manifest"),
        ("dense_int8", "auto", "dense_int8", "manifest"),
        ("sparse", "dense", "dense", "config"),
        ("sparse", "dense_int8", "dense_int8", "config"),
        (None, "sparse", "sparse", "config"),
    ],
)
def test_pins_skip_the_measurement(tmp_path, manifest_pin, config_pin, want, by):
    payload, manifest = _bundle_dir(tmp_path, manifest_pin, int8=True)
    choice, opener = select_execution(payload, manifest, SPEC, config_pin)
    assert (choice.chosen, choice.pinned_by, choice.candidates) == (want, by, ())
    with opener(SessionOptions()) as session:
        assert session.precision == ("int8" if want == "dense_int8" else "fp32")


def test_a_dense_int8_pin_on_float_values_falls_back_and_says_why(tmp_path):
    payload, manifest = _bundle_dir(tmp_path)
    choice, _ = select_execution(payload, manifest, SPEC, "dense_int8")
    assert choice.chosen == "dense" and choice.pinned_by == "config"
    assert "cannot run here" in choice.reason and "float32" in choice.reason


def test_a_candidate_whose_outputs_disagree_is_never_chosen(tmp_path, monkeypatch):
    import device_agent.selection as selection

    monkeypatch.setattr(selection, "TOLERANCE", {"dense_int8": 0.0, "sparse": 1e-3})
    payload, manifest = _bundle_dir(tmp_path, int8=True)
    choice, _ = select_execution(payload, manifest, SPEC)
    int8 = next(c for c in choice.candidates if c.name == "dense_int8")
    assert "differ from the dense execution" in int8.error and int8.p50_ms is None
    assert choice.chosen in ("dense", "sparse") and "dense_int8 could not run" in choice.reason


def test_weights_that_are_not_what_the_manifest_says_are_refused(tmp_path):
    payload, manifest = _bundle_dir(tmp_path, int8=True)
    (payload / manifest.sparse.weights).write_bytes(encode_sparse_weights(sparsify(mlp([64, 128, 10], 0.9)).matrices))
    with pytest.raises(BundleFormatError, match="int8 values"):
        select_execution(payload, manifest, SPEC)


def test_sparse_that_cannot_run_falls_back_to_dense_and_says_why(tmp_path):
    payload, manifest = _bundle_dir(tmp_path)
    # A sparse graph whose weights do not fit it (as an onnxruntime without the kernel would refuse it).
    (payload / manifest.model).write_bytes((payload / manifest.sparse.dense_model).read_bytes())
    choice, _ = select_execution(payload, manifest, SPEC)
    assert choice.chosen == "dense"
    sparse = next(c for c in choice.candidates if c.name == "sparse")
    assert sparse.error and sparse.p50_ms is None and "sparse could not run" in choice.reason
    pinned, _ = select_execution(payload, manifest, SPEC, "sparse")
    assert pinned.chosen == "dense" and "cannot run here" in pinned.reason
