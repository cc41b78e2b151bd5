"""Install slots on disk, atomic activation, the previous version kept, rollback.

Layout under the agent's data directory::

    state.json                    which slot of each bundle is active, and the previous one
    slots/<name>/v<version>/      verified payload files of one bundle version
    staging/<transfer_id>.part    bytes of a transfer being received
    tmp/                          verification and extraction scratch (emptied at start)

Every change of what is active is one atomic replace of ``state.json`` (temp file, fsync,
rename, fsync the directory). A slot directory is complete and fsynced before its name
appears under ``slots/``, so after a power cut ``state.json`` names either the old or
the new version, and both are whole. Slots that ``state.json`` does not name are
leftovers of an interrupted install and are removed at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.bundle import BundleLimits, Manifest, VerifiedBundle, verify_bundle
from edge_sdk.durable import atomic_write_bytes, fsync_dir, fsync_tree
from edge_sdk.errors import StorageError
from edge_sdk.trust import TrustedKeys

__all__ = ["ActiveBundle", "Installer", "StagedBundle"]

log = logging.getLogger(__name__)
_STATE_SCHEMA = 1


@dataclass(frozen=True)
class ActiveBundle:
    """What is installed for one bundle name."""

    name: str
    version: int
    slot: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.slot / "payload" / self.manifest.model

    @property
    def sample_path(self) -> Path | None:
        return self.slot / "payload" / self.manifest.sample_input if self.manifest.sample_input else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "precision": self.manifest.precision}


@dataclass(frozen=True)
class StagedBundle:
    """A verified bundle unpacked into its slot, not yet active."""

    verified: VerifiedBundle
    slot: Path


class Installer:
    """Owns the agent's data directory.

    Args:
        data_dir: the agent's own directory (created if missing).
        trusted: keys that may sign bundles.
        limits: bundle limits.
    """

    def __init__(self, data_dir: Path, trusted: TrustedKeys, limits: BundleLimits = BundleLimits()) -> None:
        self.data_dir = Path(data_dir)
        self.trusted = trusted
        self.limits = limits
        self.slots_dir = self.data_dir / "slots"
        self.staging_dir = self.data_dir / "staging"
        self.tmp_dir = self.data_dir / "tmp"
        self.state_path = self.data_dir / "state.json"
        try:
            for d in (self.data_dir, self.slots_dir, self.staging_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.data_dir}: {exc.strerror}") from exc
        self._state = self._load_state()

    # --- state ----------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {"schema": _STATE_SCHEMA, "bundles": {}}
        except OSError as exc:
            raise StorageError(f"cannot read {self.state_path}: {exc.strerror}") from exc
        try:
            state = json.loads(raw)
        except ValueError as exc:
            raise StorageError(f"{self.state_path} is corrupt: {exc}") from exc
        if (
            not isinstance(state, dict)
            or state.get("schema") != _STATE_SCHEMA
            or not isinstance(state.get("bundles"), dict)
        ):
            raise StorageError(f"{self.state_path} is corrupt: unknown layout")
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.state_path, json.dumps(state, sort_keys=True, indent=1).encode())
        self._state = state

    def _slot_dir(self, name: str, version: int) -> Path:
        return self.slots_dir / name / f"v{version}"

    def _load_active(self, name: str, key: str) -> ActiveBundle | None:
        entry = self._state["bundles"].get(name, {}).get(key)
        if entry is None:
            return None
        slot = self._slot_dir(name, int(entry["version"]))
        try:
            manifest = Manifest.from_bytes((slot / "manifest.json").read_bytes(), self.limits.max_manifest_bytes)
        except OSError as exc:
            raise StorageError(f"slot {slot} named in state.json is unreadable: {exc.strerror}") from exc
        return ActiveBundle(name, manifest.version, slot, manifest)

    def active(self, name: str) -> ActiveBundle | None:
        """The active version of ``name``, or None."""
        return self._load_active(name, "active")

    def previous(self, name: str) -> ActiveBundle | None:
        return self._load_active(name, "previous")

    def all_active(self) -> list[ActiveBundle]:
        return [a for n in sorted(self._state["bundles"]) if (a := self.active(n)) is not None]

    def accepted_version(self, name: str) -> int | None:
        """Highest version of ``name`` ever activated here (rollback protection)."""
        entry = self._state["bundles"].get(name)
        return None if entry is None else entry.get("highest")

    # --- recovery -------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Remove leftovers of interrupted work: scratch, partial transfers, unnamed slots.

        Returns:
            What was removed, for the log.
        """
        removed = []
        for d in (self.tmp_dir, self.staging_dir):
            for child in d.iterdir():
                _remove(child)
                removed.append(str(child))
        keep = set()
        for name, entry in self._state["bundles"].items():
            for key in ("active", "previous"):
                if entry.get(key):
                    keep.add(self._slot_dir(name, int(entry[key]["version"])))
        for name_dir in self.slots_dir.iterdir():
            for slot in name_dir.iterdir() if name_dir.is_dir() else []:
                if slot not in keep:
                    _remove(slot)
                    removed.append(str(slot))
        return removed

    # --- install --------------------------------------------------------------------

    def staging_path(self, transfer_id: str) -> Path:
        return self.staging_dir / f"{transfer_id}.part"

    def stage(self, bundle_path: Path, now: float) -> StagedBundle:
        """Verify a received bundle and unpack it into a fresh slot (not yet active).

        Raises:
            UntrustedInputError: any failed check (see :func:`edge_sdk.bundle.verify_bundle`).
            StorageError: the slot cannot be written (disk full...).
        """
        scratch = Path(tempfile.mkdtemp(prefix="unpack-", dir=self.tmp_dir))
        try:
            payload = scratch / "payload"
            payload.mkdir()
            verified = verify_bundle(
                bundle_path,
                self.trusted,
                now,
                installed_version=self.accepted_version,
                limits=self.limits,
                extract_to=payload,
            )
            manifest = verified.manifest
            (scratch / "manifest.json").write_bytes(manifest.to_bytes())
            fsync_tree(scratch)
            slot = self._slot_dir(manifest.name, manifest.version)
            slot.parent.mkdir(parents=True, exist_ok=True)
            if slot.exists():
                _remove(slot)
            os.replace(scratch, slot)
            fsync_dir(slot.parent)
            return StagedBundle(verified, slot)
        except OSError as exc:
            raise StorageError(f"cannot unpack bundle into {self.slots_dir}: {exc.strerror}") from exc
        finally:
            if scratch.exists():
                _remove(scratch)

    def activate(self, staged: StagedBundle) -> ActiveBundle | None:
        """Make a staged slot active; the old active one becomes ``previous``.

        Returns:
            The bundle that was active before, if any.
        """
        m = staged.verified.manifest
        state = json.loads(json.dumps(self._state))
        entry = state["bundles"].setdefault(m.name, {})
        old = entry.get("active")
        entry["previous"] = old
        entry["active"] = {"version": m.version}
        entry["highest"] = max(m.version, entry.get("highest") or 0)
        self._write_state(state)
        log.info("activated %s v%s", m.name, m.version)
        self._prune(m.name)
        return self._load_active(m.name, "previous")

    def rollback(self, name: str) -> ActiveBundle | None:
        """Make the previous version active again (the failed one is dropped).

        Returns:
            The bundle now active, or None if there was no previous version.
        """
        state = json.loads(json.dumps(self._state))
        entry = state["bundles"].get(name)
        if entry is None:
            return None
        failed = entry.get("active")
        entry["active"] = entry.get("previous")
        entry["previous"] = None
        if entry["active"] is None:
            del state["bundles"][name]
            if entry.get("highest"):
                # Keep rollback protection even when nothing remains active.
                state["bundles"][name] = {"active": None, "previous": None, "highest": entry["highest"]}
        self._write_state(state)
        if failed:
            _remove(self._slot_dir(name, int(failed["version"])))
        log.warning("rolled back %s to %s", name, entry["active"])
        return self.active(name)

    def _prune(self, name: str) -> None:
        entry = self._state["bundles"][name]
        keep = {f"v{entry[k]['version']}" for k in ("active", "previous") if entry.get(k)}
        name_dir = self.slots_dir / name
        for slot in name_dir.iterdir():
            if slot.name not in keep:
                _remove(slot)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
