"""`.tflite` quantization with ai-edge-quantizer: tensor types in the file, LiteRT results, errors, CLI.

Models are built at test time by :mod:`tflite_models` (no TensorFlow); the quantized
flatbuffers are read back with the schema module that ships inside ai-edge-litert, and
run through :mod:`edge_sdk.runtime`, as a device would run them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from tflite_models import add_model, fully_connected_model

from edge_sdk.errors import CompressionError, ConfigError, ModelLoadError
from edge_sdk.runtime import SessionOptions, open_session
from host_tools.compress.data import Dataset
from host_tools.compress.tflite.quantize import (
    compress_tflite,
    quantize_tflite,
    tflite_tensors,
)

UNITS, FEATURES = 16, 64


@pytest.fixture(scope="module")
def fc() -> tuple[bytes, np.ndarray]:
    """A float FULLY_CONNECTED model and inputs for it."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((UNITS, FEATURES)).astype(np.float32) / np.sqrt(FEATURES)
    bias = rng.standard_normal(UNITS).astype(np.float32) * 0.1
    x = rng.standard_normal((64, FEATURES)).astype(np.float32)
    return fully_connected_model(weights, bias), x


def _types(model: bytes) -> dict[str, int]:
    """Tensor name -> schema TensorType, read straight from the flatbuffer."""
    parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    return {t.name.decode(): t.type for t in parsed.subgraphs[0].tensors}


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    with open_session(model, "litert", SessionOptions(threads=1)) as session:
        return np.concatenate([session.run({"x": row[None]})[0] for row in x])


@pytest.mark.parametrize("recipe", ["dynamic_wi8_afp32", "weight_only_wi8_afp32"])
def test_weight_quantization_stores_int8_weights_and_keeps_outputs(fc, recipe: str) -> None:
    model, x = fc
    quantized = quantize_tflite(model, recipe)
    types = _types(quantized)
    assert _types(model)["weights"] == schema.TensorType.FLOAT32
    assert types["weights"] == schema.TensorType.INT8
    assert types["x"] == types["y"] == schema.TensorType.FLOAT32  # float in, float out
    assert len(quantized) < len(model) / 2
    expected, got = _run(model, x), _run(quantized, x)
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def test_static_int8_calibrates_a_model_without_signature(fc) -> None:
    model, x = fc
    assert not schema.ModelT.InitFromPackedBuf(model, 0).signatureDefs
    quantized = quantize_tflite(model, "static_wi8_ai8", calibration=x)
    types = _types(quantized)
    assert types["weights"] == types["x"] == types["y"] == schema.TensorType.INT8
    assert types["bias"] == schema.TensorType.INT32
    with open_session(quantized, "litert", SessionOptions(threads=1)) as session:
        assert session.precision == "int8"
    expected, got = _run(model, x), _run(quantized, x)  # floats quantized and dequantized at the edge
    # Ranges are the running min/max over all calibration rows, so nothing clips: the
    # error stays within a few output quantization steps (ptp / 255 each).
    assert np.abs(got - expected).max() <= 0.02 * np.ptp(expected)
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.95


def test_tflite_tensors_describes_weights(fc) -> None:
    model, _ = fc
    tensors = {t.name: t for t in tflite_tensors(quantize_tflite(model))}
    assert tensors["weights"].dtype == "int8" and tensors["weights"].constant
    assert tensors["weights"].shape == (UNITS, FEATURES)
    assert not tensors["x"].constant


def test_wrong_inputs_fail_clearly(fc) -> None:
    model, x = fc
    with pytest.raises(ModelLoadError, match="TFL3"):
        quantize_tflite(b"\x08\x00\x00\x00ONNXnot a tflite model")
    with pytest.raises(ConfigError, match=r"unknown .tflite recipe 'int3'.*dynamic_wi8_afp32"):
        quantize_tflite(model, "int3")
    with pytest.raises(CompressionError, match="static and needs calibration data"):
        quantize_tflite(model, "static_wi8_ai8")
    with pytest.raises(CompressionError, match=r"input 'x' has shape \[64, 10\].*expects \[1, 64\]"):
        quantize_tflite(model, "static_wi8_ai8", calibration=x[:, :10])
    with pytest.raises(CompressionError, match="model has 2 inputs"):
        quantize_tflite(add_model((1, 4)), "static_wi8_ai8", calibration=np.zeros((4, 4), np.float32))
    with pytest.raises(ConfigError, match=r"not available for .tflite models"):
        compress_tflite(model, "fp16")


def test_compress_tflite_reports_size_agreement_and_latency(fc) -> None:
    model, x = fc
    result = compress_tflite(model, "int8_dynamic", evaluation=Dataset(x), latency_runs=5)
    report = result.to_dict()
    assert report["recipe"] == "dynamic_wi8_afp32" and report["mode"] == "int8-dynamic"
    assert result.size_ratio > 2
    assert report["original"]["weight_types"] == {"float32": 2}
    assert report["final"]["weight_types"] == {"int8": 1, "float32": 1}
    assert report["original"]["quality"] == 1.0 and report["final"]["quality_metric"] == "agreement"
    assert report["final"]["quality"] >= 0.9
    assert report["final"]["latency_p50_ms"] > 0
    labelled = compress_tflite(
        model, "int8-weight-only", evaluation=Dataset(x, _run(model, x).argmax(1)), latency_runs=0
    )
    assert labelled.original.quality == 1.0 and labelled.original.quality_metric == "accuracy"
    assert labelled.final.latency_p50_ms is None


def test_cli_compress_dispatches_tflite_models(tmp_path, fc) -> None:
    from click.testing import CliRunner

    from host_tools.cli import cli

    model, x = fc
    source = tmp_path / "m.tflite"
    source.write_bytes(model)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "m.int8.tflite"
    base = ["--home", str(tmp_path / "home"), "compress", str(source), "-o", str(out)]
    result = CliRunner().invoke(
        cli, [*base, "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "calib.npz"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["format"] == "tflite" and report["recipe"] == "static_wi8_ai8"
    assert _types(out.read_bytes())["weights"] == schema.TensorType.INT8
    text = CliRunner().invoke(cli, [*base, "--quantize", "int8-dynamic"])
    assert text.exit_code == 0, text.output
    assert "int8-dynamic (dynamic_wi8_afp32)" in text.stdout and "smaller; wrote" in text.stdout
    # without data the default is int8-dynamic; int8-static without --calib is refused before any work
    bare = CliRunner().invoke(cli, [*base])
    assert bare.exit_code == 0 and "int8-dynamic" in bare.output, bare.output
    no_calib = CliRunner().invoke(cli, [*base, "--quantize", "int8-static"])
    assert no_calib.exit_code == 2 and "--calib" in no_calib.output, no_calib.output
    mixed = CliRunner().invoke(cli, [*base, "--quantize", "int8-dynamic", "--prune", "magnitude:0.5"])
    assert mixed.exit_code == 2 and "--prune" in mixed.output
    cosine = CliRunner().invoke(
        cli,
        [*base, "--quantize", "int8-dynamic", "--eval", str(tmp_path / "calib.npz"), "--quality", "cosine", "--json"],
    )
    assert cosine.exit_code == 0, cosine.output
    scored = json.loads(cosine.stdout)["report"]
    assert scored["original"]["quality"] == pytest.approx(1.0) and scored["final"]["quality_metric"] == "cosine"
    assert 0.9 < scored["final"]["quality"] <= 1.0
