"""Unit tests for host_tools.compress.data: the operator's own data files and Dataset itself."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.errors import ConfigError
from host_tools.compress import Dataset, load_arrays


def test_npz_with_named_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 3), np.float32), y=np.arange(5))
    data = load_arrays(str(path))
    assert data.x.shape == (5, 3) and data.y is not None and data.y.dtype == np.int64


def test_npz_positional_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, np.ones((4, 2)), np.array([0.0, 1.0, 1.0, 0.0]))
    data = load_arrays(path)
    assert data.x.shape == (4, 2) and data.y is not None and data.y.tolist() == [0, 1, 1, 0]


def test_npz_inputs_only(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 2)))
    assert load_arrays(path).y is None


def test_npy_inputs_only(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((3, 8), np.float32))
    data = load_arrays(path)
    assert data.x.shape == (3, 8) and data.y is None


def test_npz_labels_without_inputs_names_key(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, y=np.arange(3), z=np.zeros((3, 2)))
    with pytest.raises(ConfigError) as info:
        load_arrays(path)
    assert "'x'" in str(info.value) and str(path) in str(info.value) and info.value.details["key"] == "x"


def test_npz_label_count_mismatch_names_key(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.arange(4))
    with pytest.raises(ConfigError) as info:
        load_arrays(path)
    assert "'y'" in str(info.value) and str(path) in str(info.value)


def test_non_integer_labels_name_key(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="'y'"):
        load_arrays(path)


def test_pickled_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=r"d.npy"):
        load_arrays(path)


@pytest.mark.parametrize("name,content", [("bad.npz", b"not a zip"), ("bad.npy", b"\x93NUMPY garbage")])
def test_corrupt_file_names_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=name):
        load_arrays(path)


def test_missing_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothere.npz"):
        load_arrays(tmp_path / "nothere.npz")


def test_unknown_spec() -> None:
    with pytest.raises(ConfigError, match="entry point"):
        load_arrays("just some words")


def test_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "calib_mod.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            def with_labels():
                return np.zeros((3, 4), np.float32), np.array([0, 1, 2])
            def inputs_only():
                return np.zeros((2, 4), np.float32)
            def broken():
                raise RuntimeError("no data today")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "calib_mod", raising=False)
    data = load_arrays("calib_mod:with_labels")
    assert data.x.shape == (3, 4) and data.y is not None and data.y.tolist() == [0, 1, 2]
    assert load_arrays("calib_mod:inputs_only").y is None
    with pytest.raises(ConfigError, match="no data today"):
        load_arrays("calib_mod:broken")
    with pytest.raises(ConfigError, match="missing"):
        load_arrays("calib_mod:missing")
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        load_arrays("no_such_module_xyz:f")


def test_dataset_validates() -> None:
    with pytest.raises(ConfigError):
        Dataset(np.zeros((0, 2)))
    with pytest.raises(ConfigError):
        Dataset(np.zeros((2, 2)), np.zeros(3, dtype=np.int64))
    assert len(Dataset(np.zeros((2, 2)))) == 2


def test_sample_is_stratified_ordered_and_reproducible() -> None:
    y = np.repeat(np.arange(3), [50, 30, 2])
    data = Dataset(np.arange(len(y), dtype=np.float32)[:, None], y)
    part = data.sample(0.2, seed=5)
    assert part.y is not None
    assert np.bincount(part.y).tolist() == [10, 6, 1]  # every class in proportion, at least one
    assert np.all(np.diff(part.x[:, 0]) > 0)  # original order, no repeats
    assert np.array_equal(part.y, y[part.x[:, 0].astype(int)])  # labels stay with their inputs
    assert np.array_equal(part.x, data.sample(0.2, seed=5).x)
    assert not np.array_equal(part.x, data.sample(0.2, seed=6).x)
    assert len(data.sample(1.0).x) == len(y)


def test_sample_unlabelled_and_bad_share() -> None:
    data = Dataset(np.zeros((10, 2), np.float32))
    assert len(data.sample(0.3).x) == 3 and data.sample(0.3).y is None
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="share"):
            data.sample(share)


def test_multi_input_dataset_takes_samples_across_inputs() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(6, 2)
    data = Dataset({"ids": ids, "mask": np.ones((6, 2), np.int64)}, np.array([0, 1, 0, 1, 0, 1]))
    assert len(data) == 6 and data.input_names == ("ids", "mask")
    part = data.take(np.array([1, 4]))
    assert isinstance(part.x, Mapping) and part.x["ids"].tolist() == [[2, 3], [8, 9]] and part.y.tolist() == [1, 0]
    assert np.bincount(data.sample(0.5, seed=0).y).tolist() == [2, 2]
    with pytest.raises(
        ConfigError, match=r"training supports single-input models only; this data has inputs \['ids', 'mask'\]"
    ):
        data.array("training")
    assert Dataset(ids).array("training") is ids and Dataset(ids).input_names is None


@pytest.mark.parametrize(
    "x, match",
    [
        ({}, "at least one input"),
        ({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, "differ in sample count"),
        ({"a": np.zeros((3, 2)), "b": np.array([], dtype=np.float32)}, "input 'b'"),
    ],
)
def test_multi_input_dataset_validates(x: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Dataset(x)


def test_npz_with_one_array_per_input(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **{"x.input_ids": np.ones((5, 7), np.int64), "x.attention_mask": np.ones((5, 7)), "y": np.arange(5)})
    data = load_arrays(str(path))
    assert data.input_names is not None and set(data.input_names) == {"input_ids", "attention_mask"}
    assert data.x["input_ids"].dtype == np.int64 and data.y is not None and len(data) == 5
    np.savez(tmp_path / "both.npz", x=np.ones((5, 2)), **{"x.a": np.ones((5, 2))})
    with pytest.raises(ConfigError, match="both 'x' and per-input"):
        load_arrays(str(tmp_path / "both.npz"))
    np.savez(tmp_path / "short.npz", **{"x.a": np.ones((5, 2)), "x.b": np.ones((4, 2))})
    with pytest.raises(ConfigError, match="sample count"):
        load_arrays(str(tmp_path / "short.npz"))


def test_entry_point_returning_a_dict_of_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "twoinputs.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    return {'a': np.zeros((3, 2), np.float32), 'b': np.ones((3, 1), np.float32)}, np.array([0, 1, 2])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_arrays("twoinputs:load")
    assert data.input_names == ("a", "b") and data.y is not None and data.y.tolist() == [0, 1, 2]


def test_npz_of_unprefixed_inputs_says_to_name_them(tmp_path: Path) -> None:
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=np.ones((4, 6), np.int64), attention_mask=np.ones((4, 6), np.int64))
    with pytest.raises(ConfigError, match=r"not 1-D labels; for a model with several inputs name the arrays x.NAME"):
        load_arrays(str(path))
