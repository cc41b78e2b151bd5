"""Packing models into signed bundles, and checking bundles as a device would.

``edgectl pack`` and ``edgectl verify`` parse their options into :class:`PackOptions`
and :class:`CheckOptions` and call :func:`pack_model` or :func:`check_bundle`; what
they print comes from :mod:`host_tools.report.bundle`.

Packing opens the model once on the host, so a broken file fails here and not on a
thousand devices. A sparse bundle (``--sparse``) splits the model into a sparse graph,
a dense graph and CSR weights, and the sparse graph is run against the original model
before anything is signed.

An encrypted bundle (``--encrypt-to``) is encrypted for recipient keys that
:func:`resolve_recipients` finds: a recipient key file, or a device whose status the
registry holds (the agent publishes its key there).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
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
from edge_sdk.errors import CompressionError, ConfigError, KeyStoreError
from edge_sdk.runtime import open_session, open_sparse_session, sample_feeds
from edge_sdk.runtime.agreement import TOLERANCE, agreement
from edge_sdk.trust import RecipientPublicKey, Root, load_root
from host_tools.keys import KeyRing

__all__ = [
    "BundleCheck",
    "CheckOptions",
    "PackOptions",
    "PackedBundle",
    "SparseOptions",
    "check_bundle",
    "pack_model",
    "resolve_recipients",
]


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
        encrypt_to=options.encrypt_to,
    )
    with tempfile.TemporaryDirectory(prefix="edgectl-sparse-") as tmp:
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
    result = verify_bundle(
        bundle, root.trusted("bundles"), now, installed_version=options.installed_version, device=options.device
    )
    return BundleCheck(bundle, (root_line, *result.checks), result.manifest)


def _read_root(path: Path) -> Root:
    try:
        return load_root(path.read_bytes()).root
    except OSError as exc:
        raise KeyStoreError(f"cannot read root {path}: {exc.strerror}") from exc
