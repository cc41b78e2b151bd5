"""Helpers for tests that drive real `edgectl` and `edge-agent` processes."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from json_schemas import validate_output
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import DeviceStatus, DeviceTopics, Message, SignedReport, decode

BIN = Path(sys.executable).parent


def read_device_message(payload: bytes) -> Message:
    """What a device published, as a test observer reads it: the message inside its signed envelope."""
    msg = decode(payload)
    return decode(msg.message.encode()) if isinstance(msg, SignedReport) else msg


def enroll(home: Path, device_id: str, public_key_pem: bytes) -> None:
    """Enrol a device's key in the registry under ``home``, as `edgectl devices enroll ID --key` does."""
    from edge_sdk.trust import PublicKey
    from host_tools.fleet.registry import open_registry

    with open_registry(home / "registry.db") as reg:
        reg.ensure_schema()
        reg.enroll(device_id, PublicKey.from_pem(public_key_pem).raw.hex(), time.time())


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> object:
        return json.loads(self.stdout)


@dataclass
class Host:
    home: Path

    def env(self, home: Path | None = None) -> dict[str, str]:
        """The environment `edgectl` runs in: this operator's home, no broker from the caller's."""
        env = dict(os.environ, EDGE_SDK_HOME=str(home or self.home))
        env.pop("EDGE_SDK_BROKER", None)
        return env

    def run(self, *args: str, timeout: float = 120.0, home: Path | None = None) -> CliResult:
        started = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "edgectl"), *args], capture_output=True, text=True, timeout=timeout, env=self.env(home)
        )
        if "--json" in args and proc.stdout.strip():
            validate_output(args, proc.stdout)  # every --json output a test sees meets its schema
        return CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)

    def pack(self, model: Path, sample: Path, out: Path, name: str, version: int = 1, *extra: str) -> Path:
        """`edgectl pack` ``model`` (with its ``sample`` input) into ``out``; the pack must succeed."""
        r = self.run(
            "pack",
            str(model),
            "-o",
            str(out),
            "--name",
            name,
            "--version",
            str(version),
            "--sample",
            str(sample),
            *extra,
        )
        assert r.code == 0, r.stderr
        return out

    def deploy_metrics(
        self, bundle: Path, url: str, device: str, runs: int = 30, warmup: int = 3, *extra: str, timeout: float = 120.0
    ) -> dict:
        """`edgectl deploy --json` of ``bundle`` to ``device``; the deploy must succeed. Returns its metrics report.

        ``extra`` goes on the command line (``--timeout``...), ``timeout`` bounds the process.
        """
        r = self.run(
            "deploy",
            str(bundle),
            "--device",
            device,
            "--broker",
            url,
            "--runs",
            str(runs),
            "--warmup",
            str(warmup),
            "--json",
            *extra,
            timeout=timeout,
        )
        assert r.code == 0, r.stderr
        return r.json()["metrics"]  # type: ignore[index]

    @property
    def root(self) -> Path:
        """The signed root of trust devices of this host are provisioned with."""
        return self.home / "keys" / "root.json"

    @property
    def public_key(self) -> Path:
        """Old name of :attr:`root` (what a device needs to trust this host)."""
        return self.root

    def signed(self, command: object) -> bytes:
        """``command`` (deploy, rollback, remove) signed with this host's command keys, encoded."""
        from edge_sdk.protocol import encode, sign_command
        from host_tools.keys import KeyRing

        return encode(sign_command(command, KeyRing(self.home / "keys").role_keys("commands")))  # type: ignore[arg-type]


@dataclass
class TinyModel:
    path: Path
    sample: Path


def build_tiny_model(d: Path) -> TinyModel:
    """Gemm(16->8) + Relu + Gemm(8->4), fp32, dynamic batch, and a sample input, under ``d``."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(8, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(4, np.float32), "b2")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = d / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    sample = d / "sample.npz"
    np.savez(sample, input=rng.standard_normal((2, 16)).astype(np.float32))
    return TinyModel(path, sample)


class AgentProcess:
    def __init__(self, proc: subprocess.Popen[str], device_id: str, data_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.device_id = device_id
        self.data_dir = data_dir
        self.log_path = log_path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def public_key_file(self) -> Path:
        """The public half of the key the agent made at first start (what an operator enrols)."""
        return self.data_dir / "identity" / "device.pub"

    def wait_for_key(self, timeout: float = 20.0) -> bytes:
        """The agent's public key, once it has written it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.public_key_file.exists() and self.public_key_file.stat().st_size:
                return self.public_key_file.read_bytes()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.device_id} wrote no public key within {timeout} s")

    def state(self) -> dict:
        path = self.data_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def assert_one_version(data_dir: Path, name: str) -> int:
    """One whole version of bundle ``name`` is active in an agent's ``data_dir``; returns it.

    state.json names it and no pending mark remains, its slot's files match its
    manifest's hashes, only the active and previous slots exist, staging holds only
    whole kept transfers, and no scratch or temp file is left.
    """
    state = json.loads((data_dir / "state.json").read_text())
    entry = state["bundles"][name]
    assert "pending" not in entry, entry
    active = entry["active"]["version"]
    previous = entry["previous"]["version"] if entry.get("previous") else None
    slot = data_dir / "slots" / name / f"v{active}"
    manifest = json.loads((slot / "manifest.json").read_text())
    assert manifest["version"] == active
    on_disk = sorted(str(p.relative_to(slot / "payload")) for p in (slot / "payload").rglob("*") if p.is_file())
    assert on_disk == sorted(f["path"] for f in manifest["files"])
    for f in manifest["files"]:
        assert hashlib.sha256((slot / "payload" / f["path"]).read_bytes()).hexdigest() == f["sha256"], f["path"]
    expected_slots = {f"v{active}"} | ({f"v{previous}"} if previous else set())
    assert {p.name for p in (data_dir / "slots" / name).iterdir()} == expected_slots
    _assert_staging_whole(data_dir / "staging")
    assert list((data_dir / "tmp").iterdir()) == []
    assert not list(data_dir.glob(".state.json.*"))
    return active


def _assert_staging_whole(staging: Path) -> None:
    """Only whole kept transfers: each a command and its bytes (and maybe its chunk index), nothing else."""
    names = [p.name for p in staging.iterdir()]
    tids = {n.split(".")[0] for n in names}
    for tid in tids:
        assert {f"{tid}.cmd", f"{tid}.part"} <= set(names), names
    assert all(n.split(".", 1)[1] in ("cmd", "part", "index") for n in names), names


class ChunkSpy:
    """Counts the chunk messages published on one device's data topic, as the broker delivers them."""

    def __init__(self, url: str, device_id: str) -> None:
        self.client = MqttClient(url, MqttOptions(client_id=f"spy-{uuid.uuid4().hex[:8]}"))
        self.client.connect()
        self.client.subscribe(DeviceTopics(device_id).data)
        self.seen = 0

    def count(self, settle_s: float = 0.5) -> int:
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            try:
                item = self.client.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Incoming):
                self.seen += 1
        return self.seen

    def close(self) -> None:
        self.client.close()


def wait_online(broker_url: str, device_id: str, timeout: float = 20.0) -> DeviceStatus:
    """Block until the device's retained status says online."""
    client = MqttClient(broker_url, MqttOptions(client_id=f"test-watch-{device_id}-{os.getpid()}"))
    client.connect()
    try:
        client.subscribe(DeviceTopics(device_id).status)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = client.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Incoming):
                msg = read_device_message(item.payload)
                if isinstance(msg, DeviceStatus) and msg.state == "online":
                    return msg
    finally:
        client.close()
    raise AssertionError(f"{device_id} did not come online within {timeout} s")
