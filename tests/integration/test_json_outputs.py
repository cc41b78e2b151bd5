"""Every `edgectl` command with `--json`, run once as a real process against a real Mosquitto and agent.

:meth:`harness.Host.run` checks each `--json` output against its command's schema
(tests/json_schemas.py); this module makes sure every command's schema meets a real output,
success and failure alike. A command with `--json` that no case here runs fails
:func:`test_every_json_command_was_run`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
from harness import BIN
from json_schemas import json_commands, validate_output

from host_tools.cli import cli, json_schema_of

pytestmark = pytest.mark.integration


def test_every_json_command_was_run(host, tiny_model, mosquitto, start_agent, tmp_path) -> None:
    """One pass through the fleet's life; each command once with --json (checked by Host.run)."""
    ran: set[str] = set()

    def run(*args: str, code: int = 0) -> object:
        r = host.run(*args, "--json")
        assert r.code == code, (args, r.stderr)
        ran.add(json_schema_of(cli, list(args)))
        return r.json()

    url = mosquitto.url
    run("init", "--path", str(tmp_path / "edgectl.toml"), "--broker", url)
    run("config", "show")
    run("keys", "show")
    rotated = run("keys", "rotate", "commands")
    run("keys", "revoke", rotated["replaced"], code=5)  # no longer in the root: the failure, as JSON
    run("keys", "init")
    run("ca", "init")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32))
    run("compress", str(tiny_model.path), "-o", str(tmp_path / "tiny.int8.onnx"), "--calib", str(calib))
    v1 = tmp_path / "v1.edge"
    pack = ["--name", "js", "--sample", str(tiny_model.sample)]
    run("pack", str(tiny_model.path), "-o", str(v1), "--version", "1", *pack)
    run("verify", str(v1))
    run("resign", str(v1), "-o", str(tmp_path / "v1-resigned.edge"))
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", "js", 2)

    agent = start_agent(url, "json-dev", host.root)
    device = ["--device", agent.device_id, "--broker", url]
    run("deploy", str(v1), *device, "--runs", "5", "--warmup", "1")
    run("deploy", str(v2), *device, "--runs", "5", "--warmup", "1")
    run("profile", agent.device_id, str(v1), "--broker", url, "--runs", "5", "--warmup", "1")
    run("rollback", *device, "--name", "js", "--version", "1")
    run("remove", *device, "--name", "js")
    run("metrics", "--device", agent.device_id)
    run("devices", "--broker", url, "--wait", "0.5")
    run("devices", "label", agent.device_id, "site=depot-3")
    run("groups", "add", "depot3", "site=depot-3")
    run("groups", "list")
    v3 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v3.edge", "js", 3)
    fast = ("--runs", "5", "--warmup", "1", "--max-p99-ratio", "0", "--max-rss-ratio", "0")
    rollout = run("rollout", "start", str(v3), "--to", "@depot3", "--canary", "1", "--broker", url, *fast)
    run("rollout", "status", rollout["id"])
    run("rollout", "pause", rollout["id"], code=_PAUSE_DONE)
    run("rollout", "resume", rollout["id"], "--broker", url, *fast[:4], code=_RESUME_DONE)
    run("rollout", "abort", rollout["id"], "--broker", url, code=_RESUME_DONE)
    run("groups", "rm", "depot3")
    kept = run("runs")
    assert isinstance(kept, list) and len(kept) >= 2
    run("compare", str(kept[-1]["id"]), str(kept[0]["id"]))
    run("report", "--html", str(tmp_path / "report.html"), "--png", str(tmp_path / "plots"))
    run("sim", "--devices", "2", "--broker", url, "--root", str(tmp_path / "sim"), "--for", "3")
    _collect_once(host, url)
    ran.add("collect")

    start_agent(url, "json-new", host.root, enroll_key=False, wait=False)
    pending = _wait_pending(host, url, "json-new")
    ran.add("devices-enroll")
    assert pending
    run("devices", "approve", "json-new", "--yes")
    run("devices", "revoke", "json-new")
    run("devices", "provision", "json-prov", "--broker", url, "--out", str(tmp_path / "prov"))
    run("devices", "forget", agent.device_id, "--broker", url)
    run("demo", "--broker", url, "--runs", "20", "--workdir", str(tmp_path / "demo"))
    assert ran == set(json_commands())


_PAUSE_DONE = 2  # a completed rollout takes no pause (usage error, as JSON)
_RESUME_DONE = 2  # nor a resume or an abort: their success outputs are checked in test_rollouts.py


def _collect_once(host, url: str) -> None:  # type: ignore[no-untyped-def]
    """`edgectl collect --json` runs until stopped: a few seconds, SIGTERM, its final counts checked."""
    args = ("collect", "--broker", url, "--client-id", "json-collect", "--json")
    proc = subprocess.Popen([str(BIN / "edgectl"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=host.env())  # fmt: skip
    try:
        time.sleep(3.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    validate_output(args, out)


def _wait_pending(host, url: str, device_id: str, timeout_s: float = 20.0) -> list:  # type: ignore[no-untyped-def]
    """`devices` then `devices enroll --json` until ``device_id`` waits for approval (its announcement seen)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert host.run("devices", "--broker", url, "--wait", "0.5").code == 0
        listed = host.run("devices", "enroll", "--json")
        assert listed.code == 0, listed.stderr
        pending = [p for p in json.loads(listed.stdout) if p["device_id"] == device_id]
        if pending:
            return pending
        time.sleep(0.2)
    return []
