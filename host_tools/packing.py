"""Packing models into signed bundles, and checking bundles as a device would.

``edgectl pack`` and ``edgectl verify`` parse their options into :class:`PackOptions`
and :class:`CheckOptions` and call :func:`pack_model` or :func:`check_bundle`
(:func:`checklist_bundle` for the whole checklist, the failing check marked); what
they print comes from :mod:`host_tools.report.bundle`. ``edgectl resign`` calls
:func:`resign_bundle`: after ``edgectl keys rotate bundles`` it signs a bundle packed
before again with the current bundle keys, keeping its payload, manifest and version.

Packing opens the model once on the host, so a broken file fails here and not on a
thousand devices. A sparse bundle (``--sparse``) splits the model into a sparse graph,
a dense graph and CSR weights, and the sparse graph is run against the original model
before anything is signed.

A sample input (``--sample``) is checked against the model's inputs when packing, and
against the manifest's inputs by ``verify``, so a sample the device could not feed fails on
the host instead of using up a version on the device. Packing accepts the layouts
``--eval`` reads (see :func:`canonical_sample`) and always stores the canonical one: one
array per model input, under the input's name, in the input's dtype.

An encrypted bundle (``--encrypt-to``) is encrypted for recipient keys that
:func:`resolve_recipients` finds: a recipient key file, or a device whose status the
registry holds (the agent publishes its key there).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
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
    VerifiedBundle,
    pack_bundle,
    verify_bundle,
)
from edge_sdk.bundle.archive import BundleLimits, BundleReader, write_bundle
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
    UntrustedKeyError,
)
from edge_sdk.runtime import open_session, open_sparse_session, sample_feeds
from edge_sdk.runtime.agreement import TOLERANCE, agreement
from edge_sdk.trust import RecipientPublicKey, Root, TrustedKeys, encode_signatures, load_root
from host_tools.keys import KeyRing

__all__ = [
    "CHECKS",
    "BundleCheck",
    "BundleChecklist",
    "CheckItem",
    "CheckOptions",
    "PackOptions",
    "PackedBundle",
    "ResignedBundle",
    "SparseOptions",
    "canonical_sample",
    "check_bundle",
    "checklist_bundle",
    "pack_model",
    "read_sample",
    "resign_bundle",
    "resolve_recipients",
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
        sample: .npz with one sample batch for the device's health check, in any layout
            :func:`canonical_sample` accepts.
        ttl_s: seconds until the manifest expires.
        max_latency_ms: health check: the device rolls back above this median latency.
        target: architectures, memory and accelerators a device must have.
        sparse: ship pruned MatMul/Gemm weights as CSR; ``None`` for a dense bundle.
        encrypt_to: recipient keys; when given the payload is encrypted for them
            (see :func:`resolve_recipients`).
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
    encrypt_to: tuple[RecipientPublicKey, ...] = ()


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
        ConfigError: ``sparse`` asked of a model that is not ONNX; a sample that is unreadable
            or does not fit the model's inputs (names the input and what it expects).
        KeyStoreError: the bundle keys cannot be loaded.
    """
    runtime = options.runtime or ("litert" if options.model.suffix == ".tflite" else "onnxruntime")
    # Loading the model here catches a broken file on the host, not on a thousand devices.
    with open_session(options.model, runtime) as session:
        inputs = tuple(TensorInfo(s.name, tuple(s.shape), s.dtype) for s in session.inputs())
        precision = options.precision or session.precision
    sample = None
    if options.sample is not None:
        sample = canonical_sample(read_sample(options.sample), inputs, str(options.sample))
    signers = keys.role_keys("bundles", passphrase)
    health = HealthSpec(options.max_latency_ms) if options.max_latency_ms is not None else None
    spec = BundleSpec(
        options.name,
        options.version,
        runtime,
        options.model,
        precision,
        inputs,
        None,
        health=health,
        target=options.target,
        ttl_s=options.ttl_s,
        encrypt_to=options.encrypt_to,
    )
    with tempfile.TemporaryDirectory(prefix="edgectl-pack-") as tmp:
        if sample is not None:
            # The canonical layout, whatever layout the operator's file had.
            sample_path = Path(tmp) / "sample" / "sample_input.npz"
            sample_path.parent.mkdir()
            arrays: dict[str, Any] = dict(sample)  # numpy's stub types **kwds like allow_pickle
            np.savez(sample_path, **arrays)
            spec = dataclasses.replace(spec, sample_input=sample_path)
        if options.sparse is not None:
            spec = _sparse_bundle_spec(spec, Path(tmp), options.sparse)
        manifest = pack_bundle(spec, signers, options.output, now)
    return PackedBundle(options.output, tuple(k.keyid for k in signers), manifest)


def resolve_recipients(
    values: Sequence[str], device_key: Callable[[str], str | None] | None = None
) -> tuple[RecipientPublicKey, ...]:
    """The recipient keys ``--encrypt-to`` names: each a key file or a device id.

    A value naming an existing file is a recipient key file (PEM X25519 public key, as
    ``edge-agent show-keys`` prints it, or ``x25519:<base64>``); any other value is a
    device id whose key the registry learnt from the device's status.

    Args:
        values: what ``--encrypt-to`` was given, in order.
        device_key: looks up a device's published key (``x25519:...``) by id; ``None``
            when there is no registry to ask.

    Returns:
        The keys, duplicates removed, in the order given.

    Raises:
        ConfigError: a value is neither a readable key file nor a device with a known key.
        KeyStoreError: a key file or a published key is malformed.
    """
    keys: dict[str, RecipientPublicKey] = {}
    for value in values:
        path = Path(value)
        if path.is_file():
            try:
                key = RecipientPublicKey.from_file_bytes(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read recipient key file {path}: {exc.strerror}", key="encrypt_to") from exc
        else:
            published = device_key(value) if device_key is not None else None
            if published is None:
                raise ConfigError(
                    f"--encrypt-to {value!r} is neither a recipient key file nor a device whose key the registry "
                    "knows (a device publishes it in its status; or copy the file edge-agent show-keys prints)",
                    key="encrypt_to",
                )
            key = RecipientPublicKey.from_text(published)
        keys.setdefault(key.keyid, key)
    return tuple(keys.values())


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
    with tempfile.TemporaryDirectory(prefix="edgectl-verify-") as tmp:
        payload = Path(tmp)
        result = verify_bundle(
            bundle,
            root.trusted("bundles"),
            now,
            installed_version=options.installed_version,
            device=options.device,
            extract_to=payload,
        )
        _check_bundled_sample(payload, result.manifest)
    return BundleCheck(bundle, (root_line, *result.checks), result.manifest)


def _check_bundled_sample(payload: Path, manifest: Manifest) -> None:
    """Check that the bundled sample (if any) fits the manifest's inputs, keyed by their
    names as the device reads it, so that ``verify`` fails where the device would.

    Raises:
        ManifestError: the sample is unreadable or does not fit (names the input).
    """
    if manifest.sample_input is None:
        return
    try:
        arrays = read_sample(payload / manifest.sample_input)
        canonical_sample(arrays, manifest.inputs, manifest.sample_input)
    except ConfigError as exc:
        raise ManifestError(f"sample: {exc.message}", **exc.details) from exc
    missing = [i.name for i in manifest.inputs if i.name not in arrays]
    if missing:
        raise ManifestError(
            f"sample: {manifest.sample_input} has no array named {missing[0]!r}; the device feeds each input "
            f"from the array of its name (has: {', '.join(sorted(arrays))})",
            input=missing[0],
        )


def read_sample(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a sample ``.npz`` (pickled arrays refused).

    Args:
        path: the ``.npz`` file.

    Returns:
        Its arrays by key.

    Raises:
        ConfigError: the file is missing or not a readable ``.npz`` (names it).
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise ConfigError(
                f"sample {path}: one bare array (.npy); give a .npz keyed x, x.NAME or by input name", file=str(path)
            )
        with loaded as npz:
            return {key: np.asarray(npz[key]) for key in npz.files}
    except FileNotFoundError as exc:
        raise ConfigError(f"sample {path}: no such file", file=str(path)) from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"sample {path}: not a readable .npz file ({exc})", file=str(path)) from exc


def canonical_sample(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorInfo], source: str = "sample"
) -> dict[str, np.ndarray]:
    """A sample's arrays by model input name, checked against the model's inputs.

    Three layouts, as ``--eval`` reads them: the model's own input names as keys; ``x``
    for a single-input model; ``x.NAME`` per input. Axis 0 is the batch (the device
    feeds the first row). Each input must get an array of its rank whose dimensions
    after the batch equal the model's (dynamic ones match any size), and whose dtype
    converts to the input's without changing kind (float to float, integer to integer or
    float; not float to integer).

    Args:
        arrays: the sample file's arrays by key.
        inputs: the model's inputs.
        source: what to call the sample in errors (its file name).

    Returns:
        One array per input, under its name, in its dtype.

    Raises:
        ConfigError: an input has no array, or its array does not fit; the message names
            the input, what the model expects and what the sample has.
    """
    names = [i.name for i in inputs]
    per_input = {key[2:]: value for key, value in arrays.items() if key.startswith("x.") and len(key) > 2}
    if all(name in arrays for name in names):
        chosen = {name: arrays[name] for name in names}
    elif per_input:
        unknown = sorted(set(per_input) - set(names))
        missing = [name for name in names if name not in per_input]
        if unknown or missing:
            raise ConfigError(
                f"{source}: has arrays for inputs {sorted(per_input)} (x.NAME), the model takes {names}"
                + (f"; no input named {', '.join(unknown)}" if unknown else "")
                + (f"; missing x.{missing[0]}" if missing else ""),
                key="sample",
                model=names,
            )
        chosen = {name: per_input[name] for name in names}
    elif "x" in arrays:
        if len(names) != 1:
            raise ConfigError(
                f"{source}: one array 'x', but the model takes {len(names)} inputs {names}; "
                "give one array per input, keyed x.NAME or by the input's name",
                key="sample",
                model=names,
            )
        chosen = {names[0]: arrays["x"]}
    else:
        missing = [name for name in names if name not in arrays]
        raise ConfigError(
            f"{source}: no array for model input {missing[0]!r} (the sample has {sorted(arrays) or 'no arrays'}); "
            f"key the arrays by input name {names}, as x.NAME, or as x for a single-input model",
            key="sample",
            input=missing[0],
        )
    return {info.name: _fitted(chosen[info.name], info, source) for info in inputs}


def _fitted(array: np.ndarray, info: TensorInfo, source: str) -> np.ndarray:
    """``array`` as the value of input ``info``; refused when it does not fit."""
    expected = "[" + ", ".join("?" if d is None else str(d) for d in info.shape) + "]"
    got = list(array.shape)
    fits = (
        array.ndim == len(info.shape)
        and array.ndim > 0
        and got[0] >= 1
        and all(d is None or d == g for d, g in zip(info.shape[1:], got[1:], strict=True))
    )
    if not fits:
        raise ConfigError(
            f"{source}: input {info.name!r} expects shape {expected} (axis 0 the batch, ? any size), "
            f"the sample has {got}",
            key="sample",
            input=info.name,
            expected=expected,
            got=got,
        )
    try:
        want = np.dtype(info.dtype)
    except TypeError as exc:
        raise ConfigError(f"{source}: input {info.name!r} has unknown dtype {info.dtype!r}", key="sample") from exc
    if not np.can_cast(array.dtype, want, casting="same_kind"):
        raise ConfigError(
            f"{source}: input {info.name!r} expects {want}, the sample has {array.dtype}",
            key="sample",
            input=info.name,
            expected=str(want),
            got=str(array.dtype),
        )
    return np.ascontiguousarray(array, dtype=want)


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


@dataclass(frozen=True)
class ResignedBundle:
    """A bundle signed again by :func:`resign_bundle`.

    Attributes:
        path: the bundle file written.
        source: the bundle it was made from (the same file when re-signed in place).
        signed_by: key ids of the current bundle keys that signed it.
        previously_signed_by: key ids whose signatures it carried before.
        vouched_by_root: the version of this key directory's root whose bundle keys had signed it.
        checks: what :func:`check_bundle` found on the result, the root of trust first.
        manifest: its manifest, unchanged.
    """

    path: Path
    source: Path
    signed_by: tuple[str, ...]
    previously_signed_by: tuple[str, ...]
    vouched_by_root: int
    checks: tuple[str, ...]
    manifest: Manifest

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.path),
            "source": str(self.source),
            "signed_by": list(self.signed_by),
            "previously_signed_by": list(self.previously_signed_by),
            "vouched_by_root": self.vouched_by_root,
            "checks": list(self.checks),
            "manifest": self.manifest.to_dict(),
        }


def resign_bundle(
    bundle: Path, keys: KeyRing, now: float, output: Path | None = None, passphrase: bytes | None = None
) -> ResignedBundle:
    """Sign a bundle again with the current bundle keys: same payload, same manifest, same version.

    After ``edgectl keys rotate bundles`` devices refuse every bundle signed by the old
    key. This gives such a bundle new signatures without packing it again. Only a bundle
    this key directory signed before is re-signed: its signatures must verify under the
    bundle keys of one of the roots in ``keys`` (newest first), leaving out keys that were
    revoked (dropped from the role without a replacement), and every file must match the
    manifest. The manifest, and so its expiry, is kept byte for byte: an expired bundle
    must be packed again.

    Args:
        bundle: the bundle file.
        keys: the key directory: its root history says which keys signed bundles before,
            its current bundle keys sign.
        now: current time, for expiry.
        output: where to write the result (atomically); ``None`` replaces ``bundle``.
        passphrase: of the bundle keys.

    Returns:
        The written bundle, and what ``edgectl verify`` finds on it.

    Raises:
        KeyStoreError: the bundle keys or the roots cannot be loaded.
        UntrustedKeyError: no root of this key directory trusted the bundle's signers (or they were revoked).
        UntrustedInputError: the bundle is malformed, tampered with, or expired.
        StorageError: the bundle cannot be read or the output written.
    """
    signers = keys.role_keys("bundles", passphrase)  # fail before reading anything
    out = Path(output) if output is not None else Path(bundle)
    with tempfile.TemporaryDirectory(prefix="edgectl-resign-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        staging = Path(tmp) / "payload"
        staging.mkdir()
        version, verified = _verify_with_past_keys(bundle, keys, now, staging)
        with BundleReader(Path(bundle)) as reader:
            manifest_bytes = reader.manifest_bytes
        limits = BundleLimits()
        if Manifest.from_bytes(manifest_bytes, limits.max_manifest_bytes, limits.max_manifest_depth) != (
            verified.manifest
        ):
            raise ManifestError(f"{bundle} changed while it was being re-signed; nothing written")
        files = {entry.path: staging.joinpath(*entry.path.split("/")) for entry in verified.manifest.files}
        write_bundle(out, manifest_bytes, encode_signatures(k.sign(manifest_bytes) for k in signers), files)
    check = check_bundle(out, keys, now)
    return ResignedBundle(
        out,
        Path(bundle),
        tuple(k.keyid for k in signers),
        tuple(sorted(verified.signers)),
        version,
        check.checks,
        check.manifest,
    )


def _bundle_keys_by_root(keys: KeyRing) -> list[tuple[int, TrustedKeys]]:
    """The bundle keys of every root in ``keys``, newest first, without revoked keys.

    A key that left the bundles role while no new key joined it was revoked (``edgectl keys
    revoke``), not rotated: a bundle it signed may be an attacker's, and is not re-signed.
    """
    roots = [load_root(data).root for data in keys.chain()] or [keys.root]
    revoked: set[str] = set()
    for before, after in itertools.pairwise(roots):
        left = set(before.roles["bundles"].keyids) - set(after.roles["bundles"].keyids)
        if left and set(after.roles["bundles"].keyids) <= set(before.roles["bundles"].keyids):
            revoked |= left
    out = []
    for root in reversed(roots):
        role = root.roles["bundles"]
        kept = tuple(root.keys[k] for k in role.keyids if k not in revoked)
        if len(kept) >= role.threshold:
            out.append((root.version, TrustedKeys(kept, role.threshold)))
    return out


def _verify_with_past_keys(bundle: Path, keys: KeyRing, now: float, staging: Path) -> tuple[int, VerifiedBundle]:
    """Verify ``bundle`` against the newest root of ``keys`` whose bundle keys signed it; extract it to ``staging``.

    Returns:
        That root's version and the verified bundle.

    Raises:
        SignatureError: a signature by a key of one of the roots does not verify.
        UntrustedKeyError: no root's bundle keys (revoked ones left out) signed it.
        UntrustedInputError: it fails another check (format, expiry, files, hashes).
    """
    bad_signature: SignatureError | None = None
    for version, trusted in _bundle_keys_by_root(keys):
        try:
            return version, verify_bundle(bundle, trusted, now, extract_to=staging)
        except UntrustedKeyError:
            continue
        except SignatureError as exc:
            bad_signature = bad_signature or exc
    if bad_signature is not None:
        raise bad_signature
    raise UntrustedKeyError(
        f"{bundle} is not signed by a bundle key of any root in {keys.dir}: only bundles this key "
        "directory signed, with a key since rotated out (not revoked), can be re-signed",
        bundle=str(bundle),
    )
