"""The device side on a real arm64 Debian userland, under qemu-user (`make test-arm64`).

edge-sdk is installed in a venv inside Debian bookworm arm64 from PyPI's aarch64 wheels
exactly as the README tells a Raspberry Pi owner (``pip install 'edge-sdk[litert]'``); the
real ``edge-agent`` runs there, talking to a Mosquitto on this host, and ``edgectl`` runs
here. Latency measured under emulation is the emulator's (hundreds of times slower than
the board): the reports say ``emulated``, and nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time

import numpy as np
import pytest
from agent_models import int8_qdq_onnx
from harness import BIN, assert_one_version, wait_online
from tflite_models import QuantParams, quantized_add_model
from userland import DEPLOY_ARGS, EMULATED_TIMEOUT, emulated

pytestmark = pytest.mark.integration


def test_the_device_install_is_an_aarch64_venv_with_both_runtimes(bookworm_arm64):
    r = bookworm_arm64.run(
        ["python", "-c", "import platform, onnxruntime, ai_edge_litert; print(platform.machine())"], timeout=300
    )
    assert r.returncode == 0 and r.stdout.split()[-1] == "aarch64", r.stdout[-3000:]
    r = bookworm_arm64.run(["edgectl", "--help"])  # the device install has no host tools
    assert r.returncode == 2 and "edge-sdk[host]" in r.stdout, r.stdout[-2000:]


def test_int8_onnx_and_tflite_bundles_install_and_report_emulated_aarch64(
    bookworm_arm64, host, mosquitto, start_agent, tiny_model, tmp_path
):
    agent = start_agent(mosquitto.url, "pi-arm64", host.root, **emulated(bookworm_arm64))
    status = wait_online(mosquitto.url, agent.device_id)
    assert status.platform["arch"] == "aarch64" and status.platform["emulated"] is True
    assert {"onnxruntime", "litert"} <= set(status.runtimes), status.runtimes

    onnx_int8 = int8_qdq_onnx(tiny_model.path, tiny_model.sample, tmp_path / "tiny.int8.onnx")
    bundle = host.pack(onnx_int8, tiny_model.sample, tmp_path / "onnx.edge", "tiny-onnx")
    m = host.deploy_metrics(bundle, mosquitto.url, agent.device_id, 5, 1, *DEPLOY_ARGS, timeout=EMULATED_TIMEOUT)
    assert (m["runtime"], m["precision"], m["arch"], m["emulated"]) == ("onnxruntime", "int8", "aarch64", True)
    assert m["latency"]["count"] >= 5

    tflite = tmp_path / "qadd.tflite"
    tflite.write_bytes(quantized_add_model((1, 4), QuantParams(0.05, 0), QuantParams(0.05, 0), QuantParams(0.1, 0)))
    np.savez(tmp_path / "qadd.npz", a=np.ones((1, 4), np.int8), b=np.full((1, 4), 3, np.int8))
    bundle = host.pack(tflite, tmp_path / "qadd.npz", tmp_path / "qadd.edge", "tiny-tflite")
    m = host.deploy_metrics(bundle, mosquitto.url, agent.device_id, 5, 1, *DEPLOY_ARGS, timeout=EMULATED_TIMEOUT)
    assert (m["runtime"], m["precision"], m["arch"], m["emulated"]) == ("litert", "int8", "aarch64", True)

    shown = host.run("metrics", "--device", agent.device_id)
    assert shown.code == 0 and shown.stdout.count("aarch64 (emulated)") == 2, shown.stdout + shown.stderr
    assert {n: b["active"]["version"] for n, b in agent.state()["bundles"].items()} == {
        "tiny-onnx": 1,
        "tiny-tflite": 1,
    }
    assert agent.stop() == 0, agent.log()[-3000:]
    assert "Traceback" not in agent.log()


def test_sigkill_of_the_emulated_agent_mid_install_leaves_one_version(
    bookworm_arm64, host, mosquitto, start_agent, tiny_model, tmp_path
):
    device = "pi-arm64-crash"
    v1 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v1.edge", "cs", 1)
    v2 = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "v2.edge", "cs", 2)
    agent = start_agent(mosquitto.url, device, host.root, **emulated(bookworm_arm64))
    host.deploy_metrics(v1, mosquitto.url, device, 3, 1, *DEPLOY_ARGS, timeout=EMULATED_TIMEOUT)

    # v2 is activated and under its health check (pending in state.json) when the agent is killed
    deployer = subprocess.Popen(
        [str(BIN / "edgectl"), "deploy", str(v2), "--device", device, "--broker", mosquitto.url, *DEPLOY_ARGS],
        env=host.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + EMULATED_TIMEOUT
        while "pending" not in agent.state().get("bundles", {}).get("cs", {}):
            assert time.monotonic() < deadline and agent.alive, agent.log()[-3000:]
            time.sleep(0.02)
        agent.proc.send_signal(signal.SIGKILL)
        assert agent.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        deployer.kill()
        deployer.wait()
    killed_at = json.loads((agent.data_dir / "state.json").read_text())["bundles"]["cs"]
    assert killed_at["active"]["version"] == 2 and "pending" in killed_at  # activated, not yet confirmed

    restarted = start_agent(mosquitto.url, device, host.root, enroll_key=False, **emulated(bookworm_arm64))
    assert assert_one_version(restarted.data_dir, "cs") == 1  # activated but not confirmed: rolled back
    assert restarted.stop() == 0
    assert "Traceback" not in restarted.log(), restarted.log()[-3000:]


BOARDS = [
    pytest.param({"/sys/firmware/devicetree/base/model": "Raspberry Pi 4 Model B Rev 1.4\0"}, "raspberry-pi",
                 "Raspberry Pi 4 Model B Rev 1.4", id="pi4"),
    pytest.param({"/sys/firmware/devicetree/base/model": "Raspberry Pi 5 Model B Rev 1.0\0"}, "raspberry-pi",
                 "Raspberry Pi 5 Model B Rev 1.0", id="pi5"),
    pytest.param({"/sys/firmware/devicetree/base/model": "NVIDIA Jetson Orin Nano Developer Kit\0",
                  "/etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic\n"},
                 "jetson", "NVIDIA Jetson Orin Nano Developer Kit", id="jetson-orin-nano"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "kind", "model"), BOARDS)
def test_platform_detection_inside_the_userland_names_the_board(bookworm_arm64, files, kind, model, tmp_path):
    probe = "import json; from device_agent.platform import detect_platform as d; print(json.dumps(d().to_dict()))"
    with contextlib.ExitStack() as mounts:
        for i, (target, text) in enumerate(files.items()):
            mounts.enter_context(bookworm_arm64.bind_file(target, text, tmp_path / f"file-{i}"))
        r = bookworm_arm64.run(["python", "-c", probe])
    assert r.returncode == 0, r.stdout[-3000:]
    found = json.loads(r.stdout.splitlines()[-1])
    assert (found["kind"], found["model"], found["arch"], found["emulated"]) == (kind, model, "aarch64", True)
