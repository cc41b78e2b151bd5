"""Install slots on disk, atomic activation, the previous version kept, rollback.

Layout under the agent's data directory::

    state.json                    per bundle name: the active slot, the previous one, the floor,
                                  and the versions that ran with their content digest
    slots/<name>/v<version>/      verified payload files of one bundle version
    staging/<transfer_id>.*       transfers being received, kept across restarts (device_agent.receiving)
    deferred/<transfer_id>.*      received bundles the update gate held back (kept across restarts)
    tmp/                          verification, extraction and profiling scratch (emptied at start)

Every change of what is active is one atomic replace of ``state.json`` (temp file, fsync,
rename, fsync the directory). A slot directory is complete and fsynced before its name
appears under ``slots/``, so after a power cut ``state.json`` names either the old or
the new version, and both are whole. Slots that ``state.json`` does not name are
leftovers of an interrupted install and are removed at start.

Activation is two-phase. :meth:`Installer.activate` makes the new version active but
marks it ``pending`` (with the command that asked for it); only :meth:`Installer.confirm`,
called once the health check and benchmark passed, clears the mark. An agent that
finds a pending version at start (power cut, ``kill -9``, or a runtime that crashed the
process during the health check) rolls it back with :meth:`Installer.roll_back_pending`:
a version that never proved itself never stays active, and a model that crashes the
agent cannot put it in a restart loop.

Rollback protection keeps, per bundle name, a *floor* and the versions that *ran*
(the rule is :mod:`edge_sdk.bundle.admission`'s). A signed deploy must exceed the
floor: the version the device runs, or last ran, after every signed rollback or
remove, not the highest version ever seen. :meth:`Installer.confirm` makes the
confirmed version the floor and records its content digest; :meth:`Installer.rollback`
with ``signed=True`` (the operator's rollback command) makes the restored version the
floor; :meth:`Installer.remove` keeps the removed version as the floor. A version that
never passed its health check (rolled back for a failed check, a missing runtime, a
model that does not load, or an interrupted install) leaves the floor and the record
untouched, so a corrected bundle of the same number installs. The versions that ran are
kept with their content digest (the :data:`~edge_sdk.bundle.admission.MAX_RAN_VERSIONS`
highest), so a different bundle under a number that already ran is refused.
``state.json`` of schema 1 (which kept only the highest version accepted) is migrated
in place at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.bundle import (
    BundleLimits,
    DeviceFacts,
    Expected,
    Manifest,
    VerifiedBundle,
    VersionHistory,
    content_digest,
    verify_bundle,
)
from edge_sdk.bundle.admission import MAX_RAN_VERSIONS
from edge_sdk.durable import atomic_write_bytes, fsync_dir, fsync_tree, read_json
from edge_sdk.errors import EdgeError, StorageError
from edge_sdk.trust import RecipientKey, TrustedKeys

__all__ = ["ActiveBundle", "BundleChecks", "Installer", "PendingRollback", "StagedBundle"]

log = logging.getLogger(__name__)
_STATE_SCHEMA = 2
#: File in a slot that records the execution chosen at install (sparse bundles).
EXECUTION_FILE = "execution.json"
_MAX_EXECUTION_BYTES = 64 * 1024


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

    @property
    def execution(self) -> dict[str, Any] | None:
        """The execution chosen for this version when it was installed (sparse bundles), or None.

        Kept in the slot (``execution.json``) so that a restart does not measure again.
        """
        try:
            data = read_json(self.slot / EXECUTION_FILE, None, max_bytes=_MAX_EXECUTION_BYTES)
        except StorageError:
            return None
        return data if isinstance(data, dict) else None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "version": self.version, "precision": self.manifest.precision}
        execution = self.execution
        if execution is not None and isinstance(execution.get("chosen"), str):
            d["execution"] = execution["chosen"]
        return d


@dataclass(frozen=True)
class PendingRollback:
    """A version found active-but-unconfirmed at start, and what replaced it.

    Attributes:
        name: bundle name.
        version: the version whose install was interrupted.
        command_id: the deploy command that asked for it ("" if unknown).
        restored: the version active again, or None.
    """

    name: str
    version: int
    command_id: str
    restored: int | None


@dataclass(frozen=True)
class BundleChecks:
    """What a received bundle is verified against, besides its own signatures and hashes.

    Passed to :func:`edge_sdk.bundle.verify_bundle` by :meth:`Installer.stage` and
    :meth:`Installer.stage_scratch`.

    Attributes:
        trusted: keys that may sign bundles; None means the installer's own keys.
        device: this device's facts, for the bundle's target constraints; None skips them.
        expect: the name and version the signed command announced; None skips the match.
        decrypt_with: this device's decryption key, for encrypted bundles; without it an
            encrypted bundle is refused.
    """

    trusted: TrustedKeys | None = None
    device: DeviceFacts | None = None
    expect: Expected | None = None
    decrypt_with: RecipientKey | None = None


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
        limits: bundle limits (default: :class:`~edge_sdk.bundle.BundleLimits`).
        checkpoint: called with the name of each step of an install as it is reached
            (``staged``, ``activated``, ``confirmed``); the agent's ``debug_crash_at``
            option uses it to SIGKILL itself there in crash-safety tests.
    """

    def __init__(
        self,
        data_dir: Path,
        trusted: TrustedKeys,
        limits: BundleLimits | None = None,
        checkpoint: Callable[[str], None] = lambda _point: None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.trusted = trusted
        self.limits = limits or BundleLimits()
        self.checkpoint = checkpoint
        self.slots_dir = self.data_dir / "slots"
        self.staging_dir = self.data_dir / "staging"
        self.deferred_dir = self.data_dir / "deferred"
        self.tmp_dir = self.data_dir / "tmp"
        self.state_path = self.data_dir / "state.json"
        try:
            for d in (self.data_dir, self.slots_dir, self.staging_dir, self.deferred_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.data_dir}: {exc.strerror}") from exc
        self._state = self._load_state()

    # --- state ----------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        state: Any = read_json(self.state_path, {"schema": _STATE_SCHEMA, "bundles": {}})
        if (
            not isinstance(state, dict)
            or state.get("schema") not in (1, _STATE_SCHEMA)
            or not isinstance(state.get("bundles"), dict)
        ):
            raise StorageError(f"{self.state_path} is corrupt: unknown layout")
        if state["schema"] == 1:
            state = self._migrate_v1(state)
            self._write_state(state)
            log.info("migrated %s to schema %d (floors and versions that ran)", self.state_path, _STATE_SCHEMA)
        loaded: dict[str, Any] = state
        return loaded

    def _migrate_v1(self, old: dict[str, Any]) -> dict[str, Any]:
        """Schema 1 kept ``highest`` (every version ever activated); schema 2 keeps a floor and what ran.

        A confirmed active version becomes the floor; an unconfirmed one (rolled back
        at start) leaves its predecessor as the floor; with nothing active, the old
        ``highest`` stays the floor (``floor_reason`` ``highest``). The content digest
        of every kept slot that ran is read from its manifest.
        """
        bundles: dict[str, Any] = {}
        entry: Any
        for name, entry in old["bundles"].items():
            if not isinstance(entry, dict):
                raise StorageError(f"{self.state_path} is corrupt: entry {name!r} is not an object")
            new: dict[str, Any] = {k: entry.get(k) for k in ("active", "previous")}
            if "pending" in entry:
                new["pending"] = entry["pending"]
            ran_versions = [int(new[k]["version"]) for k in ("active", "previous") if new.get(k)]
            if "pending" in entry and new.get("active"):
                ran_versions.remove(int(new["active"]["version"]))
            floor: int | None = None
            reason = "ran"
            if new.get("active") and "pending" not in entry:
                floor = int(new["active"]["version"])
            elif new.get("previous"):
                floor = int(new["previous"]["version"])
            elif entry.get("highest"):
                floor, reason = int(entry["highest"]), "highest"
            new["floor"] = None if floor is None else {"version": floor, "reason": reason}
            ran = {}
            for version in ran_versions:
                manifest = self._slot_manifest(name, version)
                if manifest is not None:
                    ran[str(version)] = content_digest(manifest.files)
            new["ran"] = ran
            bundles[name] = new
        return {"schema": _STATE_SCHEMA, "bundles": bundles}

    def _slot_manifest(self, name: str, version: int) -> Manifest | None:
        """The manifest kept in a slot, or None if it cannot be read."""
        try:
            raw = (self._slot_dir(name, version) / "manifest.json").read_bytes()
            return Manifest.from_bytes(raw, self.limits.max_manifest_bytes)
        except (OSError, EdgeError):
            return None

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
        """The floor of ``name``: a signed deploy must offer a newer version (None: no floor)."""
        return self.history(name).floor

    def history(self, name: str) -> VersionHistory:
        """What rollback protection knows of ``name``: installed version, floor and why, versions that ran."""
        entry = self._state["bundles"].get(name) or {}
        active, floor = entry.get("active"), entry.get("floor")
        return VersionHistory(
            installed=int(active["version"]) if active else None,
            floor=int(floor["version"]) if floor else None,
            floor_reason=str(floor.get("reason", "ran")) if floor else "ran",
            ran={int(v): str(d) for v, d in (entry.get("ran") or {}).items()},
        )

    # --- recovery -------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Remove leftovers of interrupted work: scratch and unnamed slots.

        Partial transfers in ``staging/`` are kept: :class:`device_agent.receiving.Receiving`
        resumes them (or removes them by its own bounds).

        Returns:
            What was removed, for the log.
        """
        removed = []
        for child in self.tmp_dir.iterdir():
            _remove(child)
            removed.append(str(child))
        # Temp files of an atomic write of state.json cut short (edge_sdk.durable names them so).
        for child in self.data_dir.glob(f".{self.state_path.name}.*.tmp"):
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

    # --- deferred (update gate said "not now") -------------------------------------

    def defer(self, transfer_id: str, bundle_path: Path, command: bytes) -> None:
        """Keep a received bundle and its command until the update gate opens.

        The bundle is fsynced and moved first and the command written last (atomically), so a
        crash in between leaves a bundle without a command, which :meth:`deferred`
        removes: a deferred install is whole or absent.

        Raises:
            StorageError: the bundle cannot be moved or the command written.
        """
        target = self.deferred_dir / f"{transfer_id}.edge"
        try:
            with open(bundle_path, "rb") as fh:  # received without an fsync (see receiving.StagingFile.finish)
                os.fsync(fh.fileno())
            os.replace(bundle_path, target)
            fsync_dir(self.deferred_dir)
        except OSError as exc:
            raise StorageError(f"cannot keep deferred bundle in {self.deferred_dir}: {exc.strerror}") from exc
        atomic_write_bytes(self.deferred_dir / f"{transfer_id}.cmd", command, mode=0o600)

    def deferred(self) -> list[tuple[str, Path, bytes]]:
        """Deferred installs, oldest first: (transfer id, bundle file, command bytes).

        Incomplete entries (a crash while deferring) are removed.
        """
        found = []
        for child in sorted(self.deferred_dir.iterdir(), key=lambda p: (p.stat().st_mtime, p.name)):
            tid, _, suffix = child.name.partition(".")
            if suffix == "edge" and (self.deferred_dir / f"{tid}.cmd").is_file():
                try:
                    found.append((tid, child, (self.deferred_dir / f"{tid}.cmd").read_bytes()))
                except OSError as exc:
                    raise StorageError(f"cannot read deferred command {tid}: {exc.strerror}") from exc
            elif suffix != "cmd" or not (self.deferred_dir / f"{tid}.edge").is_file():
                _remove(child)
        return found

    def drop_deferred(self, transfer_id: str) -> None:
        """Forget a deferred install (done, refused or superseded)."""
        _remove(self.deferred_dir / f"{transfer_id}.cmd")
        _remove(self.deferred_dir / f"{transfer_id}.edge")

    def stage(self, bundle_path: Path, now: float, checks: BundleChecks | None = None) -> StagedBundle:
        """Verify a received bundle and unpack it into a fresh slot (not yet active).

        Args:
            bundle_path: the received bundle file.
            now: current time (unix seconds), for expiry checks.
            checks: what else to verify it against (default: signed by the installer's keys).

        Returns:
            The verified bundle and its slot.

        Raises:
            UntrustedInputError: any failed check (see :func:`edge_sdk.bundle.verify_bundle`).
            StorageError: the slot cannot be written (disk full...).
        """
        checks = checks or BundleChecks()
        with self._unpacking("unpack-", into=self.slots_dir) as scratch:
            verified = verify_bundle(
                bundle_path,
                checks.trusted or self.trusted,
                now,
                installed_version=self.history,
                limits=self.limits,
                extract_to=scratch / "payload",
                device=checks.device,
                expect=checks.expect,
                decrypt_with=checks.decrypt_with,
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

    def stage_scratch(self, bundle_path: Path, now: float, checks: BundleChecks | None = None) -> StagedBundle:
        """Verify a bundle and unpack it into a scratch directory, for profiling only.

        Every check of :meth:`stage` runs except rollback protection (nothing is
        installed, so an older version may be measured). ``state.json`` and ``slots/``
        are not touched; the caller removes the scratch with :meth:`discard`, and
        :meth:`recover` removes it after a crash.

        Args:
            bundle_path: the received bundle file.
            now: current time (unix seconds), for expiry checks.
            checks: what else to verify it against (default: signed by the installer's keys).

        Returns:
            The verified bundle and its scratch directory.

        Raises:
            UntrustedInputError: any failed check.
            StorageError: the scratch directory cannot be written.
        """
        checks = checks or BundleChecks()
        with self._unpacking("profile-", into=self.tmp_dir) as scratch:
            verified = verify_bundle(
                bundle_path,
                checks.trusted or self.trusted,
                now,
                limits=self.limits,
                extract_to=scratch / "payload",
                device=checks.device,
                expect=checks.expect,
                decrypt_with=checks.decrypt_with,
            )
        return StagedBundle(verified, scratch)

    @contextlib.contextmanager
    def _unpacking(self, prefix: str, *, into: Path) -> Iterator[Path]:
        """A fresh scratch directory under ``tmp/`` with an empty ``payload/``, for one bundle.

        The body verifies the bundle into ``payload/`` and then moves the scratch into
        place or keeps it. If the body fails, the scratch is removed, and an
        :class:`OSError` becomes a :class:`StorageError` that names ``into``.
        """
        scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        done = False
        try:
            (scratch / "payload").mkdir()
            yield scratch
            done = True
        except OSError as exc:
            raise StorageError(f"cannot unpack bundle into {into}: {exc.strerror}") from exc
        finally:
            if not done and scratch.exists():
                _remove(scratch)

    def discard(self, staged: StagedBundle) -> None:
        """Remove a scratch directory made by :meth:`stage_scratch`."""
        _remove(staged.slot)

    def activate(self, staged: StagedBundle, command_id: str = "") -> ActiveBundle | None:
        """Make a staged slot active, pending its health check; the old active one becomes ``previous``.

        Args:
            staged: from :meth:`stage`.
            command_id: the deploy command, remembered with the pending mark so that a
                roll-back at the next start can be reported against it.

        Returns:
            The bundle that was active before, if any.
        """
        m = staged.verified.manifest
        self.checkpoint("staged")
        state = json.loads(json.dumps(self._state))
        entry = state["bundles"].setdefault(m.name, {})
        old = entry.get("active")
        entry["previous"] = old
        entry["active"] = {"version": m.version}
        entry.setdefault("floor", None)
        entry.setdefault("ran", {})
        entry["pending"] = {"command_id": command_id}
        self._write_state(state)
        log.info("activated %s v%s (pending its health check)", m.name, m.version)
        self.checkpoint("activated")
        self._prune(m.name)
        return self._load_active(m.name, "previous")

    def confirm(self, name: str) -> None:
        """Clear the pending mark: the active version of ``name`` passed its health check.

        It becomes the floor, and is recorded as having run with its content digest.
        """
        entry = self._state["bundles"].get(name)
        if entry is None or "pending" not in entry:
            return
        state = json.loads(json.dumps(self._state))
        new = state["bundles"][name]
        del new["pending"]
        if new.get("active"):
            version = int(new["active"]["version"])
            new["floor"] = {"version": version, "reason": "ran"}
            manifest = self._slot_manifest(name, version)
            if manifest is not None:
                ran = dict(new.get("ran") or {})
                ran[str(version)] = content_digest(manifest.files)
                kept = sorted(ran, key=int)[-MAX_RAN_VERSIONS:]
                new["ran"] = {v: ran[v] for v in kept}
        self._write_state(state)
        log.info("confirmed %s v%s", name, entry["active"]["version"] if entry.get("active") else None)
        self.checkpoint("confirmed")

    def record_execution(self, active: ActiveBundle, choice: dict[str, Any]) -> None:
        """Keep the execution chosen for an active bundle in its slot, durably.

        Args:
            active: the bundle, from :meth:`active` (its slot is written, not looked up again).
            choice: the choice, as :attr:`ActiveBundle.execution` will read it back.

        Raises:
            StorageError: the file cannot be written (from :func:`~edge_sdk.durable.atomic_write_bytes`).
        """
        atomic_write_bytes(active.slot / EXECUTION_FILE, json.dumps(choice, sort_keys=True).encode())

    def pending(self) -> list[str]:
        """Names whose active version has not passed its health check yet."""
        return sorted(n for n, e in self._state["bundles"].items() if "pending" in e)

    def roll_back_pending(self) -> list[PendingRollback]:
        """Roll back every version left pending by an interrupted install (call at start).

        Returns:
            One entry per roll-back, for the agent to report.
        """
        done = []
        for name in self.pending():
            entry = self._state["bundles"][name]
            version = int(entry["active"]["version"]) if entry.get("active") else 0
            command_id = str((entry.get("pending") or {}).get("command_id", ""))
            restored = self.rollback(name)
            done.append(PendingRollback(name, version, command_id, restored.version if restored else None))
        return done

    def rollback(self, name: str, *, signed: bool = False) -> ActiveBundle | None:
        """Make the previous version active again (the failed one is dropped).

        Args:
            name: the bundle name.
            signed: an operator's signed rollback command asked for it: the restored
                version becomes the floor. Otherwise (a failed health check, an interrupted
                install) the floor stays what it was: the dropped version never ran.

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
        entry.pop("pending", None)
        if signed and entry["active"] is not None:
            entry["floor"] = {"version": int(entry["active"]["version"]), "reason": "rollback"}
        self._write_state(state)
        if failed:
            _remove(self._slot_dir(name, int(failed["version"])))
        log.warning("rolled back %s to %s", name, entry["active"])
        return self.active(name)

    def remove(self, name: str) -> int | None:
        """Stop running ``name`` and delete its slots; the removed version stays the floor.

        Returns:
            The version that was active, or None if nothing of that name was installed.
        """
        state = json.loads(json.dumps(self._state))
        entry = state["bundles"].get(name)
        if entry is None or not entry.get("active"):
            return None
        removed = int(entry["active"]["version"])
        state["bundles"][name] = {
            "active": None,
            "previous": None,
            "floor": {"version": removed, "reason": "removed"},
            "ran": entry.get("ran") or {},
        }
        self._write_state(state)
        _remove(self.slots_dir / name)
        log.info("removed %s (was v%s)", name, removed)
        return removed

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
