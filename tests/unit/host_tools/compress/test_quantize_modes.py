"""float16, 4-bit weight-only, the accuracy guard and recipes, on small real and generated models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from compress_data import FAST
from onnx import TensorProto, helper, numpy_helper

import host_tools.compress as hc
from edge_sdk.errors import CompressionError, ConfigError
from host_tools.compress import AccuracyGuard, Float16Conversion, Int4WeightOnlyQuantization


def _run(model: bytes | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with hc.evaluate.open_host_session(model) as session:
        return session.run({session.inputs()[0].name: x.astype(np.float32)})[0]


def test_fp16_halves_weights_and_keeps_float32_io(mlp: bytes, split: hc.DigitsSplit) -> None:
    result = hc.compress(mlp, [Float16Conversion()], evaluation=split.test, measure=FAST)
    model = onnx.load_model_from_string(result.model_bytes)
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert result.report.size_ratio > 1.9
    np.testing.assert_allclose(_run(result.model_bytes, split.x_test[:32]), _run(mlp, split.x_test[:32]), atol=2e-2)
    assert result.report.quality_drop <= 0.005


def test_int4_weight_only_makes_matmulnbits(mlp: bytes, split: hc.DigitsSplit) -> None:
    result = hc.compress(mlp, [Int4WeightOnlyQuantization()], evaluation=split.test, measure=FAST)
    model = onnx.load_model_from_string(result.model_bytes)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "MatMul" not in ops
    packed = [i for i in model.graph.initializer if i.data_type == TensorProto.UINT8]
    assert sum(int(np.prod(i.dims)) for i in packed) * 2 >= 64 * 128  # two 4-bit values per byte
    assert result.report.size_ratio > 3.0
    assert result.report.quality_drop <= 0.02


def test_int4_rejects_a_model_without_matmul() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompressionError, match=r"MatMul.*Relu"):
        hc.compress(model, [Int4WeightOnlyQuantization()], measure=FAST)
    with pytest.raises(ConfigError, match="block_size"):
        Int4WeightOnlyQuantization(block_size=24)


def test_guard_keeps_sensitive_nodes_float_until_the_budget_fits(mlp: bytes, split: hc.DigitsSplit) -> None:
    # Per-tensor asymmetric 4-bit blocks of 128 lose accuracy on this model; a zero budget
    # forces the guard to keep nodes in float and say which.
    inner = Int4WeightOnlyQuantization(block_size=128, symmetric=True)
    plain = hc.compress(mlp, [inner], evaluation=split.test, measure=FAST)
    guarded = hc.compress(mlp, [AccuracyGuard(inner, 0.0, max_float_fraction=1.0)], evaluation=split.test, measure=FAST)
    notes = guarded.report.steps[0].notes
    assert guarded.report.quality_drop <= 0.0
    model = onnx.load_model_from_string(guarded.model_bytes)
    float_matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert set(notes["float_nodes"]) == float_matmuls
    if plain.report.quality_drop > 0:
        assert notes["float_nodes"], "the guard had to keep something in float"
    assert notes["guard"]["attempts"][-1]["drop"] <= 0.0


def test_guard_errors_when_the_target_cannot_be_met(mlp: bytes, split: hc.DigitsSplit) -> None:
    inner = Int4WeightOnlyQuantization(block_size=128)
    impossible = AccuracyGuard(inner, 0.0, max_float_fraction=0.01)
    result = hc.compress(mlp, [inner], evaluation=split.test, measure=FAST)
    if result.report.quality_drop <= 0:
        pytest.skip("4-bit quantization happened to lose nothing on this model")
    with pytest.raises(CompressionError, match="cannot keep the quality drop"):
        hc.compress(mlp, [impossible], evaluation=split.test, measure=FAST)
    with pytest.raises(CompressionError, match="evaluation data"):
        hc.compress(mlp, [impossible], measure=FAST)


def test_node_sensitivity_ranks_the_damaged_layer_first(mlp: bytes, split: hc.DigitsSplit) -> None:
    reference = onnx.load_model_from_string(mlp)
    damaged = onnx.load_model_from_string(mlp)
    weight = next(i for i in damaged.graph.initializer if i.name == "fc1.weight")
    values = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array(np.round(values * 4) / 4, weight.name))  # coarse on fc1 only
    ranking = hc.node_sensitivity(reference, damaged, split.x_test[:64], ["fc0", "fc1", "fc2"])
    assert ranking[0][0] == "fc1"


def test_recipe_builds_guarded_and_plain_passes(tmp_path) -> None:
    text = (
        '[[step]]\npass = "lowrank"\nenergy = 0.95\n\n'
        '[[step]]\npass = "quantize"\nmode = "int8-static"\nmethod = "entropy"\nmax_accuracy_drop = 0.01\n\n'
        '[[step]]\npass = "quantize"\nmode = "int4-weight"\nblock_size = 64\n'
    )
    steps = hc.parse_recipe(text)
    assert isinstance(steps[0], hc.LowRankFactorization) and steps[0].energy == 0.95
    assert isinstance(steps[1], AccuracyGuard) and steps[1].inner.method == "entropy"
    assert isinstance(steps[2], Int4WeightOnlyQuantization) and steps[2].block_size == 64
    path = tmp_path / "r.toml"
    path.write_text(text)
    assert len(hc.load_recipe(path)) == 3
    with pytest.raises(ConfigError, match=r"step 1 .*unknown option"):
        hc.parse_recipe('[[step]]\npass = "lowrank"\nenergie = 0.9\n')
    with pytest.raises(ConfigError, match="unknown compression pass"):
        hc.parse_recipe('[[step]]\npass = "magic"\n')
    with pytest.raises(ConfigError, match="mode"):
        hc.parse_recipe('[[step]]\npass = "quantize"\nmode = "int3"\n')
    with pytest.raises(ConfigError, match="TOML"):
        hc.parse_recipe("[[step]\n")
    with pytest.raises(ConfigError, match="already registered"):
        hc.register_pass("quantize", lambda o: steps[0])


def _embedder(seed: int = 0) -> onnx.ModelProto:
    """A two-layer embedding model (16 -> 32 -> 24, no classes): what cosine quality is for."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(0, 0.3, (32, 24)).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="proj0"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "w1"], ["embedding"], name="proj1"),
    ]
    graph = helper.make_graph(
        nodes, "embedder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 24])], initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_cosine_quality_is_the_worst_sample(tmp_path) -> None:
    model = _embedder()
    x = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    data = hc.Dataset(x)
    quality = hc.Quality.for_model(model, data, "cosine")
    assert quality.metric == "cosine" and quality.of(model) == pytest.approx(1.0)
    bent = _embedder()
    w1 = numpy_helper.to_array(bent.graph.initializer[1]).copy()
    w1[:, 0] += 0.5  # pushes every embedding along one axis, some samples much more than others
    bent.graph.initializer[1].CopyFrom(numpy_helper.from_array(w1, "w1"))
    reference, moved = _run(model, x), _run(bent, x)
    expected = np.sum(reference * moved, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(moved, axis=1))
    assert quality.of(bent) == pytest.approx(float(expected.min()), abs=1e-5)
    assert quality.of(bent) < float(expected.mean())
    # The same scorer for outputs computed elsewhere (LiteRT), also over the first samples only.
    elsewhere = hc.Quality(reference, data, "cosine")
    assert elsewhere.score(moved) == pytest.approx(quality.of(bent))
    assert elsewhere.score(moved[:10]) == pytest.approx(float(expected[:10].min()), abs=1e-5)
    labelled = hc.Quality(reference, hc.Dataset(x, reference.argmax(1)))
    assert labelled.metric == "accuracy" and labelled.score(reference) == 1.0
    assert hc.Quality.for_model(model, data).metric == "agreement"
    with pytest.raises(ConfigError, match="labelled"):
        hc.Quality.for_model(model, data, "accuracy")
    with pytest.raises(ConfigError, match="unknown quality metric"):
        hc.Quality.for_model(model, data, "f1")


def test_guard_meets_a_cosine_budget_and_the_report_says_cosine() -> None:
    # 4-bit weights cost this model about 0.018 of worst-sample cosine; keeping either
    # MatMul in float brings it under 0.015 (0.006 or 0.012), so the guard keeps one.
    model = _embedder()
    data = hc.Dataset(np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32))
    inner = Int4WeightOnlyQuantization(block_size=16)
    plain = hc.compress(model, [inner], evaluation=data, measure=FAST, quality_metric="cosine")
    assert plain.report.final.quality_metric == "cosine" and plain.report.quality_drop > 0.015
    guarded = hc.compress(model, [AccuracyGuard(inner, 0.015)], evaluation=data, measure=FAST, quality_metric="cosine")
    assert guarded.report.quality_drop <= 0.015
    assert len(guarded.report.steps[0].notes["float_nodes"]) == 1
    assert [n.op_type for n in onnx.load_model_from_string(guarded.model_bytes).graph.node].count("MatMulNBits") == 1
    worst = hc.Quality.for_model(model, data, "cosine").of(guarded.model_bytes)
    assert worst == pytest.approx(guarded.report.final.quality) and worst >= 1 - 0.015


def test_cli_quality_cosine(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from host_tools.cli import cli

    (tmp_path / "e.onnx").write_bytes(_embedder().SerializeToString())
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(32, 16)).astype(np.float32))
    base = ["--home", str(tmp_path / "home"), "compress", str(tmp_path / "e.onnx"), "--quantize", "int8-dynamic"]
    out = tmp_path / "q.onnx"
    ok = CliRunner().invoke(cli, [*base, "-o", str(out), "--eval", str(tmp_path / "x.npy"), "--quality", "cosine"])
    assert ok.exit_code == 0, ok.output
    assert "cosine" in ok.stdout and out.exists()
    as_json = CliRunner().invoke(
        cli, [*base, "-o", str(out), "--eval", str(tmp_path / "x.npy"), "--quality", "cosine", "--json"]
    )
    final = json.loads(as_json.stdout)["report"]["final"]
    assert final["quality_metric"] == "cosine" and 0.99 < final["quality"] <= 1.0
    no_eval = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "n.onnx"), "--quality", "cosine"])
    assert no_eval.exit_code == 2 and "--eval" in no_eval.output
    no_labels = CliRunner().invoke(
        cli, [*base, "-o", str(tmp_path / "l.onnx"), "--eval", str(tmp_path / "x.npy"), "--quality", "accuracy"]
    )
    assert no_labels.exit_code != 0 and "labelled" in no_labels.output
    assert not (tmp_path / "n.onnx").exists() and not (tmp_path / "l.onnx").exists()


def _two_input_classifier() -> tuple[onnx.ModelProto, hc.Dataset]:
    """A classifier over two inputs (a float feature vector and a float mask) and data for it,
    labelled by the float model itself so that its accuracy is 100%."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (16, 5)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Mul", ["features", "mask"], ["masked"], name="mask"),
        helper.make_node("Concat", ["masked", "mask"], ["both"], name="concat", axis=1),
        helper.make_node("MatMul", ["both", "w"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], initializer=[w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    inputs = {"features": rng.normal(size=(200, 8)).astype(np.float32),
              "mask": (rng.random((200, 8)) > 0.3).astype(np.float32)}  # fmt: skip
    return model, hc.Dataset(inputs, hc.predict_classes(model, inputs))


def test_two_input_model_calibrates_evaluates_and_times() -> None:
    model, data = _two_input_classifier()
    assert hc.evaluate_accuracy(model, data) == 1.0
    result = hc.compress(model, [hc.StaticInt8Quantization()], calibration=data, evaluation=data)
    report = result.report
    assert report.final.quality_metric == "accuracy" and report.final.quality >= 0.9
    assert report.final.latency_p50_ms is not None and report.final.latency_p50_ms > 0
    assert "QuantizeLinear" in {n.op_type for n in onnx.load_model_from_string(result.model_bytes).graph.node}
    guarded = hc.compress(
        model, [AccuracyGuard(hc.DynamicInt8Quantization(), 0.0, max_float_fraction=1.0)], evaluation=data, measure=FAST
    )
    assert guarded.report.quality_drop <= 0.0


def test_two_input_model_refuses_data_that_does_not_name_its_inputs() -> None:
    model, data = _two_input_classifier()
    with pytest.raises(
        ConfigError, match=r"the data has inputs \['features', 'other'\], the model takes \['features', 'mask'\]"
    ):
        hc.evaluate_accuracy(model, hc.Dataset({"features": data.x["features"], "other": data.x["mask"]}, data.y))
    with pytest.raises(ConfigError, match="one array per input"):
        hc.evaluate_accuracy(model, hc.Dataset(data.x["features"], data.y))
    with pytest.raises(CompressionError, match=r"calibration data has inputs \['features'\], the model takes"):
        hc.compress(
            model, [hc.StaticInt8Quantization()], calibration=hc.Dataset({"features": data.x["features"]}), measure=FAST
        )
    with pytest.raises(CompressionError, match=r"x.NAME"):
        hc.compress(model, [hc.StaticInt8Quantization()], calibration=hc.Dataset(data.x["features"]), measure=FAST)


def test_guard_considers_only_the_nodes_quantization_changed() -> None:
    # Dynamic int8 quantizes a MatMul by a constant weight, not one between two activations.
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "ht"], ["scores"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes, "attention_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "N"])],
        initializer=[numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    quantized = (
        hc.DynamicInt8Quantization().run(onnx.ModelProto.FromString(model.SerializeToString()), hc.PassContext()).model
    )
    assert hc.quantized_nodes(model, quantized, ["proj", "scores"]) == ["proj"]
    static = hc.compress(
        model,
        [hc.StaticInt8Quantization()],
        calibration=hc.Dataset(rng.normal(size=(16, 8)).astype(np.float32)),
        measure=FAST,
    )
    assert "proj" in hc.quantized_nodes(model, onnx.load_model_from_string(static.model_bytes), ["proj"])


def test_measured_ranking_keeps_the_node_that_matters_for_the_metric() -> None:
    # On this model, keeping proj0 in float halves the 4-bit cosine loss (0.006 left) and
    # keeping proj1 does not (0.012): the measured ranking keeps proj0 alone for a 0.008 budget.
    model = _embedder()
    data = hc.Dataset(np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32))
    guard = AccuracyGuard(Int4WeightOnlyQuantization(block_size=16), 0.008, ranking="measured")
    result = hc.compress(model, [guard], evaluation=data, measure=FAST, quality_metric="cosine")
    notes = result.report.steps[0].notes
    assert notes["float_nodes"] == ["proj0"] and result.report.quality_drop <= 0.008
    measured = notes["guard"]["measured"]
    assert [m["node"] for m in measured] == ["proj0", "proj1"] and measured[0]["drop"] < measured[1]["drop"]
    with pytest.raises(ConfigError, match="ranking"):
        AccuracyGuard(Int4WeightOnlyQuantization(), 0.01, ranking="random")  # type: ignore[arg-type]


def test_guard_ranking_in_recipes_and_cli(tmp_path) -> None:
    from click.testing import CliRunner

    from host_tools.cli import cli

    steps = hc.parse_recipe(
        '[[step]]\npass = "quantize"\nmode = "int8-dynamic-per-channel"\n'
        'max_accuracy_drop = 0.01\nguard_ranking = "measured"\n'
    )
    assert steps[0].ranking == "measured" and steps[0].inner.per_channel
    with pytest.raises(ConfigError, match="guard_ranking needs max_accuracy_drop"):
        hc.parse_recipe('[[step]]\npass = "quantize"\nguard_ranking = "measured"\n')
    (tmp_path / "e.onnx").write_bytes(_embedder().SerializeToString())
    r = CliRunner().invoke(cli, ["--home", str(tmp_path), "compress", str(tmp_path / "e.onnx"),
                                 "-o", str(tmp_path / "o.onnx"), "--guard-ranking", "measured"])  # fmt: skip
    assert r.exit_code == 2 and "--guard-ranking needs --max-accuracy-drop" in r.output


def test_quantized_nodes_ignores_shape_gathers_and_float_nodes_reading_dequantized_activations() -> None:
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
        helper.make_node("Shape", ["y"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch_dim", axis=0),
    ]
    graph = helper.make_graph(
        nodes, "shape_gather", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("batch", TensorProto.INT64, [])],
        initializer=[numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w1"),
                     numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w2"),
                     numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calib = hc.Dataset(rng.normal(size=(16, 8)).astype(np.float32))
    static = hc.compress(model, [hc.StaticInt8Quantization(exclude_nodes=("mm2",))], calibration=calib, measure=FAST)
    assert hc.quantized_nodes(model, onnx.load_model_from_string(static.model_bytes), ["mm1", "mm2", "batch_dim"]) == [
        "mm1"
    ]
    dynamic = hc.compress(model, [hc.DynamicInt8Quantization()], measure=FAST)
    assert hc.quantized_nodes(model, onnx.load_model_from_string(dynamic.model_bytes), ["mm1", "mm2", "batch_dim"]) == [
        "mm1",
        "mm2",
    ]


def test_cli_choices_are_the_library_s() -> None:
    # The CLI spells them out (importing the library at CLI start-up would slow every command).
    from typing import get_args

    from host_tools.cli import compress
    from host_tools.compress.passes.accuracy_guard import Ranking

    choices = {p.name: tuple(p.type.choices) for p in compress.params if hasattr(p.type, "choices")}
    assert choices["quality_metric"] == hc.QUALITY_METRICS
    assert choices["guard_ranking"] == get_args(Ranking)
    from host_tools.compress.tflite.quantize import TFLITE_QUANTIZE_MODES

    quantize_help = next(p.help for p in compress.params if p.name == "quantize")
    assert all(mode in quantize_help for mode in [*hc.QUANTIZE_OPTIONS, *TFLITE_QUANTIZE_MODES])
