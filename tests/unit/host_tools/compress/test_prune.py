"""Unstructured and structured pruning: the weights really change as claimed, the models still run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from compress_data import run_model
from prune_models import cnn, mlp, residual, weights

import host_tools.compress as hc
from edge_sdk.errors import CompressionError, ConfigError
from host_tools.compress import ChannelPruning, Dataset, MagnitudePruning, PassContext, SensitivityPruning


@pytest.fixture(scope="module")
def digits_cnn(split: hc.DigitsSplit) -> bytes:
    return hc.train_digits_cnn(split, epochs=1)  # only the shapes matter here


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _zeros(values: np.ndarray) -> float:
    return float(np.mean(values == 0))


# --- unstructured ------------------------------------------------------------------------


def test_global_magnitude_pruning_hits_the_target_and_zeroes_the_smallest() -> None:
    original = mlp()
    result = MagnitudePruning(0.7).run(_copy(original), PassContext())
    before, after = weights(original), weights(result.model)
    layer_weights = ["w0", "w1", "w2"]
    total = sum(after[n].size for n in layer_weights)
    zeros = sum(int(np.count_nonzero(after[n] == 0)) for n in layer_weights)
    assert zeros == int(np.ceil(0.7 * total))
    assert result.notes["sparsity"] == pytest.approx(0.7, abs=1e-3)
    # one threshold: every kept weight is at least as large as every pruned one
    kept = np.concatenate([np.abs(after[n][after[n] != 0]) for n in layer_weights])
    pruned = np.concatenate([np.abs(before[n][after[n] == 0]) for n in layer_weights])
    assert kept.min() >= pruned.max()
    for name in ("b0", "b1", "b2"):  # biases stay dense and unchanged
        np.testing.assert_array_equal(before[name], after[name])
    assert hc.measure_sparsity(result.model) == pytest.approx(0.7, abs=1e-3)
    x = np.random.default_rng(1).normal(size=(16, 12)).astype(np.float32)
    assert run_model(result.model, x).shape == (16, 5)


def test_layer_scope_prunes_every_layer_to_the_target_and_overrides_win() -> None:
    result = MagnitudePruning(0.5, scope="layer", layer_sparsity={"fc1": 0.9}, skip=("fc2",)).run(mlp(), PassContext())
    after = weights(result.model)
    assert _zeros(after["w0"]) == pytest.approx(0.5, abs=0.01)
    assert _zeros(after["w1"]) == pytest.approx(0.9, abs=0.01)
    assert _zeros(after["w2"]) == 0.0
    assert result.notes["layer_sparsity"]["fc1"] == pytest.approx(0.9, abs=0.01)


def test_small_pruning_keeps_outputs_close() -> None:
    original = mlp()
    pruned = MagnitudePruning(0.05).run(_copy(original), PassContext()).model
    x = np.random.default_rng(2).normal(size=(32, 12)).astype(np.float32)
    a, b = run_model(original, x), run_model(pruned, x)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_unreachable_global_target_is_refused_naming_the_layers() -> None:
    # fc1 holds 768 of 1272 weights; with it dense at most ~40% can be zero
    with pytest.raises(CompressionError, match=r"cannot be met.*fc1") as info:
        MagnitudePruning(0.5, skip=("fc1",)).run(mlp(), PassContext())
    assert info.value.details["reachable"] < 0.5


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"sparsity": 1.0}, ConfigError, "sparsity"),
        ({"sparsity": -0.1}, ConfigError, "sparsity"),
        ({"scope": "row"}, ConfigError, "scope"),
        ({"layer_sparsity": {"fc9": 0.5}}, CompressionError, "fc9"),
        ({"skip": ("nope",)}, CompressionError, "nope"),
    ],
)
def test_bad_pruning_options(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MagnitudePruning(**options).run(mlp(), PassContext())


def test_pruning_a_quantized_weight_names_the_layer() -> None:
    model = mlp()
    init = model.graph.initializer[0]
    init.CopyFrom(onnx.numpy_helper.from_array(np.zeros((32, 12), np.int8), init.name))
    with pytest.raises(CompressionError, match=r"fc0.*INT8"):
        MagnitudePruning(0.5).run(model, PassContext())


def test_a_model_without_layers_is_refused() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
    )  # fmt: skip
    with pytest.raises(CompressionError, match=r"nothing to prune.*Relu"):
        MagnitudePruning(0.5).run(onnx.helper.make_model(graph), PassContext())


def test_sensitivity_pruning_prunes_the_insensitive_layer_harder() -> None:
    # fc1 feeds a head where only output 0 matters to the labels; make fc0 critical by
    # giving the labels a direct dependence on it, and fc1's weights tiny perturbations.
    model = mlp(widths=(12, 32, 24, 5))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = np.argmax(run_model(model, x), axis=1).astype(np.int64)
    result = SensitivityPruning(0.6, grid=(0.2, 0.4, 0.6, 0.8, 0.9)).run(
        _copy(model), PassContext(training=Dataset(x, y))
    )
    layer = result.notes["layer_sparsity"]
    sens = result.notes["sensitivity"]
    assert set(sens) == {"fc0", "fc1", "fc2"}
    assert result.notes["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert hc.measure_sparsity(result.model) == pytest.approx(0.6, abs=0.01)
    # the layer whose pruning costs the least at 80% gets the highest sparsity
    cost_at_80 = {name: dict(map(tuple, curve))[0.8] for name, curve in sens.items()}
    assert max(layer, key=layer.get) == min(cost_at_80, key=cost_at_80.get)
    assert max(layer.values()) - min(layer.values()) > 0.05


def test_sensitivity_pruning_needs_data_and_a_reachable_target() -> None:
    with pytest.raises(CompressionError, match="needs data"):
        SensitivityPruning(0.5).run(mlp(), PassContext())
    data = Dataset(np.zeros((4, 12), np.float32), np.zeros(4, np.int64))
    with pytest.raises(CompressionError, match="at most"):
        SensitivityPruning(0.95, max_layer_sparsity=0.9).run(mlp(), PassContext(training=data))


def test_digits_global_pruning_costs_little_at_half_sparsity(digits_mlp: bytes, split: hc.DigitsSplit) -> None:
    result = hc.compress(
        digits_mlp, [MagnitudePruning(0.5)], evaluation=split.test, measure=hc.MeasureOptions(latency=False)
    )
    report = result.report
    assert report.final.sparsity == pytest.approx(0.5, abs=0.01)
    assert report.quality_drop is not None and report.quality_drop <= 0.03


# --- structured ----------------------------------------------------------------------------


def test_channel_pruning_shrinks_every_weight_layout_and_still_runs() -> None:
    result = ChannelPruning(0.5).run(mlp(), PassContext())
    after = weights(result.model)
    assert after["w0"].shape == (16, 12) and after["b0"].shape == (16,)  # Gemm transB=1: rows
    assert after["w1"].shape == (16, 12) and after["b1"].shape == (12,)  # Gemm transB=0: columns out, rows in
    assert after["w2"].shape == (12, 5) and after["b2"].shape == (5,)  # head: inputs only
    assert result.notes["channels"] == {"fc0": [32, 16], "fc1": [24, 12]}
    x = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
    assert run_model(result.model, x).shape == (8, 5)


def test_channel_pruning_keeps_the_largest_channels_and_the_function_of_the_rest() -> None:
    model = mlp()
    w = weights(model)
    # Channels 0..15 of fc0 are silenced (zero weight and bias): removing them changes nothing.
    for name, values in (("w0", w["w0"]), ("b0", w["b0"])):
        values = values.copy()
        values[:16] = 0
        hc.layers.replace_initializer(model.graph, name, values)
    result = ChannelPruning(layers=("fc0",), ratio=0.5, criterion="l2").run(_copy(model), PassContext())
    after = weights(result.model)
    np.testing.assert_array_equal(after["w0"], weights(model)["w0"][16:])
    x = np.random.default_rng(4).normal(size=(20, 12)).astype(np.float32)
    np.testing.assert_allclose(run_model(result.model, x), run_model(model, x), rtol=1e-5, atol=1e-5)


def test_channel_pruning_through_conv_batchnorm_pool_and_flatten() -> None:
    model = cnn()
    result = ChannelPruning(0.5).run(_copy(model), PassContext())
    after = weights(result.model)
    assert after["c0.w"].shape == (4, 2, 3, 3) and after["c0.b"].shape == (4,)
    assert all(after[n].shape == (4,) for n in ("bn.scale", "bn.bias", "bn.mean", "bn.var"))
    assert after["c1.w"].shape == (3, 4, 3, 3)
    assert after["fc.w"].shape == (4, 3 * 16)  # 3 channels x 4x4 after Flatten
    x = np.random.default_rng(5).normal(size=(6, 2, 8, 8)).astype(np.float32)
    assert run_model(result.model, x).shape == (6, 4)
    assert hc.count_parameters(result.model) < 0.6 * hc.count_parameters(model)


def test_channel_pruning_of_silent_conv_filters_is_exact() -> None:
    model = cnn()
    w = weights(model)
    c1w, c1b = w["c1.w"].copy(), w["c1.b"].copy()
    c1w[[1, 4]] = 0
    c1b[[1, 4]] = -5.0  # Relu makes these channels exactly zero: removing them is lossless
    c1w[[0, 2, 3, 5]] += 1.0  # and the others clearly larger
    hc.layers.replace_initializer(model.graph, "c1.w", c1w)
    hc.layers.replace_initializer(model.graph, "c1.b", c1b)
    result = ChannelPruning(layers=("conv1",), ratio=2 / 6).run(_copy(model), PassContext())
    assert result.notes["channels"] == {"conv1": [6, 4]}
    x = np.random.default_rng(6).normal(size=(5, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(result.model, x), run_model(model, x), rtol=1e-4, atol=1e-4)


def test_channel_pruning_refuses_a_residual_and_names_the_layer() -> None:
    model = residual()
    with pytest.raises(CompressionError, match=r"'fc0'.*read by 2 nodes") as info:
        ChannelPruning(0.5).run(model, PassContext())
    assert info.value.details["layer"] == "fc0"
    with pytest.raises(CompressionError, match=r"'fc1'.*Add node 'skip'"):
        ChannelPruning(0.5, layers=("fc1",)).run(residual(), PassContext())


def test_channel_pruning_refuses_the_output_layer_and_impossible_ratios() -> None:
    with pytest.raises(CompressionError, match=r"fc2.*model output"):
        ChannelPruning(0.5, layers=("fc2",)).run(mlp(), PassContext())
    with pytest.raises(ConfigError, match="ratio"):
        ChannelPruning(1.0)
    with pytest.raises(CompressionError, match="would leave none"):
        ChannelPruning(0.99).run(mlp(widths=(12, 2, 24, 5)), PassContext())


def test_channel_pruning_through_the_pass_manager_leaves_nothing_on_failure(tmp_path) -> None:
    with pytest.raises(CompressionError, match="prune-channels"):
        hc.compress(residual(), [ChannelPruning(0.5)], measure=hc.MeasureOptions(latency=False))


def test_digits_cnn_channel_pruning_halves_the_convolutions(digits_cnn: bytes) -> None:
    result = ChannelPruning(0.5).run(onnx.load_model_from_string(digits_cnn), PassContext())
    channels = result.notes["channels"]
    assert channels["conv1"] == [16, 8] and channels["conv2"] == [32, 16] and channels["fc1"] == [128, 64]
    onnx.checker.check_model(result.model)


def test_cli_compress_prune_and_finetune(tmp_path, split: hc.DigitsSplit, digits_mlp: bytes) -> None:
    import json

    from click.testing import CliRunner

    from host_tools.cli import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(digits_mlp)
    np.savez(tmp_path / "train.npz", x=split.x_train, y=split.y_train)
    np.savez(tmp_path / "test.npz", x=split.x_test, y=split.y_test)
    out = tmp_path / "pruned.onnx"
    args = ["--home", str(tmp_path / "home"), "compress", str(model), "-o", str(out), "--prune", "channels:0.5",
            "--finetune", "2", "--train", str(tmp_path / "train.npz"), "--eval", str(tmp_path / "test.npz"),
            "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert [s["name"] for s in report["steps"]] == ["prune-channels", "finetune"]
    assert report["steps"][0]["notes"]["channels"] == {"fc0": [64, 32], "fc1": [32, 16]}
    assert out.exists()
    bad = CliRunner().invoke(cli, [*args[:5], str(tmp_path / "bad.onnx"), "--prune", "magnitude:1.5"])
    assert bad.exit_code == 2 and "sparsity" in bad.output
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_compress_finetunes_after_pruning_and_low_rank(tmp_path, split: hc.DigitsSplit, digits_mlp: bytes) -> None:
    import json

    from click.testing import CliRunner

    from host_tools.cli import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(digits_mlp)
    np.savez(tmp_path / "train.npz", x=split.x_train, y=split.y_train)
    out = tmp_path / "small.onnx"
    args = ["--home", str(tmp_path / "home"), "compress", str(model), "-o", str(out), "--finetune", "1",
            "--lowrank", "2x", "--prune", "magnitude:0.5", "--quantize", "int8-dynamic",
            "--train", str(tmp_path / "train.npz"), "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    steps = [s["name"] for s in json.loads(result.stdout)["report"]["steps"]]
    assert steps.index("finetune") > steps.index("lowrank") > 0
    assert steps[0] == "prune-global" and steps[-1] == "int8-dynamic"
