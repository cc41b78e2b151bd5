"""A pruned model deployed as a sparse bundle through a real agent: it measures, chooses, reports.

`edgectl pack --sparse --sparse-int8` ships the pruned layers as int8 CSR; the agent times
the dense, dense int8 and sparse executions on its own CPU, activates the fastest, keeps
the choice in the slot and reports every timing (and that sparse int8 does not exist).
Which one wins is not asserted (it depends on the machine); that the choice is the
minimum of what was reported, and that pins are obeyed, is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from sparse_models import mlp

pytestmark = pytest.mark.integration


def _model(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "pruned.onnx"
    onnx.save(mlp([256, 512, 10], 0.9), path)
    sample = tmp_path / "pruned.npz"
    np.savez(sample, x=np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32))
    return path, sample


def test_sparse_bundle_is_measured_chosen_persisted_and_pinnable(host, mosquitto, start_agent, tmp_path):
    model, sample = _model(tmp_path)
    v1 = host.pack(model, sample, tmp_path / "v1.edge", "pruned", 1, "--sparse", "--sparse-int8")
    manifest = json.loads(host.run("verify", str(v1), "--json").stdout)["manifest"]
    assert manifest["sparse"]["format"] == "csr" and len(manifest["sparse"]["layers"]) == 2
    assert manifest["sparse"]["values"] == "int8"
    assert {f["path"] for f in manifest["files"]} == {
        "pruned.sparse.onnx",
        "pruned.dense.onnx",
        "pruned.csr",
        "sample_input.npz",
    }
    csr = next(f for f in manifest["files"] if f["path"] == "pruned.csr")
    assert csr["size"] < 0.1 * (256 * 512 + 512 * 10) * 4  # int8 CSR, never dense on disk

    agent = start_agent(mosquitto.url, "sparse", host.root)
    m = host.deploy_metrics(v1, mosquitto.url, agent.device_id)
    ex = m["execution"]
    timings = {c["name"]: c["p50_ms"] for c in ex["candidates"] if "not_applicable" not in c}
    assert set(timings) == {"dense", "dense_int8", "sparse"} and all(t > 0 for t in timings.values())
    assert [c["name"] for c in ex["candidates"] if "not_applicable" in c] == ["sparse_int8"]
    assert ex["chosen"] == min(timings, key=timings.get) and ex["pinned_by"] is None
    slot = agent.data_dir / "slots" / "pruned" / "v1"
    assert json.loads((slot / "execution.json").read_text())["chosen"] == ex["chosen"]
    assert m["latency"]["count"] >= 30

    # Pinned by the manifest: no measurement, the pinned execution runs.
    r = host.run(
        "pack",
        str(model),
        "-o",
        str(tmp_path / "bad.edge"),
        "--name",
        "pruned",
        "--version",
        "2",
        "--sparse",
        "--execution",
        "dense_int8",
    )
    assert r.code != 0 and "--sparse-int8" in r.stderr  # nothing int8 to run
    v2 = host.pack(
        model, sample, tmp_path / "v2.edge", "pruned", 2, "--sparse", "--execution", "dense_int8", "--sparse-int8"
    )
    m = host.deploy_metrics(v2, mosquitto.url, agent.device_id)
    assert (m["execution"]["chosen"], m["execution"]["pinned_by"], m["execution"]["candidates"]) == (
        "dense_int8",
        "manifest",
        [],
    )
    assert m["precision"] == "int8"
    agent.stop()

    # Pinned by the device's configuration, which wins over the manifest.
    other = start_agent(mosquitto.url, "sparse-dense", host.root, "--execution", "dense")
    m = host.deploy_metrics(v2, mosquitto.url, other.device_id)
    assert (m["execution"]["chosen"], m["execution"]["pinned_by"]) == ("dense", "config")
