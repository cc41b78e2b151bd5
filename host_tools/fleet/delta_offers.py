"""Which devices are offered a delta, from which base: the host's side of deltas before anything is sent.

A device that runs version N of a bundle can take N+1 as a delta
(:mod:`edge_sdk.bundle.delta`, built by :func:`host_tools.delta.build_delta`) if the host has
the bundle file the device installed N from. That file comes from the host's
:class:`~host_tools.fleet.bundle_store.BundleStore`, where every deploy keeps what it sends
(:func:`keep_bundle`), found by the sha256 the registry recorded for the device's last
``installed`` deployment of N; or from a base given explicitly (``edgectl deploy
--delta-from``, :func:`explicit_base`). :func:`base_of` says which base a device runs, and
:func:`offer_deltas` builds one delta per distinct base and puts its offer
(:class:`~edge_sdk.protocol.DeltaOffer`) in those devices' commands, to be signed with them.

Nothing here decides for the device: it takes the delta only if its installed slot is the
delta's base, and the whole bundle otherwise (see :mod:`device_agent.deltas`). A base the
host cannot use (not in the store, unreadable, a delta not worth sending) only means the
device gets the whole bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_sdk.bundle import Manifest
from edge_sdk.bundle.archive import BundleLimits, BundleReader
from edge_sdk.bundle.delta import read_delta_header
from edge_sdk.errors import ConfigError, EdgeError, StorageError
from edge_sdk.protocol import DeltaOffer, DeployCommand
from host_tools.delta import DeltaOptions, DeltaStats, build_delta
from host_tools.fleet.bundle_store import BundleStore
from host_tools.fleet.delivery import PreparedFile, prepare_file
from host_tools.fleet.registry import DeviceRecord, Registry

__all__ = ["Base", "DeltaSettings", "PreparedDelta", "base_of", "explicit_base", "keep_bundle", "offer_deltas"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeltaSettings:
    """Deltas for devices that run an older version, and the store their bases come from.

    Attributes:
        store: where every bundle deployed is kept, by name and sha256 (the bases of later
            deltas); None: nothing is kept.
        offer: offer deltas (``edgectl deploy --no-delta`` turns it off; bundles are
            still kept).
        base: a base bundle given explicitly (``--delta-from``), for the devices that run
            its version when the store lacks their bundle (or the registry does not know
            which one they installed).
        build: how deltas are built, and when one is not worth sending.
    """

    store: BundleStore | None = None
    offer: bool = True
    base: Path | None = None
    build: DeltaOptions = field(default_factory=DeltaOptions)


@dataclass(frozen=True)
class Base:
    """A bundle file a delta can start from.

    Attributes:
        path: the file.
        version: its bundle version.
        sha256: its sha256 (what the registry records for a device that installed it).
    """

    path: Path
    version: int
    sha256: str


@dataclass(frozen=True)
class PreparedDelta:
    """A delta built for the devices that run one base, ready to be offered and sent.

    Attributes:
        prepared: the delta file, its hash and chunk index.
        offer: what the deploy commands of those devices carry.
        stats: what the delta holds (sizes, what was copied).
    """

    prepared: PreparedFile
    offer: DeltaOffer
    stats: DeltaStats


def _manifest(path: Path) -> Manifest:
    with BundleReader(path, BundleLimits()) as reader:
        return Manifest.from_bytes(reader.manifest_bytes, BundleLimits().max_manifest_bytes)


def explicit_base(settings: DeltaSettings | None, manifest: Manifest) -> Base | None:
    """The base given with ``--delta-from``, checked to be another version of the bundle being deployed.

    Args:
        settings: the deploy's delta settings.
        manifest: the manifest of the bundle being deployed.

    Returns:
        The base; None when none is given or deltas are off.

    Raises:
        ConfigError: a base of another bundle, or of the version being deployed.
        BundleFormatError, ManifestError, StorageError: the file is not a readable bundle.
    """
    if settings is None or settings.base is None or not settings.offer:
        return None
    path = settings.base
    base = _manifest(path)
    if base.name != manifest.name:
        raise ConfigError(f"the delta base {path} is bundle {base.name!r}, not {manifest.name!r}")
    if base.version == manifest.version:
        raise ConfigError(f"the delta base {path} is v{base.version}, the version being deployed")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    return Base(path, base.version, digest.hexdigest())


def keep_bundle(store: BundleStore | None, bundle_path: Path, name: str, sha256: str) -> None:
    """Keep the bundle being deployed in the store, the base of the next version's deltas.

    A failure is logged, not raised: the deploy goes on, and a later version travels whole.
    """
    if store is None:
        return
    try:
        store.put(bundle_path, name, sha256)
    except EdgeError as exc:
        log.warning("the bundle store did not keep %s (%s): later deltas cannot start from it", bundle_path, exc)


def base_of(
    registry: Registry,
    device: DeviceRecord | None,
    cmd: DeployCommand,
    settings: DeltaSettings,
    explicit: Base | None = None,
) -> Base | None:
    """The bundle file the device installed the version it runs from, if the host has it.

    The version is the one the device's record says it runs (another than ``cmd``'s); the
    file is the store's copy of the bundle the registry's last ``installed`` deployment of
    that version to this device names, else ``explicit`` when it is that version (and the
    registry does not name another file).

    Args:
        registry: where the device's deployments are recorded.
        device: the device's record (as fresh as its retained status), or None.
        cmd: the deploy command about to be signed.
        settings: the store.
        explicit: the base given explicitly, if any (:func:`explicit_base`).

    Returns:
        The base, or None (the device gets the whole bundle).

    Raises:
        StorageError: the registry cannot be read.
    """
    if device is None:
        return None
    running = next((b for b in device.active_bundles or () if b.name == cmd.bundle_name), None)
    if running is None or running.version == cmd.bundle_version:
        return None
    installed = registry.installed_deployment(device.device_id, cmd.bundle_name, running.version)
    sha256 = installed.bundle_sha256 if installed is not None else None
    if sha256 is not None and settings.store is not None:
        try:
            kept = settings.store.get(cmd.bundle_name, sha256)
        except ConfigError:  # not a sha256 in the registry: nothing the store can have
            kept = None
        if kept is not None:
            return Base(kept, running.version, sha256)
    if explicit is not None and explicit.version == running.version and sha256 in (None, explicit.sha256):
        return explicit
    return None


def offer_deltas(
    commands: Mapping[str, DeployCommand],
    bases: Mapping[str, Base],
    bundle_path: Path,
    build: DeltaOptions,
    chunk_size: int,
    work: Path,
) -> tuple[dict[str, DeployCommand], dict[str, PreparedDelta]]:
    """Offer each device with a base a delta from it: one delta built per distinct base.

    Args:
        commands: each device's deploy command, not yet signed.
        bases: per device, the base it runs (:func:`base_of`); devices without one are left as they are.
        bundle_path: the bundle being deployed.
        build: how deltas are built.
        chunk_size: the chunk size wanted for sending them.
        work: where the delta files are written (they must last until they are sent).

    Returns:
        The commands, those of devices with a base that a delta was worth building from
        carrying its offer; and the deltas, by transfer id.
    """
    by_base: dict[str, tuple[Base, list[str]]] = {}
    for device_id, base in bases.items():
        if device_id in commands:
            by_base.setdefault(base.sha256, (base, []))[1].append(device_id)
    offered = dict(commands)
    built: dict[str, PreparedDelta] = {}
    for base, devices in by_base.values():
        delta = _build(base, bundle_path, work / f"{base.sha256[:16]}.delta", build, chunk_size)
        if delta is None:
            continue
        built[delta.prepared.transfer_id] = delta
        for device_id in devices:
            offered[device_id] = dataclasses.replace(offered[device_id], delta=delta.offer)
    return offered, built


def _build(base: Base, bundle_path: Path, out: Path, build: DeltaOptions, chunk_size: int) -> PreparedDelta | None:
    """The delta from ``base`` to the bundle, prepared for sending; None when there is none worth sending."""
    try:
        stats = build_delta(base.path, bundle_path, out, build)
        if stats is None:
            return None
        header = read_delta_header(out, build.limits)
        prepared = prepare_file(out, chunk_size)
    except EdgeError as exc:
        log.warning("no delta from %s (v%d): %s: %s", base.path, base.version, exc.code, exc.message)
        return None
    log.info(
        "delta from v%d: %d bytes instead of %d (%.1f%%)",
        stats.base_version,
        stats.delta_bytes,
        stats.full_bytes,
        100 * stats.ratio,
    )
    return PreparedDelta(prepared, DeltaOffer(prepared.offer(), header.base_version, header.base_content), stats)
