"""Helpers shared by the compression tests: :func:`run_model` and :data:`FAST`.

The shared fixtures (the digits split and the trained MLPs) are in tests/unit/host_tools/compress/conftest.py.
"""

from __future__ import annotations

import numpy as np
import onnx

import host_tools.compress as hc
from host_tools.compress.evaluate import open_host_session, run_batched

__all__ = ["FAST", "run_model"]

FAST = hc.MeasureOptions(latency=False)
"""Measure size, parameters, sparsity and quality, but not host latency."""


def run_model(model: onnx.ModelProto | bytes, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's first output for every sample of ``x``, in onnxruntime."""
    with open_host_session(model) as session:
        return run_batched(session, x, batch_size)
