"""Low-rank factorization: ranks from shapes, parameter counts and targets, outputs close to the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from compress_data import FAST
from onnx import TensorProto, helper, numpy_helper

import host_tools.compress as hc
from edge_sdk.errors import CompressionError, ConfigError
from host_tools.compress import LowRankFactorization
from host_tools.compress.passes.lowrank import rank_for_energy


def _low_rank_matrix(rng: np.random.Generator, n_in: int, n_out: int, rank: int) -> np.ndarray:
    return (rng.normal(size=(n_in, rank)) @ rng.normal(size=(rank, n_out)) / np.sqrt(rank)).astype(np.float32)


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """MatMul [32->96] (rank 8), Gemm transB [96->80] (rank 6) with bias, 1x1 Conv [80->64] (rank 5)."""
    w0 = _low_rank_matrix(rng, 32, 96, 8)
    w1 = _low_rank_matrix(rng, 96, 80, 6).T.copy()  # Gemm transB=1 stores [out, in]
    w2 = _low_rank_matrix(rng, 80, 64, 5).T.copy()[:, :, None, None]
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.normal(size=80).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.array([-1, 80, 1, 1]), "shape")]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu"),
        helper.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], name="gemm", transB=1, alpha=0.5),
        helper.make_node("Reshape", ["h1", "shape"], ["img"], name="reshape"),
        helper.make_node("Conv", ["img", "w2"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 1, 1])],
                              inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    with hc.evaluate.open_host_session(model) as session:
        return session.run({"x": x})[0]


def test_rank_for_energy() -> None:
    assert rank_for_energy(np.array([4.0, 3.0, 0.0]), 0.5) == 1
    assert rank_for_energy(np.array([4.0, 3.0, 0.0]), 0.9) == 2
    assert rank_for_energy(np.array([4.0, 3.0, 0.0]), 1.0) == 2
    assert rank_for_energy(np.zeros(3), 0.9) == 1


def test_exact_low_rank_layers_are_factorized_to_their_rank() -> None:
    rng = np.random.default_rng(0)
    model = _model(rng)
    result = hc.compress(model, [LowRankFactorization(energy=0.9999, min_params=1)], measure=FAST)
    out = onnx.load_model_from_string(result.model_bytes)
    shapes = {i.name: list(i.dims) for i in out.graph.initializer}
    assert shapes["mm.lowrank_a"] == [32, 8] and shapes["mm.lowrank_b"] == [8, 96]
    assert shapes["gemm.lowrank_a"] == [96, 6] and shapes["gemm.lowrank_b"] == [6, 80]
    assert shapes["conv.lowrank_a"] == [5, 80, 1, 1] and shapes["conv.lowrank_b"] == [64, 5, 1, 1]
    assert not {"w0", "w1", "w2"} & set(shapes)
    notes = result.report.steps[0].notes
    assert notes["factorized_params_before"] == 32 * 96 + 96 * 80 + 80 * 64
    assert notes["factorized_params_after"] == 8 * 128 + 6 * 176 + 5 * 144
    assert result.report.final.parameters < result.report.original.parameters
    x = rng.normal(size=(16, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model_bytes, x), _run(model, x), rtol=1e-3, atol=1e-3)


def test_lower_energy_means_lower_rank_and_bounded_error(split: hc.DigitsSplit, mlp: bytes) -> None:
    result = hc.compress(mlp, [LowRankFactorization(energy=0.8, min_params=1000)], evaluation=split.test, measure=FAST)
    layers = result.report.steps[0].notes["layers"]
    assert layers and all(d["rank"] < d["full_rank"] for d in layers)
    for d in layers:
        assert d["params_after"] == d["rank"] * sum(d["shape"]) < d["params_before"]
    assert result.report.quality_drop <= 0.03


def test_accuracy_budget_picks_ranks_within_it(split: hc.DigitsSplit, mlp: bytes) -> None:
    step = LowRankFactorization(max_drop=0.01, min_params=1000)
    result = hc.compress(mlp, [step], evaluation=split.test, measure=FAST)
    assert result.report.quality_drop <= 0.01
    notes = result.report.steps[0].notes
    assert notes["factorized_params_after"] * 2 <= notes["factorized_params_before"]
    with pytest.raises(CompressionError, match="evaluation data"):
        hc.compress(mlp, [step], measure=FAST)


def test_named_layer_that_cannot_be_factorized_is_named() -> None:
    model = _model(np.random.default_rng(1))
    with pytest.raises(CompressionError, match=r"'relu'.*Relu"):
        hc.compress(model, [LowRankFactorization(layers=("relu",))], measure=FAST)
    with pytest.raises(CompressionError, match="no node named nope"):
        hc.compress(model, [LowRankFactorization(layers=("nope",))], measure=FAST)
    with pytest.raises(CompressionError, match="no Gemm, MatMul or 1x1 Conv"):
        hc.compress(model, [LowRankFactorization(min_params=10**6)], measure=FAST)
    with pytest.raises(ConfigError):
        LowRankFactorization(energy=0.0)


def _factor_ranks(model: onnx.ModelProto) -> dict[str, tuple[int, int, int]]:
    """Per factorized layer, read from the factor shapes: ``(rank, in, out)`` (MatMul/Gemm layout)."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    ranks = {}
    for name, dims in shapes.items():
        if name.endswith(".lowrank_a"):
            layer = name.removesuffix(".lowrank_a")
            n_in, rank = dims
            rank_b, n_out = shapes[f"{layer}.lowrank_b"]
            assert rank_b == rank
            ranks[layer] = (rank, n_in, n_out)
    return ranks


@pytest.mark.parametrize("ratio", [2.0, 3.0])
def test_param_ratio_gives_the_requested_reduction(split: hc.DigitsSplit, mlp: bytes, ratio: float) -> None:
    dense = {i.name: i for i in onnx.load_model_from_string(mlp).graph.initializer}
    result = hc.compress(
        mlp, [LowRankFactorization(param_ratio=ratio, min_params=1000)], evaluation=split.test, measure=FAST
    )
    out = onnx.load_model_from_string(result.model_bytes)
    ranks = _factor_ranks(out)
    assert set(ranks) == {"fc0", "fc1"}  # fc2 (64x10) is under min_params
    before = sum(n_in * n_out for _, n_in, n_out in ranks.values())
    after = sum(rank * (n_in + n_out) for rank, n_in, n_out in ranks.values())
    assert before / after >= ratio
    assert before == sum(int(np.prod(dense[f"{layer}.weight"].dims)) for layer in ranks)
    assert not {"fc0.weight", "fc1.weight"} & {i.name for i in out.graph.initializer}
    notes = result.report.steps[0].notes
    assert notes["param_ratio"] == ratio
    assert (notes["factorized_params_before"], notes["factorized_params_after"]) == (before, after)
    assert {d["layer"]: d["rank"] for d in notes["layers"]} == {layer: r[0] for layer, r in ranks.items()}
    # the threshold reported is the one used: a plain energy pass at it picks the same ranks
    again = LowRankFactorization(energy=notes["energy"], min_params=1000).run(
        hc.model_from_bytes(mlp), hc.PassContext()
    )
    assert _factor_ranks(again.model) == ranks


def test_param_ratio_out_of_reach_or_misused_is_refused() -> None:
    model = _model(np.random.default_rng(2))
    with pytest.raises(CompressionError, match=r"cannot reach 1000x .* at most"):
        hc.compress(model, [LowRankFactorization(param_ratio=1000.0, min_params=1)], measure=FAST)
    with pytest.raises(ConfigError, match="param_ratio"):
        LowRankFactorization(param_ratio=1.0)
    with pytest.raises(ConfigError, match="not both"):
        LowRankFactorization(param_ratio=2.0, max_drop=0.01)


def test_recipe_and_cli_take_a_parameter_reduction(tmp_path, mlp: bytes) -> None:
    import json

    from click.testing import CliRunner

    from host_tools.cli import cli

    steps = hc.parse_recipe('[[step]]\npass = "lowrank"\nparam_ratio = 2.0\n[[step]]\npass = "finetune"\nepochs = 3\n')
    assert steps[0] == LowRankFactorization(param_ratio=2.0) and isinstance(steps[1], hc.FineTune)
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp)
    args = ["--home", str(tmp_path / "home"), "compress", str(model), "-o", str(tmp_path / "lr.onnx"), "--json"]
    result = CliRunner().invoke(cli, [*args, "--lowrank", "2x"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert [s["name"] for s in report["steps"]] == ["lowrank"]
    notes = report["steps"][0]["notes"]
    assert notes["param_ratio"] == 2.0
    assert notes["factorized_params_before"] >= 2 * notes["factorized_params_after"]
    bad = CliRunner().invoke(cli, [*args, "--lowrank", "twox"])
    assert bad.exit_code != 0 and "reduction like 2x" in bad.output
