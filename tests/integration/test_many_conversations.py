"""Many deploys at once over one host connection, to real `edge-agent` processes.

Twenty agents, one :class:`~edge_sdk.mqtt.MqttClient` and one
:class:`~host_tools.fleet.router.Router`; twenty threads each run the ordinary
:func:`~host_tools.fleet.deployer.deploy_bundle`. The devices get four different bundles,
interleaved, so that an answer delivered to the wrong conversation shows as a wrong
outcome: a good v1 and a good v2 (installed, each reporting its own version), a bundle
with a flipped byte (refused: hash mismatch) and a model that answers NaN (installed,
then failed by the health check). Each outcome must match its device, and nothing may
be dropped on the way.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agent_models import nan_model
from harness import wait_online

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import BenchmarkSpec
from host_tools.fleet.deployer import CommandAuthority, DeployOptions, DeployOutcome, deploy_bundle
from host_tools.fleet.enrolment import ReportGate
from host_tools.fleet.registry import open_registry
from host_tools.fleet.router import Router
from host_tools.keys import KeyRing

pytestmark = pytest.mark.integration

DEVICES = 20


def _flip_a_model_byte(good: Path, out: Path) -> Path:
    raw = bytearray(good.read_bytes())
    raw[raw.index(b"payload/tiny.onnx") + 512 + 100] ^= 0x01  # inside the model's data
    out.write_bytes(bytes(raw))
    return out


def test_twenty_deploys_over_one_connection_each_get_their_own_outcome(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    nan_path, nan_sample = nan_model(tmp_path)
    v1 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", "tiny", 1)
    bundles = {
        "v1": v1,
        "v2": host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", "tiny", 2),
        "flipped": _flip_a_model_byte(v1, tmp_path / "flipped.edge"),
        "nan": host.pack(nan_path, nan_sample, tmp_path / "nan.edge", "tiny", 3),
    }
    kinds = list(bundles)
    plan = {f"many-{i:02d}-{uuid.uuid4().hex[:4]}": kinds[i % len(kinds)] for i in range(DEVICES)}
    agents = {d: start_agent(mosquitto.url, d, host.root, wait=False) for d in plan}
    for device_id in plan:
        wait_online(mosquitto.url, device_id, timeout=60)

    ring = KeyRing(host.home / "keys")
    options = DeployOptions(
        benchmark=BenchmarkSpec(runs=5, warmup=1),
        authority=CommandAuthority(tuple(ring.role_keys("commands")), tuple(ring.chain())),
        accept_timeout_s=60,
        finish_timeout_s=90,
    )
    client = MqttClient(mosquitto.url, MqttOptions(client_id=f"many-{uuid.uuid4().hex[:8]}"))
    client.connect()
    started = time.monotonic()
    try:
        with open_registry(host.home / "registry.db") as registry:  # the agents' keys are enrolled there
            gate = ReportGate.from_registry(registry)
        with Router(client, gate=gate) as router, ThreadPoolExecutor(DEVICES) as pool:
            futures = {
                d: pool.submit(deploy_bundle, client, d, bundles[kind], options, router=router)
                for d, kind in plan.items()
            }
            outcomes: dict[str, DeployOutcome] = {d: f.result(timeout=150) for d, f in futures.items()}
    finally:
        client.close()
    elapsed = time.monotonic() - started

    for device_id, kind in plan.items():
        out, agent = outcomes[device_id], agents[device_id]
        assert out.device_id == device_id and agent.alive
        what = (device_id, kind, out.state, out.error)
        if kind in ("v1", "v2"):
            version = int(kind[1])
            assert out.state == "installed" and out.error is None, what
            assert out.bundle_version == version
            assert out.metrics is not None and out.metrics.device_id == device_id
            assert (
                out.metrics.bundle_version == version
                and out.metrics.latency is not None
                and out.metrics.latency.count >= 5
            )
            assert agent.state()["bundles"]["tiny"]["active"]["version"] == version
        elif kind == "flipped":
            assert out.state == "refused" and out.error is not None and out.error.code == "hash_mismatch", what
            assert out.metrics is None and agent.state() == {}
        else:
            assert out.state == "failed" and out.error is not None and out.error.code == "health_check", what
            assert out.error.details["check"] == "finite"
            assert agent.state()["bundles"]["tiny"]["active"] is None  # rolled back to nothing

    # They ran at once (one after another, their times would add up to the elapsed time) ...
    assert sum(o.seconds for o in outcomes.values()) > 2 * elapsed
    # ... and every answer reached its conversation; nothing was lost to a full queue.
    assert router.delivered > 0 and router.conversations == 0 and not router.running
    assert (router.dropped_full, router.malformed, client.inbox_dropped) == (0, 0, 0)
    assert elapsed < 120, f"20 deploys over one connection took {elapsed:.0f} s"
