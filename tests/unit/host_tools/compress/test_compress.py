"""Unit tests for host_tools.compress: digits model, passes, quantization, model files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import host_tools.compress as hc
from edge_sdk.errors import CompressionError, ConfigError, ModelLoadError, StorageError
from host_tools.compress import (
    CompressionReport,
    Dataset,
    DynamicInt8Quantization,
    MeasureOptions,
    PassContext,
    PassManager,
    PassResult,
    StaticInt8Quantization,
)

FAST = MeasureOptions(latency_runs=5, latency_warmup=1)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_bytes(split: hc.DigitsSplit) -> bytes:
    return hc.train_digits_mlp(split, seed=0)


@pytest.fixture(scope="module")
def float_accuracy(float_bytes: bytes, split: hc.DigitsSplit) -> float:
    return hc.evaluate_accuracy(float_bytes, split.test)


@pytest.fixture(scope="module")
def static_result(float_bytes: bytes, split: hc.DigitsSplit) -> hc.CompressionResult:
    return hc.compress(
        float_bytes, [StaticInt8Quantization()], calibration=split.train, evaluation=split.test, measure=FAST
    )


class _Raises:
    name = "explodes"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise ValueError("boom")


class _Breaks:
    """Returns a model whose only node reads a tensor that does not exist."""

    name = "breaks-graph"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        model.graph.node[0].input[0] = "no_such_tensor"
        return PassResult(model, changed=True)


class _Identity:
    name = "identity"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        return PassResult(model, changed=False)


# --- digits model ----------------------------------------------------------------------


def test_digits_split_shapes(split: hc.DigitsSplit) -> None:
    assert split.x_train.dtype == np.float32 and split.x_train.shape[1] == 64
    assert split.y_train.dtype == np.int64
    assert len(split.x_train) + len(split.x_test) == 1797
    assert split.x_train.min() >= 0.0 and split.x_train.max() <= 1.0
    # stratified: every class in the test part in about the same share as overall
    counts = np.bincount(split.y_test, minlength=10)
    assert counts.min() >= 40


def test_digits_mlp_accuracy_and_graph(float_bytes: bytes, float_accuracy: float) -> None:
    assert float_accuracy >= 0.95
    model = onnx.load_model_from_string(float_bytes)
    graph = model.graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 64
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10
    assert [n.op_type for n in graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]


def test_mlp_export_reproduces_sklearn(split: hc.DigitsSplit) -> None:
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=300, random_state=1)
    clf.fit(split.x_train, split.y_train)
    model = hc.mlp_to_onnx(clf)
    predictions = hc.predict_classes(model, split.x_test)
    np.testing.assert_array_equal(predictions, clf.predict(split.x_test))
    # logits, through a softmax, are sklearn's probabilities
    from host_tools.compress.evaluate import open_host_session, run_batched

    with open_host_session(model) as session:
        logits = run_batched(session, split.x_test, 256)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, clf.predict_proba(split.x_test), atol=1e-4)


# --- static int8 -----------------------------------------------------------------------


def test_static_int8_is_qdq_with_int8_weights(static_result: hc.CompressionResult) -> None:
    model = onnx.load_model_from_string(static_result.model_bytes)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "Gemm" in ops  # QDQ keeps the float op between DQ and Q
    inits = {i.name: i for i in model.graph.initializer}
    weights = [i for i in model.graph.initializer if len(i.dims) >= 2]
    assert len(weights) == 3
    assert all(w.data_type == TensorProto.INT8 for w in weights), [
        TensorProto.DataType.Name(w.data_type) for w in weights
    ]
    # every weight is dequantized per channel: one scale per output row
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(inits[node.input[0]].dims) >= 2:
            scale = inits[node.input[1]]
            assert list(scale.dims) == [inits[node.input[0]].dims[0]]
            zero_point = onnx.numpy_helper.to_array(inits[node.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric


def test_static_int8_size_and_accuracy(
    static_result: hc.CompressionResult, float_bytes: bytes, float_accuracy: float, split: hc.DigitsSplit
) -> None:
    report = static_result.report
    assert report.original.size_bytes == len(float_bytes)
    assert len(float_bytes) >= 3 * len(static_result.model_bytes)
    assert report.size_ratio >= 3.0
    accuracy = hc.evaluate_accuracy(static_result.model_bytes, split.test)  # runs in onnxruntime
    assert accuracy >= float_accuracy - 0.01
    assert report.final.quality == pytest.approx(accuracy)
    assert report.original.quality == pytest.approx(float_accuracy)
    assert report.quality_drop is not None and report.quality_drop <= 0.01
    step = report.steps[0]
    assert step.name == "int8-static" and step.changed
    assert step.notes["int8_weights"] == 3 and step.notes["calibration_samples"] == 1024
    assert step.metrics.latency_p50_ms is not None and step.metrics.latency_p50_ms > 0


def test_report_is_json_ready(static_result: hc.CompressionResult) -> None:
    data = json.loads(json.dumps(static_result.report.to_dict()))
    assert data["schema_version"] == CompressionReport.SCHEMA_VERSION
    assert data["steps"][0]["name"] == "int8-static"
    assert data["final"]["quality_metric"] == "accuracy"
    assert data["original"]["sparsity"] == 0.0


def test_static_int8_wrong_shape_calibration_names_input(float_bytes: bytes, split: hc.DigitsSplit) -> None:
    bad = Dataset(split.x_train[:, :32])
    with pytest.raises(CompressionError) as info:
        hc.compress(float_bytes, [StaticInt8Quantization()], calibration=bad, measure=FAST)
    message = str(info.value)
    assert "'input'" in message and "[1347, 32]" in message and "64" in message
    assert info.value.details["input"] == "input"
    assert info.value.details["step"] == "int8-static"


def test_static_int8_missing_calibration(float_bytes: bytes) -> None:
    model = onnx.load_model_from_string(float_bytes)
    with pytest.raises(CompressionError, match="calibration data"):
        StaticInt8Quantization().run(model, PassContext())


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_static_int8_histogram_methods_keep_stdout_clean(
    method: str, float_bytes: bytes, split: hc.DigitsSplit, capsys: pytest.CaptureFixture[str]
) -> None:
    model = onnx.load_model_from_string(float_bytes)
    ctx = PassContext(calibration=Dataset(split.x_train[:256]))
    result = StaticInt8Quantization(method=method).run(model, ctx)
    assert result.changed and hc.evaluate_accuracy(result.model, split.test) >= 0.95
    assert capsys.readouterr().out == ""


def test_onnxruntime_root_logging_is_routed(float_bytes: bytes, split: hc.DigitsSplit) -> None:
    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    seen: list[logging.LogRecord] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    spy = Spy(level=logging.DEBUG)
    root.addHandler(spy)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        StaticInt8Quantization().run(onnx.load_model_from_string(float_bytes), PassContext(calibration=split.train))
    finally:
        root.removeHandler(spy)
        root.setLevel(old_level)
    assert root.handlers == handlers and root.filters == filters
    assert not [r for r in seen if r.name == "root"], "onnxruntime logged on the root logger"


def test_invalid_static_options() -> None:
    with pytest.raises(ConfigError):
        StaticInt8Quantization(method="kl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StaticInt8Quantization(calibration_batch_size=0)


# --- dynamic int8 ----------------------------------------------------------------------


def test_dynamic_int8_runs_and_is_smaller(float_bytes: bytes, float_accuracy: float, split: hc.DigitsSplit) -> None:
    result = hc.compress(float_bytes, [DynamicInt8Quantization()], evaluation=split.test, measure=FAST)
    assert len(result.model_bytes) * 3 <= len(float_bytes)
    model = onnx.load_model_from_string(result.model_bytes)
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    assert hc.evaluate_accuracy(result.model_bytes, split.test) >= float_accuracy - 0.01
    assert result.report.steps[0].notes["gemms_decomposed"] == 3


def test_decompose_gemm_is_exact(float_bytes: bytes, split: hc.DigitsSplit) -> None:
    model = onnx.load_model_from_string(float_bytes)
    result = hc.DecomposeGemm().run(model, PassContext())
    assert result.changed and "Gemm" not in {n.op_type for n in result.model.graph.node}
    np.testing.assert_array_equal(
        hc.predict_classes(result.model, split.x_test), hc.predict_classes(float_bytes, split.x_test)
    )


# --- pass manager ----------------------------------------------------------------------


def test_pass_manager_names_failing_step(float_bytes: bytes) -> None:
    manager = PassManager([_Identity(), _Raises()], measure=MeasureOptions(latency=False))
    with pytest.raises(CompressionError) as info:
        manager.run(onnx.load_model_from_string(float_bytes))
    assert "explodes" in str(info.value) and "step 2" in str(info.value) and "boom" in str(info.value)
    assert info.value.details == {"step": "explodes", "step_index": 1}
    assert isinstance(info.value.__cause__, ValueError)


def test_pass_manager_rejects_broken_output(float_bytes: bytes) -> None:
    with pytest.raises(CompressionError) as info:
        PassManager([_Breaks()], measure=FAST).run(onnx.load_model_from_string(float_bytes))
    assert "breaks-graph" in str(info.value) and info.value.details["step"] == "breaks-graph"


def test_pass_manager_keeps_caller_model_and_reports_progress(float_bytes: bytes, split: hc.DigitsSplit) -> None:
    model = onnx.load_model_from_string(float_bytes)
    before = model.SerializeToString()
    events: list[hc.ProgressEvent] = []
    result = hc.compress(
        model,
        [hc.DecomposeGemm(), _Identity()],
        evaluation=Dataset(split.x_test),  # unlabelled: agreement with the original
        progress=events.append,
        measure=FAST,
    )
    assert model.SerializeToString() == before
    report = result.report
    assert report.original.quality_metric == "agreement" and report.original.quality == 1.0
    assert report.steps[0].metrics.quality == 1.0
    assert not report.steps[1].changed and report.steps[1].metrics == report.steps[0].metrics
    assert {(e.step, e.phase) for e in events} >= {("decompose-gemm", "run"), ("identity", "run"), ("final", "done")}


def test_pass_manager_rejects_non_pass() -> None:
    with pytest.raises(ConfigError):
        PassManager([object()])  # type: ignore[list-item]


# --- evaluation ----------------------------------------------------------------------


def test_metrics_of_float_model(float_bytes: bytes) -> None:
    assert hc.model_size_bytes(float_bytes) == len(float_bytes)
    assert hc.count_parameters(float_bytes) == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert hc.measure_sparsity(float_bytes) == 0.0
    assert hc.host_latency_ms(float_bytes, runs=3, warmup=1) > 0


def test_measure_sparsity_counts_zero_weights() -> None:
    weight = np.zeros((4, 4), dtype=np.float32)
    weight[0, :] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")],
    )
    assert hc.measure_sparsity(helper.make_model(graph)) == pytest.approx(0.75)


def test_accuracy_needs_labels(float_bytes: bytes, split: hc.DigitsSplit) -> None:
    with pytest.raises(ConfigError):
        hc.evaluate_accuracy(float_bytes, Dataset(split.x_test))


# --- model files -----------------------------------------------------------------------


def test_load_model_garbage_names_file(tmp_path: Path) -> None:
    for name, data in [("garbage.onnx", os.urandom(256)), ("text.onnx", b"definitely not a model\n")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelLoadError) as info:
            hc.load_model(path)
        assert str(path) in str(info.value) and info.value.details["file"] == str(path)


def test_load_model_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.onnx"
    with pytest.raises(ModelLoadError, match=r"absent.onnx"):
        hc.load_model(path)


def test_compress_from_garbage_path_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError, match=r"bad.onnx"):
        hc.compress(path, [])


def test_save_and_load_round_trip(tmp_path: Path, float_bytes: bytes) -> None:
    target = tmp_path / "model.onnx"
    hc.save_model_atomic(float_bytes, target)
    assert target.read_bytes() == float_bytes
    assert os.listdir(tmp_path) == ["model.onnx"]
    assert hc.load_model(target).SerializeToString() == onnx.load_model_from_string(float_bytes).SerializeToString()


def test_save_model_atomic_missing_dir(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "model.onnx"
    with pytest.raises(StorageError, match=r"model.onnx"):
        hc.save_model_atomic(b"abc", target)
    assert not target.exists() and os.listdir(tmp_path) == []


def test_save_model_atomic_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StorageError):
        hc.save_model_atomic(b"new", target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


# --- CLI option parsing and public surface ---------------------------------------------


def test_parse_quantize_option() -> None:
    assert isinstance(hc.parse_quantize_option("int8-static"), StaticInt8Quantization)
    assert isinstance(hc.parse_quantize_option(" INT8_dynamic "), DynamicInt8Quantization)
    entropy = hc.parse_quantize_option("int8-static-entropy")
    assert isinstance(entropy, StaticInt8Quantization) and entropy.method == "entropy"
    with pytest.raises(ConfigError, match="int8-static"):
        hc.parse_quantize_option("int3")


def test_public_names() -> None:
    assert sorted(hc.__all__) == sorted(
        [
            "compress", "load_model", "model_from_bytes", "save_model_atomic",
            "CompressJob", "CompressJobResult", "PackedFile", "run_compress_job", "StepOptions", "passes_from_options",
            "CompressionPass", "PassContext", "PassResult", "PassManager", "ProgressEvent",
            "ProgressCallback", "MeasureOptions",
            "CompressionResult", "CompressionReport", "StepReport", "ModelMetrics",
            "StaticInt8Quantization", "DynamicInt8Quantization", "DecomposeGemm",
            "parse_quantize_option", "QUANTIZE_OPTIONS",
            "Dataset", "DigitsSplit", "load_digits_split", "load_arrays",
            "evaluate_accuracy", "predict_classes", "top1_agreement", "model_size_bytes", "Quality", "QUALITY_METRICS",
            "check_metric", "cosine_similarities",
            "count_parameters", "measure_sparsity", "host_latency_ms",
            "train_digits_mlp", "mlp_to_onnx",
            "Float16Conversion", "Int4WeightOnlyQuantization", "AccuracyGuard", "node_sensitivity", "quantized_nodes",
            "LowRankFactorization", "WeightSharing", "PackedModel", "pack_model",
            "PASS_REGISTRY", "register_pass", "build_pass", "parse_recipe", "load_recipe",
            "quantize_modes", "train_digits_cnn",
            "MagnitudePruning", "SensitivityPruning", "ChannelPruning", "FineTune", "Distillation",
            "MlpStudent", "parse_student", "TrainingOptions", "WeightLayer", "find_layers",
            "weight_sparsity", "teacher_logits", "train_module", "finetune_module", "graph_module",
            "module_to_onnx",
        ]
    )  # fmt: skip
    for name in hc.__all__:
        assert hasattr(hc, name), name
