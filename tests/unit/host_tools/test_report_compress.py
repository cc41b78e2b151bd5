"""What ``edgectl compress`` prints (host_tools.report.compress): pure functions of the reports."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from host_tools.compress import CompressionReport, CompressJobResult, ModelMetrics, PackedFile, StepReport
from host_tools.compress.tflite.quantize import TfliteCompression, TfliteMetrics
from host_tools.report.compress import compress_table, compress_text, packed_line, quality_cell, tflite_table


def _report() -> CompressionReport:
    original = ModelMetrics(4096, 1000, 0.0, 0.975, "accuracy", 0.1234)
    pruned = ModelMetrics(4096, 1000, 0.5, 0.97, "accuracy", None)
    quantized = ModelMetrics(1024, 1000, 0.5, 0.9655, "accuracy", 0.05)
    return CompressionReport(
        original,
        (
            StepReport("prune", True, 0.1, pruned, {}),
            StepReport("int8-static", True, 0.2, quantized, {"float_nodes": ["fc1", "fc2"], "packed_bytes": 2048}),
            StepReport("lowrank", False, 0.0, quantized, {"factorized_params_before": 0, "layers": []}),
        ),
    )


def test_quality_cell() -> None:
    assert quality_cell(None, "accuracy") is None
    assert quality_cell(0.975, "accuracy") == "97.50% accuracy"
    assert quality_cell(0.5, "agreement") == "50.00% agreement"
    assert quality_cell(0.99912, "cosine") == "0.9991 cosine"


def test_compress_table() -> None:
    text = compress_table(_report(), Path("out.onnx"))
    lines = text.splitlines()
    assert lines[0].split() == ["step", "size", "params", "sparsity", "quality", "host", "p50"]
    assert lines[2].split() == ["original", "4.0", "KiB", "1000", "0.0%", "97.50%", "accuracy", "0.123", "ms"]
    assert lines[3].split() == ["prune", "4.0", "KiB", "1000", "50.0%", "97.00%", "accuracy", "-"]
    assert "* int8-static: kept in float: fc1, fc2" in lines
    assert "* int8-static: packed transport form 2.0 KiB" in lines
    assert "* lowrank: no layer worth factorizing" in lines
    assert text.endswith("\n\n4.00x smaller; wrote out.onnx")


def test_packed_line() -> None:
    report = _report()
    assert packed_line(None, report) == ""
    line = packed_line(PackedFile(Path("m.packed"), 512, ("fc1.weight",)), report)
    assert line == "\npacked transport form: 512 bytes (8.0x smaller than the input model); wrote m.packed"


def test_compress_text_joins_table_and_packed_line() -> None:
    report = _report()
    packed = PackedFile(Path("m.packed"), 512)
    result = CompressJobResult(Path("out.onnx"), report, packed)
    assert compress_text(result) == compress_table(report, Path("out.onnx")) + packed_line(packed, report)
    assert result.to_dict() == {
        "output": "out.onnx",
        "report": report.to_dict(),
        "packed": {"path": "m.packed", "size_bytes": 512, "shared_tensors": []},
    }
    assert "packed" not in CompressJobResult(Path("out.onnx"), report).to_dict()


def test_tflite_table() -> None:
    original = TfliteMetrics(8192, MappingProxyType({"FLOAT32": 2}), 0.9, "accuracy", 0.25)
    final = TfliteMetrics(2048, MappingProxyType({"INT8": 2}), None, None, None)
    result = TfliteCompression(b"", "int8-dynamic", "dynamic_wi8_afp32", original, final)
    text = tflite_table(result, Path("m.int8.tflite"))
    lines = text.splitlines()
    assert lines[0].split() == ["model", "size", "weights", "quality", "LiteRT", "p50"]
    assert lines[2].split() == ["original", "8.0", "KiB", "2", "FLOAT32", "90.00%", "accuracy", "0.250", "ms"]
    assert lines[3].split() == ["int8-dynamic", "(dynamic_wi8_afp32)", "2.0", "KiB", "2", "INT8", "-", "-"]
    assert text.endswith("\n\n4.00x smaller; wrote m.int8.tflite")
    assert compress_text(CompressJobResult(Path("m.int8.tflite"), result)) == text
