"""`edgectl demo`: the whole path on one machine, end to end, with real parts.

train (digits, scikit-learn) -> ONNX -> static int8 (QDQ, per-channel) -> evaluate both
-> keys -> signed bundles -> MQTT broker (embedded amqtt unless one is given) -> a device
agent in its own process with its own data directory -> deploy fp32 (v1) then int8 (v2)
over MQTT in chunks -> the agent verifies, installs, health-checks, benchmarks, reports
-> one table of size, accuracy, on-device latency, memory and power.

Every process and broker it starts is stopped on the way out, including on errors and
Ctrl-C.

Where things go (:func:`run_demo_session`): everything under the work directory, so the
demo never touches the operator's own ``~/.edge-sdk`` unless asked (``home``). Keys and
the registry go to ``WORKDIR/home`` and are reused by the next run in the same work
directory; the demo device is a new device every run (its data directory
``WORKDIR/agent-data`` is recreated), so the run deploys v1 and v2 again and can be
repeated as often as wanted.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import BundleSpec, TensorInfo, pack_bundle
from edge_sdk.errors import DeviceTimeoutError, StorageError
from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import (
    BenchmarkSpec,
    DeviceStatus,
    DeviceTopics,
    MetricsReport,
)
from edge_sdk.trust import PublicKey, SigningKey
from host_tools.fleet.collector import record_message
from host_tools.fleet.deployer import CommandAuthority, DeployOptions, deploy_and_record
from host_tools.fleet.enrolment import ReportGate, Verified
from host_tools.fleet.registry import Registry, open_registry
from host_tools.keys import command_authority, init_keys

__all__ = ["DemoOptions", "DemoResult", "DemoRow", "run_demo", "run_demo_session", "run_demo_with_keys"]

log = logging.getLogger(__name__)
_BUNDLE_NAME = "digits-mlp"


@dataclass(frozen=True)
class DemoOptions:
    """What the demo does.

    Attributes:
        workdir: models, bundles, the agent's data directory and log go here; ``None``:
            a fresh temporary directory, removed afterwards.
        broker_url: use this broker instead of starting an embedded one.
        device_id: the demo agent's id.
        runs, warmup, min_duration_s: the on-device benchmark (at least ``runs`` timed
            inferences and at least ``min_duration_s`` of them, so energy windows are long
            enough to mean something).
        agent_start_timeout_s: how long the agent has to come online.
        home: keep keys and the registry here (the operator's own home, when asked for);
            ``None``: in ``WORKDIR/home``.
        registry_url: the registry to record into; ``None``: ``HOME/registry.db`` of the
            home in use.
    """

    workdir: Path | None = None
    broker_url: str | None = None
    device_id: str = "demo-device"
    runs: int = 300
    warmup: int = 30
    min_duration_s: float = 1.0
    agent_start_timeout_s: float = 30.0
    home: Path | None = None
    registry_url: str | None = None


@dataclass(frozen=True)
class DemoRow:
    """One model's line in the final table."""

    model: str
    precision: str
    size_bytes: int
    accuracy: float
    metrics: MetricsReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "accuracy": self.accuracy,
            "device": self.metrics.to_dict(),
        }


@dataclass(frozen=True)
class DemoResult:
    """What ``edgectl demo`` shows: one row per model, and how long the whole path took."""

    rows: tuple[DemoRow, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "seconds": self.seconds}


@contextlib.contextmanager
def _broker(url: str | None, say: Callable[[str], None]) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from host_tools.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        say(f"embedded MQTT broker (amqtt) listening on {broker.url}")
        yield broker.url


@contextlib.contextmanager
def _agent_process(args: list[str], log_path: Path, say: Callable[[str], None]) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
        say(f"device agent started (pid {proc.pid}), log {log_path}")
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            say(f"device agent stopped (exit {proc.returncode})")


def _wait_online(
    client: MqttClient,
    device_id: str,
    timeout_s: float,
    proc: subprocess.Popen[bytes],
    registry: Registry,
    identity_dir: Path,
) -> DeviceStatus:
    """Wait for the demo agent's online status; it is enrolled first with the key it made (the demo started it)."""
    topic = DeviceTopics(device_id).status
    client.subscribe(topic)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeviceTimeoutError(f"device agent exited with status {proc.returncode} before coming online")
        try:
            item = client.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(item, Incoming) and item.topic == topic:
            key = PublicKey.from_pem((identity_dir / "device.pub").read_bytes())
            registry.enroll(device_id, key.raw.hex(), time.time())
            verified = ReportGate.from_registry(registry).check(item.topic, item.payload, time.time())
            msg = verified.msg if isinstance(verified, Verified) else None
            if isinstance(msg, DeviceStatus) and msg.state == "online":
                return msg
    raise DeviceTimeoutError(f"device agent {device_id} did not come online within {timeout_s:g} s")


def run_demo(
    options: DemoOptions,
    bundle_keys: Sequence[SigningKey],
    authority: CommandAuthority,
    root_path: Path,
    registry: Registry,
    say: Callable[[str], None],
    progress: Callable[[str, int], Callable[[int, int], None]],
    clock: Callable[[], float] = time.time,
) -> list[DemoRow]:
    """Run the whole path and return one row per model.

    Args:
        options: what to do and where.
        bundle_keys: sign the bundles.
        authority: signs the deploy commands.
        root_path: the signed root of trust, given to the agent.
        registry: where device status and metrics are recorded.
        say: prints a progress line.
        progress: makes a byte-progress callback for a named transfer of a given size.
        clock: wall clock.

    Raises:
        EdgeError: any step failed; the message names it.
    """
    if options.workdir is None:
        with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
            return run_demo(
                replace(options, workdir=Path(tmp)), bundle_keys, authority, root_path, registry, say, progress, clock
            )
    # Compression lives in the host extra; import it only when the demo runs.
    from host_tools import compress as hc

    work = Path(options.workdir)
    work.mkdir(parents=True, exist_ok=True)

    say("1/7 training a small MLP on scikit-learn's bundled digits")
    split = hc.load_digits_split()
    fp32_bytes = hc.train_digits_mlp(split)
    fp32_path = hc.save_model_atomic(fp32_bytes, work / "digits-fp32.onnx")

    say("2/7 static int8 quantization (QDQ, per-channel, calibrated on training digits)")
    result = hc.compress(
        fp32_bytes,
        [hc.parse_quantize_option("int8-static")],
        calibration=hc.Dataset(split.x_train[:512]),
        evaluation=split.test,
    )
    int8_path = hc.save_model_atomic(result.model_bytes, work / "digits-int8.onnx")
    report = result.report
    acc_fp32 = float(report.original.quality or 0.0)
    acc_int8 = float(report.final.quality or 0.0)
    say(f"    accuracy on {len(split.y_test)} held-out digits: fp32 {acc_fp32:.2%}, int8 {acc_int8:.2%}")

    say("3/7 packing signed bundles")
    sample = work / "sample_input.npz"
    np.savez(sample, input=split.x_test[:8].astype(np.float32))
    inputs = (TensorInfo("input", (None, 64), "float32"),)
    now = clock()
    bundles = []
    for version, (path, precision) in enumerate(((fp32_path, "fp32"), (int8_path, "int8")), start=1):
        out = work / f"{_BUNDLE_NAME}-v{version}-{precision}.edge"
        pack_bundle(
            BundleSpec(_BUNDLE_NAME, version, "onnxruntime", path, precision, inputs, sample),
            list(bundle_keys),
            out,
            now,
        )
        bundles.append((out, precision, path.stat().st_size, acc_fp32 if precision == "fp32" else acc_int8))

    rows: list[DemoRow] = []
    with _broker(options.broker_url, lambda m: say(f"4/7 {m}")) as url:
        # The embedded broker (amqtt) speaks only MQTT 3.1.1: say so rather than try 5 first.
        protocol = "auto" if options.broker_url else "3.1.1"
        client = MqttClient(url, MqttOptions(client_id=f"edgectl-demo-{int(now)}", protocol=protocol))
        client.connect()
        try:
            agent_args = [
                sys.executable,
                "-m",
                "device_agent.cli",
                "run",
                "--broker",
                url,
                "--device-id",
                options.device_id,
                "--data-dir",
                str(work / "agent-data"),
                "--root",
                str(root_path),
                "--mqtt-protocol",
                protocol,
            ]
            with _agent_process(agent_args, work / "agent.log", lambda m: say(f"5/7 {m}")) as proc:
                status = _wait_online(
                    client,
                    options.device_id,
                    options.agent_start_timeout_s,
                    proc,
                    registry,
                    work / "agent-data" / "identity",
                )
                record_message(registry, status, clock())
                say(
                    f"    {options.device_id} online: {status.platform.get('kind')} {status.platform.get('arch')}, "
                    f"runtimes {', '.join(status.runtimes)}"
                )
                deploy_options = DeployOptions(
                    chunk_size=16 * 1024,
                    benchmark=BenchmarkSpec(
                        runs=options.runs, warmup=options.warmup, threads=1, min_duration_s=options.min_duration_s
                    ),
                    authority=authority,
                )
                for bundle_path, precision, size, accuracy in bundles:
                    say(f"6/7 deploying {bundle_path.name} over MQTT")
                    outcome = deploy_and_record(
                        client,
                        registry,
                        options.device_id,
                        bundle_path,
                        deploy_options,
                        progress(bundle_path.name, bundle_path.stat().st_size),
                        clock,
                    )
                    if outcome.state != "installed":
                        assert outcome.error is not None
                        raise outcome.error
                    assert outcome.metrics is not None
                    rows.append(DemoRow(bundle_path.stem, precision, size, accuracy, outcome.metrics))
        finally:
            client.close()
    say("7/7 done; every process the demo started has stopped")
    return rows


def run_demo_with_keys(
    keys_dir: Path,
    registry: Registry,
    options: DemoOptions,
    say: Callable[[str], None],
    progress: Callable[[str, int], Callable[[int, int], None]],
    clock: Callable[[], float] = time.time,
    timer: Callable[[], float] = time.monotonic,
) -> DemoResult:
    """``edgectl demo``: make the keys if there are none, then :func:`run_demo` with them.

    Args:
        keys_dir: the host's key directory; created with unencrypted keys if it has no root.
        registry: where device status and metrics are recorded.
        options: what to do and where.
        say: prints a progress line.
        progress: makes a byte-progress callback for a named transfer of a given size.
        clock: wall clock.
        timer: monotonic clock for the duration of the whole path.

    Returns:
        One row per model, and the seconds the whole path took.

    Raises:
        EdgeError: any step failed; the message names it.
    """
    started = timer()
    ring, created = init_keys(keys_dir, clock())
    say(f"root of trust v{ring.root.version} ({'created' if created else 'existing'}, {ring.root_path})")
    rows = run_demo(
        options, ring.role_keys("bundles"), command_authority(ring), ring.root_path, registry, say, progress, clock
    )
    return DemoResult(tuple(rows), timer() - started)


def run_demo_session(
    options: DemoOptions,
    say: Callable[[str], None],
    progress: Callable[[str, int], Callable[[int, int], None]],
    clock: Callable[[], float] = time.time,
    timer: Callable[[], float] = time.monotonic,
) -> DemoResult:
    """``edgectl demo``: decide where everything goes, say so, and run the whole path.

    Keys and the registry go to ``options.home``, or to ``WORKDIR/home`` when it is
    ``None`` (the operator's own home is used only when asked for). The demo device's
    data directory ``WORKDIR/agent-data`` is recreated first: every run is a new device,
    so a second run in the same work directory deploys v1 and v2 again instead of being
    refused as not newer than what the previous run installed.

    Args:
        options: what to do and where; ``workdir`` ``None`` is a temporary directory,
            removed afterwards (with the keys and registry in it unless ``home`` is set).
        say: prints a progress line.
        progress: makes a byte-progress callback for a named transfer of a given size.
        clock: wall clock.
        timer: monotonic clock for the duration of the whole path.

    Returns:
        One row per model, and the seconds the whole path took.

    Raises:
        EdgeError: any step failed; the message names it.
        StorageError: the work directory cannot be prepared.
    """
    if options.workdir is None:
        with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
            return run_demo_session(replace(options, workdir=Path(tmp)), say, progress, clock, timer)
    work = Path(options.workdir)
    agent_data = work / "agent-data"
    home = options.home if options.home is not None else work / "home"
    try:
        work.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        if agent_data.exists():
            shutil.rmtree(agent_data)
    except OSError as exc:
        raise StorageError(f"cannot prepare the demo work directory {work}: {exc.strerror or exc}") from exc
    registry_url = options.registry_url or str(home / "registry.db")
    where = "your edge-sdk home, as asked" if options.home is not None else "inside the work directory"
    say(f"work directory {work}; keys and registry in {home} ({where}); registry {registry_url}")
    say(f"demo device {options.device_id}: a new device every run, data in {agent_data}")
    with open_registry(registry_url) as registry:
        return run_demo_with_keys(home / "keys", registry, options, say, progress, clock, timer)
