"""What ``edgectl pack`` and ``edgectl verify`` print about a bundle."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from host_tools.packing import BundleCheck, BundleChecklist, PackedBundle, ResignedBundle

__all__ = ["check_text", "checklist_text", "packed_text", "resigned_text"]

#: How each status of a checklist line starts (``ok  `` as :func:`check_text` prints it).
_MARKS = {"ok": "ok  ", "failed": "FAIL ", "not run": "--  "}


def packed_text(packed: PackedBundle) -> str:
    """What was packed, where, signed by whom, and which layers went sparse.

    Args:
        packed: the result of :func:`host_tools.packing.pack_model`.

    Returns:
        Lines without a trailing newline.
    """
    manifest = packed.manifest
    text = (
        f"packed {manifest.name} v{manifest.version} ({manifest.runtime}, {manifest.precision}, "
        f"{len(manifest.files)} file(s)) -> {packed.path}\nsigned by {', '.join(packed.signed_by)}"
    )
    if manifest.sparse is not None:
        layers = ", ".join(f"{layer.name} {layer.sparsity:.1%}" for layer in manifest.sparse.layers)
        text += f"\nsparse: {len(manifest.sparse.layers)} layer(s) as CSR ({manifest.sparse.values} values): {layers}"
    if manifest.encryption is not None:
        text += f"\nencrypted (AES-256-GCM) for recipient key(s) {', '.join(manifest.encryption.keyids)}"
    return text


def check_text(check: BundleCheck) -> str:
    """One ``ok`` line per check that passed, then the verified bundle.

    Args:
        check: the result of :func:`host_tools.packing.check_bundle`.

    Returns:
        Lines without a trailing newline.
    """
    m = check.manifest
    return "\n".join(f"ok  {c}" for c in check.checks) + f"\n{check.path}: {m.name} v{m.version} verified"


def resigned_text(resigned: ResignedBundle) -> str:
    """Which bundle was re-signed, by which keys in place of which, and where it went.

    Args:
        resigned: the result of :func:`host_tools.packing.resign_bundle`.

    Returns:
        Lines without a trailing newline.
    """
    m = resigned.manifest
    return (
        f"re-signed {m.name} v{m.version} (payload and manifest unchanged) -> {resigned.path}\n"
        f"signed by {', '.join(resigned.signed_by)} (was {', '.join(resigned.previously_signed_by)}, "
        f"a bundle key of root v{resigned.vouched_by_root})"
    )


def checklist_text(checklist: BundleChecklist) -> str:
    """Every check, the failing one marked ``FAIL`` with its reason, then the verdict.

    Args:
        checklist: the result of :func:`host_tools.packing.checklist_bundle`.

    Returns:
        Lines without a trailing newline; when every check passed, the lines
        :func:`check_text` prints.
    """
    lines = []
    for item in checklist.items:
        text = item.detail if item.status != "not run" else "not run (an earlier check failed)"
        lines.append(f"{_MARKS[item.status]}{item.name}: {text}" if text else f"{_MARKS[item.status]}{item.name}")
    failed = checklist.failed
    if failed is None and checklist.manifest is not None:
        m = checklist.manifest
        lines.append(f"{checklist.path}: {m.name} v{m.version} verified")
    elif failed is not None:
        lines.append(f"{checklist.path}: failed the {failed.name} check; a device would refuse it")
    return "\n".join(lines)
