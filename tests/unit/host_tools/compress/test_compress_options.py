"""The grammar of ``edgectl compress``'s step options (host_tools.compress.recipe) and the job service."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from compress_data import FAST

import host_tools.compress as hc
from edge_sdk.errors import CompressionError, ConfigError, ModelLoadError
from host_tools.compress import (
    AccuracyGuard,
    ChannelPruning,
    Distillation,
    DynamicInt8Quantization,
    FineTune,
    Float16Conversion,
    LowRankFactorization,
    MagnitudePruning,
    MlpStudent,
    SensitivityPruning,
    StaticInt8Quantization,
    StepOptions,
    WeightSharing,
    passes_from_options,
)
from host_tools.compress.recipe import parse_lowrank_option, parse_prune_option


def test_no_step_options_mean_int8_static() -> None:
    (step,) = passes_from_options(StepOptions())
    assert isinstance(step, StaticInt8Quantization)


@pytest.mark.parametrize(
    ("text", "cls", "fields"),
    [
        ("magnitude:0.8", MagnitudePruning, {"sparsity": 0.8, "scope": "global"}),
        (" Layer:0.5 ", MagnitudePruning, {"sparsity": 0.5, "scope": "layer"}),
        ("sensitivity:0.7", SensitivityPruning, {"sparsity": 0.7}),
        ("channels:0.25", ChannelPruning, {"ratio": 0.25}),
    ],
)
def test_prune_forms(text: str, cls: type, fields: dict[str, object]) -> None:
    step = parse_prune_option(text)
    assert isinstance(step, cls)
    for key, value in fields.items():
        assert getattr(step, key) == value


@pytest.mark.parametrize("text", ["magnitude", "magnitude:", "magnitude:lots", "random:0.5", "0.5"])
def test_prune_refuses_other_forms_and_shows_them(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--prune takes magnitude:S, layer:S, sensitivity:S or channels:R") as err:
        parse_prune_option(text)
    assert err.value.details["key"] == "prune"


@pytest.mark.parametrize(
    ("text", "fields"),
    [("0.9", {"energy": 0.9, "param_ratio": None}), ("2x", {"param_ratio": 2.0}), (" 3X ", {"param_ratio": 3.0})],
)
def test_lowrank_forms(text: str, fields: dict[str, object]) -> None:
    step = parse_lowrank_option(text)
    assert isinstance(step, LowRankFactorization)
    for key, value in fields.items():
        assert getattr(step, key) == value


def test_lowrank_auto_needs_and_takes_the_quality_budget() -> None:
    with pytest.raises(ConfigError, match=r"--lowrank auto needs --max-accuracy-drop"):
        parse_lowrank_option("auto")
    step = parse_lowrank_option("AUTO", 0.01)
    assert isinstance(step, LowRankFactorization) and step.max_drop == 0.01


def test_lowrank_refuses_other_forms() -> None:
    with pytest.raises(ConfigError, match=r"--lowrank takes an energy in \(0, 1\], a reduction like 2x, or 'auto'"):
        parse_lowrank_option("twox")


def test_distill_student_and_settings() -> None:
    (step, quantize) = passes_from_options(StepOptions(distill="mlp:128,64", quantize="int8-dynamic"))
    assert isinstance(step, Distillation)
    assert step.student == MlpStudent((128, 64))
    assert (step.temperature, step.alpha) == (4.0, 0.7)
    assert (step.options.epochs, step.options.learning_rate) == (60, 0.01)
    assert isinstance(quantize, DynamicInt8Quantization)
    (step,) = passes_from_options(StepOptions(distill="mlp:8", train_epochs=3, distill_alpha=1.0))
    assert isinstance(step, Distillation) and step.options.epochs == 3 and step.alpha == 1.0


def test_distill_refuses_a_bad_student() -> None:
    with pytest.raises(ConfigError, match=r"mlp:WIDTH"):
        passes_from_options(StepOptions(distill="cnn:3"))
    with pytest.raises(ModelLoadError):
        passes_from_options(StepOptions(distill="/nonexistent/student.onnx"))


def test_steps_run_in_the_fixed_order() -> None:
    options = StepOptions(distill="mlp:16", prune="magnitude:0.5", lowrank="0.9", finetune_epochs=2, weight_share=4)
    kinds = [type(step) for step in passes_from_options(options)]
    assert kinds == [Distillation, MagnitudePruning, LowRankFactorization, FineTune, WeightSharing]
    options = StepOptions(prune="channels:0.5", lowrank="2x", finetune_epochs=2, quantize="fp16")
    kinds = [type(step) for step in passes_from_options(options)]
    assert kinds == [ChannelPruning, LowRankFactorization, FineTune, Float16Conversion]
    # Training steps alone do not add the default quantization; a compression step alone neither.
    assert [type(s) for s in passes_from_options(StepOptions(prune="magnitude:0.5"))] == [MagnitudePruning]
    assert [type(s) for s in passes_from_options(StepOptions(lowrank="2x"))] == [LowRankFactorization]


def test_quality_budget_wraps_quantization_in_the_guard() -> None:
    (step,) = passes_from_options(StepOptions(max_accuracy_drop=0.01, guard_ranking="measured"))
    assert isinstance(step, AccuracyGuard)
    assert (step.max_drop, step.ranking) == (0.01, "measured")
    assert isinstance(step.inner, StaticInt8Quantization)


@pytest.mark.parametrize(
    ("options", "recipe", "message"),
    [
        (StepOptions(max_accuracy_drop=-0.1), None, r"--max-accuracy-drop must be >= 0"),
        (StepOptions(guard_ranking="measured"), "r.toml", r"with --recipe, set guard_ranking"),
        (StepOptions(guard_ranking="measured"), None, r"--guard-ranking needs --max-accuracy-drop"),
        (StepOptions(prune="magnitude:0.5"), "r.toml", r"give either --recipe or step options \(--prune, --distill"),
        (StepOptions(finetune_epochs=1), "r.toml", r"give either --recipe or step options \(--prune, --distill"),
        (StepOptions(quantize="fp16"), "r.toml", r"give either --recipe or step options \(--quantize, --lowrank"),
        (StepOptions(quantize="fp16", weight_share=4), None, r"--weight-share clusters float weights"),
        (StepOptions(quantize="int3"), None, r"unknown quantization mode 'int3'"),
    ],
)
def test_options_that_do_not_go_together(options: StepOptions, recipe: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        passes_from_options(options, recipe)


def test_a_recipe_replaces_the_step_options(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\npass = "prune"\nsparsity = 0.3\n\n[[step]]\npass = "quantize"\nmode = "fp16"\n')
    steps = passes_from_options(StepOptions(max_accuracy_drop=0.01), recipe)
    assert [type(s) for s in steps] == [MagnitudePruning, Float16Conversion]


# --- the job service -------------------------------------------------------------------------


def _write_data(tmp_path: Path, split: hc.DigitsSplit) -> tuple[str, str]:
    np.savez(tmp_path / "calib.npz", x=split.train.array("calibration")[:64])
    np.savez(tmp_path / "test.npz", x=split.test.array("evaluation"), y=np.asarray(split.test.y))
    return str(tmp_path / "calib.npz"), str(tmp_path / "test.npz")


def test_job_writes_the_model_and_the_packed_form(tmp_path: Path, mlp: bytes, split: hc.DigitsSplit) -> None:
    (tmp_path / "m.onnx").write_bytes(mlp)
    calib, test = _write_data(tmp_path, split)
    events: list[hc.ProgressEvent] = []
    job = hc.CompressJob(
        tmp_path / "m.onnx", tmp_path / "out.onnx", StepOptions(weight_share=4), packed=tmp_path / "out.packed",
        calibration=calib, evaluation=test,
    )  # fmt: skip
    result = hc.run_compress_job(job, events.append)
    assert onnx.load(str(tmp_path / "out.onnx")) is not None
    assert result.packed is not None and result.packed.size_bytes == (tmp_path / "out.packed").stat().st_size
    assert [(e.step, e.done, e.total) for e in events if e.phase == "run"] == [("weight-share-4bit", 0, 1)]
    data = result.to_dict()
    assert data["output"] == str(tmp_path / "out.onnx")
    assert data["report"]["steps"][0]["name"] == "weight-share-4bit"
    assert data["packed"]["path"] == str(tmp_path / "out.packed")


def test_job_writes_nothing_when_the_budget_is_missed(tmp_path: Path, mlp: bytes, split: hc.DigitsSplit) -> None:
    (tmp_path / "m.onnx").write_bytes(mlp)
    _, test = _write_data(tmp_path, split)
    job = hc.CompressJob(
        tmp_path / "m.onnx", tmp_path / "out.onnx", StepOptions(prune="magnitude:0.99", max_accuracy_drop=0.0),
        evaluation=test,
    )  # fmt: skip
    with pytest.raises(CompressionError, match=r"dropped by .*nothing written"):
        hc.run_compress_job(job)
    assert not (tmp_path / "out.onnx").exists()


def test_job_checks_data_needs_and_tflite_options_first(tmp_path: Path) -> None:
    onnx_job = hc.CompressJob(tmp_path / "absent.onnx", tmp_path / "o.onnx", quality_metric="cosine")
    with pytest.raises(ConfigError, match=r"--quality needs evaluation data \(--eval\)"):
        hc.run_compress_job(onnx_job)
    budget = hc.CompressJob(tmp_path / "absent.onnx", tmp_path / "o.onnx", StepOptions(max_accuracy_drop=0.01))
    with pytest.raises(ConfigError, match=r"--max-accuracy-drop needs evaluation data \(--eval\)"):
        hc.run_compress_job(budget)
    tflite = hc.CompressJob(
        tmp_path / "absent.tflite", tmp_path / "o.tflite", StepOptions(prune="magnitude:0.5"), packed=tmp_path / "p"
    )
    with pytest.raises(
        ConfigError, match=r"takes --quantize, --calib, --eval and --quality only, not --prune, --packed"
    ):
        hc.run_compress_job(tflite)
    with pytest.raises(ModelLoadError, match=r"absent.tflite: cannot read model file"):
        hc.run_compress_job(hc.CompressJob(tmp_path / "absent.tflite", tmp_path / "o.tflite"))


def test_quantization_leaves_the_working_directory_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlp: bytes, split: hc.DigitsSplit
) -> None:
    """Pre-processing works in its own folder by absolute paths: no chdir, nothing left in the cwd."""
    monkeypatch.chdir(tmp_path)

    def refuse(path: object) -> None:
        raise AssertionError(f"os.chdir({path!r}) called by the library")

    monkeypatch.setattr(os, "chdir", refuse)
    for step in (StaticInt8Quantization(), DynamicInt8Quantization()):
        result = hc.compress(mlp, [step], calibration=split.train, measure=FAST)
        assert result.report.steps[0].changed
    assert list(tmp_path.iterdir()) == []
