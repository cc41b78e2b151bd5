"""Durable, atomic writes: temp file in the same directory, fsync, rename, fsync the directory.

Power can be cut at any instant on a device; after a crash a path holds either its old
content or its new content, never a mix, and never a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edge_sdk.errors import StorageError

__all__ = ["atomic_write_bytes", "atomic_writer", "fsync_dir", "fsync_tree"]


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
