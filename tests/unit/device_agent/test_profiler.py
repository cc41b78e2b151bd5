"""device_agent.profiler.health_check: finite, shaped, and within the latency budget."""

from __future__ import annotations

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
