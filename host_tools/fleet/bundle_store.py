"""The bundles this host has deployed, kept so that the next version can travel as a delta.

A device that runs version N holds N's payload in its slot; to send it N+1 as a delta the
host needs N's bundle file too (:func:`host_tools.delta.build_delta` reads both). So every
deploy keeps a copy of the bundle it sends, named by content::

    <root>/<bundle name>/<sha256>.edge

The registry says which bundle file (by sha256) each device installed; the store has the
file. A copy is written once per content, atomically (temp file, fsync, rename), and is
never changed afterwards: a bundle file edited or removed where the operator keeps it
changes nothing here. At most ``keep`` bundles are kept per name, the least recently
deployed removed first, so the store stays a few versions deep.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.durable import atomic_writer
from edge_sdk.errors import ConfigError, StorageError

__all__ = ["BundleStore"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # a manifest's bundle name
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".edge"


@dataclass(frozen=True)
class BundleStore:
    """Bundle files by name and sha256, the last ``keep`` deployed of each name.

    Attributes:
        root: the store's directory (made when the first bundle is kept).
        keep: most bundles kept per name.

    Raises:
        ConfigError: ``keep`` below 1.
    """

    root: Path
    keep: int = 4

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError(f"a bundle store keeps at least 1 bundle per name, not {self.keep}")

    def path(self, name: str, sha256: str) -> Path:
        """Where the bundle ``name`` with this sha256 is kept (whether it is or not).

        Raises:
            ConfigError: not a bundle name, or not a sha256.
        """
        if not _NAME.fullmatch(name):
            raise ConfigError(f"not a bundle name: {name!r}")
        if not _SHA256.fullmatch(sha256):
            raise ConfigError(f"not a sha256 (64 lowercase hex digits): {sha256!r}")
        return self.root / name / f"{sha256}{_SUFFIX}"

    def get(self, name: str, sha256: str) -> Path | None:
        """The kept bundle ``name`` with this sha256, or None when the store does not have it.

        Raises:
            ConfigError: not a bundle name, or not a sha256.
        """
        path = self.path(name, sha256)
        return path if path.is_file() else None

    def put(self, bundle: Path, name: str, sha256: str) -> Path:
        """Keep a copy of ``bundle`` (once per content), then drop the oldest beyond ``keep``.

        Args:
            bundle: the bundle file being deployed.
            name: its bundle name (from its manifest).
            sha256: its sha256, as read when it was prepared for sending.

        Returns:
            The kept copy.

        Raises:
            ConfigError: not a bundle name, or not a sha256.
            StorageError: the copy cannot be written, or is not the file named (changed while copied).
        """
        target = self.path(name, sha256)
        try:
            if target.is_file():
                os.utime(target)  # deployed again: the most recent now
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._copy(bundle, target, sha256)
                log.info("kept %s as %s", bundle, target)
        except OSError as exc:
            raise StorageError(f"cannot keep {bundle} in the bundle store {self.root}: {exc.strerror}") from exc
        self._prune(target)
        return target

    @staticmethod
    def _copy(bundle: Path, target: Path, sha256: str) -> None:
        digest = hashlib.sha256()
        with open(bundle, "rb") as src, atomic_writer(target) as out:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
            if digest.hexdigest() != sha256:
                # Raised inside the writer: nothing appears under the target's name.
                raise StorageError(f"{bundle} changed while it was kept (its sha256 is no longer {sha256[:16]}...)")

    def _prune(self, kept: Path) -> None:
        """Remove the least recently deployed bundles of ``kept``'s name beyond ``keep`` (never ``kept``)."""
        try:
            found = [p for p in kept.parent.iterdir() if p.name.endswith(_SUFFIX) and p != kept]
            found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError as exc:
            log.warning("cannot list the bundle store %s: %s", kept.parent, exc.strerror)
            return
        for old in found[self.keep - 1 :]:
            try:
                old.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove %s from the bundle store: %s", old, exc.strerror)
                continue
            log.info("removed %s from the bundle store (keeping %d per name)", old.name, self.keep)
