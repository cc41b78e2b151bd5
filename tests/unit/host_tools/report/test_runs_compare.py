"""Kept runs: stored in a real SQLite registry, read back, compared figure by figure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from host_tools.cli import cli
from host_tools.fleet.registry import Registry, open_registry
from host_tools.fleet.runs import bundle_parameters, compress_parameters, record_run
from host_tools.report.runs import compare_runs, compare_text, run_facts, runs_text


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with open_registry(tmp_path / "home" / "registry.db") as reg:
        yield reg


def _compress_results(size: int, quality: float) -> dict[str, Any]:
    final = {"size_bytes": size, "quality": quality, "quality_metric": "accuracy", "latency_p50_ms": 0.5}
    return {"output": "m.onnx", "report": {"final": final, "steps": []}}


def _outcome(device: str, p50: float, p99: float, state: str = "profiled") -> dict[str, Any]:
    latency = {"p50_ms": p50, "p90_ms": (p50 + p99) / 2, "p99_ms": p99}
    return {"device_id": device, "state": state, "metrics": {"latency": latency}}


def test_compress_run_keeps_model_hashes_and_compares(registry: Registry, tmp_path: Path) -> None:
    model, small, smaller = tmp_path / "m.onnx", tmp_path / "a.onnx", tmp_path / "b.onnx"
    model.write_bytes(b"x" * 400)
    small.write_bytes(b"y" * 200)
    smaller.write_bytes(b"z" * 100)
    a = record_run(
        registry, "compress", compress_parameters(model, small, {"quantize": "int8-dynamic", "prune": None}),
        _compress_results(200, 0.97), at=1000.0,
    )  # fmt: skip
    b = record_run(
        registry, "compress", compress_parameters(model, smaller, {"quantize": "int4-weight"}),
        _compress_results(100, 0.95), at=2000.0,
    )  # fmt: skip
    run_a, run_b = registry.get_run(a), registry.get_run(b)
    assert run_a is not None and run_b is not None
    import hashlib

    assert run_a.parameters["model"]["sha256"] == hashlib.sha256(b"x" * 400).hexdigest()
    assert run_a.parameters["output"]["sha256"] == hashlib.sha256(b"y" * 200).hexdigest()
    assert run_a.parameters["options"] == {"quantize": "int8-dynamic"}
    rows = {r["figure"]: r for r in compare_runs(run_a, run_b)["rows"]}
    assert rows["size_bytes"]["change"] == -100 and rows["size_bytes"]["ratio"] == 0.5
    assert rows["quality"]["change"] == pytest.approx(-0.02)
    assert rows["sha256"]["same"] is False
    assert [r.id for r in registry.list_runs()] == [b, a]
    assert [r.id for r in registry.list_runs(since=1500.0)] == [b]
    assert "accuracy 0.9700" in runs_text(registry.list_runs())


def _bundle(tmp_path: Path, model_bytes: bytes) -> Path:
    import time

    from edge_sdk.bundle import BundleSpec, pack_bundle
    from edge_sdk.trust import SigningKey

    model = tmp_path / "m.onnx"
    model.write_bytes(model_bytes)
    out = tmp_path / "cnn.edge"
    pack_bundle(BundleSpec("cnn", 3, "onnxruntime", model, ttl_s=3600), [SigningKey.generate()], out, now=time.time())
    return out


def test_profile_runs_compare_latency_per_device(registry: Registry, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, b"model" * 50)
    params = bundle_parameters(bundle, ["pi-01", "pi-02"], {"runs": 200})
    import hashlib

    assert params["bundle"]["name"] == "cnn" and params["bundle"]["version"] == 3
    assert params["bundle"]["files"][0]["sha256"] == hashlib.sha256(b"model" * 50).hexdigest()
    a = record_run(registry, "profile", params, {"outcomes": [_outcome("pi-01", 1.0, 3.0)]}, at=10.0)
    b = record_run(
        registry, "deploy", params, {"outcomes": [_outcome("pi-01", 0.5, 2.0), _outcome("pi-02", 2.0, 4.0)]}, at=20.0
    )
    run_a, run_b = registry.get_run(a), registry.get_run(b)
    assert run_a is not None and run_b is not None
    assert run_facts(run_b)["devices"]["pi-02"]["p99_ms"] == 4.0
    comparison = compare_runs(run_a, run_b)
    rows = {r["figure"]: r for r in comparison["rows"]}
    assert rows["latency p99_ms pi-01"]["change"] == -1.0
    assert rows["latency p50_ms pi-02"]["a"] is None and rows["latency p50_ms pi-02"]["b"] == 2.0
    assert rows["sha256"]["same"] is True
    text = compare_text(comparison)
    assert "latency p99_ms pi-01" in text and "0.667x" in text


def test_run_refuses_unknown_kind_and_non_finite_numbers(registry: Registry) -> None:
    with pytest.raises(ValueError, match="unknown run kind"):
        record_run(registry, "train", {}, {}, at=1.0)
    with pytest.raises(ValueError, match="not a finite number"):
        record_run(registry, "profile", {}, {"x": float("nan")}, at=1.0)
    assert registry.list_runs() == []


def test_cli_runs_and_compare(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with open_registry(home / "registry.db") as reg:
        a = record_run(reg, "compress", {"options": {}}, _compress_results(300, 0.9), at=100.0)
        b = record_run(reg, "compress", {"options": {}}, _compress_results(150, 0.91), at=200.0)
    runner = CliRunner()
    listed = runner.invoke(cli, ["--home", str(home), "runs", "--kind", "compress", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["id"] for r in json.loads(listed.output)] == [b, a]
    compared = runner.invoke(cli, ["--home", str(home), "compare", str(a), str(b), "--json"])
    assert compared.exit_code == 0, compared.output
    rows = {r["figure"]: r for r in json.loads(compared.output)["rows"]}
    assert rows["size_bytes"]["ratio"] == 0.5
    missing = runner.invoke(cli, ["--home", str(home), "compare", str(a), "99"])
    assert missing.exit_code == 2 and "no kept run with id 99" in missing.output


def test_runs_text_counts_an_outcome_without_a_state_in_words_not_as_none(registry: Registry) -> None:
    outcomes = [_outcome("pi-01", 1.0, 3.0, "installed"), {"device_id": "pi-02"}, {"device_id": "pi-03", "state": None}]
    record_run(registry, "deploy", {"bundle_name": "cnn"}, {"outcomes": outcomes}, at=10.0)
    text = runs_text(registry.list_runs())
    assert "1 installed, 2 no state" in text
    assert "None" not in text


def test_a_rollout_run_keeps_its_bundle_and_where_each_device_stands(registry: Registry, tmp_path: Path) -> None:
    from host_tools.fleet.registry import BundleRef, DeviceRecord
    from host_tools.fleet.rollout_plan import RolloutPlanner, RolloutPolicy, Target
    from host_tools.fleet.rollout_store import RolloutStore
    from host_tools.fleet.rollouts import rollout_report
    from host_tools.fleet.runs import rollout_run

    bundle = _bundle(tmp_path, b"model" * 50)
    registry.upsert_device(DeviceRecord("pi-1", "online", 1000.0, active_bundles=(BundleRef("cnn", 2),)))
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=1, canary_share=None), [Target("pi-1", 2), Target("pi-2", 2)], 1000.0
    )
    sha = bundle_parameters(bundle, [], {})["bundle"]["sha256"]
    store = RolloutStore(registry)
    rid = store.create(planner, bundle=("cnn", 3, sha, str(bundle)), selector="pi-1,pi-2", now=1000.0).id
    parameters, results = rollout_run(rollout_report(registry, rid))
    run_id = record_run(registry, "rollout", parameters, results, at=1001.0)
    kept = registry.get_run(run_id)
    assert kept is not None and kept.kind == "rollout"
    assert kept.parameters["rollout"] == rid and kept.parameters["devices"] == ["pi-1", "pi-2"]
    assert kept.parameters["bundle"]["sha256"] == sha and kept.parameters["bundle"]["version"] == 3
    assert [o["device_id"] for o in kept.results["outcomes"]] == ["pi-1", "pi-2"]
    assert kept.results["status"] == "running" and kept.results["outcomes"][0]["runs"] == 2
    assert run_facts(kept)["devices"]["pi-1"]["state"] == "queued"
    assert "rollout  " in runs_text([kept]) and "2 queued" in runs_text([kept]) and "cnn.edge" in runs_text([kept])

    bundle.unlink()  # a rollout whose bundle file is gone is still kept, as the rollout stored it
    parameters, _ = rollout_run(rollout_report(registry, rid))
    assert parameters["bundle"] == {"path": str(bundle), "sha256": sha, "name": "cnn", "version": 3}
