"""Packing models into signed bundles, and checking bundles as a device would.

``edgectl pack`` and ``edgectl verify`` parse their options into :class:`PackOptions`
and :class:`CheckOptions` and call :func:`pack_model` or :func:`check_bundle`
(:func:`checklist_bundle` for the whole checklist, the failing check marked); what
they print comes from :mod:`host_tools.report.bundle`.

Packing opens the model once on the host, so a broken file fails here and not on a
thousand devices. A sparse bundle (``--sparse``) splits the model into a sparse graph,
a dense graph and CSR weights, and the sparse graph is run against the original model
before anything is signed.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import (
    BundleSpec,
    DeviceFacts,
    HealthSpec,
    Manifest,
    Target,
    TensorInfo,
    pack_bundle,
    verify_bundle,
)
from edge_sdk.bundle.sparse import decode_sparse_weights
from edge_sdk.errors import (
    BundleFormatError,
    CompressionError,
    ConfigError,
    EdgeError,
    ExpiredError,
    FileSetMismatchError,
    HashMismatchError,
    KeyStoreError,
    ManifestError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    UntrustedInputError,
)
from edge_sdk.runtime import open_session, open_sparse_session, sample_feeds
from edge_sdk.runtime.agreement import TOLERANCE, agreement
from edge_sdk.trust import Root, load_root
from host_tools.keys import KeyRing

__all__ = [
    "CHECKS",
    "BundleCheck",
    "BundleChecklist",
    "CheckItem",
    "CheckOptions",
    "PackOptions",
    "PackedBundle",
    "SparseOptions",
    "check_bundle",
    "checklist_bundle",
    "pack_model",
]

#: Every check ``verify`` runs, in the order a device runs them; a check runs only after those before it passed.
CHECKS = ("root", "archive", "signature", "manifest", "expiry", "target", "rollback", "files", "hashes")

#: Which check an error of the bundle's verification comes from (most specific type first).
_FAILED_CHECK: tuple[tuple[type[EdgeError], str], ...] = (
    (SignatureError, "signature"),
    (ManifestError, "manifest"),
    (ExpiredError, "expiry"),
    (TargetMismatchError, "target"),
    (RollbackError, "rollback"),
    (FileSetMismatchError, "files"),
    (HashMismatchError, "hashes"),
    (BundleFormatError, "archive"),
)


@dataclass(frozen=True)
class SparseOptions:
    """How a sparse bundle stores its pruned weights.

    Attributes:
        min_sparsity: a layer goes sparse from this fraction of zeros.
        int8_values: store the sparse values as int8 with a scale per row.
        execution: pin how devices run the bundle (``auto``, ``dense``, ``dense_int8``,
            ``sparse``); ``None`` lets them measure.
    """

    min_sparsity: float = 0.5
    int8_values: bool = False
    execution: str | None = None


@dataclass(frozen=True)
class PackOptions:
    """What ``edgectl pack`` makes.

    Attributes:
        model: the model file (.onnx or .tflite).
        output: the bundle file to write.
        name, version: the bundle's name (stable across versions) and version.
        runtime: ``onnxruntime`` or ``litert``; ``None`` picks by the file suffix.
        precision: what the model computes in; ``None`` asks the runtime.
        sample: .npz with one sample batch for the device's health check.
        ttl_s: seconds until the manifest expires.
        max_latency_ms: health check: the device rolls back above this median latency.
        target: architectures, memory and accelerators a device must have.
        sparse: ship pruned MatMul/Gemm weights as CSR; ``None`` for a dense bundle.
    """

    model: Path
    output: Path
    name: str
    version: int
    runtime: str | None = None
    precision: str | None = None
    sample: Path | None = None
    ttl_s: float = 30 * 86400.0
    max_latency_ms: float | None = None
    target: Target | None = None
    sparse: SparseOptions | None = None


@dataclass(frozen=True)
class PackedBundle:
    """A bundle written by :func:`pack_model`.

    Attributes:
        path: the bundle file.
        signed_by: key ids of the bundle keys that signed it.
        manifest: its signed manifest.
    """

    path: Path
    signed_by: tuple[str, ...]
    manifest: Manifest

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.path), "signed_by": list(self.signed_by), "manifest": self.manifest.to_dict()}


@dataclass(frozen=True)
class CheckItem:
    """One line of ``verify``'s checklist.

    Attributes:
        name: one of :data:`CHECKS`.
        status: ``ok``, ``failed`` or ``not run`` (an earlier check failed).
        detail: what the check found, or why it failed; empty when not known.
    """

    name: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class BundleChecklist:
    """Every check of :data:`CHECKS` on a bundle, passed, failed or not run.

    Attributes:
        path: the bundle file.
        items: one per check, in :data:`CHECKS` order.
        manifest: the manifest, when the checks got far enough to read it authentically.
        error: the failing check's error; ``None`` when every check passed.
    """

    path: Path
    items: tuple[CheckItem, ...]
    manifest: Manifest | None
    error: EdgeError | None = None

    @property
    def failed(self) -> CheckItem | None:
        """The check that failed, if any."""
        return next((item for item in self.items if item.status == "failed"), None)

    def to_dict(self) -> dict[str, Any]:
        """``ok``, the passed checks as ``name: detail`` lines, the whole checklist and the manifest."""
        return {
            "ok": self.error is None,
            "checks": [f"{i.name}: {i.detail}" if i.detail else i.name for i in self.items if i.status == "ok"],
            "checklist": [i.to_dict() for i in self.items],
            "manifest": None if self.manifest is None else self.manifest.to_dict(),
        }


@dataclass(frozen=True)
class CheckOptions:
    """What :func:`check_bundle` checks a bundle against, besides its signatures.

    Attributes:
        root_file: root of trust to check against; ``None`` for the key directory's own.
        installed_version: check rollback protection against this installed version.
        device: check target constraints against this device.
    """

    root_file: Path | None = None
    installed_version: int | None = None
    device: DeviceFacts | None = None


@dataclass(frozen=True)
class BundleCheck:
    """A bundle that passed every check a device runs.

    Attributes:
        path: the bundle file.
        checks: one line per check that passed, the root of trust first.
        manifest: the verified manifest.
    """

    path: Path
    checks: tuple[str, ...]
    manifest: Manifest

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "checks": list(self.checks), "manifest": self.manifest.to_dict()}


def pack_model(options: PackOptions, keys: KeyRing, now: float, passphrase: bytes | None = None) -> PackedBundle:
    """Pack a model into a bundle signed by the root's bundle key(s).

    Args:
        options: the model, the bundle and what goes into its manifest.
        keys: the key directory holding the bundle keys.
        now: current time; the manifest expires at ``now + options.ttl_s``.
        passphrase: of the bundle keys.

    Returns:
        The written bundle.

    Raises:
        ModelError: the model does not load, or its sparse split does not compute what it does.
        ConfigError: ``sparse`` asked of a model that is not ONNX.
        KeyStoreError: the bundle keys cannot be loaded.
    """
    runtime = options.runtime or ("litert" if options.model.suffix == ".tflite" else "onnxruntime")
    # Loading the model here catches a broken file on the host, not on a thousand devices.
    with open_session(options.model, runtime) as session:
        inputs = tuple(TensorInfo(s.name, tuple(s.shape), s.dtype) for s in session.inputs())
        precision = options.precision or session.precision
    signers = keys.role_keys("bundles", passphrase)
    health = HealthSpec(options.max_latency_ms) if options.max_latency_ms is not None else None
    spec = BundleSpec(
        options.name,
        options.version,
        runtime,
        options.model,
        precision,
        inputs,
        options.sample,
        health=health,
        target=options.target,
        ttl_s=options.ttl_s,
    )
    with tempfile.TemporaryDirectory(prefix="edgectl-sparse-") as tmp:
        if options.sparse is not None:
            spec = _sparse_bundle_spec(spec, Path(tmp), options.sparse)
        manifest = pack_bundle(spec, signers, options.output, now)
    return PackedBundle(options.output, tuple(k.keyid for k in signers), manifest)


def _sparse_bundle_spec(spec: BundleSpec, tmp: Path, sparse: SparseOptions) -> BundleSpec:
    """The bundle spec with the model split into sparse graph, dense graph and CSR weights.

    The sparse graph is opened here with its weights and compared with the original
    model on a random batch, so a broken split fails on the host, not on the devices.
    """
    from host_tools.compress import load_model

    # Sparse packing is not part of host_tools.compress's public API; imported here, where
    # it is needed, so that dense packing does not load it.
    from host_tools.compress.sparse_pack import sparsify, write_sparse_files

    if spec.runtime != "onnxruntime":
        raise ConfigError("--sparse needs an ONNX model (onnxruntime)", key="sparse")
    split = sparsify(load_model(spec.model), sparse.min_sparsity)
    model_path, files, sparse_spec = write_sparse_files(
        split, tmp, Path(spec.model).stem, int8_values=sparse.int8_values
    )
    weights = decode_sparse_weights(files[sparse_spec.weights].read_bytes())
    with (
        open_session(spec.model, "onnxruntime") as dense,
        open_sparse_session(model_path, weights) as sparse_session,
    ):
        feeds = sample_feeds(dense.inputs(), np.random.default_rng(0))
        want, got = dense.run(feeds), sparse_session.run(feeds)
    if agreement(want, got, TOLERANCE["dense_int8" if sparse.int8_values else "sparse"]) is not None:
        raise CompressionError("the sparse graph's outputs differ from the model's; not packing it")
    return dataclasses.replace(spec, model=model_path, files=files, sparse=sparse_spec, execution=sparse.execution)


def check_bundle(bundle: Path, keys: KeyRing, now: float, options: CheckOptions | None = None) -> BundleCheck:
    """Run every check a device runs on a bundle, and say what each one found.

    Args:
        bundle: the bundle file.
        keys: the key directory whose root is used when ``options.root_file`` is not given.
        now: current time, for expiry.
        options: another root, an installed version, a device to check against.

    Returns:
        The checks that passed and the verified manifest.

    Raises:
        KeyStoreError: the root cannot be read.
        UntrustedInputError: the root or the bundle fails a check (expired, unsigned, tampered, ...).
    """
    options = options or CheckOptions()
    root = keys.root if options.root_file is None else _read_root(options.root_file)
    root.check_not_expired(now)
    role = root.roles["bundles"]
    root_line = (
        f"root: v{root.version}, valid for another {(root.expires_at - now) / 86400:.0f} days; bundle keys "
        f"{', '.join(role.keyids)}, threshold {role.threshold}"
    )
    result = verify_bundle(
        bundle, root.trusted("bundles"), now, installed_version=options.installed_version, device=options.device
    )
    return BundleCheck(bundle, (root_line, *result.checks), result.manifest)


def checklist_bundle(bundle: Path, keys: KeyRing, now: float, options: CheckOptions | None = None) -> BundleChecklist:
    """Like :func:`check_bundle`, but a failed check is a result: the whole checklist with it marked.

    Checks before the failing one passed; those after it did not run. Details of the
    passed checks are known when every check passed, or when only the rollback or
    target check (the ones ``options`` add) failed.

    Args:
        bundle: the bundle file.
        keys: the key directory whose root is used when ``options.root_file`` is not given.
        now: current time, for expiry.
        options: another root, an installed version, a device to check against.

    Returns:
        The checklist; its ``error`` is the failing check's error, ``None`` if all passed.

    Raises:
        KeyStoreError: the root cannot be read.
        StorageError: the bundle cannot be read.
    """
    options = options or CheckOptions()
    try:
        check = check_bundle(bundle, keys, now, options)
    except UntrustedInputError as exc:
        return _failed_checklist(bundle, keys, now, options, exc)
    items = tuple(CheckItem(*_split_check(line)) for line in check.checks)
    return BundleChecklist(bundle, items, check.manifest)


def _split_check(line: str) -> tuple[str, str, str]:
    name, _, detail = line.partition(": ")
    return name, "ok", detail


def _failed_checklist(
    bundle: Path, keys: KeyRing, now: float, options: CheckOptions, exc: UntrustedInputError
) -> BundleChecklist:
    root_failed = not _root_is_valid(keys, now, options)
    failed = "root" if root_failed else next((n for t, n in _FAILED_CHECK if isinstance(exc, t)), "archive")
    details: dict[str, str] = {}
    manifest = None
    if failed in ("target", "rollback"):
        # The checks before it passed; run them again without the options that failed, for their details.
        try:
            plain = check_bundle(bundle, keys, now, CheckOptions(options.root_file))
        except EdgeError:
            pass
        else:
            details = dict(_split_check(line)[::2] for line in plain.checks)
            manifest = plain.manifest
    position = CHECKS.index(failed)
    items = tuple(
        CheckItem(name, "ok", details.get(name, ""))
        if i < position
        else CheckItem(name, "failed", exc.message)
        if i == position
        else CheckItem(name, "not run")
        for i, name in enumerate(CHECKS)
    )
    return BundleChecklist(bundle, items, manifest, exc)


def _root_is_valid(keys: KeyRing, now: float, options: CheckOptions) -> bool:
    try:
        root = keys.root if options.root_file is None else _read_root(options.root_file)
        root.check_not_expired(now)
    except UntrustedInputError:
        return False
    return True


def _read_root(path: Path) -> Root:
    try:
        return load_root(path.read_bytes()).root
    except OSError as exc:
        raise KeyStoreError(f"cannot read root {path}: {exc.strerror}") from exc
