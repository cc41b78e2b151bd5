"""`edgectl` commands that need no broker, run as real processes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_keys_init_is_idempotent_and_private_key_is_0600(host):
    again = host.run("keys", "init", "--json")
    assert again.code == 0 and again.json()["created"] is False
    keys = list((host.home / "keys").glob("*.key"))
    assert len(keys) == 3  # root, bundles, commands
    assert all(stat.S_IMODE(os.stat(k).st_mode) == 0o600 for k in keys)
    shown = host.run("keys", "show", "--json")
    assert shown.json()["roles"] == again.json()["roles"] and shown.json()["version"] == 1


def test_passphrase_protected_key(tmp_path, tiny_model):
    from harness import Host

    h = Host(tmp_path / "home")
    os.environ["EDGE_TEST_PASS"] = "correct horse"
    try:
        assert h.run("keys", "init", "--passphrase-env", "EDGE_TEST_PASS").code == 0
        out = tmp_path / "b.edge"
        no_pass = h.run("pack", str(tiny_model.path), "-o", str(out), "--name", "t", "--version", "1")
        assert (
            no_pass.code == 2 and "signing key" in no_pass.stderr and "passphrase" in no_pass.stderr
        )  # usage, as everywhere
        assert not out.exists()
        ok = h.run(
            "pack",
            str(tiny_model.path),
            "-o",
            str(out),
            "--name",
            "t",
            "--version",
            "1",
            "--passphrase-env",
            "EDGE_TEST_PASS",
        )
        assert ok.code == 0, ok.stderr
    finally:
        del os.environ["EDGE_TEST_PASS"]


def test_compress_writes_model_and_report(host, tiny_model, tmp_path):
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.standard_normal((64, 16)).astype(np.float32))
    out = tmp_path / "tiny.int8.onnx"
    r = host.run("compress", str(tiny_model.path), "-o", str(out), "--calib", str(calib), "--json")
    assert r.code == 0, r.stderr
    report = r.json()["report"]
    assert out.exists() and report["steps"][0]["metrics"]["size_bytes"] == out.stat().st_size
    table = host.run("compress", str(tiny_model.path), "-o", str(out), "--calib", str(calib))
    assert "smaller" in table.stdout and "int8" in table.stdout


def test_compress_refuses_bad_input_and_writes_nothing(host, tiny_model, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((8, 5), np.float32))
    out = tmp_path / "never.onnx"
    r = host.run("compress", str(tiny_model.path), "-o", str(out), "--calib", str(wrong))
    assert r.code == 6 and "input" in r.stderr
    assert not out.exists()

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    r = host.run("compress", str(garbage), "-o", str(out), "--quantize", "int8-dynamic")
    assert r.code == 6 and "garbage.onnx" in r.stderr
    assert not out.exists()


def test_pack_refuses_a_model_that_does_not_load(host, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 definitely not protobuf")
    out = tmp_path / "b.edge"
    r = host.run("pack", str(garbage), "-o", str(out), "--name", "g", "--version", "1")
    assert r.code == 6 and "garbage.onnx" in r.stderr
    assert not out.exists()


def test_verify_explains_and_refuses(host, tiny_model, tmp_path):
    out = tmp_path / "b.edge"
    assert host.run("pack", str(tiny_model.path), "-o", str(out), "--name", "t", "--version", "3").code == 0
    ok = host.run("verify", str(out), "--json")
    checks = ok.json()["checks"]
    assert [c.split(":")[0] for c in checks] == [
        "root",
        "archive",
        "signature",
        "manifest",
        "expiry",
        "target",
        "rollback",
        "files",
        "hashes",
    ]

    old = host.run("verify", str(out), "--installed-version", "3")
    assert old.code == 3 and "not newer" in old.stderr

    cut = tmp_path / "cut.edge"
    cut.write_bytes(out.read_bytes()[:-3000])
    r = host.run("verify", str(cut))
    assert r.code == 3 and "truncated" in r.stderr


def test_verify_of_a_bad_bundle_shows_the_whole_checklist_with_the_failing_check_marked(host, tiny_model, tmp_path):
    out = tmp_path / "b.edge"
    assert host.run("pack", str(tiny_model.path), "-o", str(out), "--name", "t", "--version", "3").code == 0
    text = host.run("verify", str(out), "--installed-version", "3")
    assert text.code == 3 and "not newer" in text.stderr
    lines = text.stdout.splitlines()
    assert [line.split()[0] for line in lines[:9]] == ["ok"] * 6 + ["FAIL", "--", "--"]
    assert lines[6].startswith("FAIL rollback: t v3 is not newer") and "signature:" in lines[2]
    assert "failed the rollback check" in lines[-1]

    j = host.run("verify", str(out), "--installed-version", "3", "--json")
    data = j.json()
    assert j.code == 3 and data["ok"] is False and data["error"]["code"] == "rollback"
    assert data["error"]["exit_code"] == 3 and data["error"]["kind"] == "untrusted_input"
    statuses = {c["check"]: c["status"] for c in data["checklist"]}
    assert statuses["rollback"] == "failed" and statuses["hashes"] == "not run" and statuses["root"] == "ok"
    assert len(data["checklist"]) == 9

    cut = tmp_path / "cut.edge"
    cut.write_bytes(out.read_bytes()[:-3000])
    r = host.run("verify", str(cut), "--json")
    failed = [c for c in r.json()["checklist"] if c["status"] == "failed"]
    assert r.code == 3 and len(failed) == 1 and "truncated" in failed[0]["detail"]


def test_remove_of_an_absent_bundle_fails_and_progress_in_a_pipe_is_plain_lines(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    agent = start_agent(mosquitto.url, "cli-remove", host.root)
    bundle = tmp_path / "t.edge"
    r = host.run(
        "pack", str(tiny_model.path), "-o", str(bundle), "--name", "t", "--version", "1",
        "--sample", str(tiny_model.sample),
    )  # fmt: skip
    assert r.code == 0, r.stderr
    dev = ("--device", agent.device_id, "--broker", mosquitto.url)
    # stderr is a pipe here: progress is whole lines, never a bar's carriage returns.
    deployed = host.run("deploy", str(bundle), *dev, "--runs", "5", "--warmup", "1", "--chunk-size", "1024")
    assert deployed.code == 0, deployed.stderr
    assert "\r" not in deployed.stderr and "\x1b" not in deployed.stderr
    progress = [line for line in deployed.stderr.splitlines() if line.startswith("t.edge:")]
    assert progress and "100%" in progress[-1] and len(progress) <= 12

    first = host.run("remove", *dev, "--name", "t")
    assert first.code == 0 and "v1 removed" in first.stdout and "{" not in first.stdout, first.stdout
    again = host.run("remove", *dev, "--name", "t")
    assert again.code == 3 and "does not have t installed" in again.stderr
    j = host.run("remove", *dev, "--name", "t", "--json")
    assert j.code == 3 and j.json()["error"]["code"] == "not_installed" and j.json()["state"] == "done"


def test_a_malformed_config_file_leaves_help_working_and_fails_only_what_needs_it(tmp_path):
    from harness import Host

    h = Host(tmp_path / "home")
    h.home.mkdir()
    config = h.home / "config.toml"
    config.write_text('home = "/h"\n[broker\nurl = "mqtt://127.0.0.1:1"\n')
    helps = (("--help",), ("runs", "--help"), ("rollout", "start", "--help"), ("deploy", "--help"), ("init", "-h"))
    for args in helps:
        shown = h.run(*args)
        assert shown.code == 0 and shown.stdout.startswith("Usage: edgectl"), (args, shown.stderr)
        assert "Traceback" not in shown.stderr
    for args in (("runs",), ("config", "show"), ("devices",)):
        failed = h.run(*args)
        assert failed.code == 2, (args, failed.stdout, failed.stderr)
        assert f"config file {config}, line 2" in failed.stderr and "not valid TOML" in failed.stderr
        assert "Traceback" not in failed.stderr
    as_json = h.run("runs", "--json")
    assert as_json.code == 2 and as_json.json()["error"]["code"] == "config_invalid"
    assert h.run("init", "--force").code == 0  # init replaces it
    assert h.run("runs").code == 0


def test_compress_whose_run_cannot_be_kept_succeeds_with_the_model_whole_and_says_why(host, tiny_model, tmp_path):
    import subprocess
    import sys

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the registry's directory would be")
    out = tmp_path / "a.onnx"
    args = ("compress", str(tiny_model.path), "-o", str(out), "--calib", str(calib), "--json")
    unwritable = host.run("--registry", str(blocker / "registry.db"), *args)
    assert unwritable.code == 0, unwritable.stderr
    assert unwritable.json()["report"]["steps"][0]["metrics"]["size_bytes"] == out.stat().st_size
    assert f"the model {out} is written and whole; the compress run was not kept" in unwritable.stderr
    assert f"registry sqlite://{blocker / 'registry.db'}: cannot create directory" in unwritable.stderr

    # A registry another process holds locked past the registry's timeout.
    locked_db = tmp_path / "locked.db"
    assert host.run("--registry", str(locked_db), "runs").code == 0  # creates it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         f"c = sqlite3.connect({str(locked_db)!r}, isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\n"
         "print('locked', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        out.unlink()
        busy = host.run("--registry", str(locked_db), *args, timeout=180)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert busy.code == 0, busy.stderr
    assert out.stat().st_size == busy.json()["report"]["steps"][0]["metrics"]["size_bytes"]
    assert "the compress run was not kept" in busy.stderr and "locked" in busy.stderr
    assert host.run("--registry", str(locked_db), "runs", "--json").json() == []
