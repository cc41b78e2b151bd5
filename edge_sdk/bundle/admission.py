"""What a device admits: the version floor, the content a version names, and the cheap checks.

Pure decisions, no I/O: values in, a line for the checklist out, or the specific
:class:`~edge_sdk.errors.UntrustedInputError` (or :class:`~edge_sdk.errors.StorageError`)
that says why not.

**The floor.** A signed deploy must offer a version newer than the *floor*: the version
the device runs, or last ran, after every signed rollback or remove. It is not the
highest version ever seen:

- a version becomes the floor when it passes its health check (it *ran*);
- a signed ``rollback`` command makes the restored version the floor (commands are
  signed, so an operator's explicit rollback resets it);
- a signed ``remove`` keeps the removed version as the floor (nothing runs; the floor
  is what ran last);
- a version that never activated successfully (failed health check, missing runtime,
  model that does not load, install interrupted and rolled back) leaves the floor where
  it was, so a corrected bundle of the same number installs;
- a deploy whose signed command says ``rollback`` may go below the floor.

**One number, one content.** A version that ran successfully here is remembered with
its content digest (:func:`content_digest`, over the manifest's file list); a bundle of
that version with other content is refused, with or without ``rollback``.

**Cheap checks first.** :func:`check_offer` runs, on what the signed deploy command
says about the bundle, every check that needs no byte of it: version against the floor
and content, expiry, a runtime the device lacks, target (architecture, memory,
accelerators), and storage for the download plus its unpacked payload. The bundle's own
manifest is verified again after receipt, so an offer can only make a device refuse
early, never accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from edge_sdk.bundle.manifest import DeviceFacts, FileEntry, Target
from edge_sdk.errors import ExpiredError, RollbackError, StorageError, TargetMismatchError
from edge_sdk.trust import canonical_json

__all__ = [
    "FLOOR_REASONS",
    "MAX_RAN_VERSIONS",
    "OfferedBundle",
    "VersionHistory",
    "check_offer",
    "check_storage",
    "check_version",
    "content_digest",
    "runtime_available",
    "storage_needed",
]

#: Why a floor is what it is (kept in the device's state, explained in refusals).
FLOOR_REASONS = ("ran", "rollback", "removed", "highest")
#: How many versions that ran are remembered per bundle name (the lowest are forgotten first).
MAX_RAN_VERSIONS = 32
#: Storage kept free beyond what an install needs: this many bytes, or a twentieth of the need if more.
STORAGE_MARGIN_BYTES = 1 << 20

#: Runtimes a bundle's ``runtime`` field can run on (LiteRT bundles also run on tflite-runtime).
_RUNS_ON = {"onnxruntime": ("onnxruntime",), "litert": ("litert", "tflite-runtime")}


def content_digest(files: Iterable[FileEntry]) -> str:
    """The digest that names a bundle's content: sha256 over its signed file list.

    Two bundles with the same payload files (paths, sizes, hashes) have the same digest,
    whoever signed them and whenever; a changed model changes it.

    Args:
        files: the manifest's file entries.

    Returns:
        64 lowercase hex digits.
    """
    listing = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in sorted(files, key=lambda f: f.path)]
    return hashlib.sha256(canonical_json(listing)).hexdigest()


def runtime_available(runtime: str, runtimes: Collection[str]) -> bool:
    """Whether a bundle's ``runtime`` can run where ``runtimes`` are installed.

    Args:
        runtime: the manifest's runtime (``onnxruntime``, ``litert``).
        runtimes: installed runtime names, as a device's status lists them.

    Returns:
        True if one of them runs it (LiteRT bundles also run on ``tflite-runtime``).
    """
    return any(r in runtimes for r in _RUNS_ON.get(runtime, (runtime,)))


def _v(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


@dataclass(frozen=True)
class VersionHistory:
    """What a device keeps about the versions of one bundle name.

    Attributes:
        installed: the version active now, or None.
        floor: the version a signed deploy must exceed, or None (no floor: anything installs).
        floor_reason: one of :data:`FLOOR_REASONS`: ``ran`` (it passed its health check
            and runs, or ran last), ``rollback`` (a signed rollback made it active),
            ``removed`` (it ran until a signed remove), ``highest`` (the highest version
            accepted, recorded before the device kept floors).
        ran: versions that ran successfully here -> their :func:`content_digest`.
    """

    installed: int | None = None
    floor: int | None = None
    floor_reason: str = "ran"
    ran: Mapping[int, str] = field(default_factory=dict)

    @classmethod
    def of_installed(cls, version: int | None) -> VersionHistory:
        """The history of a device that only says which version it runs (floor = that version)."""
        return cls(installed=version, floor=version)

    def why(self) -> str:
        """Why the floor is what it is, for a person: ``"the version this device runs; installed: v2"``."""
        if self.floor_reason == "removed":
            because = "the version this device last ran, until a signed remove"
        elif self.floor_reason == "highest":
            because = "the highest version this device accepted before it kept floors"
        elif self.installed == self.floor:
            because = "the version this device runs" + (
                ", since a signed rollback" if self.floor_reason == "rollback" else ""
            )
        else:
            because = "the version this device last ran successfully"
        return f"{because}; installed: {_v(self.installed)}"


def check_version(history: VersionHistory, name: str, version: int, content: str | None, *, rollback: bool) -> str:
    """Admit ``name`` v``version`` against the floor and the versions that ran.

    Args:
        history: what the device keeps about ``name``.
        name: the bundle name (for messages).
        version: the offered version.
        content: the offered bundle's :func:`content_digest`, or None when unknown (an
            offer without it); the content check is then left to after receipt.
        rollback: the signed command explicitly allows a version at or below the floor.

    Returns:
        The check's line for the checklist.

    Raises:
        RollbackError: the version is not above the floor (and no rollback is allowed), or
            it ran here before with other content. ``details`` has ``offered``,
            ``installed``, ``floor``, ``floor_reason`` (and ``reason``:
            ``not_newer`` or ``content_differs``).
    """
    facts: dict[str, object] = {
        "offered": version,
        "installed": history.installed,
        "floor": history.floor,
        "floor_reason": history.floor_reason,
    }
    ran = history.ran.get(version)
    if content is not None and ran is not None and ran != content:
        raise RollbackError(
            f"{name} v{version} differs from the v{version} this device already ran "
            f"(content sha256 {content[:12]}... offered, {ran[:12]}... ran): a version names one content, "
            f"so pack the change as a new version (floor {_v(history.floor)}, {history.why()})",
            reason="content_differs",
            **facts,
        )
    if history.floor is None:
        return "rollback: no floor for this name (nothing ran here)"
    if rollback:
        return f"rollback: v{version} with floor v{history.floor}, explicitly allowed by a signed rollback command"
    if version <= history.floor:
        raise RollbackError(
            f"{name} v{version} is not newer than the floor v{history.floor} ({history.why()})",
            reason="not_newer",
            **facts,
        )
    return f"rollback: v{version} is newer than the floor v{history.floor} ({history.why()})"


def storage_needed(download_bytes: int, unpacked_bytes: int) -> int:
    """Bytes an install needs free: the staged download, its unpacked payload, and a margin.

    The margin is :data:`STORAGE_MARGIN_BYTES` or a twentieth of the rest, whichever is more
    (the manifest, state files, file-system overhead).
    """
    need = download_bytes + unpacked_bytes
    return need + max(STORAGE_MARGIN_BYTES, need // 20)


def check_storage(
    name: str, version: int, download_bytes: int, unpacked_bytes: int, free_bytes: int, where: str
) -> str:
    """Refuse an install that would not fit, before any byte of it moves.

    Args:
        name, version: the bundle (for messages).
        download_bytes: the bundle file's size (the staging file).
        unpacked_bytes: its payload files' sizes summed (the slot).
        free_bytes: free bytes where both go.
        where: that place, for the message.

    Returns:
        The check's line for the checklist.

    Raises:
        StorageError: it does not fit; ``details`` has ``download_bytes``,
            ``unpacked_bytes``, ``needed_bytes`` and ``free_bytes``.
    """
    needed = storage_needed(download_bytes, unpacked_bytes)
    sizes = f"{download_bytes} bytes to download + {unpacked_bytes} bytes unpacked + margin = {needed} bytes"
    if needed > free_bytes:
        raise StorageError(
            f"not enough storage for {name} v{version}: it needs {sizes}, and {where} has {free_bytes} bytes free",
            download_bytes=download_bytes,
            unpacked_bytes=unpacked_bytes,
            needed_bytes=needed,
            free_bytes=free_bytes,
        )
    return f"storage: {sizes}; {free_bytes} free"


@dataclass(frozen=True)
class OfferedBundle:
    """What a signed deploy command says about its bundle, before any byte of it arrives.

    Attributes:
        name, version: the bundle the command names.
        size: the bundle file's size (the download).
        runtime: the manifest's runtime; "" when the offer does not say.
        expires_at: the manifest's expiry (unix seconds); 0 when the offer does not say.
        content: the manifest's :func:`content_digest`; "" when the offer does not say.
        unpacked_bytes: the manifest's file sizes summed; 0 when the offer does not say.
        target: the manifest's target constraints, or None.
        rollback: the signed command allows a version at or below the floor.
    """

    name: str
    version: int
    size: int
    runtime: str = ""
    expires_at: float = 0.0
    content: str = ""
    unpacked_bytes: int = 0
    target: Target | None = None
    rollback: bool = False


def check_offer(
    offer: OfferedBundle,
    history: VersionHistory | None,
    device: DeviceFacts,
    runtimes: Collection[str],
    now: float,
    free_bytes: tuple[int, str] | None = None,
) -> tuple[str, ...]:
    """Every check a signed offer allows, in order, before any chunk moves.

    Args:
        offer: what the command says about the bundle.
        history: the device's versions of this name; None skips the version check (a
            profile-only run may measure any version).
        device: this device's facts, for the target.
        runtimes: the runtimes installed here (names as :func:`edge_sdk.runtime.available_runtimes` gives).
        now: unix seconds.
        free_bytes: free bytes and where, for the storage check; None skips it.

    Returns:
        One line per check that passed.

    Raises:
        RollbackError: the version is not above the floor, or its content differs from the one that ran.
        ExpiredError: the manifest the offer describes has expired.
        TargetMismatchError: the device lacks the runtime (``constraint="runtime"``), or
            does not fit the target.
        StorageError: the download and its unpacked payload do not fit.
    """
    lines = []
    if history is not None:
        lines.append(check_version(history, offer.name, offer.version, offer.content or None, rollback=offer.rollback))
    if offer.expires_at and now >= offer.expires_at:
        raise ExpiredError(
            f"manifest of {offer.name} v{offer.version} expired at {offer.expires_at:.0f} (now {now:.0f})",
            expires_at=offer.expires_at,
            now=now,
        )
    if offer.runtime:
        have = sorted(runtimes)
        if not runtime_available(offer.runtime, runtimes):
            raise TargetMismatchError(
                f"{offer.name} v{offer.version} needs runtime {offer.runtime}, which this device lacks "
                f"(it has {', '.join(have) or 'none'})",
                constraint="runtime",
                required=offer.runtime,
                actual=have,
            )
        lines.append(f"runtime: {offer.runtime} is installed")
    if offer.target is not None:
        lines.append(f"target: {offer.target.check(device)}")
    if free_bytes is not None and offer.unpacked_bytes:
        free, where = free_bytes
        lines.append(check_storage(offer.name, offer.version, offer.size, offer.unpacked_bytes, free, where))
    return tuple(lines)
