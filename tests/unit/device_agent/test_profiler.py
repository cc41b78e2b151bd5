"""device_agent.profiler.health_check: finite, shaped, and within the latency budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.profiler import HEALTH_TIMED_RUNS, health_check
from edge_sdk.errors import HealthCheckError
from edge_sdk.runtime import TensorSpec


class FakeSession:
    """Returns fixed outputs; declares ``shape``."""

    def __init__(self, outputs: list[np.ndarray], shape: tuple[int | None, ...] = (None, 4)) -> None:
        self._outputs = outputs
        self._shape = shape
        self.calls = 0

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("logits", self._shape, "float32")]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        return self._outputs


class StepClock:
    def __init__(self, step_s: float) -> None:
        self.t = 0.0
        self.step = step_s

    def __call__(self) -> float:
        self.t += self.step  # each run reads it twice: one step per run
        return self.t


def test_healthy_model_passes() -> None:
    session = FakeSession([np.zeros((1, 4), np.float32)])
    health_check(session, {}, max_latency_ms=10.0, clock=StepClock(0.001))  # type: ignore[arg-type]
    assert session.calls == 1 + HEALTH_TIMED_RUNS


def test_nan_output_fails() -> None:
    with pytest.raises(HealthCheckError) as info:
        health_check(FakeSession([np.array([[0, np.nan, 0, 0]], np.float32)]), {})  # type: ignore[arg-type]
    assert info.value.details["check"] == "finite"


def test_wrong_shape_fails() -> None:
    with pytest.raises(HealthCheckError) as info:
        health_check(FakeSession([np.zeros((1, 5), np.float32)]), {})  # type: ignore[arg-type]
    assert info.value.details["check"] == "shape"


def test_slower_than_the_budget_fails_and_says_by_how_much() -> None:
    with pytest.raises(HealthCheckError) as info:
        health_check(FakeSession([np.zeros((1, 4), np.float32)]), {}, max_latency_ms=1.0, clock=StepClock(0.002))  # type: ignore[arg-type]
    assert info.value.details["check"] == "latency"
    assert info.value.details["median_ms"] == pytest.approx(2.0)
    assert info.value.details["max_latency_ms"] == 1.0


def _matmul_model(path: Path, rows: int, cols: int) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["out"])],
        "m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", cols])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_model_memory_share_does_not_depend_on_what_was_loaded_before(tmp_path: Path) -> None:
    """A plain RSS difference gave 12.6, 0, 16 and 0 MiB for one 8 MiB model loaded four times."""
    from device_agent.profiler import profile_model
    from edge_sdk.metrics import EstimatedSource
    from edge_sdk.protocol import BenchmarkSpec

    big = _matmul_model(tmp_path / "big.onnx", 512, 4096)  # 8 MiB of weights
    small = _matmul_model(tmp_path / "small.onnx", 64, 256)
    source = EstimatedSource(1.0, 10.0)
    spec = BenchmarkSpec(runs=3, warmup=1)
    shares = []
    for path in (big, small, big, big):
        profile = profile_model(path, "onnxruntime", "fp32", None, spec, source)
        shares.append(profile.memory.model_bytes)
        assert profile.memory.model_bytes_method in ("heap", "rss")
    first, _, second, third = shares
    assert first >= 8 << 20
    for later in (second, third):
        assert abs(later - first) <= max(0.25 * first, 256 << 10), shares
