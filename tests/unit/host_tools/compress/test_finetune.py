"""The torch bridge and fine-tuning: ONNX runs the same in torch, zeros stay zero, accuracy comes back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compress_data import run_model
from prune_models import cnn, mlp, residual, weights

import host_tools.compress as hc
from edge_sdk.errors import CompressionError
from host_tools.compress import FineTune, MagnitudePruning, PassContext, TrainingOptions


@pytest.mark.parametrize(("build", "shape"), [(mlp, (12,)), (cnn, (2, 8, 8))])
def test_graph_module_computes_what_onnxruntime_computes(build, shape) -> None:
    model = build()
    x = np.random.default_rng(0).normal(size=(7, *shape)).astype(np.float32)
    module = hc.graph_module(model)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_model(model, x), rtol=1e-4, atol=1e-4)
    # untouched parameters write back to the same graph, bit for bit
    assert weights(module.to_onnx()).keys() == weights(model).keys()
    for name, values in weights(module.to_onnx()).items():
        np.testing.assert_array_equal(values, weights(model)[name])


def test_graph_module_names_an_unsupported_node() -> None:
    model = mlp()
    model.graph.node[1].op_type = "Gelu"
    with pytest.raises(CompressionError, match="'relu0' is a Gelu"):
        hc.graph_module(model)


def test_module_to_onnx_exports_a_sequential_that_onnxruntime_agrees_with() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64, 10),
    )  # fmt: skip
    net.eval()
    model = hc.module_to_onnx(net, (1, 8, 8))
    x = np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_model(model, x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(CompressionError, match="GRU"):
        hc.module_to_onnx(torch.nn.Sequential(torch.nn.GRU(4, 4)), (4,))


def test_finetune_keeps_zeros_and_lowers_the_loss() -> None:
    model = MagnitudePruning(0.6).run(mlp(), PassContext()).model
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)  # 4 classes of 5 outputs
    result = FineTune(TrainingOptions(epochs=5, learning_rate=1e-2, threads=1)).run(
        model, PassContext(training=hc.Dataset(x, y))
    )
    before, after = weights(model), weights(result.model)
    for name in ("w0", "w1", "w2"):
        assert np.array_equal(after[name] == 0, before[name] == 0)  # the same weights are zero
        assert not np.array_equal(after[name], before[name])  # and the others were trained
    assert result.notes["loss_after"] < result.notes["loss_before"]
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]


def test_finetune_needs_labelled_training_data() -> None:
    with pytest.raises(CompressionError, match="labelled training data"):
        FineTune().run(mlp(), PassContext())


def test_finetune_reports_unsupported_ops_through_the_manager() -> None:
    data = hc.Dataset(np.zeros((4, 6), np.float32), np.zeros(4, np.int64))
    model = residual()
    model.graph.node[3].op_type = "Max"
    with pytest.raises(CompressionError, match=r"finetune.*'skip' is a Max"):
        hc.compress(model, [FineTune()], training=data, measure=hc.MeasureOptions(latency=False))


def test_finetune_module_on_a_users_torch_model_keeps_its_zeros() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        net[0].weight[:, :6] = 0
    x = np.random.default_rng(3).normal(size=(64, 12)).astype(np.float32)
    y = (x[:, 7] > 0).astype(np.int64)
    stats = hc.finetune_module(net, hc.Dataset(x, y), TrainingOptions(epochs=3))
    assert stats["loss_after"] < stats["loss_before"]
    assert not net[0].weight[:, :6].any()


def test_digits_prune_then_finetune_wins_accuracy_back(split: hc.DigitsSplit, digits_mlp: bytes) -> None:
    result = hc.compress(
        digits_mlp,
        [MagnitudePruning(0.8), FineTune(TrainingOptions(epochs=10, learning_rate=1e-2, threads=1))],
        evaluation=split.test,
        training=split.train,
        measure=hc.MeasureOptions(latency=False),
    )
    original, pruned, tuned = result.report.original, result.report.steps[0].metrics, result.report.final
    assert pruned.sparsity == pytest.approx(0.8, abs=0.01) and tuned.sparsity == pytest.approx(0.8, abs=0.01)
    assert tuned.quality > pruned.quality + 0.02
    assert tuned.quality >= original.quality - 0.03


def test_finetune_trains_both_low_rank_factors_and_keeps_the_rank(split: hc.DigitsSplit, digits_mlp: bytes) -> None:
    dense = hc.model_from_bytes(digits_mlp)
    factorized = hc.LowRankFactorization(param_ratio=3.0, min_params=1000).run(dense, PassContext()).model
    step = FineTune(TrainingOptions(epochs=5, learning_rate=1e-2, threads=1))
    result = hc.compress(
        factorized, [step], evaluation=split.test, training=split.train, measure=hc.MeasureOptions(latency=False)
    )
    tuned = hc.model_from_bytes(result.model_bytes)
    before, after = weights(factorized), weights(tuned)
    factors = sorted(name for name in before if ".lowrank_" in name)
    assert factors == ["fc0.lowrank_a", "fc0.lowrank_b", "fc1.lowrank_a", "fc1.lowrank_b"]
    # same graph, same factor shapes (the rank is kept; nothing is re-densified)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert [(n.op_type, list(n.input)) for n in tuned.graph.node] == [
        (n.op_type, list(n.input)) for n in factorized.graph.node
    ]
    for name in factors:
        assert not np.array_equal(after[name], before[name]), f"{name} was not trained"
    # it runs in onnxruntime, and training won accuracy back
    logits = run_model(tuned, split.x_test)
    assert logits.shape == (len(split.x_test), 10)
    assert float(np.mean(logits.argmax(axis=1) == split.y_test)) == pytest.approx(result.report.final.quality)
    assert result.report.final.quality >= result.report.original.quality


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_sdk.errors import RuntimeUnavailableError

    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'edge-sdk\[train\]'"):
        FineTune().run(mlp(), PassContext(training=hc.Dataset(np.zeros((2, 12), np.float32), np.zeros(2, np.int64))))


def test_codebook_finetuning_keeps_clusters_and_moves_centroids(split: hc.DigitsSplit) -> None:
    model = hc.model_from_bytes(hc.train_digits_mlp(split, hidden=(64, 32), seed=0, max_iter=30))
    steps = [MagnitudePruning(0.8), hc.WeightSharing(bits=3, min_params=256, bias_bits=3, float16_codebook=True)]
    shared = hc.compress(model, steps, measure=hc.MeasureOptions(latency=False)).model_bytes
    before = weights(hc.model_from_bytes(shared))
    step = FineTune(TrainingOptions(epochs=3, learning_rate=1e-2, threads=1), share_codebooks=True)
    result = step.run(hc.model_from_bytes(shared), PassContext(training=split.train))
    after = weights(result.model)
    assert result.notes["tied_parameters"]
    moved = 0
    for name, old in before.items():
        if len(np.unique(old[old != 0])) >= np.count_nonzero(old):
            continue  # not shared: trained freely
        new = after[name]
        assert np.array_equal(new == 0, old == 0), "zeros stay zero"
        # same clusters: equal values stay equal, and still at most 8 distinct, float16-exact
        _, old_ids = np.unique(old, return_inverse=True)
        _, new_ids = np.unique(new, return_inverse=True)
        assert len(np.unique(np.stack([old_ids.ravel(), new_ids.ravel()]), axis=1)[0]) == len(np.unique(old))
        assert len(np.unique(new)) <= len(np.unique(old))
        assert np.array_equal(new.astype(np.float16).astype(np.float32), new)
        moved += int(not np.array_equal(new, old))
    assert moved
