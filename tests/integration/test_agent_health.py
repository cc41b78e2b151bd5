"""Health checks after activation, end to end: a bad model is rolled back by the agent itself.

Each bad model (NaN outputs, outputs of the wrong shape, slower than the manifest's
latency budget) is packed, signed and deployed through real `edgectl` and `edge-agent`
processes over a real Mosquitto. The host is told why, the previous version is active
again, the failed slot is gone, and the agent goes on to install a good version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_models import nan_model, slow_model, wrong_shape_model

pytestmark = pytest.mark.integration

EXIT_MODEL = 6


def pack(host, model: Path, sample: Path, out: Path, version: int, *extra: str, name: str = "hc") -> Path:
    r = host.run(
        "pack", str(model), "-o", str(out), "--name", name, "--version", str(version), "--sample", str(sample), *extra
    )
    assert r.code == 0, r.stderr
    return out


def deploy(host, bundle: Path, url: str, device: str):
    return host.run(
        "deploy", str(bundle), "--device", device, "--broker", url, "--runs", "20", "--warmup", "2", "--json"
    )


def test_bad_models_are_rolled_back_and_the_host_is_told_why(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "health-rollback", host.root)
    v1 = pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", 1)
    r = deploy(host, v1, mosquitto.url, agent.device_id)
    assert r.code == 0, r.stderr

    cases = [
        (nan_model, "finite", ()),
        (wrong_shape_model, "shape", ()),
        (slow_model, "latency", ("--max-latency-ms", "1")),
    ]
    for version, (build, check, extra) in enumerate(cases, start=2):
        model, sample = build(tmp_path)
        bundle = pack(host, model, sample, tmp_path / f"v{version}.edge", version, *extra)
        r = deploy(host, bundle, mosquitto.url, agent.device_id)
        assert r.code == EXIT_MODEL, (check, r.stdout, r.stderr)
        out = r.json()
        assert out["state"] == "failed"
        assert out["error"]["code"] == "health_check", out
        assert out["error"]["details"]["check"] == check
        assert out["error"]["details"]["rolled_back_to"] == 1
        state = agent.state()["bundles"]["hc"]
        assert state["active"] == {"version": 1} and "pending" not in state, state
        assert sorted(p.name for p in (agent.data_dir / "slots" / "hc").iterdir()) == ["v1"]
        assert agent.alive
    assert "exceeds the budget of 1 ms" in agent.log()

    good = pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v5.edge", 5, "--max-latency-ms", "1000")
    r = deploy(host, good, mosquitto.url, agent.device_id)
    assert r.code == 0, r.stderr
    state = agent.state()["bundles"]["hc"]
    assert state["active"] == {"version": 5} and state["previous"] == {"version": 1} and "pending" not in state
    manifest = json.loads((agent.data_dir / "slots" / "hc" / "v5" / "manifest.json").read_text())
    assert manifest["health"] == {"max_latency_ms": 1000.0}
