"""Sparse execution in onnxruntime equals the dense model; the host-side split; selection logic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sparse_models import mlp, pruned

from edge_sdk.bundle import FileEntry, Manifest, file_sha256
from edge_sdk.bundle.sparse import decode_sparse_weights, dense_model, encode_sparse_weights
from edge_sdk.errors import CompressionError, EdgeError, ModelError, ModelLoadError
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.runtime import open_session, open_sparse_session
from host_tools.compress.sparse_pack import sparsify, write_sparse_files


def _split(model: onnx.ModelProto, int8: bool = False):
    pack = sparsify(model, min_sparsity=0.3)
    weights = decode_sparse_weights(encode_sparse_weights(pack.matrices, int8_values=int8))
    return pack, weights


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
@pytest.mark.parametrize(("dims", "gemm", "trans_b"), [([64, 96, 10], False, False), ([33, 17, 50, 3], True, False), ([40, 24, 8], True, True)])
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
    dense = dense_model(pack.dense_graph.SerializeToString(), weights, {l.tensor: l.transposed for l in pack.layers})
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
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w_dense, "Wd"), numpy_helper.from_array(w_shared, "Ws"),
         numpy_helper.from_array(w_3d, "W3"), numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompressionError) as info:
        sparsify(model)
    skipped = info.value.details["skipped"]
    assert "below" in skipped["dense"] and "shared" in skipped["shared1"] and "2-D" in skipped["rank3"]


# --- selection -----------------------------------------------------------------------

from device_agent.selection import CandidateTiming, choose, select_execution  # noqa: E402


def test_choose_takes_the_fastest_that_ran():
    timings = [CandidateTiming("dense", 2.0), CandidateTiming("sparse", 1.0), CandidateTiming("x", error="boom")]
    assert choose(timings)[0] == "sparse"
    assert choose([CandidateTiming("dense", 2.0), CandidateTiming("sparse", error="no kernel")])[0] == "dense"
    with pytest.raises(EdgeError, match="no kernel"):
        choose([CandidateTiming("sparse", error="no kernel")])


def _bundle_dir(tmp_path: Path, execution: str | None = None) -> tuple[Path, Manifest]:
    pack = sparsify(mlp([64, 128, 10], 0.9))
    model_path, files, spec = write_sparse_files(pack, tmp_path, "m")
    entries = []
    for p in (model_path, *files.values()):
        digest, size = file_sha256(p)
        entries.append(FileEntry(p.name, size, digest))
    manifest = Manifest("m", 1, 0.0, 10.0, "onnxruntime", model_path.name, tuple(entries), sparse=spec, execution=execution)
    return tmp_path, manifest


SPEC = BenchmarkSpec(runs=12, warmup=2)


def test_selection_measures_both_and_picks_the_minimum(tmp_path):
    payload, manifest = _bundle_dir(tmp_path)
    choice, opener = select_execution(payload, manifest, SPEC)
    by_name = {c.name: c for c in choice.candidates}
    assert set(by_name) == {"dense", "sparse"} and choice.pinned_by is None
    assert all(c.error is None and c.runs >= 12 for c in by_name.values())
    assert choice.chosen == min(by_name.values(), key=lambda c: c.p50_ms).name
    json.dumps(choice.to_dict())
    with opener(__import__("edge_sdk.runtime", fromlist=["SessionOptions"]).SessionOptions()) as session:
        assert session.run({"x": np.ones((1, 64), np.float32)})[0].shape == (1, 10)


@pytest.mark.parametrize(("manifest_pin", "config_pin", "want", "by"), [
    ("dense", "auto", "dense", "manifest"),
    ("sparse", "auto", "sparse", "manifest"),
    ("sparse", "dense", "dense", "config"),
    (None, "sparse", "sparse", "config"),
])
def test_pins_skip_the_measurement(tmp_path, manifest_pin, config_pin, want, by):
    payload, manifest = _bundle_dir(tmp_path, manifest_pin)
    choice, _ = select_execution(payload, manifest, SPEC, config_pin)
    assert (choice.chosen, choice.pinned_by, choice.candidates) == (want, by, ())


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
