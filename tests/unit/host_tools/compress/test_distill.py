"""Knowledge distillation: the student is smaller, is trained on the teacher's soft targets, runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from prune_models import mlp

import host_tools.compress as hc
from edge_sdk.errors import CompressionError, ConfigError, ModelLoadError
from host_tools.compress import Distillation, MlpStudent, PassContext, TrainingOptions


@pytest.fixture(scope="module")
def teacher(digits_mlp: bytes) -> onnx.ModelProto:
    return onnx.load_model_from_string(digits_mlp)


def test_distilled_mlp_student_is_small_and_accurate(teacher: onnx.ModelProto, split: hc.DigitsSplit) -> None:
    step = Distillation(
        MlpStudent((16,)), temperature=2.0, alpha=0.7, options=TrainingOptions(epochs=10, learning_rate=1e-2, threads=1)
    )
    result = hc.compress(
        teacher, [step], evaluation=split.test, training=split.train, measure=hc.MeasureOptions(latency=False)
    )
    student = onnx.load_model_from_string(result.model_bytes)
    assert [n.op_type for n in student.graph.node] == ["Gemm", "Relu", "Gemm"]
    assert student.graph.input[0].name == "input" and student.graph.output[0].name == "logits"
    assert hc.count_parameters(student) == 64 * 16 + 16 + 16 * 10 + 10
    assert result.report.final.parameters <= result.report.original.parameters / 4
    assert result.report.final.quality >= 0.95 * result.report.original.quality
    notes = result.report.steps[0].notes
    assert notes["teacher_parameters"] == hc.count_parameters(teacher) and notes["temperature"] == 2.0


def test_soft_loss_is_scaled_by_t_squared(teacher: onnx.ModelProto, split: hc.DigitsSplit) -> None:
    # With alpha=1 the student learns from the teacher alone; the initial loss is
    # T^2 * KL, so it grows with T for the same (random) student.
    data = hc.Dataset(split.x_train[:200], split.y_train[:200])
    losses = []
    for temperature in (1.0, 4.0):
        step = Distillation(MlpStudent((8,)), temperature=temperature, alpha=1.0, options=TrainingOptions(epochs=0))
        losses.append(step.run(teacher, PassContext(training=data)).notes["loss_before"])
    assert losses[1] > losses[0] * 1.5


def test_teacher_probabilities_become_logits() -> None:
    model = mlp()
    model.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.output[0].name = "probs"
    x = 0.2 * np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32)
    logits, from_probs = hc.teacher_logits(model, x)
    assert from_probs and logits.shape == (10, 5)
    reference, _ = hc.teacher_logits(mlp(), x)
    np.testing.assert_allclose(
        logits - logits.mean(1, keepdims=True), reference - reference.mean(1, keepdims=True), atol=1e-3
    )


def test_torch_student_is_trained_and_exported(teacher: onnx.ModelProto, split: hc.DigitsSplit) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    data = hc.Dataset(split.x_train[:300], split.y_train[:300])
    result = Distillation(net, options=TrainingOptions(epochs=3)).run(teacher, PassContext(training=data))
    assert hc.count_parameters(result.model) == 64 * 16 + 16 + 16 * 10 + 10
    with torch.no_grad():
        expected = net(torch.from_numpy(split.x_test[:5])).numpy()
    from host_tools.compress.evaluate import open_host_session, run_batched

    with open_host_session(result.model) as session:
        np.testing.assert_allclose(run_batched(session, split.x_test[:5], 8), expected, rtol=1e-4, atol=1e-4)


def test_distillation_refusals(teacher: onnx.ModelProto, split: hc.DigitsSplit) -> None:
    with pytest.raises(CompressionError, match="training data"):
        Distillation().run(teacher, PassContext())
    with pytest.raises(CompressionError, match="needs labels"):
        Distillation(alpha=0.5).run(teacher, PassContext(training=hc.Dataset(split.x_train[:10])))
    wrong = torch.nn.Sequential(torch.nn.Linear(64, 3))
    with pytest.raises(CompressionError, match="student outputs shape \\[3\\]"):
        Distillation(wrong).run(teacher, PassContext(training=split.train))
    with pytest.raises(ConfigError, match="temperature"):
        Distillation(temperature=0)
    with pytest.raises(ConfigError, match="mlp:WIDTH"):
        hc.parse_student("cnn:3")
    assert hc.parse_student("mlp:32,16").hidden == (32, 16)


def test_soft_targets_beat_labels_when_labels_are_few(teacher: onnx.ModelProto, split: hc.DigitsSplit) -> None:
    # Hinton et al. (2015): soft targets carry most of what the teacher learnt from the
    # whole training set, so a student given 10% of it learns more from them than from
    # its labels. Each seed pairs the two students (same draw, initial weights, batches).
    options = TrainingOptions(epochs=100, learning_rate=1e-2, threads=1)
    gains = []
    for seed in range(3):
        few = split.train.sample(0.1, seed=seed)
        accuracy = {}
        for alpha in (1.0, 0.0):
            step = Distillation(MlpStudent((32,)), temperature=4.0, alpha=alpha, options=options)
            accuracy[alpha] = hc.evaluate_accuracy(
                step.run(teacher, PassContext(training=few, seed=seed)).model, split.test
            )
        gains.append(accuracy[1.0] - accuracy[0.0])
    assert min(gains) > 0 and np.mean(gains) > 0.01, gains


def test_cli_distills_from_unlabelled_transfer_set_only_at_alpha_one(
    tmp_path, teacher: onnx.ModelProto, split: hc.DigitsSplit
) -> None:
    import json

    from click.testing import CliRunner

    from host_tools.cli import cli

    model = tmp_path / "teacher.onnx"
    model.write_bytes(teacher.SerializeToString())
    np.save(tmp_path / "unlabelled.npy", split.x_train[:300])
    np.savez(tmp_path / "test.npz", x=split.x_test, y=split.y_test)
    out = tmp_path / "student.onnx"
    args = ["--home", str(tmp_path / "home"), "compress", str(model), "-o", str(out), "--distill", "mlp:16",
            "--train", str(tmp_path / "unlabelled.npy"), "--eval", str(tmp_path / "test.npz"),
            "--epochs", "60"]  # fmt: skip
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0 and "labels" in refused.output and not out.exists()
    result = CliRunner().invoke(cli, [*args, "--distill-alpha", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["steps"][0]["name"] == "distill" and report["final"]["parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    assert report["final"]["quality"] > 0.8


def test_cli_and_recipe_take_an_onnx_student(tmp_path, teacher: onnx.ModelProto, split: hc.DigitsSplit) -> None:
    import json

    from click.testing import CliRunner

    from host_tools.cli import cli

    model = tmp_path / "teacher.onnx"
    model.write_bytes(teacher.SerializeToString())
    student = MlpStudent((24, 12)).build(teacher, 10, seed=3)
    (tmp_path / "student.onnx").write_bytes(student.SerializeToString())
    np.savez(tmp_path / "train.npz", x=split.x_train, y=split.y_train)
    base = ["--home", str(tmp_path / "home"), "compress", str(model), "--train", str(tmp_path / "train.npz"),
            "--epochs", "3", "--json"]  # fmt: skip
    result = CliRunner().invoke(
        cli, [*base, "-o", str(tmp_path / "a.onnx"), "--distill", str(tmp_path / "student.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"]["final"]["parameters"] == hc.count_parameters(student)
    trained = onnx.load(str(tmp_path / "a.onnx"))
    assert [tuple(i.dims) for i in trained.graph.initializer] == [tuple(i.dims) for i in student.graph.initializer]

    # In a recipe file a relative student path is relative to the recipe's folder.
    (tmp_path / "r.toml").write_text('[[step]]\npass = "distill"\nstudent = "student.onnx"\nepochs = 2\n')
    steps = hc.load_recipe(tmp_path / "r.toml")
    assert isinstance(steps[0].student, onnx.ModelProto) and hc.count_parameters(
        steps[0].student
    ) == hc.count_parameters(student)
    (tmp_path / "bad.toml").write_text('[[step]]\npass = "distill"\nstudent = "gone.onnx"\n')
    with pytest.raises(ModelLoadError, match=r"bad.toml: step 1 \(distill\): .*gone.onnx"):
        hc.load_recipe(tmp_path / "bad.toml")

    missing = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "b.onnx"), "--distill", str(tmp_path / "nope.onnx")])
    assert missing.exit_code != 0 and "nope.onnx" in missing.output and not (tmp_path / "b.onnx").exists()
    with pytest.raises(ConfigError, match="student or hidden"):
        hc.parse_recipe('[[step]]\npass = "distill"\nstudent = "mlp:8"\nhidden = [8]\n')
    with pytest.raises(ConfigError, match=r"student.onnx"):
        hc.parse_student("cnn:3")
