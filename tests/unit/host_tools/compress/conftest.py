"""Fixtures shared by the compression tests in this folder.

Session-scoped: built once for the whole run, never modified by a test.

- ``split``: scikit-learn's digits, split 75/25 with seed 0.
- ``mlp``: a 128-64 MLP trained on ``split``, as ONNX bytes.
- ``digits_mlp``: a 64-32 MLP trained on ``split``, as ONNX bytes.
"""

from __future__ import annotations

import pytest

import host_tools.compress as hc


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
