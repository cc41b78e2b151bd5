"""Both runtimes and both precisions end to end through the agent, and remote profiling.

.tflite bundles run on LiteRT (built without TensorFlow by tests/tflite_models.py); a
full-integer .tflite with int8 inputs and outputs and an int8 QDQ ONNX model report that
they ran at int8. `edgectl profile` benchmarks a bundle on the device without
installing it: the report comes back and is stored, and state.json does not change.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from agent_models import int8_qdq_onnx
from tflite_models import QuantParams, fully_connected_model, quantized_add_model

pytestmark = pytest.mark.integration


def test_tflite_and_int8_bundles_run_and_report_their_precision(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "runtimes", host.root)
    rng = np.random.default_rng(0)

    fc = tmp_path / "fc.tflite"
    fc.write_bytes(fully_connected_model(rng.standard_normal((4, 8)).astype(np.float32), np.zeros(4, np.float32)))
    np.savez(tmp_path / "fc.npz", x=rng.standard_normal((1, 8)).astype(np.float32))
    m = host.deploy_metrics(
        host.pack(fc, tmp_path / "fc.npz", tmp_path / "fc.edge", "fc"), mosquitto.url, agent.device_id
    )
    assert m["runtime"] in ("litert", "tflite-runtime") and m["precision"] == "fp32"
    assert m["latency"]["count"] >= 30 and m["power"]["estimated"] is True

    qadd = tmp_path / "qadd.tflite"
    qadd.write_bytes(quantized_add_model((1, 4), QuantParams(0.05, 0), QuantParams(0.05, 0), QuantParams(0.1, 0)))
    np.savez(tmp_path / "qadd.npz", a=np.ones((1, 4), np.int8), b=np.full((1, 4), 3, np.int8))
    m = host.deploy_metrics(
        host.pack(qadd, tmp_path / "qadd.npz", tmp_path / "qadd.edge", "qadd"), mosquitto.url, agent.device_id
    )
    assert m["runtime"] in ("litert", "tflite-runtime") and m["precision"] == "int8"

    q = int8_qdq_onnx(tiny_model.path, tiny_model.sample, tmp_path / "tiny.int8.onnx")
    m = host.deploy_metrics(
        host.pack(q, tiny_model.sample, tmp_path / "q.edge", "tiny-int8"), mosquitto.url, agent.device_id
    )
    assert m["runtime"] == "onnxruntime" and m["precision"] == "int8"
    assert m["providers"] == ["CPUExecutionProvider"] and m["threads"] == 1

    bundles = agent.state()["bundles"]
    assert {n: b["active"]["version"] for n, b in bundles.items()} == {"fc": 1, "qadd": 1, "tiny-int8": 1}


def test_remote_profile_reports_and_stores_without_installing(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "profile-only", host.root)
    v1 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", "pr", 1)
    host.deploy_metrics(v1, mosquitto.url, agent.device_id)
    state_before = (agent.data_dir / "state.json").read_bytes()
    slots_before = sorted(p.relative_to(agent.data_dir) for p in (agent.data_dir / "slots").rglob("*"))

    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", "pr", 2)
    r = host.run(
        "profile",
        agent.device_id,
        str(v2),
        "--broker",
        mosquitto.url,
        "--runs",
        "25",
        "--warmup",
        "2",
        "--threads",
        "2",
        "--json",
    )
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["state"] == "profiled"
    m = out["metrics"]
    assert m["bundle_version"] == 2 and m["mode"] == "profile" and m["threads"] == 2
    assert m["latency"]["count"] >= 25 and "estimated" in m["power"]

    assert (agent.data_dir / "state.json").read_bytes() == state_before
    assert sorted(p.relative_to(agent.data_dir) for p in (agent.data_dir / "slots").rglob("*")) == slots_before
    assert list((agent.data_dir / "tmp").iterdir()) == []

    stored = host.run("metrics", "--device", agent.device_id, "--json")
    assert stored.code == 0
    assert any(rep["bundle_version"] == 2 and rep.get("mode") == "profile" for rep in stored.json())
    table = host.run("profile", agent.device_id, str(v2), "--broker", mosquitto.url, "--runs", "5", "--warmup", "1")
    assert table.code == 0 and "not installed" in table.stdout and "(estimated)" in table.stdout

    # An older version can be profiled (nothing is installed), and v2 can still be deployed after.
    assert host.run("profile", agent.device_id, str(v1), "--broker", mosquitto.url, "--runs", "5", "--json").code == 0
    m = host.deploy_metrics(v2, mosquitto.url, agent.device_id)
    assert m["bundle_version"] == 2 and agent.state()["bundles"]["pr"]["active"]["version"] == 2

    # Every profile and deploy was kept as a run, newest first, naming the bundle by its hash.
    kept = host.run("runs", "--json")
    assert kept.code == 0, kept.stderr
    runs = kept.json()
    assert [r["kind"] for r in runs] == ["deploy", "profile", "profile", "profile", "deploy"]
    v2_sha = hashlib.sha256(v2.read_bytes()).hexdigest()
    assert runs[0]["parameters"]["bundle"]["sha256"] == runs[3]["parameters"]["bundle"]["sha256"] == v2_sha
    assert runs[3]["results"]["outcomes"][0]["metrics"]["latency"]["samples_ms"]
    compared = host.run("compare", str(runs[3]["id"]), str(runs[1]["id"]), "--json")
    assert compared.code == 0, compared.stderr
    figures = {row["figure"]: row for row in compared.json()["rows"]}
    assert figures["sha256"]["same"] is False
    assert figures[f"latency p99_ms {agent.device_id}"]["a"] == out["metrics"]["latency"]["p99_ms"]
