"""Kept runs: every compression, profile, deploy and rollout, recorded through one function.

A run is what one command did, stored in the registry (:meth:`Registry.add_run`) with an
id, its kind, its time, what it was asked (``parameters``: input files with their sha256,
options) and what it found (``results``: the compression report, each device's outcome
with its metrics report). :func:`record_run` is the one way in; the helpers here build
the parameters for each kind, so every kind names its files the same way.

Nothing here renders: ``edgectl runs`` and ``edgectl compare`` read the records back through
:mod:`host_tools.report.runs`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_sdk.bundle import file_sha256
from host_tools.fleet.registry import RUN_KINDS, Registry

__all__ = ["bundle_parameters", "compress_parameters", "file_facts", "record_run"]

logger = logging.getLogger(__name__)


def file_facts(path: Path) -> dict[str, Any]:
    """A file as a run names it: path, sha256 and size.

    Raises:
        StorageError: the file cannot be read.
    """
    digest, size = file_sha256(path)
    return {"path": str(path), "sha256": digest, "size_bytes": size}


def compress_parameters(model: Path, output: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a compression: input and output model with their hashes, and the options given.

    Args:
        model: the input model.
        output: the compressed model written.
        options: the step options and data sources as given (``None`` where not given is dropped).
    """
    return {
        "model": file_facts(model),
        "output": file_facts(output),
        "options": {k: v for k, v in options.items() if v is not None},
    }


def bundle_parameters(bundle: Path, devices: Sequence[str], benchmark: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a profile or deploy: the bundle file with its hash and its manifest's name, version
    and files (path, sha256: how a compression run's output model is found in it), the devices, the benchmark.

    Raises:
        StorageError: the bundle cannot be read.
        BundleFormatError, ManifestError: it is not a bundle.
    """
    from host_tools.fleet.deployer import read_manifest

    manifest = read_manifest(bundle)
    facts = {
        **file_facts(bundle),
        "name": manifest.name,
        "version": manifest.version,
        "files": [{"path": f.path, "sha256": f.sha256, "size_bytes": f.size} for f in manifest.files],
    }
    return {"bundle": facts, "devices": list(devices), "benchmark": dict(benchmark)}


def record_run(
    registry: Registry, kind: str, parameters: Mapping[str, Any], results: Mapping[str, Any], at: float
) -> int:
    """Keep one run in the registry.

    Args:
        registry: where to keep it.
        kind: ``compress``, ``profile``, ``deploy`` or ``rollout``.
        parameters: what the run was asked.
        results: what it produced; JSON-ready.
        at: unix seconds.

    Returns:
        The run's id.

    Raises:
        ValueError: an unknown kind or a value that cannot be stored (nothing is stored).
        StorageError: on a database failure.
    """
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}; expected one of {sorted(RUN_KINDS)}")
    run_id = registry.add_run(kind, at, parameters, results)
    logger.info("kept %s run %d", kind, run_id)
    return run_id
