"""edge_sdk.durable: atomic, durable replacement of files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge_sdk.durable import atomic_write_bytes, atomic_writer, fsync_dir, fsync_tree, read_json
from edge_sdk.errors import StorageError


def test_creates_a_new_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["state.json"]


def test_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old content that is longer than the new one")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_applies_the_requested_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    atomic_write_bytes(target, b"secret", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "state.json"
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"x")
    assert info.value.details["path"] == str(target)
    assert isinstance(info.value.__cause__, OSError)
    assert not (tmp_path / "no").exists()


def test_writer_raising_midway_leaves_the_original_untouched(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"original")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_writer(target) as fh:
        fh.write(b"half of the new")
        raise Boom
    assert target.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_os_error_inside_the_writer_becomes_storage_error(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"original")
    with pytest.raises(StorageError), atomic_writer(target) as fh:
        fh.write(b"partial")
        raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_writer_that_raises_before_writing_anything_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(KeyError), atomic_writer(target):
        raise KeyError("x")
    assert os.listdir(tmp_path) == []


def test_fsync_helpers_accept_real_trees(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"1")
    (tmp_path / "g").write_bytes(b"2")
    fsync_tree(tmp_path)
    fsync_dir(tmp_path)


# --- read_json: the one reader of our own JSON files ------------------------------------------


def test_read_json_returns_the_default_only_for_a_missing_file(tmp_path: Path) -> None:
    default: dict[str, int] = {}
    assert read_json(tmp_path / "absent.json", default) is default
    atomic_write_bytes(tmp_path / "state.json", b'{"a": [1, 2]}')
    assert read_json(tmp_path / "state.json", default) == {"a": [1, 2]}


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b""], ids=repr)
def test_read_json_calls_garbage_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(StorageError, match="corrupt"):
        read_json(tmp_path / "state.json", None)


def test_read_json_refuses_a_file_above_its_bound_before_parsing(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"[" + b"1," * 100 + b"1]")
    assert len(read_json(tmp_path / "state.json", None, max_bytes=1000)) == 101
    with pytest.raises(StorageError, match="larger than 100 bytes"):
        read_json(tmp_path / "state.json", None, max_bytes=100)


def test_read_json_of_an_unreadable_path_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(StorageError, match="cannot read"):
        read_json(tmp_path / "dir.json", {})
