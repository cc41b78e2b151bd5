"""Datasets for calibration and evaluation.

Two sources: scikit-learn's bundled handwritten digits (the demo and the tests; nothing is
downloaded), and the operator's own arrays, named on the command line as a ``.npz`` or
``.npy`` file or as a Python entry point ``module:function``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edge_sdk.errors import ConfigError

__all__ = ["Dataset", "DigitsSplit", "Inputs", "load_arrays", "load_digits_split", "match_inputs"]

logger = logging.getLogger(__name__)

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


Inputs = np.ndarray | Mapping[str, np.ndarray]
"""Model inputs: one array for a single-input model, or one array per input name."""


@dataclass(frozen=True)
class Dataset:
    """Model inputs and, when known, their integer class labels.

    Attributes:
        x: inputs; axis 0 is the sample axis. One array for a single-input model, or a
            mapping of input name to array (all with the same number of samples) for a
            model with several inputs, e.g. ``{"input_ids": ..., "attention_mask": ...}``.
        y: one integer label per sample, or ``None`` for unlabelled data (then accuracy
            is replaced by top-1 agreement with the original model).

    Raises:
        ConfigError: ``x`` is empty or not an array (or a mapping of arrays of one
            length), or ``y`` does not match it.
    """

    x: Inputs
    y: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.x, Mapping):
            if not self.x:
                raise ConfigError("dataset inputs must name at least one input", key="x")
            arrays = {str(name): value for name, value in self.x.items()}
            for name, value in arrays.items():
                _check_inputs(value, f"input {name!r}")
            lengths = {name: len(value) for name, value in arrays.items()}
            if len(set(lengths.values())) > 1:
                raise ConfigError(f"dataset inputs differ in sample count: {lengths}", key="x")
            object.__setattr__(self, "x", MappingProxyType(arrays))
        else:
            _check_inputs(self.x, "inputs")
        if self.y is None:
            return
        if getattr(self.y, "ndim", None) != 1:  # also catches a list or other non-array
            raise ConfigError("dataset labels must be a 1-D array", key="y")
        if len(self.y) != len(self):
            raise ConfigError(
                f"dataset has {len(self)} inputs but {len(self.y)} labels",
                key="y",
                inputs=len(self),
                labels=len(self.y),
            )
        if not np.issubdtype(self.y.dtype, np.integer):
            raise ConfigError(f"dataset labels must be integers, not {self.y.dtype}", key="y")

    def __len__(self) -> int:
        if isinstance(self.x, Mapping):
            return len(next(iter(self.x.values())))
        return len(self.x)

    @property
    def input_names(self) -> tuple[str, ...] | None:
        """The input names of multi-input data; ``None`` for one unnamed array."""
        return tuple(self.x) if isinstance(self.x, Mapping) else None

    def array(self, purpose: str) -> np.ndarray:
        """The inputs as one array, for work that handles single-input models only.

        Raises:
            ConfigError: the data has several named inputs (names ``purpose`` and them).
        """
        if isinstance(self.x, Mapping):
            raise ConfigError(
                f"{purpose} supports single-input models only; this data has inputs {list(self.x)}", key="x"
            )
        return self.x

    @property
    def labelled(self) -> bool:
        """Whether the dataset carries labels."""
        return self.y is not None

    def sample(self, share: float, seed: int = 0) -> Dataset:
        """A random ``share`` of the samples, in their original order.

        A labelled dataset is sampled per class (stratified): each class keeps
        ``round(share * its count)`` samples, at least one, so a small share still
        holds every class in its proportion.

        Args:
            share: the fraction to keep, in ``(0, 1]``.
            seed: random seed of the draw.

        Raises:
            ConfigError: ``share`` is outside ``(0, 1]``.
        """
        if not 0.0 < share <= 1.0:
            raise ConfigError(f"sample share must be in (0, 1], got {share}", key="share")
        rng = np.random.default_rng(seed)
        if self.y is None:
            keep = rng.choice(len(self), max(1, round(share * len(self))), replace=False)
        else:
            keep = np.concatenate([
                rng.choice(members, max(1, round(share * len(members))), replace=False)
                for members in (np.flatnonzero(self.y == label) for label in np.unique(self.y))
            ])  # fmt: skip
        keep.sort()
        return self.take(keep)

    def take(self, rows: np.ndarray | slice) -> Dataset:
        """The samples at ``rows`` (indices or a slice), labels with them."""
        x = {name: value[rows] for name, value in self.x.items()} if isinstance(self.x, Mapping) else self.x[rows]
        return Dataset(x, None if self.y is None else self.y[rows])


@dataclass(frozen=True)
class DigitsSplit:
    """The digits data set split into train and test parts.

    Attributes:
        x_train: float32 ``[N, 64]`` pixel intensities scaled to ``[0, 1]``.
        y_train: int64 ``[N]`` labels 0..9.
        x_test: float32 ``[M, 64]``.
        y_test: int64 ``[M]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def train(self) -> Dataset:
        """The training part as a :class:`Dataset` (use it for calibration)."""
        return Dataset(self.x_train, self.y_train)

    @property
    def test(self) -> Dataset:
        """The test part as a :class:`Dataset` (use it for evaluation)."""
        return Dataset(self.x_test, self.y_test)


def match_inputs(names: Sequence[str], x: Inputs, what: str = "the data") -> dict[str, np.ndarray]:
    """The arrays of ``x`` by model input name, in ``names`` order.

    One array feeds a single-input model; several inputs need one named array each.

    Args:
        names: the model's input names.
        x: the data's inputs.
        what: what to call the data in errors, e.g. ``"calibration data"``.

    Raises:
        ConfigError: the names differ, or one array was given for several inputs (names both sides).
    """
    names = list(names)
    if isinstance(x, Mapping):
        if set(x) != set(names):
            raise ConfigError(
                f"{what} has inputs {sorted(x)}, the model takes {names}", key="x", data=sorted(x), model=names
            )
        return {name: x[name] for name in names}
    if len(names) != 1:
        raise ConfigError(
            f"the model takes {len(names)} inputs {names}; give {what} as one array per input "
            "(.npz keys x.NAME, or a dict from a module:function)",
            key="x",
            model=names,
        )
    return {names[0]: x}


def _check_inputs(value: Any, what: str) -> None:
    if not isinstance(value, np.ndarray) or value.ndim < 1 or len(value) == 0:
        raise ConfigError(f"dataset {what} must be a non-empty array with a sample axis", key="x")
    if value.dtype == object:
        raise ConfigError(f"dataset {what} must be numeric, not objects", key="x")


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Split scikit-learn's bundled 8x8 digits (1,797 images) into train and test, stratified.

    Args:
        test_fraction: share of the samples held out for testing, in ``(0, 1)``.
        seed: random seed for the split.

    Returns:
        The split, inputs scaled from 0..16 to ``[0, 1]``.

    Raises:
        ConfigError: ``test_fraction`` is outside ``(0, 1)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}", key="test_fraction")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsSplit(x_train, y_train, x_test, y_test)


def load_arrays(spec: str | os.PathLike[str]) -> Dataset:
    """Load the operator's calibration or evaluation data.

    ``spec`` is one of:

    - a ``.npz`` file: inputs under key ``x`` and optional labels under ``y``; for a
      model with several inputs, one array per input under ``x.NAME`` (e.g.
      ``x.input_ids``, ``x.attention_mask``); without any ``x`` key, the first array is
      the inputs and the second (if any) the labels;
    - a ``.npy`` file: inputs only;
    - ``module:function``: an importable callable returning ``x`` or ``(x, y)``, where
      ``x`` is an array or a dict of input name to array.

    Pickled arrays are refused: a data file must not be able to run code.

    Args:
        spec: the file path or entry point.

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        ConfigError: the file is missing or malformed, a key is missing or its array is
            unusable, or the entry point cannot be imported or called; the message names
            the file, key or entry point.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix.lower() in (".npz", ".npy") or path.exists():
        return _load_file(path)
    if _ENTRY_POINT.match(text):
        return _load_entry_point(text)
    raise ConfigError(f"{text}: not a .npz/.npy file and not a module:function entry point", file=text)


def _load_file(path: Path) -> Dataset:
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise ConfigError(f"{path}: unsupported data file type (expected .npz or .npy)", file=str(path))
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: data file not found", file=str(path)) from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable {suffix} file ({exc})", file=str(path)) from exc
    if isinstance(loaded, np.ndarray):
        return _dataset(loaded, None, source=str(path), x_key="<array>", y_key=None)
    with loaded as archive:
        keys = list(archive.files)
        named = [k for k in keys if k.startswith("x.") and len(k) > 2]
        if named:
            if "x" in keys:
                raise ConfigError(
                    f"{path}: has both 'x' and per-input 'x.NAME' arrays; give one or the other",
                    file=str(path),
                    key="x",
                )
            y_key = "y" if "y" in keys else None
            ignored = [k for k in keys if k not in named and k != y_key]
            if ignored:
                logger.warning("%s: using %s as inputs and %r as labels, ignoring %s", path, named, y_key, ignored)
            inputs = {k[2:]: _read(archive, k, path) for k in named}
            return _dataset(
                inputs, _read(archive, y_key, path) if y_key else None, source=str(path), x_key="x", y_key=y_key
            )
        if "x" in keys:
            x_key, y_key = "x", ("y" if "y" in keys else None)
        elif "y" in keys:
            raise ConfigError(f"{path}: has labels 'y' but no inputs 'x' (keys: {keys})", file=str(path), key="x")
        elif keys:
            x_key, y_key = keys[0], (keys[1] if len(keys) > 1 else None)
            if len(keys) > 2:
                logger.warning(
                    "%s: no 'x' key; using %r as inputs and %r as labels, ignoring %s", path, x_key, y_key, keys[2:]
                )
        else:
            raise ConfigError(f"{path}: archive holds no arrays", file=str(path))
        x = _read(archive, x_key, path)
        y = _read(archive, y_key, path) if y_key else None
        if x_key != "x" and y is not None and y.ndim != 1:
            raise ConfigError(
                f"{path}: no 'x' key, so {x_key!r} would be the inputs and {y_key!r} the labels, but {y_key!r} is not "
                f"1-D labels; for a model with several inputs name the arrays x.NAME (keys: {keys})",
                file=str(path),
                key=y_key,
            )
    return _dataset(x, y, source=str(path), x_key=x_key, y_key=y_key)


def _read(archive: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(archive[key])
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: array {key!r} is unreadable ({exc})", file=str(path), key=key) from exc


def _load_entry_point(spec: str) -> Dataset:
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{spec}: cannot import module {module_name!r} ({exc})", entry_point=spec) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{spec}: module {module_name!r} has no callable {func_name!r}", entry_point=spec)
    try:
        result: Any = func()
    except Exception as exc:  # the operator's own code: report whatever it raised
        raise ConfigError(f"{spec}: raised {type(exc).__name__}: {exc}", entry_point=spec) from exc
    if isinstance(result, tuple):
        if len(result) != 2:
            raise ConfigError(f"{spec}: must return x or (x, y), got a {len(result)}-tuple", entry_point=spec)
        x, y = result
    else:
        x, y = result, None
    return _dataset(x, y, source=spec, x_key="x", y_key="y" if y is not None else None)


def _dataset(x: Any, y: Any, *, source: str, x_key: str, y_key: str | None) -> Dataset:
    if isinstance(x, Mapping):
        x_arr: Inputs = {str(name): _numeric(value, source, f"{x_key}.{name}") for name, value in x.items()}
    else:
        x_arr = _numeric(x, source, x_key)
    y_arr = None
    if y is not None:
        y_arr = _numeric(y, source, y_key or "y")
        if np.issubdtype(y_arr.dtype, np.floating) and np.all(np.mod(y_arr, 1) == 0):
            y_arr = y_arr.astype(np.int64)  # labels saved as floats, e.g. by pandas
        elif np.issubdtype(y_arr.dtype, np.integer):
            y_arr = y_arr.astype(np.int64, copy=False)
    try:
        return Dataset(x_arr, y_arr)
    except ConfigError as exc:
        key = exc.details.get("key")
        named = {"x": x_key, "y": y_key}.get(str(key), key)
        raise ConfigError(f"{source}: array {named!r}: {exc.message}", file=source, key=named) from exc


def _numeric(value: Any, source: str, key: str) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ConfigError(f"{source}: array {key!r} has non-numeric dtype {arr.dtype}", file=source, key=key)
    return arr
