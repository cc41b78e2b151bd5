"""What ``edgectl compress`` prints: the per-step table, its notes, and the ``.tflite`` comparison.

Pure functions from reports to text; the JSON form is the reports' own ``to_dict()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from host_tools.report.table import Column, format_bytes, render_table

if TYPE_CHECKING:
    from host_tools.compress import CompressionReport, CompressJobResult, PackedFile
    from host_tools.compress.tflite.quantize import TfliteCompression

__all__ = ["compress_table", "compress_text", "packed_line", "quality_cell", "tflite_table"]


def quality_cell(quality: float | None, metric: str | None) -> str | None:
    """A quality figure for a table cell: accuracy and agreement as percentages, cosine as itself.

    Args:
        quality: the figure, or ``None`` when not measured.
        metric: ``accuracy``, ``agreement`` or ``cosine``.

    Returns:
        ``"97.50% accuracy"``, ``"0.9991 cosine"``, or ``None`` (printed as ``-``).
    """
    if quality is None:
        return None
    return f"{quality:.4f} cosine" if metric == "cosine" else f"{quality:.2%} {metric}"


def _latency_cell(p50_ms: float | None) -> str | None:
    return None if p50_ms is None else f"{p50_ms:.3f} ms"


def compress_table(report: CompressionReport, output: Path) -> str:
    """The per-step table of an ONNX compression, its notes, and the closing line.

    Args:
        report: the compression report.
        output: where the model was written.

    Returns:
        The text, without a trailing newline.
    """
    rows = [("original", report.original)] + [(s.name, s.metrics) for s in report.steps]
    table = render_table(
        [
            Column("step", lambda r: r[0]),
            Column("size", lambda r: format_bytes(r[1].size_bytes), ">"),
            Column("params", lambda r: r[1].parameters, ">"),
            Column("sparsity", lambda r: f"{r[1].sparsity:.1%}", ">"),
            Column("quality", lambda r: quality_cell(r[1].quality, r[1].quality_metric), ">"),
            Column("host p50", lambda r: _latency_cell(r[1].latency_p50_ms), ">"),
        ],
        rows,
    )
    notes = []
    for step in report.steps:
        if step.notes.get("float_nodes"):
            notes.append(f"{step.name}: kept in float: {', '.join(step.notes['float_nodes'])}")
        if "packed_bytes" in step.notes:
            notes.append(f"{step.name}: packed transport form {format_bytes(step.notes['packed_bytes'])}")
        if "factorized_params_before" in step.notes:
            layers = ", ".join(f"{d['layer']} rank {d['rank']}/{d['full_rank']}" for d in step.notes["layers"])
            notes.append(f"{step.name}: {layers or 'no layer worth factorizing'}")
    extra = "".join(f"\n* {n}" for n in notes)
    return f"{table}{extra}\n\n{report.size_ratio:.2f}x smaller; wrote {output}"


def packed_line(packed: PackedFile | None, report: CompressionReport) -> str:
    """The line about the packed transport form, or ``""`` when none was written.

    Args:
        packed: the packed file.
        report: the compression report (its original size is the reference).

    Returns:
        The line, starting with a newline.
    """
    if packed is None:
        return ""
    ratio = report.original.size_bytes / max(1, packed.size_bytes)
    return (
        f"\npacked transport form: {packed.size_bytes} bytes ({ratio:.1f}x smaller than the input model); "
        f"wrote {packed.path}"
    )


def tflite_table(result: TfliteCompression, output: Path) -> str:
    """The original and the quantized ``.tflite`` model side by side, and the closing line.

    Args:
        result: the ``.tflite`` compression.
        output: where the model was written.

    Returns:
        The text, without a trailing newline.
    """
    table = render_table(
        [
            Column("model", lambda r: r[0]),
            Column("size", lambda r: format_bytes(r[1].size_bytes), ">"),
            Column("weights", lambda r: ", ".join(f"{n} {t}" for t, n in sorted(r[1].weight_types.items()))),
            Column("quality", lambda r: quality_cell(r[1].quality, r[1].quality_metric), ">"),
            Column("LiteRT p50", lambda r: _latency_cell(r[1].latency_p50_ms), ">"),
        ],
        [("original", result.original), (f"{result.mode} ({result.recipe})", result.final)],
    )
    return f"{table}\n\n{result.size_ratio:.2f}x smaller; wrote {output}"


def compress_text(result: CompressJobResult) -> str:
    """What ``edgectl compress`` prints without ``--json``.

    Args:
        result: the job's result, for an ONNX or a ``.tflite`` model.

    Returns:
        The text, without a trailing newline.
    """
    from host_tools.compress.pass_manager import CompressionReport

    if isinstance(result.report, CompressionReport):
        return compress_table(result.report, result.output) + packed_line(result.packed, result.report)
    return tflite_table(result.report, result.output)
