"""Versions, rollback protection and cheap checks first, with real agent processes through a real Mosquitto.

The floor a signed deploy must clear is the version the device runs, or last ran, after
every signed rollback or remove (edge_sdk.bundle.admission). A version that never ran
does not raise it; a version that ran names one content. Everything the signed offer
lets the device check is checked before any chunk moves: a spy on the device's data
topic counts the chunks the host sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_models import nan_model
from harness import BIN, AgentProcess, enroll, wait_online
from tflite_models import fully_connected_model

from edge_sdk.bundle import BundleSpec, pack_bundle
from edge_sdk.mqtt import MqttClient, MqttOptions
from host_tools.fleet.deployer import DeployOptions, deploy_bundle
from host_tools.fleet.registry import open_registry
from host_tools.fleet.router import gated
from host_tools.keys import KeyRing, command_authority

pytestmark = pytest.mark.integration

EXIT_UNTRUSTED = 3
EXIT_LOCAL_STATE = 5


def _pack(host, model: Path, sample: Path | None, out: Path, version: int, name: str = "my-cnn") -> Path:
    args = ["pack", str(model), "-o", str(out), "--name", name, "--version", str(version)]
    r = host.run(*args, *(("--sample", str(sample)) if sample else ()))
    assert r.code == 0, r.stderr
    return out


def _deploy(host, bundle: Path, url: str, device: str, *extra: str):
    return host.run(
        "deploy", str(bundle), "--device", device, "--broker", url, "--runs", "5", "--warmup", "1", "--json", *extra
    )


def _rollback(host, url: str, device: str, version: int):
    return host.run("rollback", "--device", device, "--name", "my-cnn", "--version", str(version), "--broker", url)


def _active(agent: AgentProcess) -> int | None:
    entry = agent.state().get("bundles", {}).get("my-cnn") or {}
    return (entry.get("active") or {}).get("version")


def _direct(host, url: str, device: str, bundle: Path):  # type: ignore[no-untyped-def]
    """deploy_bundle without the registry: what the device itself says, with the bytes the host sent."""
    authority = command_authority(KeyRing(host.home / "keys"))
    sent: list[int] = []
    client = MqttClient(url, MqttOptions(client_id=f"direct-{uuid.uuid4().hex[:8]}"))
    client.connect()
    try:
        with open_registry(host.home / "registry.db") as registry, gated(client, registry) as router:
            outcome = deploy_bundle(
                client,
                device,
                bundle,
                DeployOptions(authority=authority),
                progress=lambda n, _total: sent.append(n),
                router=router,
            )
    finally:
        client.close()
    return outcome, sum(1 for _ in sent)


def test_rollback_then_redeploy_and_remove_say_what_the_floor_is(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "ver-rollback", host.root)
    url, dev = mosquitto.url, agent.device_id
    v1 = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", 1)
    v2 = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", 2)
    assert _deploy(host, v1, url, dev).code == 0
    assert _deploy(host, v2, url, dev).code == 0
    assert _rollback(host, url, dev, 1).code == 0 and _active(agent) == 1

    again = _deploy(host, v2, url, dev)  # the case: refused today as "not newer than installed v2"
    assert again.code == 0, again.stderr
    assert _active(agent) == 2

    assert host.run("remove", "--device", dev, "--name", "my-cnn", "--broker", url).code == 0
    after = _deploy(host, v2, url, dev)
    assert after.code == EXIT_UNTRUSTED
    message = after.json()["error"]["message"]
    assert message == (
        "my-cnn v2 is not newer than the floor v2 (the version this device last ran, until a signed remove; "
        "installed: none)"
    )
    assert "installed v2" not in after.stderr + after.stdout
    assert agent.alive


def test_a_failed_version_does_not_use_up_its_number(host, tiny_model, mosquitto, start_agent, tmp_path):
    agent = start_agent(mosquitto.url, "ver-failed", host.root)
    url, dev = mosquitto.url, agent.device_id
    assert _deploy(host, _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", 2), url, dev).code == 0
    bad, bad_sample = nan_model(tmp_path)
    broken = _deploy(host, _pack(host, bad, bad_sample, tmp_path / "v3-bad.edge", 3), url, dev)
    assert broken.code != 0 and broken.json()["error"]["code"] == "health_check" and _active(agent) == 2

    fixed = _deploy(host, _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v3.edge", 3), url, dev)
    assert fixed.code == 0, fixed.stderr  # refused today as "not newer than installed v3"
    assert _active(agent) == 3


def test_same_version_other_content_is_refused_before_transfer(host, tiny_model, mosquitto, start_agent, spy, tmp_path):
    agent = start_agent(mosquitto.url, "ver-content", host.root)
    url, dev = mosquitto.url, agent.device_id
    assert _deploy(host, _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", 1), url, dev).code == 0
    assert _deploy(host, _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", 2), url, dev).code == 0
    assert _rollback(host, url, dev, 1).code == 0
    bad, bad_sample = nan_model(tmp_path)
    other = _pack(host, bad, bad_sample, tmp_path / "v2-other.edge", 2)
    chunks = spy(dev)
    r = _deploy(host, other, url, dev)
    assert r.code == EXIT_UNTRUSTED
    assert "my-cnn v2 differs from the v2 this device already ran" in r.json()["error"]["message"]
    assert chunks.count() == 0 and _active(agent) == 1


def test_an_older_offer_is_refused_with_zero_chunks_sent(host, tiny_model, mosquitto, start_agent, spy, tmp_path):
    agent = start_agent(mosquitto.url, "ver-older", host.root)
    url, dev = mosquitto.url, agent.device_id
    v1 = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", 1)
    assert _deploy(host, v1, url, dev).code == 0
    assert _deploy(host, _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", 2), url, dev).code == 0
    chunks = spy(dev)

    # The host knows the device runs v2 (its retained status): it refuses before sending anything.
    r = _deploy(host, v1, url, dev)
    assert r.code == EXIT_UNTRUSTED and "nothing was sent" in r.stderr + r.stdout
    assert chunks.count() == 0

    # Without the host's check, the device refuses the signed offer before the first chunk.
    outcome, progress_calls = _direct(host, url, dev, v1)
    assert outcome.state == "refused" and outcome.error is not None and outcome.error.code == "rollback"
    assert outcome.error.message.startswith("my-cnn v1 is not newer than the floor v2")
    assert progress_calls == 0 and chunks.count() == 0
    assert "refused offer of my-cnn v1 before transfer" in agent.log()
    assert list((agent.data_dir / "staging").iterdir()) == [] and _active(agent) == 2


_HIDE_LITERT = """
import importlib.abc, sys

class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ai_edge_litert", "tflite_runtime"):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, _Hide())
"""


@pytest.fixture
def agent_without_litert(mosquitto, host, tmp_path) -> Iterator[AgentProcess]:
    """A real agent process on which neither LiteRT package can be imported."""
    site = tmp_path / "no-litert"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_HIDE_LITERT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    data_dir, log_path = tmp_path / "agent-ver-nolitert", tmp_path / "agent-ver-nolitert.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                *(str(BIN / "edge-agent"), "run", "--broker", mosquitto.url, "--device-id", "ver-nolitert"),
                *("--data-dir", str(data_dir), "--root", str(host.root), "--log-level", "DEBUG"),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    agent = AgentProcess(proc, "ver-nolitert", data_dir, log_path)
    try:
        enroll(host.home, agent.device_id, agent.wait_for_key())
        status = wait_online(mosquitto.url, agent.device_id)
        assert "litert" not in status.runtimes and "onnxruntime" in status.runtimes
        yield agent
    finally:
        agent.stop()


def test_a_runtime_the_device_lacks_is_refused_before_transfer(host, mosquitto, agent_without_litert, spy, tmp_path):
    agent, url = agent_without_litert, mosquitto.url
    rng = np.random.default_rng(0)
    fc = tmp_path / "fc.tflite"
    fc.write_bytes(fully_connected_model(rng.standard_normal((4, 8)).astype(np.float32), np.zeros(4, np.float32)))
    np.savez(tmp_path / "fc.npz", x=rng.standard_normal((1, 8)).astype(np.float32))
    bundle = _pack(host, fc, tmp_path / "fc.npz", tmp_path / "fc.edge", 1, name="fc")
    chunks = spy(agent.device_id)

    r = _deploy(host, bundle, url, agent.device_id)  # the host heard the device's status: it lacks LiteRT
    assert r.code == EXIT_UNTRUSTED, r.stderr
    assert f"fc v1 needs runtime litert, which device {agent.device_id} lacks" in r.stderr
    assert chunks.count() == 0

    outcome, progress_calls = _direct(host, url, agent.device_id, bundle)  # the device's own check
    assert outcome.state == "refused" and outcome.error is not None and outcome.error.code == "target_mismatch"
    assert "fc v1 needs runtime litert, which this device lacks (it has onnxruntime)" in outcome.error.message
    assert progress_calls == 0 and chunks.count() == 0 and agent.alive


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 6 MiB tmpfs (needs the right to mount; skipped without it)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_storage_counts_the_unpacked_payload_before_transfer(host, mosquitto, start_agent, spy, small_disk, tmp_path):
    # An agent whose data directory is the 6 MiB file system.
    agent = start_agent(mosquitto.url, "ver-disk", host.root, "--data-dir", str(small_disk / "agent"))
    model = tmp_path / "big.onnx"
    model.write_bytes(np.random.default_rng(0).bytes(3 << 20))  # 3 MiB: fits as a download, not also unpacked
    bundle = tmp_path / "big.edge"
    pack_bundle(
        BundleSpec("big", 1, "onnxruntime", model),
        KeyRing(host.home / "keys").role_keys("bundles"),
        bundle,
        time.time(),
    )
    free = shutil.disk_usage(small_disk).free
    size = bundle.stat().st_size
    assert size < free < 2 * size  # the old check (the download alone) passed this bundle
    chunks = spy(agent.device_id)
    r = _deploy(host, bundle, mosquitto.url, agent.device_id)
    assert r.code == EXIT_LOCAL_STATE, r.stderr
    error = r.json()["error"]
    assert error["code"] == "storage"
    assert f"{size} bytes to download + {3 << 20} bytes unpacked" in error["message"]
    assert "bytes free" in error["message"]
    assert chunks.count() == 0 and list((small_disk / "agent" / "staging").iterdir()) == [] and agent.alive
