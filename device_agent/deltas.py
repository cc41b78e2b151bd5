"""Deltas on the device: whether an offered delta fits what is installed, and the bundle it rebuilds.

A deploy command may offer, besides the whole bundle, a delta from a version the device
runs (:class:`edge_sdk.protocol.DeltaOffer`). The agent takes it only when its active slot
of that bundle is exactly the delta's base (:func:`base_refusal`, before any chunk
moves), and once the delta is in, rebuilds the bundle file from the slot
(:func:`rebuild_bundle`). The rebuilt file must be the one the signed command's own offer
names (size and sha256); it then goes through the install sequence exactly as a bundle
received whole, so a delta adds no trust of its own::

    deploy with a delta   base_refusal(cmd, active)  None -> receive the delta
                                                     why  -> receive the full bundle
    delta received        rebuild_bundle             -> the bundle, installed as always
                          DeltaError, StorageError   -> receive the full bundle

Either way the agent falls back to the full transfer by itself and says why in its
``accepted`` event; the host sends the full bundle to whoever accepts it.
"""

from __future__ import annotations

import logging
import os
import stat

from device_agent.installer import ActiveBundle
from device_agent.receiving import ReceivedBundle, ReceivedDelta
from edge_sdk.bundle import BundleLimits, content_digest
from edge_sdk.errors import DeltaError, StorageError
from edge_sdk.protocol import DeployCommand

__all__ = ["base_refusal", "rebuild_bundle"]

log = logging.getLogger(__name__)

#: Suffix of a bundle file rebuilt from a delta, under ``staging/`` (removed at start if left over).
_REBUILT_SUFFIX = ".rebuilt"


def base_refusal(cmd: DeployCommand, active: ActiveBundle | None) -> str | None:
    """Why the delta ``cmd`` offers cannot start from the active slot of its bundle, or None when it can.

    The slot must hold the delta's base version with the base's content (the content
    digest of its manifest's files), not encrypted, and each payload file its manifest
    lists must be a regular file of the listed size. The files' hashes are checked when
    the delta is applied (:func:`edge_sdk.bundle.delta.apply_delta`): a slot damaged
    inside a file is found then, and the device falls back then.

    Args:
        cmd: a verified deploy command.
        active: the active version of ``cmd.bundle_name`` (``Installer.active``), or None.

    Returns:
        None when the delta fits; else a short reason, for the log and the host.
    """
    offer = cmd.delta
    if offer is None:
        return "no delta offered"
    if active is None:
        return f"{cmd.bundle_name} is not installed"
    if active.version != offer.base_version:
        return f"v{active.version} is installed, the delta starts from v{offer.base_version}"
    manifest = active.manifest
    if manifest.encryption is not None:
        return f"the installed v{active.version} is encrypted"
    if content_digest(manifest.files) != offer.base_content:
        return f"the installed v{active.version} has other content than the delta's base"
    payload = active.slot / "payload"
    for entry in manifest.files:
        try:
            info = os.lstat(payload.joinpath(*entry.path.split("/")))
        except OSError:
            return f"the installed slot lacks {entry.path!r}"
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
            return f"the installed slot's {entry.path!r} is not the file its manifest lists"
    return None


def rebuild_bundle(received: ReceivedDelta, active: ActiveBundle | None, limits: BundleLimits) -> ReceivedBundle:
    """The bundle file a received delta rebuilds from the active slot, written next to the delta.

    The delta's header must name the signed command's bundle file (sha256 and size) and
    the base the command's delta offer names; :func:`~edge_sdk.bundle.delta.apply_delta`
    then writes exactly that file, or nothing. So the result has the size and sha256 of
    ``received.command.transfer``, and is verified in full by the install sequence.

    Args:
        received: the delta, received whole (each chunk checked against its signed index).
        active: the active version of the command's bundle now, or None.
        limits: this device's bundle limits (the delta's bounds follow them).

    Returns:
        The rebuilt bundle, as if received whole; the caller discards the delta.

    Raises:
        DeltaError: the delta names another file or base than the signed command, or
            does not apply (malformed, for another base, wrong output).
        StorageError: the base is no longer installed or its slot is damaged (a file
            differs from its manifest), or the disk failed.
    """
    cmd = received.command
    offer = cmd.delta
    if offer is None:
        raise DeltaError(f"{cmd.bundle_name} v{cmd.bundle_version}: a delta arrived for a command that offers none")
    if active is None:
        raise StorageError(f"{cmd.bundle_name} is no longer installed: no base for the delta")
    # Imported when a delta has arrived, not at start: the agent starts light.
    from edge_sdk.bundle.delta import DeltaLimits, apply_delta, read_delta_header

    delta_limits = DeltaLimits.for_bundles(limits)
    header = read_delta_header(received.path, delta_limits)
    if (header.target_sha256, header.target_size) != (cmd.transfer.sha256, cmd.transfer.size):
        raise DeltaError(
            f"the delta rebuilds a file of {header.target_size} bytes, sha256 {header.target_sha256[:16]}..., "
            f"not the {cmd.transfer.size}-byte bundle the signed command offers",
            expected=cmd.transfer.sha256,
            actual=header.target_sha256,
        )
    if (header.base_name, header.base_version, header.base_content) != (
        cmd.bundle_name,
        offer.base_version,
        offer.base_content,
    ):
        raise DeltaError(
            f"the delta starts from {header.base_name} v{header.base_version}, not the base the signed command "
            f"names ({cmd.bundle_name} v{offer.base_version})"
        )
    out = received.path.with_name(f"{cmd.transfer.transfer_id}{_REBUILT_SUFFIX}")
    apply_delta(received.path, active.slot, out, delta_limits)
    log.info(
        "rebuilt %s v%s from v%s and a %d-byte delta",
        cmd.bundle_name,
        cmd.bundle_version,
        offer.base_version,
        offer.transfer.size,
    )
    return ReceivedBundle(cmd, out)
