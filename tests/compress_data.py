"""Data, models and helpers shared by the compression tests (a pytest plugin).

A test module that wants the fixtures names this module in ``pytest_plugins``::

    pytest_plugins = ["compress_data"]

Fixtures (session-scoped: built once for the whole run, never modified by a test):

- ``split``: scikit-learn's digits, split 75/25 with seed 0 (:func:`load_digits_split`).
- ``mlp``: a 128-64 MLP trained on ``split``, as ONNX bytes.
- ``digits_mlp``: a 64-32 MLP trained on ``split``, as ONNX bytes.

Helpers: :func:`run_model` (first output over all samples) and :data:`FAST` (measure
without timing latency).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import host_tools.compress as hc
from host_tools.compress.evaluate import open_host_session, run_batched

__all__ = ["FAST", "digits_mlp", "mlp", "run_model", "split"]

FAST = hc.MeasureOptions(latency=False)
"""Measure size, parameters, sparsity and quality, but not host latency."""


def run_model(model: onnx.ModelProto | bytes, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's first output for every sample of ``x``, in onnxruntime."""
    with open_host_session(model) as session:
        return run_batched(session, x, batch_size)


@pytest.fixture(scope="session")
def split() -> hc.DigitsSplit:
    """The digits, 75% train and 25% test, stratified, seed 0."""
    return hc.load_digits_split(test_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def mlp(split: hc.DigitsSplit) -> bytes:
    """A 128-64 MLP trained on the digits."""
    return hc.train_digits_mlp(split, hidden=(128, 64), seed=0, max_iter=60)


@pytest.fixture(scope="session")
def digits_mlp(split: hc.DigitsSplit) -> bytes:
    """A 64-32 MLP trained on the digits."""
    return hc.train_digits_mlp(split, hidden=(64, 32), seed=0, max_iter=60)
