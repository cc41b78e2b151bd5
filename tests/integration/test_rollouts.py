"""Rollouts end to end: real `edgectl rollout` and `edge-agent` processes over a real Mosquitto.

Five agents run v1 of a bundle; v2 is rolled out with a canary of one and waves of two. Where
each device ended is read from the agents' own state on disk, not from what edgectl says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from agent_models import slow_model
from harness import BIN, AgentProcess, Host

pytestmark = pytest.mark.integration

NAME = "rb"
# Benchmarks of a tiny model on a busy 2-core machine jitter far beyond any sane p99 bound; the
# health gate is covered by the planner's unit tests, and the device's own health check is on.
FAST = ("--runs", "20", "--warmup", "2", "--max-p99-ratio", "0", "--max-rss-ratio", "0")


def _fleet(host: Host, tiny_model, mosquitto, start_agent, tmp_path: Path, *, cuda: int = 5):
    """Five agents (the first ``cuda`` of them with a cuda accelerator) running v1; bundles v1 and v2."""
    tag = uuid.uuid4().hex[:6]
    agents = [
        start_agent(mosquitto.url, f"ro-{tag}-{i}", host.root, *(("--accelerator", "cuda") if i < cuda else ()))
        for i in range(5)
    ]
    v1 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", NAME, 1)
    r = host.run("deploy", str(v1), *[a for x in agents for a in ("--device", x.device_id)], "--broker", mosquitto.url,
                 "--runs", "10", "--warmup", "1", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    return agents


def _runs(agent: AgentProcess) -> int | None:
    active = agent.state().get("bundles", {}).get(NAME, {}).get("active")
    return None if active is None else active["version"]


def _installs_of(agent: AgentProcess, version: int) -> int:
    return agent.log().count(f"installed {NAME} v{version}:")


def test_a_rollout_to_five_agents_completes_wave_by_wave(host, tiny_model, mosquitto, start_agent, tmp_path):
    agents = _fleet(host, tiny_model, mosquitto, start_agent, tmp_path)
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", NAME, 2)
    ids = ",".join(a.device_id for a in agents)
    r = host.run("rollout", "start", str(v2), "--to", ids, "--canary", "1", "--wave-size", "2", *FAST,
                 "--broker", mosquitto.url, "--json", timeout=300)  # fmt: skip
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["status"] == "completed" and out["waves"] == 3
    assert [w for w in out["waves_progress"]] == [{"succeeded": 1}, {"succeeded": 2}, {"succeeded": 2}]
    assert {d["device_id"]: (d["state"], d["runs"], d["heard"]) for d in out["devices"]} == {
        a.device_id: ("succeeded", 2, True) for a in agents
    }
    assert [_runs(a) for a in agents] == [2] * 5  # from the agents' own state
    assert [_installs_of(a, 2) for a in agents] == [1] * 5
    canary = next(d for d in out["devices"] if d["wave"] == 0)["device_id"]
    assert "rollout" in r.stderr and "canary" in r.stderr  # progress per wave on stderr

    status = host.run("rollout", "status", out["id"], "--json")
    assert status.code == 0 and status.json()["status"] == "completed"
    listed = host.run("rollout", "status")
    assert out["id"] in listed.stdout and "completed" in listed.stdout
    assert canary == agents[0].device_id  # devices in plan order: the selector's, sorted

    kept = host.run("runs", "--kind", "rollout", "--json").json()  # the rollout is a kept run, as a deploy is
    assert [r["parameters"]["rollout"] for r in kept] == [out["id"]]
    assert kept[0]["results"]["status"] == "completed"
    assert {o["device_id"]: o["state"] for o in kept[0]["results"]["outcomes"]} == {
        a.device_id: "succeeded" for a in agents
    }
    assert "rollout" in host.run("runs").stdout and "5 succeeded" in host.run("runs").stdout


def test_a_failing_device_aborts_the_rollout_and_the_installed_ones_go_back(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    # The last agent lacks the accelerator v2 needs: it refuses v2 (a permanent failure).
    agents = _fleet(host, tiny_model, mosquitto, start_agent, tmp_path, cuda=4)
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", NAME, 2, "--accelerator", "cuda")
    ids = ",".join(a.device_id for a in agents)
    r = host.run("rollout", "start", str(v2), "--to", ids, "--canary", "1", "--wave-size", "2",
                 "--abort-threshold", "3%", *FAST, "--broker", mosquitto.url, "--json", timeout=300)  # fmt: skip
    assert r.code == 1, (r.stdout, r.stderr)
    out = r.json()
    assert out["status"] == "aborted" and out["reason"].startswith("wave 2: 1 of 2 devices failed")
    assert out["error"]["code"] == "rollout_aborted"
    by_id = {d["device_id"]: d for d in out["devices"]}
    assert by_id[agents[4].device_id]["state"] == "failed"
    assert by_id[agents[4].device_id]["error_code"] == "target_mismatch"
    assert [by_id[a.device_id]["state"] for a in agents[:4]] == ["rolled_back"] * 4
    assert [_runs(a) for a in agents] == [1] * 5  # every agent runs v1 again, as its own state says
    assert {by_id[a.device_id]["runs"] for a in agents} == {1}
    assert [_installs_of(a, 2) for a in agents] == [1, 1, 1, 1, 0]


def test_edgectl_killed_mid_rollout_resumes_and_no_device_installs_twice(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    agents = _fleet(host, tiny_model, mosquitto, start_agent, tmp_path)
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", NAME, 2)
    ids = ",".join(a.device_id for a in agents)
    env = dict(os.environ, EDGE_SDK_HOME=str(host.home))
    env.pop("EDGE_SDK_BROKER", None)
    proc = subprocess.Popen(
        [str(BIN / "edgectl"), "rollout", "start", str(v2), "--to", ids, "--canary", "1", "--wave-size", "2",
         "--device-timeout", "30", *FAST, "--broker", mosquitto.url, "--json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _runs(agents[0]) != 2 and time.monotonic() < deadline:  # the canary is through: wave 1 is going out
            assert proc.poll() is None
            time.sleep(0.05)
        assert _runs(agents[0]) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    listed = host.run("rollout", "status", "--json")
    (rollout,) = listed.json()
    assert rollout["status"] == "running"
    before = host.run("rollout", "status", rollout["id"], "--json").json()
    states = [d["state"] for d in before["devices"]]
    assert "in_flight" in states and "queued" in states, states  # killed half-way, with a device under way
    r = host.run("rollout", "resume", rollout["id"], "--broker", mosquitto.url, "--runs", "20", "--json", timeout=300)
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["status"] == "completed"
    assert {d["state"] for d in out["devices"]} == {"succeeded"}
    assert [_runs(a) for a in agents] == [2] * 5
    assert [_installs_of(a, 2) for a in agents] == [1] * 5  # no device installed v2 twice


def _start_in_background(host: Host, bundle: Path, agents, url: str) -> subprocess.Popen[str]:
    """`rollout start` of ``bundle`` (a slow model, ~2 s of benchmark a device) in waves of one, not waited for."""
    env = dict(os.environ, EDGE_SDK_HOME=str(host.home))
    env.pop("EDGE_SDK_BROKER", None)
    ids = ",".join(a.device_id for a in agents)
    return subprocess.Popen(
        [str(BIN / "edgectl"), "rollout", "start", str(bundle), "--to", ids, "--canary", "1", "--wave-size", "1",
         *FAST, "--runs", "200", "--broker", url, "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _pause_after_the_canary(host: Host, proc: subprocess.Popen[str], agents) -> dict:
    """Pause the running rollout once its canary runs v2; the runner stops once nothing is under way."""
    deadline = time.monotonic() + 120
    while _runs(agents[0]) != 2 and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    (rollout,) = host.run("rollout", "status", "--json").json()
    r = host.run("rollout", "pause", rollout["id"], "--json")
    assert r.code == 0, r.stderr
    assert r.json()["runner_live"] is True and r.json()["request"] == "pause"
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    paused = json.loads(out)
    assert paused["status"] == "paused"
    assert 1 <= sum(d["state"] == "succeeded" for d in paused["devices"]) < 5
    assert not {d["state"] for d in paused["devices"]} - {"succeeded", "queued"}
    return paused


def test_pause_stops_new_waves_and_resume_finishes(host, tiny_model, mosquitto, start_agent, tmp_path):
    agents = _fleet(host, tiny_model, mosquitto, start_agent, tmp_path)
    model, sample = slow_model(tmp_path)
    v2 = host.pack(model, sample, tmp_path / "v2.edge", NAME, 2)
    paused = _pause_after_the_canary(host, _start_in_background(host, v2, agents, mosquitto.url), agents)
    done = {d["device_id"] for d in paused["devices"] if d["state"] == "succeeded"}
    assert [_runs(a) for a in agents] == [2 if a.device_id in done else 1 for a in agents]
    r = host.run("rollout", "resume", paused["id"], "--broker", mosquitto.url, "--runs", "20", "--json", timeout=300)
    assert r.code == 0, r.stderr
    assert r.json()["status"] == "completed"
    assert [_runs(a) for a in agents] == [2] * 5
    assert [_installs_of(a, 2) for a in agents] == [1] * 5


def test_an_operator_abort_rolls_the_installed_devices_back(host, tiny_model, mosquitto, start_agent, tmp_path):
    agents = _fleet(host, tiny_model, mosquitto, start_agent, tmp_path)
    model, sample = slow_model(tmp_path)
    v2 = host.pack(model, sample, tmp_path / "v2.edge", NAME, 2)
    paused = _pause_after_the_canary(host, _start_in_background(host, v2, agents, mosquitto.url), agents)
    r = host.run("rollout", "abort", paused["id"], "--broker", mosquitto.url, "--json", timeout=300)
    assert r.code == 0, r.stderr  # no runner was live: abort ran the rollbacks itself
    out = r.json()
    assert out["status"] == "aborted" and out["reason"] == "aborted by the operator"
    states = {d["device_id"]: d["state"] for d in out["devices"]}
    assert sorted(states.values()) == sorted(
        ["rolled_back" if d["state"] == "succeeded" else "skipped" for d in paused["devices"]]
    )
    assert [_runs(a) for a in agents] == [1] * 5
    again = host.run("rollout", "resume", paused["id"], "--broker", mosquitto.url, "--json")
    assert again.code == 2 and "has aborted" in again.stderr


def test_a_stale_device_is_held_back_like_an_offline_one_and_gets_the_rollout_when_heard_again(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    # Three agents beating every 2 s; the middle one hangs (SIGSTOP): no will reaches the broker
    # (its connection stays open), its retained status still says online, but it is not heard.
    tag = uuid.uuid4().hex[:6]
    agents = [start_agent(mosquitto.url, f"st-{tag}-{i}", host.root, "--heartbeat", "2") for i in range(3)]
    v1 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", NAME, 1)
    r = host.run("deploy", str(v1), *[a for x in agents for a in ("--device", x.device_id)], "--broker", mosquitto.url,
                 "--runs", "10", "--warmup", "1", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", NAME, 2)
    hung = agents[1]
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(8)  # more than 3 heartbeat intervals unheard: stale
        ids = ",".join(a.device_id for a in agents)
        r = host.run("rollout", "start", str(v2), "--to", ids, "--canary", "1", "--wave-size", "2",
                     "--device-timeout", "60", *FAST, "--broker", mosquitto.url, "--json", timeout=300)  # fmt: skip
        assert r.code == 0, r.stderr
        out = r.json()
        states = {d["device_id"]: d["state"] for d in out["devices"]}
        assert out["status"] == "running"  # it waits for the stale device; `resume` goes on
        assert states == {agents[0].device_id: "succeeded", hung.device_id: "queued", agents[2].device_id: "succeeded"}
        assert next(d for d in out["devices"] if d["device_id"] == hung.device_id)["attempts"] == 0
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    assert _installs_of(hung, 2) == 0
    r = host.run("rollout", "resume", out["id"], "--broker", mosquitto.url, "--runs", "20", "--json", timeout=300)
    assert r.code == 0, r.stderr
    assert r.json()["status"] == "completed"
    assert [_runs(a) for a in agents] == [2] * 3  # from the agents' own state
    assert [_installs_of(a, 2) for a in agents] == [1] * 3
