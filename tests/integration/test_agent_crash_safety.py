"""kill -9 during an install, at every step and at random moments: one whole version stays active.

Real processes, real SIGKILL. Two ways to reach the moments that matter:

- named steps: the agent's ``--debug-crash-at STEP`` option makes it SIGKILL itself at one
  step of the install (config.CRASH_POINTS), so every step is hit exactly;
- random moments: the test itself SIGKILLs the agent at seeded random times while it
  installs a 24 MiB bundle (transfer, hashing, unpacking, fsync, model load, benchmark).

After each kill the agent is restarted without the option, and the data directory
must hold exactly one consistent active version, old or new, never a mix: state.json
names it, no pending mark remains, its slot's files match its manifest's hashes, only
the active and previous slots exist, and no scratch or temp file is left. A transfer cut
short stays in ``staging/`` whole (its command, its bytes, its chunk index), to be resumed:
a deploy of the same bundle after the restart sends only what the device lacks.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from agent_models import big_model
from harness import BIN, assert_one_version

from device_agent.config import CRASH_POINTS

pytestmark = pytest.mark.integration

OLD, NEW = 1, 2
# Where each step must leave the device after the restart.
EXPECTED = {
    "receiving": OLD,
    "received": OLD,
    "staged": OLD,
    "activated": OLD,  # pending at the crash: rolled back at start
    "profiled": OLD,  # health check passed but not confirmed: rolled back at start
    "confirmed": NEW,
    "reported": NEW,
}


def _pack(host, model: Path, sample: Path, out: Path, version: int) -> Path:
    r = host.run("pack", str(model), "-o", str(out), "--name", "cs", "--version", str(version), "--sample", str(sample))
    assert r.code == 0, r.stderr
    return out


def _deploy_in_background(host, bundle: Path, url: str, device: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BIN / "edgectl"),
            "deploy",
            str(bundle),
            "--device",
            device,
            "--broker",
            url,
            "--runs",
            "20",
            "--warmup",
            "2",
            "--chunk-size",
            str(256 * 1024),
            "--json",
            *extra,  # a later --chunk-size wins
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=host.env(),
    )


@pytest.fixture
def installed_v1(host, tiny_model, mosquitto, start_agent, tmp_path) -> Path:
    """A data directory with v1 installed and confirmed, taken from a real agent."""
    v1 = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", OLD)
    agent = start_agent(mosquitto.url, "crash-base", host.root)
    r = host.run(
        "deploy", str(v1), "--device", agent.device_id, "--broker", mosquitto.url, "--runs", "5", "--warmup", "1"
    )
    assert r.code == 0, r.stderr
    assert agent.stop() == 0
    snapshot = tmp_path / "snapshot-v1"
    shutil.copytree(agent.data_dir, snapshot)
    (snapshot / "outbox").exists() and shutil.rmtree(snapshot / "outbox")
    return snapshot


def _restart_and_check(start_agent, url: str, device: str, trust: Path, data_dir: Path) -> int:
    agent = start_agent(url, device, trust)  # waits for its birth message
    active = assert_one_version(data_dir, "cs")
    log = agent.log()
    assert agent.stop() == 0
    return active if "Traceback" not in log else pytest.fail(log[-3000:])


def test_sigkill_at_every_step_of_an_install(host, tiny_model, mosquitto, start_agent, installed_v1, tmp_path):
    v2 = _pack(host, tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", NEW)
    for point in CRASH_POINTS:
        device = f"crash-{point}"
        data_dir = tmp_path / f"agent-{device}"
        shutil.copytree(installed_v1, data_dir)
        agent = start_agent(mosquitto.url, device, host.root, "--debug-crash-at", point)
        deployer = _deploy_in_background(host, v2, mosquitto.url, device)
        try:
            assert agent.proc.wait(timeout=30) == -signal.SIGKILL, agent.log()[-2000:]
        finally:
            deployer.kill()
            deployer.wait()
        assert f"debug_crash_at={point} reached" in agent.log()
        active = _restart_and_check(start_agent, mosquitto.url, device, host.root, data_dir)
        assert active == EXPECTED[point], point


def test_sigkill_at_random_moments_of_a_large_install(host, mosquitto, start_agent, installed_v1, tmp_path):
    model, sample = big_model(tmp_path, mib=24)
    big = _pack(host, model, sample, tmp_path / "big.edge", NEW)
    rng = random.Random(20240501)
    seen = set()
    for i in range(4):
        device = f"crash-random-{i}"
        data_dir = tmp_path / f"agent-{device}"
        shutil.copytree(installed_v1, data_dir)
        agent = start_agent(mosquitto.url, device, host.root)
        deployer = _deploy_in_background(host, big, mosquitto.url, device)
        time.sleep(rng.uniform(0.6, 3.0))
        agent.proc.send_signal(signal.SIGKILL)
        assert agent.proc.wait(timeout=10) == -signal.SIGKILL
        deployer.kill()
        deployer.wait()
        seen.add(_restart_and_check(start_agent, mosquitto.url, device, host.root, data_dir))
    assert seen <= {OLD, NEW}


def test_a_transfer_cut_by_sigkill_resumes_after_the_restart(host, mosquitto, start_agent, installed_v1, tmp_path):
    """SIGKILL at half the chunks; restarted, the device keeps them, and a new deploy sends only the rest."""
    model, sample = big_model(tmp_path, mib=4)
    v2 = _pack(host, model, sample, tmp_path / "v2.edge", NEW)
    device = "crash-resume"
    data_dir = tmp_path / f"agent-{device}"
    shutil.copytree(installed_v1, data_dir)
    agent = start_agent(mosquitto.url, device, host.root, "--debug-crash-at", "receiving")
    deployer = _deploy_in_background(host, v2, mosquitto.url, device, "--chunk-size", "65536")
    try:
        assert agent.proc.wait(timeout=30) == -signal.SIGKILL, agent.log()[-2000:]
    finally:
        deployer.kill()
        deployer.wait()
    agent = start_agent(mosquitto.url, device, host.root)
    kept = [line for line in agent.log().splitlines() if "resuming cs v2" in line]
    assert kept, agent.log()[-2000:]
    have, _of, count = kept[0].split(": ")[-1].split()[:3]
    assert 0 < int(have) < int(count), kept  # the chunks written before the kill, and only those
    r = host.run(
        "deploy", str(v2), "--device", device, "--broker", mosquitto.url, "--runs", "5", "--warmup", "1",
        "--chunk-size", "65536", "--json",
    )  # fmt: skip
    out = json.loads(r.stdout)
    if r.code != 0:
        # The broker kept the device's session: what the killed deployer had published reached
        # the restarted agent, which finished the transfer from it before this deploy came;
        # the device then says it runs v2 already (the same content, or it would say so).
        details = out["error"]["details"]
        refusal = (details.get("reason"), details.get("installed"), details.get("offered"))
        assert refusal == ("not_newer", NEW, NEW), json.dumps(out) + r.stderr + agent.log()[-3000:]
        assert "resuming cs v2" in agent.log() and "installed cs v2" in agent.log()
    else:
        assert out["state"] == "installed", r.stderr + agent.log()[-3000:]
    assert agent.stop() == 0
    assert assert_one_version(data_dir, "cs") == NEW
    assert list((data_dir / "staging").iterdir()) == []
