"""The simulated devices' shell: how faults reach the agent's code paths, and the stand-in profile."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from device_agent.simulated import SimSpec, install_fault, standin_profile
from edge_sdk.errors import ConfigError, StorageError
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.simulation import DeviceFaults, LatencyModel, parse_fault


def test_an_install_failure_is_the_storage_error_of_a_full_disk_before_activation_of_its_version_only(
    tmp_path: Path,
) -> None:
    faults = DeviceFaults("d", (parse_fault("install-fail:share=1,after=10,version=3"),))
    now = [0.0]
    hook = install_fault(faults, tmp_path / "state.json", lambda: now[0])
    hook(_manifest(3))  # before its time: nothing
    now[0] = 10.0
    hook(_manifest(2))  # another version: nothing
    with pytest.raises(StorageError, match="No space left on device") as caught:
        hook(_manifest(3))
    assert caught.value.details["path"] == str(tmp_path / "state.json")
    install_fault(DeviceFaults("e"), tmp_path / "state.json", lambda: 99.0)(_manifest(3))  # no fault: no error


def _manifest(version: int) -> Any:
    return SimpleNamespace(name="m", version=version, precision="int8", health=None)


def test_the_stand_in_profile_says_simulated_and_carries_the_regression_of_its_version() -> None:
    faults = DeviceFaults(
        "d", (parse_fault("latency:share=1,factor=3,version=2"), parse_fault("rss:share=1,factor=2,version=2"))
    )
    model = LatencyModel(median_ms=2.0, sigma=0.0, model_bytes=1 << 20)
    profile = standin_profile(model, faults)
    spec = BenchmarkSpec(runs=50, warmup=2)
    v1 = profile(_manifest(1), Path("/nonexistent"), spec)
    v2 = profile(_manifest(2), Path("/nonexistent"), spec)
    assert v1.runtime == "simulated" and v1.providers == ("simulated",) and v1.power.source == "simulated"
    assert v1.cpu.insufficient_data and v1.memory.model_bytes_method == "simulated"
    assert v1.latency.p50_ms == pytest.approx(2.0) and v2.latency.p99_ms == pytest.approx(6.0)
    assert v2.memory.model_bytes == 2 * v1.memory.model_bytes == 2 << 20


def test_a_spec_with_an_unknown_runtime_or_a_missing_field_is_refused() -> None:
    spec = {"broker": "mqtt://127.0.0.1:1", "root": "/r.json", "started_at": 0, "devices": []}
    assert SimSpec.from_dict(spec).runtime == "standin"
    with pytest.raises(ConfigError, match="runtime"):
        SimSpec.from_dict({**spec, "runtime": "quantum"})
    with pytest.raises(ConfigError, match="broker"):
        SimSpec.from_dict({k: v for k, v in spec.items() if k != "broker"})


def test_edge_agent_simulate_refuses_a_spec_it_cannot_read_with_a_usage_exit_code(tmp_path: Path) -> None:
    from device_agent.cli import main

    assert main(["simulate", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text('{"broker": "mqtt://127.0.0.1:1"}')
    assert main(["simulate", str(tmp_path / "bad.json")]) == 2
