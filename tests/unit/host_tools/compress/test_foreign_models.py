"""Quantizing models the project did not make, and what ``edgectl compress`` checks first.

- a torch export whose dynamic sequence axis defeats symbolic shape inference;
- onnx's own IR v3 ``light_squeezenet.onnx`` (initializers listed as graph inputs);
- our static int8 output against plain ``onnxruntime.quantization.quantize_static``;
- outputs and data checked before any work.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import host_tools.compress as hc
from edge_sdk.errors import ConfigError

LIGHT_SQUEEZENET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
NO_LATENCY = hc.MeasureOptions(latency=False)


def _outputs(model: bytes | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _torch_attention_block() -> onnx.ModelProto:
    """A tiny BERT-like block (embedding, 2-head attention with a mask, LayerNorm, mean pooling)
    exported by torch with dynamic batch and sequence axes, the sequence axis named differently
    for its two inputs, as exports in the wild do: symbolic shape inference cannot relate them."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self, width: int = 16, heads: int = 2) -> None:
            super().__init__()
            self.heads = heads
            self.embed = torch.nn.Embedding(50, width)
            self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
            self.norm = torch.nn.LayerNorm(width)

        def split(self, t):  # [b, n, d] -> [b, heads, n, d / heads]
            b, n, d = t.size()
            return t.view(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3)

        def forward(self, ids, mask):
            x = self.embed(ids)
            bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
            att = torch.softmax(self.split(self.q(x)) @ self.split(self.k(x)).transpose(-1, -2) / 4.0 + bias, dim=-1)
            ctx = (att @ self.split(self.v(x))).permute(0, 2, 1, 3)
            y = self.norm(x + self.o(ctx.reshape(ctx.size(0), ctx.size(1), -1)))
            weight = mask.unsqueeze(-1).to(y.dtype)
            return (y * weight).sum(1) / weight.sum(1).clamp(min=1e-9)

    torch.manual_seed(0)
    buffer = io.BytesIO()
    example = (torch.randint(0, 50, (1, 5)), torch.ones(1, 5, dtype=torch.int64))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "sequence"}, "y": {0: "batch"}}
    with pytest.warns(Warning):  # torch 2.x: the TorchScript exporter is deprecated
        torch.onnx.export(
            Block().eval(), example, buffer, input_names=["input_ids", "attention_mask"], output_names=["y"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def _token_data(rows: int = 16, length: int = 7) -> hc.Dataset:
    rng = np.random.default_rng(0)
    return hc.Dataset({"input_ids": rng.integers(0, 50, (rows, length)), "attention_mask": np.ones((rows, length))})


@pytest.mark.parametrize("mode", ["int8-dynamic-per-channel", "int8-static"])
def test_dynamic_sequence_axis_falls_back_and_says_so(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    model = _torch_attention_block()
    data = _token_data()
    with caplog.at_level("WARNING", logger="host_tools.compress.passes.quantize"):
        result = hc.compress(model, [hc.parse_quantize_option(mode)], data, data, measure=NO_LATENCY)
    notes = result.report.steps[0].notes
    assert notes["preprocess"] == "without symbolic shape inference"
    assert "Incomplete symbolic shape inference" in notes["preprocess_fallback"]
    assert "symbolic shape inference failed" in caplog.text
    quantized = onnx.load_from_string(result.model_bytes)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QuantizeLinear") for n in quantized.graph.node)
    feeds = {"input_ids": data.x["input_ids"][:2], "attention_mask": data.x["attention_mask"][:2].astype(np.int64)}
    (want,), (got,) = _outputs(model, feeds), _outputs(result.model_bytes, feeds)
    assert np.allclose(want, got, atol=0.25)


def test_a_model_symbolic_inference_handles_needs_no_fallback(digits_mlp: bytes, split: hc.DigitsSplit) -> None:
    result = hc.compress(digits_mlp, [hc.parse_quantize_option("int8-dynamic")], measure=NO_LATENCY)
    notes = result.report.steps[0].notes
    assert notes["preprocess"] in ("full", "without symbolic shape inference") and "preprocess_fallback" not in notes


def test_old_ir_light_squeezenet_quantizes_with_the_same_outputs() -> None:
    original = onnx.load(str(LIGHT_SQUEEZENET))
    assert original.ir_version == 3 and len(original.graph.input) > 1  # initializers listed as inputs
    result = hc.compress(original, [hc.parse_quantize_option("int8-dynamic")], measure=NO_LATENCY)
    quantized = onnx.load_from_string(result.model_bytes)
    assert quantized.ir_version >= 4 and [i.name for i in quantized.graph.input] == ["data_0"]
    assert result.report.steps[0].notes["integer_ops"] > 0
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (want,), (got,) = _outputs(original, {"data_0": x}), _outputs(result.model_bytes, {"data_0": x})
    assert want.shape == got.shape and np.allclose(want, got, atol=1e-3)
    # The IR upgrade alone (before any quantization) leaves the outputs exactly as they were.
    from host_tools.compress.passes.quantize import _current_ir

    upgraded = _current_ir(original)
    assert upgraded.ir_version == 4 and original.ir_version == 3  # a copy; the caller's model is not changed
    onnx.checker.check_model(upgraded)
    (same,) = _outputs(upgraded, {"data_0": x})
    assert np.array_equal(want, same)


def _plain_ort_static(model: bytes, calibration: np.ndarray, tmp_path: Path) -> bytes:
    """What a user gets from onnxruntime's own tool: QDQ, per-channel, its defaults otherwise."""
    from onnxruntime import quantization as ortq

    source, out = tmp_path / "fp32.onnx", tmp_path / "plain.onnx"
    source.write_bytes(model)

    class Reader:
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i : i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    ortq.quantize_static(str(source), str(out), Reader(), quant_format=ortq.QuantFormat.QDQ, per_channel=True)
    return out.read_bytes()


def _accuracy(model: bytes, split: hc.DigitsSplit) -> float:
    (logits,) = _outputs(model, {"input": split.x_test})[:1]
    return float(np.mean(np.argmax(logits, axis=1) == split.y_test))


def test_static_int8_is_no_larger_than_plain_onnxruntime(
    digits_mlp: bytes, split: hc.DigitsSplit, tmp_path: Path
) -> None:
    ours = hc.compress(digits_mlp, [hc.StaticInt8Quantization()], split.train, split.test, measure=NO_LATENCY)
    plain = _plain_ort_static(digits_mlp, split.x_train[:1024], tmp_path)
    assert len(ours.model_bytes) <= len(plain)
    assert _accuracy(ours.model_bytes, split) >= _accuracy(plain, split) - 0.005
    notes = ours.report.steps[0].notes
    assert notes["bias_zero_points_dropped"] == 3 and notes["unused_opsets_dropped"] > 0
    # The trimmed model computes exactly what onnxruntime's untrimmed output computes.
    model = onnx.load_from_string(ours.model_bytes)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    biases = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0].endswith("bias")]
    assert len(biases) == 3 and all(len(n.input) == 2 for n in biases)


# --- what `edgectl compress` checks before the work ---------------------------------------


def _job(tmp_path: Path, model: bytes, **kwargs: object) -> hc.CompressJob:
    source = tmp_path / "m.onnx"
    source.write_bytes(model)
    fields: dict = {"output": tmp_path / "out.onnx", **kwargs}
    return hc.CompressJob(source, **fields)


def test_outputs_are_checked_before_any_work(digits_mlp: bytes, tmp_path: Path) -> None:
    events: list[object] = []
    for bad in (
        {"output": Path("/nonexistent/dir/x.onnx")},
        {"packed": tmp_path / "missing" / "p.onnx"},
        {"output": tmp_path / "m.onnx" / "x.onnx"},  # a file where a directory should be
    ):
        job = _job(tmp_path, digits_mlp, **bad)
        with pytest.raises(ConfigError, match=r"cannot be written: .*nothing was done") as info:
            hc.run_compress_job(job, events.append)
        assert str(next(iter(bad.values()))) in info.value.message
    assert events == [] and not (tmp_path / "out.onnx").exists()


def test_without_calibration_data_the_default_is_dynamic_and_static_is_refused_at_once(
    digits_mlp: bytes, split: hc.DigitsSplit, tmp_path: Path
) -> None:
    result = hc.run_compress_job(_job(tmp_path, digits_mlp))
    assert [s.name for s in result.report.steps] == ["int8-dynamic"]

    evaluation = tmp_path / "eval.npz"
    np.savez(evaluation, x=split.x_test[:32], y=split.y_test[:32])
    events: list[object] = []
    for steps in (
        hc.StepOptions(quantize="int8-static"),
        hc.StepOptions(quantize="int8-static", max_accuracy_drop=0.1),
    ):
        job = _job(tmp_path, digits_mlp, steps=steps, evaluation=str(evaluation))
        with pytest.raises(ConfigError, match=r"int8-static needs calibration data: give --calib"):
            hc.run_compress_job(job, events.append)
    assert events == []


def test_with_calibration_data_the_default_stays_static(
    digits_mlp: bytes, split: hc.DigitsSplit, tmp_path: Path
) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=split.x_train[:64])
    result = hc.run_compress_job(_job(tmp_path, digits_mlp, calibration=str(calib)))
    assert [s.name for s in result.report.steps] == ["int8-static"]
