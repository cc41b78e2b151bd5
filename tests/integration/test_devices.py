"""What `edgectl devices` shows, and what deploy measures, against real agents and real Mosquittos.

- an agent whose broker is gone (no will reached the broker read now) is not shown online;
- one device id seen on two brokers is two rows, told apart by the broker;
- `remove` clears the active bundle the registry shows; several bundles are all shown;
- `devices forget` deletes the registry rows and the retained status and metrics;
- deploy's `--min-duration` (default 1 s) makes a tiny model's CPU and power figures mean
  something, and without it they say "too short" instead of a number;
- the model's memory share does not depend on what the agent loaded before.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from harness import TinyModel
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import DeviceTopics

pytestmark = pytest.mark.integration

EXIT_USAGE = 2


def _devices(host, url: str) -> list[dict]:
    r = host.run("devices", "--broker", url, "--json", "--wait", "0.5")
    assert r.code == 0, r.stderr
    return r.json()  # type: ignore[return-value]


def _mine(rows: list[dict], device_id: str) -> list[dict]:
    return [d for d in rows if d["device_id"] == device_id]


def _deploy(host, bundle: Path, url: str, device: str, *extra: str):
    return host.run(
        "deploy", str(bundle), "--device", device, "--broker", url, "--runs", "20", "--warmup", "2", "--json", *extra
    )


def _retained(url: str, topics: list[str], wait_s: float = 1.0) -> dict[str, bytes]:
    client = MqttClient(url, MqttOptions(client_id=f"test-retained-{os.getpid()}"))
    client.connect()
    got: dict[str, bytes] = {}
    try:
        for topic in topics:
            client.subscribe(topic)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                item = client.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Incoming) and item.retain:
                got[item.topic] = item.payload
    finally:
        client.close()
    return got


def test_agent_whose_broker_is_gone_is_not_online_and_two_brokers_are_told_apart(
    host, start_mosquitto, start_agent
) -> None:
    first = start_mosquitto()
    agent = start_agent(first.url, "dev-brokers", host.root)
    [row] = _mine(_devices(host, first.url), agent.device_id)
    assert row["status"] == "online" and row["status_confirmed"] and row["broker"] == first.url

    # The broker goes away with the agent still connected: no will reaches any broker
    # (as after `make demo`, whose embedded broker is gone). The registry last saw it online.
    first.stop()
    agent.proc.kill()
    agent.proc.wait()
    second = start_mosquitto()
    [row] = _mine(_devices(host, second.url), agent.device_id)
    assert row["status"] == "unknown" and row["last_status"] == "online" and not row["status_confirmed"]
    assert row["broker"] == first.url
    table = host.run("devices", "--broker", second.url, "--wait", "0.5")
    line = next(x for x in table.stdout.splitlines() if x.startswith(agent.device_id))
    assert "online as of" in line and " UTC (" in line and first.url in line
    assert "not confirmed now" in table.stdout

    # The same id on the second broker is another row, told apart by its broker.
    again = start_agent(second.url, "dev-brokers", host.root)
    rows = {d["broker"]: d for d in _mine(_devices(host, second.url), again.device_id)}
    assert set(rows) == {first.url, second.url}
    assert rows[second.url]["status"] == "online" and rows[first.url]["status"] == "unknown"


def test_every_active_bundle_is_shown_and_remove_clears_it(host, tiny_model, mosquitto, start_agent, tmp_path) -> None:
    agent = start_agent(mosquitto.url, "dev-bundles", host.root)
    for name in ("alpha", "beta"):
        bundle = host.pack(tiny_model.path, tiny_model.sample, tmp_path / f"{name}.edge", name, 3)
        assert _deploy(host, bundle, mosquitto.url, agent.device_id).code == 0
    [row] = _mine(_devices(host, mosquitto.url), agent.device_id)
    assert row["active_bundles"] == [{"name": "alpha", "version": 3}, {"name": "beta", "version": 3}]
    table = host.run("devices", "--broker", mosquitto.url, "--wait", "0.5").stdout
    assert "alpha v3, beta v3" in table

    r = host.run("remove", "--device", agent.device_id, "--name", "alpha", "--broker", mosquitto.url)
    assert r.code == 0, r.stderr
    [row] = _mine(_devices(host, mosquitto.url), agent.device_id)
    assert row["active_bundles"] == [{"name": "beta", "version": 3}]
    r = host.run("remove", "--device", agent.device_id, "--name", "beta", "--broker", mosquitto.url)
    assert r.code == 0, r.stderr
    [row] = _mine(_devices(host, mosquitto.url), agent.device_id)
    assert row["active_bundles"] == [] and row["active_bundle"] is None


def test_forget_clears_registry_rows_and_retained_messages(host, tiny_model, mosquitto, start_agent, tmp_path) -> None:
    agent = start_agent(mosquitto.url, "dev-forget", host.root)
    bundle = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "t.edge", "tiny", 1)
    assert _deploy(host, bundle, mosquitto.url, agent.device_id).code == 0
    assert _mine(_devices(host, mosquitto.url), agent.device_id)
    agent.stop()
    topics = DeviceTopics(agent.device_id)
    assert set(_retained(mosquitto.url, [topics.status, topics.metrics])) == {topics.status, topics.metrics}

    r = host.run("devices", "forget", agent.device_id, "--broker", mosquitto.url)
    assert r.code == 0, r.stderr
    assert f"forgot {agent.device_id}" in r.stdout and "1 device row(s)" in r.stdout and "1 deployment(s)" in r.stdout
    assert _retained(mosquitto.url, [topics.status, topics.metrics]) == {}
    assert not _mine(_devices(host, mosquitto.url), agent.device_id)
    metrics = host.run("metrics", "--device", agent.device_id, "--json")
    assert metrics.code == 0 and metrics.json() == []

    unknown = host.run("devices", "forget", agent.device_id, "--broker", mosquitto.url)
    assert unknown.code == EXIT_USAGE
    assert f"no device {agent.device_id!r}" in unknown.stderr


def test_deploy_min_duration_makes_cpu_and_power_mean_something(
    host, tiny_model, mosquitto, start_agent, tmp_path
) -> None:
    agent = start_agent(mosquitto.url, "dev-duration", host.root)
    v1 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", "tiny", 1)
    r = _deploy(host, v1, mosquitto.url, agent.device_id)  # default --min-duration: 1 s
    assert r.code == 0, r.stderr
    m = r.json()["metrics"]
    # 1 s of timed runs, or the benchmark's cap of 100,000 runs for a very fast model
    assert (m["cpu"]["wall_s"] >= 1.0 or m["latency"]["count"] == 100_000) and m["latency"]["count"] > 20
    assert 0 < m["cpu"]["percent_of_one_core"] <= 100 * m["threads"]
    assert "insufficient_data" not in m["cpu"] and m["power"]["watts"] > 0

    # Without it, 20 runs of a tiny model take a few ms: the figures say so instead of a number.
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", "tiny", 2)
    r = _deploy(host, v2, mosquitto.url, agent.device_id, "--min-duration", "0")
    assert r.code == 0, r.stderr
    m = r.json()["metrics"]
    assert m["cpu"]["percent_of_one_core"] is None and "CPU-time ticks" in m["cpu"]["insufficient_data"]
    if m["power"]["estimated"]:  # an estimate from the CPU share has none either
        assert m["power"]["watts"] is None and "CPU share" in m["power"]["insufficient_data"]
        text = host.run("metrics", "--device", agent.device_id).stdout
        assert "n/a (too short)" in text


def _model_of(d: Path, rows: int, cols: int) -> TinyModel:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((rows, cols)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["out"])],
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", cols])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = d / f"wide-{rows}x{cols}.onnx"
    path.write_bytes(model.SerializeToString())
    sample = d / f"wide-{rows}x{cols}.npz"
    np.savez(sample, input=rng.standard_normal((1, rows)).astype(np.float32))
    return TinyModel(path, sample)


def test_model_memory_share_does_not_depend_on_what_was_loaded_before(host, mosquitto, start_agent, tmp_path) -> None:
    """The same 4 MiB model installed as v1 then v2 in one agent: shares within 25 % (or 256 KiB)."""
    wide = _model_of(tmp_path, 256, 4096)
    agent = start_agent(mosquitto.url, "dev-memory", host.root)
    shares = []
    for version in (1, 2):
        bundle = host.pack(wide.path, wide.sample, tmp_path / f"wide-{version}.edge", "wide", version)
        r = _deploy(host, bundle, mosquitto.url, agent.device_id, "--min-duration", "0.2")
        assert r.code == 0, r.stderr
        memory = r.json()["metrics"]["memory"]
        shares.append(memory["model_bytes"])
    first, second = shares
    weights = 256 * 4096 * 4
    assert first >= weights * 0.9, shares  # the weights are in it, at least
    assert abs(first - second) <= max(0.25 * first, 256 * 1024), shares
    assert onnx.load(str(wide.path)).graph.initializer  # the model really carries its weights
