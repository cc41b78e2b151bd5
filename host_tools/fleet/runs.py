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
from typing import TYPE_CHECKING, Any

from edge_sdk.bundle import file_sha256
from host_tools.fleet.registry import RUN_KINDS, Registry

if TYPE_CHECKING:
    from host_tools.fleet.rollouts import RolloutReport

__all__ = ["bundle_parameters", "compress_parameters", "file_facts", "record_run", "rollout_run"]

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


def rollout_run(report: RolloutReport) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters and results of one run of a rollout (a start, or a resume), as a run keeps them.

    Parameters: the rollout's id, selector, policy and devices, and its bundle as
    :func:`bundle_parameters` names it (or, when the file is gone, as the rollout stored it:
    path, sha256, name, version). Results: where the rollout stands (status, reason, each
    wave's counts) and one outcome per device (state, wave, attempts, error code, the version
    it runs, and the p99 latency and peak RSS its confirmation measured, in a metrics report's
    shape so ``edgectl compare`` lines them up as it does a deploy's).

    Raises:
        StorageError: the bundle file exists but cannot be read.
        BundleFormatError, ManifestError: it is not a bundle.
    """
    record = report.record
    devices = [d.device_id for d in report.devices]
    path = Path(record.bundle_path)
    if path.is_file():
        bundle = bundle_parameters(path, devices, {})["bundle"]
    else:
        bundle = {"path": record.bundle_path, "sha256": record.bundle_sha256, "name": record.bundle_name,
                  "version": record.bundle_version}  # fmt: skip
    parameters = {
        "rollout": record.id, "selector": record.selector, "policy": record.policy.to_dict(), "bundle": bundle,
        "devices": devices,
    }  # fmt: skip
    outcomes = []
    for d in report.devices:
        metrics: dict[str, Any] = {}
        if d.p99_ms is not None:
            metrics["latency"] = {"p99_ms": d.p99_ms}
        if d.rss_bytes is not None:
            metrics["memory"] = {"peak_bytes": d.rss_bytes}
        outcomes.append({
            "device_id": d.device_id, "state": d.state, "wave": d.wave, "attempts": d.attempts,
            "error_code": d.error_code, "runs": d.runs, "metrics": metrics or None,
        })  # fmt: skip
    results = {
        "status": record.status, "reason": record.reason, "waves": [dict(w) for w in report.waves],
        "outcomes": outcomes,
    }  # fmt: skip
    return parameters, results


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
