"""32-bit Raspberry Pi OS (armhf) userlands under qemu-user (`make test-armhf`).

PyPI has no armv7 wheels of onnxruntime, numpy, psutil or cryptography. On Debian
bookworm armhf the device install takes Debian's numpy, psutil and cryptography (a venv
with ``--system-site-packages``) and ``pip install 'edge-sdk[litert]'`` adds paho-mqtt
and tflite-runtime 2.14 from PyPI, without onnxruntime: the agent runs .tflite bundles
through tflite-runtime, its birth message lists no onnxruntime, and the host refuses an
ONNX bundle for it before any chunk is sent. On Debian trixie armhf, Debian's own
python3-onnxruntime runs ONNX bundles (``pip install edge-sdk``: tflite-runtime has no
wheel for trixie's Python 3.13).
"""

from __future__ import annotations

import numpy as np
import pytest
from agent_models import int8_qdq_onnx
from harness import wait_online
from tflite_models import QuantParams, quantized_add_model
from userland import DEPLOY_ARGS, EMULATED_TIMEOUT, emulated

pytestmark = pytest.mark.integration

EXIT_UNTRUSTED = 3  # edgectl's code for a bundle the device would refuse (a target mismatch)


def _tflite_bundle(host, tmp_path):
    tflite = tmp_path / "qadd.tflite"
    tflite.write_bytes(quantized_add_model((1, 4), QuantParams(0.05, 0), QuantParams(0.05, 0), QuantParams(0.1, 0)))
    np.savez(tmp_path / "qadd.npz", a=np.ones((1, 4), np.int8), b=np.full((1, 4), 3, np.int8))
    return host.pack(tflite, tmp_path / "qadd.npz", tmp_path / "qadd.edge", "tiny-tflite")


def _onnx_bundle(host, tiny_model, tmp_path):
    onnx_int8 = int8_qdq_onnx(tiny_model.path, tiny_model.sample, tmp_path / "tiny.int8.onnx")
    return host.pack(onnx_int8, tiny_model.sample, tmp_path / "onnx.edge", "tiny-onnx")


def test_bookworm_armhf_runs_tflite_without_onnxruntime_and_the_host_refuses_onnx_before_sending(
    bookworm_armhf, host, mosquitto, start_agent, spy, tiny_model, tmp_path
):
    r = bookworm_armhf.run(["python", "-c", "import numpy, cryptography; print(numpy.__file__, cryptography.__file__)"])
    assert r.returncode == 0 and r.stdout.count("/usr/lib/python3/dist-packages/") == 2, r.stdout  # Debian's
    agent = start_agent(mosquitto.url, "pi-armhf", host.root, **emulated(bookworm_armhf))
    status = wait_online(mosquitto.url, agent.device_id)
    assert status.platform["arch"] == "armv7l" and status.platform["emulated"] is True
    assert set(status.runtimes) == {"tflite-runtime"}, status.runtimes  # no onnxruntime, no ai-edge-litert

    tflite = _tflite_bundle(host, tmp_path)
    m = host.deploy_metrics(tflite, mosquitto.url, agent.device_id, 5, 1, *DEPLOY_ARGS, timeout=EMULATED_TIMEOUT)
    assert (m["runtime"], m["precision"], m["arch"], m["emulated"]) == ("tflite-runtime", "int8", "armv7l", True)

    chunks = spy(agent.device_id)
    onnx_bundle = _onnx_bundle(host, tiny_model, tmp_path)
    r = host.run("deploy", str(onnx_bundle), "--device", agent.device_id, "--broker", mosquitto.url, *DEPLOY_ARGS)
    assert r.code == EXIT_UNTRUSTED, r.stderr
    lacks = f"tiny-onnx v1 needs runtime onnxruntime, which device {agent.device_id} lacks (it has tflite-runtime"
    assert lacks in r.stderr and "nothing was sent" in r.stderr, r.stderr
    assert chunks.count() == 0 and list((agent.data_dir / "staging").glob("*")) == []
    assert set(agent.state()["bundles"]) == {"tiny-tflite"} and agent.alive
    assert agent.stop() == 0 and "Traceback" not in agent.log(), agent.log()[-3000:]


def test_trixie_armhf_runs_onnx_with_debians_onnxruntime(
    trixie_armhf, host, mosquitto, start_agent, tiny_model, tmp_path
):
    r = trixie_armhf.run(["python", "-c", "import onnxruntime; print(onnxruntime.__file__)"])
    assert r.returncode == 0 and "/usr/lib/python3/dist-packages/" in r.stdout, r.stdout  # Debian's package
    agent = start_agent(mosquitto.url, "pi-armhf-trixie", host.root, **emulated(trixie_armhf))
    status = wait_online(mosquitto.url, agent.device_id)
    assert status.platform["arch"] == "armv7l" and "onnxruntime" in status.runtimes, status.runtimes

    bundle = _onnx_bundle(host, tiny_model, tmp_path)
    m = host.deploy_metrics(bundle, mosquitto.url, agent.device_id, 5, 1, *DEPLOY_ARGS, timeout=EMULATED_TIMEOUT)
    assert (m["runtime"], m["precision"], m["arch"], m["emulated"]) == ("onnxruntime", "int8", "armv7l", True)
    assert agent.state()["bundles"]["tiny-onnx"]["active"]["version"] == 1
    assert agent.stop() == 0 and "Traceback" not in agent.log(), agent.log()[-3000:]
