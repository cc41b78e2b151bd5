"""Durable, atomic writes: temp file in the same directory, fsync, rename, fsync the directory.

Power can be cut at any instant on a device; after a crash a path holds either its old
content or its new content, never a mix, and never a half-written file under the real name.
:func:`read_json` reads such a file back: the value, or a default while none was written yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from edge_sdk.errors import StorageError

__all__ = ["MAX_JSON_FILE_BYTES", "atomic_write_bytes", "atomic_writer", "fsync_dir", "fsync_tree", "read_json"]

#: Default bound of :func:`read_json`: state files are small; anything larger is not ours.
MAX_JSON_FILE_BYTES = 16 << 20


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (bottom-up), then ``root``."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly.

    On any exception the temp file is removed and ``path`` is left untouched.

    Raises:
        StorageError: the directory is missing or unwritable, or the disk is full.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}", path=str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}", path=str(path)) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` durably and atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode) as fh:
        fh.write(data)


def read_json(path: Path, default: Any, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
    """Read a JSON file this program wrote, or ``default`` when there is none yet.

    The one reader of the agent's own JSON state (install state, seen nonces, outbox
    cursor, recorded executions). Only a missing file means "nothing written yet";
    every other failure is an error, because guessing would lose state. The caller
    checks the layout of what it gets.

    Args:
        path: the file.
        default: returned, as it is, when ``path`` does not exist.
        max_bytes: refuse a larger file without parsing it.

    Returns:
        The parsed JSON value, or ``default``.

    Raises:
        StorageError: the file cannot be read, is larger than ``max_bytes``, or is not
            JSON (the message then says it is corrupt).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        return default
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from exc
    if len(raw) > max_bytes:
        raise StorageError(f"{path} is corrupt: larger than {max_bytes} bytes", path=str(path))
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"{path} is corrupt: {exc}", path=str(path)) from exc
