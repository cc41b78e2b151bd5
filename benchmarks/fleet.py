"""Delivery to a fleet of real agents: bytes, time and host CPU, each case beside its baseline in the same run.

Real `edge-agent` processes, a real Mosquitto (its default limits, the test helper's
generated config), real `edgectl deploy`. A tap client subscribed to everything the host
publishes (transfer topics, devices' data and command topics) counts the bytes that went
from the host to the broker, and the devices' signed events say when each had the bundle.

Cases (issue 14's table):

- ``fan-out``: one bundle to N agents, against a raw paho QoS 1 publish of the same chunk
  frames fanned out by the broker to N subscriber processes. The agents' update gate is
  closed, so each defers the install once it has the bundle and delivery is timed alone;
  a second deploy (v2, gate open) gives delivery with installs overlapping it, for context. Goals: host->broker bytes
  <= 1.1x the bundle; delivery (first chunk to the last device's ``received``) within 1.5x
  of the raw time; host CPU (the whole `edgectl deploy` process, start-up included) <= 20 ms
  per device. The deploy starts as an installed package does, from this checkout's byte
  code, compiled beforehand (untimed).
- ``agent-kill``, ``broker-kill``, ``edgectl-kill``: SIGKILL at half the chunks, restart,
  finish. Baseline: the bundle's chunk bytes. Goal: bytes sent again <= one window of chunks
  (64), and the deploy ends installed.
- ``forged``: another client publishes forged chunks on the transfer topic (about one for
  every ten real ones, until two windows before the end, so that each lands while the device
  still receives; the bundle is three times ``--mib``). Goal: installed, every forged chunk
  refused at the chunk (the device's count, in its signed ``received`` event).
- ``delta``: an MLP (256-2048-2048-1000) installed at v1; v2 fine-tunes its last layer
  only. Baseline: the bytes of the changed tensors, and the full bundle. Goal: bytes sent
  <= 1.2x the changed tensors.
- ``slow-link``: the device's connection to Mosquitto (default limits) passes a proxy that
  delivers 256 KB/s to the device. Baseline: the bundle's size. Goal: extra bytes <= 5%.
- ``rollout``, ``rollout-abort``, ``rollout-health`` (issue 15): rollouts in waves to
  ``--rollout-devices`` simulated devices, run by ``benchmarks/rollouts.py`` (its docstring
  says what each case checks), beside a ``deploy_many`` fan-out and the clean rollout.

Usage::

    .venv/bin/python benchmarks/fleet.py [--devices 100] [--mib 10] [--cases fan-out,agent-kill,...]
    .venv/bin/python benchmarks/fleet.py --quick     # 10 devices, 4 MiB
    .venv/bin/python benchmarks/fleet.py --cases rollout,rollout-abort,rollout-health --rollout-devices 1000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # real broker, agents and models

from _report import REPO_ROOT, add_common_args, checkout_env, print_table, write_results
from agent_models import big_model
from harness import BIN, AgentProcess, Host, enroll, read_device_message, wait_online
from mosquitto import MosquittoProcess, find_mosquitto
from taps import BrokerTap

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import (
    Event,
    EventKind,
    content_transfer_id,
    decode_chunk,
    encode_chunk,
    transfer_topic,
)

CHUNK = 64 * 1024
WINDOW = 64
CASES = ("fan-out", "agent-kill", "broker-kill", "edgectl-kill", "forged", "delta", "slow-link")
DELTA_DIMS = [256, 2048, 2048, 1000]
SLOW_LINK_BYTES_PER_S = 256_000


# --- what the host sends, seen from the broker ---------------------------------------------------


class Tap:
    """Counts what the host publishes (chunk frames by index, command bytes) and when devices had the bundle."""

    def __init__(self, url: str) -> None:
        self.frames: Counter[int] = Counter()
        self.chunk_bytes = 0
        self.chunk_payload = 0  # bytes of bundle carried (chunk frames without headers, index frames not counted)
        self.cmd_bytes = 0
        self.first_chunk_at: float | None = None
        self.received_at: dict[str, float] = {}
        self.discarded: dict[str, int] = {}
        topics = ("edge/v1/transfers/#", "edge/v1/devices/+/data", "edge/v1/devices/+/cmd", "edge/v1/devices/+/events")
        self._tap = BrokerTap(url, topics, self._count)

    def _count(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if topic.endswith("/cmd"):
            self.cmd_bytes += len(payload)
        elif topic.endswith("/events"):
            msg = read_device_message(payload)
            if isinstance(msg, Event) and msg.kind == EventKind.RECEIVED:
                self.received_at.setdefault(msg.device_id, now)
                discarded = msg.detail.get("discarded")
                self.discarded[msg.device_id] = discarded if isinstance(discarded, int) else -1
        else:
            chunk = decode_chunk(payload)
            if self.first_chunk_at is None and chunk.index >= 0:
                self.first_chunk_at = now
            self.frames[chunk.index] += 1
            self.chunk_bytes += len(payload)
            if chunk.index >= 0:
                self.chunk_payload += len(chunk.data)

    def close(self) -> None:
        self._tap.close()


# --- a fleet ---------------------------------------------------------------------------------------


class Fleet:
    """Real agents on one broker, enrolled in the host's registry."""

    def __init__(self, host: Host, url: str, root: Path, work: Path) -> None:
        self.host, self.url, self.root, self.work = host, url, root, work
        self.agents: dict[str, AgentProcess] = {}

    def start(self, device_ids: Sequence[str], *extra: str) -> None:
        started = []
        for d in device_ids:
            data_dir = self.work / f"agent-{d}"
            log_path = self.work / f"agent-{d}.log"
            with open(log_path, "a") as log:
                proc = subprocess.Popen(
                    [str(BIN / "edge-agent"), "run", "--broker", self.url, "--device-id", d, "--data-dir",
                     str(data_dir), "--root", str(self.root), "--log-level", "INFO", *extra],
                    stdout=log, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
            self.agents[d] = AgentProcess(proc, d, data_dir, log_path)
            started.append(d)
        for d in started:
            enroll(self.host.home, d, self.agents[d].wait_for_key(timeout=120))
        for d in started:
            wait_online(self.url, d, timeout=120)

    def kill(self, device_id: str) -> None:
        agent = self.agents[device_id]
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(timeout=10)

    def stop(self) -> None:
        for agent in self.agents.values():
            if agent.alive:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            try:
                agent.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.proc.kill()


def _deploy_args(bundle: Path, url: str, devices: Sequence[str]) -> list[str]:
    args = [str(BIN / "edgectl"), "-v", "deploy", str(bundle), "--broker", url, "--chunk-size", str(CHUNK)]
    args += ["--window", str(WINDOW)]
    args += ["--runs", "5", "--warmup", "1", "--min-duration", "0", "--json", "--timeout", "600"]
    for d in devices:
        args += ["--device", d]
    return args


def _env(host: Host) -> dict[str, str]:
    """`edgectl deploy`'s environment: this checkout's code, read from its byte code (see :func:`_compile`)."""
    env = checkout_env(dict(os.environ, EDGE_SDK_HOME=str(host.home)))
    env.pop("EDGE_SDK_BROKER", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _compile() -> None:
    """Compile this checkout's modules once, untimed, beside their sources (``__pycache__``, which git ignores).

    So `edgectl deploy` starts as an installed package does: with ``PYTHONDONTWRITEBYTECODE``
    set (as on this project's machines) each start would compile every module again. (A
    cache elsewhere, ``PYTHONPYCACHEPREFIX``, would leave out the byte code that the
    standard library and the installed packages have beside their own sources.)
    """
    packages = [str(REPO_ROOT / p) for p in ("edge_sdk", "host_tools")]
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], env=env, check=True)


def _timed_deploy(
    host: Host, bundle: Path, url: str, devices: Sequence[str]
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `edgectl deploy` to completion; its CPU seconds (user + system, the whole process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        _deploy_args(bundle, url, devices), capture_output=True, text=True, env=_env(host), timeout=1800
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _host_sent(stderr: str) -> tuple[int, int] | None:
    """(frames, chunk bytes) the host itself says it published (its ``-v`` log line), if it said so."""
    for line in reversed(stderr.splitlines()):
        if " frames, " in line and " bytes (bundle " in line:
            words = line.replace(",", "").split()
            at = words.index("frames")
            return int(words[at - 1]), int(words[at + 1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds a live process has used, all its threads (Linux ``schedstat``, ns resolution); None if unknown."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _cpu_used(pids: Sequence[int], before: Sequence[float | None]) -> float | None:
    """Mean CPU seconds per process since ``before`` (None where any is unknown)."""
    used = [cpu_seconds(p) for p in pids]
    if not pids or any(u is None or b is None for u, b in zip(used, before, strict=True)):
        return None
    return sum(u - b for u, b in zip(used, before, strict=True) if u is not None and b is not None) / len(pids)


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


# --- the raw baseline ------------------------------------------------------------------------------

_SUBSCRIBER = r"""
import sys, time, paho.mqtt.client as mqtt
host, port, topic, want, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
got = 0
def on_message(c, u, m):
    global got
    got += 1
    if got == want:
        open(out, "w").write(repr(time.monotonic()))
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
c.on_message = on_message
c.connect(host, port)
open(out + ".ready", "w").close()
c.loop_forever()
"""


def raw_fan_out(url: str, frames: list[bytes], subscribers: int, work: Path) -> tuple[float, float | None]:
    """Paho QoS 1 publishes, the broker fans out to ``subscribers`` processes.

    Returns:
        Seconds from the first publish to the last subscriber holding every frame, and the
        subscribers' mean CPU seconds over the same span (None where it cannot be read).
    """
    host, port = url.split("//")[1].split(":")
    topic = f"bench/raw/{time.monotonic_ns()}"
    outs = [work / f"raw-{i}.done" for i in range(subscribers)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _SUBSCRIBER, host, port, topic, str(len(frames)), str(o)]) for o in outs
    ]
    try:
        if not _wait(lambda: all(Path(f"{o}.ready").exists() for o in outs), 120):
            raise RuntimeError("raw subscribers did not start")
        time.sleep(1.0)  # let every subscription reach the broker
        client = MqttClient(url, MqttOptions(client_id=f"bench-raw-{os.getpid()}"))
        client.connect()
        cpu_before = [cpu_seconds(p.pid) for p in procs]
        started = time.monotonic()
        handles = [client.publish(topic, f) for f in frames]
        for h in handles:
            h.wait()
        if not _wait(lambda: all(o.exists() for o in outs), 600):
            raise RuntimeError("raw subscribers did not get every frame")
        cpu = _cpu_used([p.pid for p in procs], cpu_before)
        client.close()
        return max(float(o.read_text()) for o in outs) - started, cpu
    finally:
        for p in procs:
            p.kill()
            p.wait()


# --- a slow link ---------------------------------------------------------------------------------


class SlowLink:
    """A TCP proxy on loopback that delivers the broker's bytes to the client at ``rate`` bytes/s.

    The client's bytes to the broker pass at full speed (a device's uplink carries only small
    events here). Runs its own event loop in a thread; :attr:`url` is what the device connects to.
    """

    def __init__(self, broker_url: str, rate: float) -> None:
        self._target = broker_url.split("//")[1].split(":")
        self._rate = rate
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("slow link proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self._target
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rate: float | None) -> None:
            try:
                while data := await src.read(16384):
                    dst.write(data)
                    await dst.drain()
                    if rate is not None:
                        await asyncio.sleep(len(data) / rate)
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, None), pipe(up_r, writer, self._rate))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def case_delta(host: Host, work: Path) -> dict:
    """v1 installed, then v2 with only its last layer fine-tuned: what the host sends for v2."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from sparse_models import mlp

    case_dir = work / "delta"
    case_dir.mkdir(parents=True, exist_ok=True)
    base = mlp(DELTA_DIMS, 0.0, seed=1)
    tuned = onnx.ModelProto()
    tuned.CopyFrom(base)
    rng = np.random.default_rng(2)
    last = len(DELTA_DIMS) - 2
    changed = 0
    for init in tuned.graph.initializer:
        if init.name in (f"W{last}", f"B{last}"):
            values = numpy_helper.to_array(init)
            values = (values + rng.standard_normal(values.shape) * 0.01).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
            changed += values.nbytes
    sample = case_dir / "sample.npz"
    np.savez(sample, x=np.ones((1, DELTA_DIMS[0]), np.float32))
    bundles = []
    for version, model in ((1, base), (2, tuned)):
        path = case_dir / f"mlp-v{version}.onnx"
        onnx.save(model, path)
        bundles.append(host.pack(path, sample, case_dir / f"mlp-v{version}.edge", "tuned", version))
    with _broker(case_dir) as broker:
        fleet = Fleet(host, broker.url, host.root, case_dir)
        device = "bench-delta"
        try:
            fleet.start([device])
            first, _cpu = _timed_deploy(host, bundles[0], broker.url, [device])
            if first.returncode:
                raise RuntimeError(first.stderr[-2000:])
            tap = Tap(broker.url)
            second, _cpu = _timed_deploy(host, bundles[1], broker.url, [device])
            time.sleep(0.5)
            tap.close()
            full = bundles[1].stat().st_size
            sent = tap.chunk_payload
            return {
                "changed_tensor_bytes": changed,
                "full_bundle_bytes": full,
                "bytes_sent": sent,
                "ratio_to_changed": sent / changed,
                "ratio_to_full": sent / full,
                "exit_code": second.returncode,
                "installed": '"state": "installed"' in second.stdout,
                "goals_met": second.returncode == 0 and sent <= 1.2 * changed,
            }
        finally:
            fleet.stop()


def case_slow_link(host: Host, work: Path, mib: int) -> dict:
    case_dir = work / "slow-link"
    with _broker(case_dir) as broker:
        link = SlowLink(broker.url, SLOW_LINK_BYTES_PER_S)
        fleet = Fleet(host, link.url, host.root, case_dir)
        device = "bench-slow"
        try:
            fleet.start([device])
            bundle = _pack(host, work, mib, 1, "slow")
            size = bundle.stat().st_size
            tap = Tap(broker.url)
            started = time.monotonic()
            proc, _cpu = _timed_deploy(host, bundle, broker.url, [device])
            seconds = time.monotonic() - started
            time.sleep(0.5)
            tap.close()
            extra = max(0, tap.chunk_payload - size) / size
            return {
                "bundle_bytes": size,
                "rate_bytes_per_s": SLOW_LINK_BYTES_PER_S,
                "chunk_frames": sum(n for i, n in tap.frames.items() if i >= 0),
                "extra_share": extra,
                "seconds": seconds,
                "exit_code": proc.returncode,
                "installed": '"state": "installed"' in proc.stdout,
                "goals_met": proc.returncode == 0 and extra <= 0.05,
                "bundle_bytes_sent": tap.chunk_payload,
            }
        finally:
            fleet.stop()
            link.close()


# --- cases -----------------------------------------------------------------------------------------


@contextmanager
def _broker(work: Path) -> Iterator[MosquittoProcess]:
    binary = find_mosquitto()  # raises, naming `make test-deps`, when Mosquitto is missing
    broker = MosquittoProcess(work / "mosquitto", binary=binary).start()
    try:
        yield broker
    finally:
        broker.stop()


def _pack(host: Host, work: Path, mib: int, version: int, name: str) -> Path:
    model_dir = work / f"model-{name}-{version}"
    model_dir.mkdir(parents=True, exist_ok=True)
    model, sample = big_model(model_dir, mib=mib)
    out = work / f"{name}-v{version}.edge"
    r = host.run("pack", str(model), "-o", str(out), "--name", name, "--version", str(version), "--sample", str(sample))
    if r.code:
        raise RuntimeError(r.stderr)
    return out


def case_fan_out(host: Host, work: Path, devices: int, mib: int) -> dict:
    with _broker(work / "fan-out") as broker:
        fleet = Fleet(host, broker.url, host.root, work / "fan-out")
        ids = [f"bench-{i:03d}" for i in range(devices)]
        try:
            # The devices' update gate is closed for the first deploy: each defers the install
            # once it has the bundle, so what is timed is delivery alone, as for the raw fan-out.
            # The second deploy (v2) opens it: installs then overlap the delivery to the others.
            gate = work / "fan-out" / "gate-closed"
            gate.parent.mkdir(parents=True, exist_ok=True)
            gate.write_text("benchmark: delivery alone\n")
            t0 = time.monotonic()
            fleet.start(ids, "--update-gate-file", str(gate))
            print(f"  {devices} agents online in {time.monotonic() - t0:.0f} s", flush=True)
            bundle = _pack(host, work, mib, 1, "fanout")
            data = bundle.read_bytes()
            tid = content_transfer_id(hashlib.sha256(data).hexdigest(), CHUNK)
            frames = [encode_chunk(tid, i // CHUNK, data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
            raw_s, raw_cpu_s = raw_fan_out(broker.url, frames, devices, work)
            pids = [fleet.agents[d].proc.pid for d in ids]
            agents_before = [cpu_seconds(p) for p in pids]
            tap = Tap(broker.url)
            proc, cpu_s = _timed_deploy(host, bundle, broker.url, ids)
            _wait(lambda: len(tap.received_at) == devices, 10)
            agent_cpu_s = _cpu_used(pids, agents_before)  # to every `received` and the deferral after it
            tap.close()
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            deliver_s = max(tap.received_at.values()) - (tap.first_chunk_at or 0.0)
            sent = tap.chunk_bytes + tap.cmd_bytes
            gate.unlink()
            v2 = _pack(host, work, mib, 2, "fanout")
            tap2 = Tap(broker.url)
            proc2, _cpu2 = _timed_deploy(host, v2, broker.url, ids)
            _wait(lambda: len(tap2.received_at) == devices, 10)
            tap2.close()
            with_installs_s = (
                max(tap2.received_at.values()) - (tap2.first_chunk_at or 0.0)
                if proc2.returncode == 0 and len(tap2.received_at) == devices
                else None
            )
            return {
                "delivery_with_installs_s": with_installs_s,
                "devices": devices,
                "bundle_bytes": len(data),
                "host_to_broker_bytes": sent,
                "chunk_frame_bytes": tap.chunk_bytes,
                "command_bytes": tap.cmd_bytes,
                "bytes_ratio": sent / len(data),
                "raw_fan_out_s": raw_s,
                "delivery_s": deliver_s,
                "delivery_ratio": deliver_s / raw_s,
                "host_cpu_s": cpu_s,
                "host_cpu_ms_per_device": 1000 * cpu_s / devices,
                "agent_cpu_ms_per_device": None if agent_cpu_s is None else 1000 * agent_cpu_s,
                "raw_subscriber_cpu_ms": None if raw_cpu_s is None else 1000 * raw_cpu_s,
                "goals_met": sent <= 1.1 * len(data) and deliver_s <= 1.5 * raw_s and 1000 * cpu_s / devices <= 20,
            }
        finally:
            fleet.stop()


def _resume_case(host: Host, work: Path, mib: int, what: str) -> dict:
    """SIGKILL the agent, the broker or `edgectl` at half the chunks; restart it; finish."""
    case_dir = work / what
    with _broker(case_dir) as broker:
        fleet = Fleet(host, broker.url, host.root, case_dir)
        device = f"bench-{what}"
        try:
            fleet.start([device])
            bundle = _pack(host, work, mib, 1, what.replace("-", ""))
            chunks = -(-bundle.stat().st_size // CHUNK)
            tap = Tap(broker.url)
            deployer = subprocess.Popen(
                _deploy_args(bundle, broker.url, [device]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=_env(host),
            )  # fmt: skip
            if not _wait(lambda: len([i for i in tap.frames if i >= 0]) >= chunks // 2, 300):
                raise RuntimeError(f"{what}: the transfer did not reach half")
            if what == "agent-kill":
                fleet.kill(device)
                time.sleep(0.5)
                fleet.start([device])
            elif what == "broker-kill":
                broker.kill()
                time.sleep(1.0)
                broker.restart()
            else:
                deployer.send_signal(signal.SIGKILL)
                deployer.wait()
                deployer = subprocess.Popen(
                    _deploy_args(bundle, broker.url, [device]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, env=_env(host),
                )  # fmt: skip
            out, err = deployer.communicate(timeout=1200)
            time.sleep(0.5)
            tap.close()
            chunk_frames = sum(n for i, n in tap.frames.items() if i >= 0)
            host_sent = _host_sent(err)
            return {
                "host_frames_sent_last_run": None if host_sent is None else host_sent[0],
                "host_bytes_sent_last_run": None if host_sent is None else host_sent[1],
                "chunks": chunks,
                "chunk_frames_sent": chunk_frames,
                # Sent again: by the host's own count where one run did it all (agent, broker killed),
                # else (edgectl killed: two runs) by the tap's count of frames the broker delivered.
                "resent_chunks": (host_sent[0] - 1 - chunks)
                if host_sent is not None and what != "edgectl-kill"
                else chunk_frames - chunks,
                "window": WINDOW,
                "exit_code": deployer.returncode,
                "installed": '"state": "installed"' in out,
                "goals_met": deployer.returncode == 0
                and (host_sent[0] - 1 - chunks if host_sent and what != "edgectl-kill" else chunk_frames - chunks)
                <= WINDOW,
                "note": "host_* are the last edgectl run's own counts (index frame included); chunk_frames_sent is "
                "what the tap saw delivered (frames lost with a killed broker are not seen)",
                "stderr_tail": err[-500:] if deployer.returncode else "",
            }
        finally:
            fleet.stop()


def case_forged(host: Host, work: Path, mib: int) -> dict:
    case_dir = work / "forged"
    with _broker(case_dir) as broker:
        fleet = Fleet(host, broker.url, host.root, case_dir)
        device = "bench-forged"
        try:
            fleet.start([device])
            bundle = _pack(host, work, 3 * mib, 1, "forged")  # larger: forgeries stop a window before the end
            data = bundle.read_bytes()
            tid = content_transfer_id(hashlib.sha256(data).hexdigest(), CHUNK)
            chunks = -(-len(data) // CHUNK)
            tap = Tap(broker.url)
            forger = MqttClient(broker.url, MqttOptions(client_id="bench-forger"))
            forger.connect()
            stop = threading.Event()
            forged = Counter[str]()
            rng = random.Random(14)

            def forge() -> None:
                real_seen = 0
                # Forged only while the device surely still receives: it is at most a window and
                # a progress report behind what the tap sees, so no forgery lands after it finished.
                while not stop.is_set() and sum(n for i, n in tap.frames.items() if i >= 0) < chunks - 2 * WINDOW:
                    real = sum(n for i, n in tap.frames.items() if i >= 0)
                    if real - real_seen >= 10:  # one forged for every ten real chunks
                        real_seen = real
                        forger.publish(
                            transfer_topic(tid), encode_chunk(tid, rng.randrange(chunks), rng.randbytes(CHUNK))
                        )
                        forged["sent"] += 1
                    time.sleep(0.001)

            thread = threading.Thread(target=forge, daemon=True)
            thread.start()
            proc, _cpu = _timed_deploy(host, bundle, broker.url, [device])
            stop.set()
            thread.join(timeout=5)
            forger.close()
            tap.close()
            refused = tap.discarded.get(device, -1)  # the device's own count, in its signed `received` event
            return {
                "chunks": chunks,
                "forged_sent": forged["sent"],
                "exit_code": proc.returncode,
                "installed": '"state": "installed"' in proc.stdout,
                "discarded_by_device": refused,
                "goals_met": proc.returncode == 0
                and '"state": "installed"' in proc.stdout
                and refused >= forged["sent"],
            }
        finally:
            fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    global WINDOW
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100, help="agents in the fan-out case")
    parser.add_argument("--mib", type=int, default=10, help="MiB of weights in the bundle")
    parser.add_argument("--slow-mib", type=int, default=50, help="MiB of weights for the slow-link case")
    import rollouts  # here: it imports sim_fleet, which imports this module

    every = (*CASES, *rollouts.CASES)
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, of {', '.join(every)} (default: every delivery case; the rollout cases when named)",
    )
    parser.add_argument("--window", type=int, default=64, help="deploy --window (chunks in flight)")
    parser.add_argument("--rollout-devices", type=int, default=1000, help="simulated devices in the rollout cases")
    add_common_args(parser)
    args = parser.parse_args(argv)
    WINDOW = args.window
    if args.quick:
        args.devices, args.mib, args.slow_mib, args.rollout_devices = 10, 4, 4, 200
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(every)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edge-fleet-bench-") as tmp:
        work = Path(tmp)
        host = Host(work / "home")
        r = host.run("keys", "init")
        if r.code:
            raise SystemExit(r.stderr)
        _compile()
        for case in [c for c in cases if c not in rollouts.CASES]:
            print(f"case {case}...", flush=True)
            started = time.monotonic()
            if case == "fan-out":
                results[case] = case_fan_out(host, work, args.devices, args.mib)
            elif case == "forged":
                results[case] = case_forged(host, work, args.mib)
            elif case == "delta":
                results[case] = case_delta(host, work)
            elif case == "slow-link":
                results[case] = case_slow_link(host, work, args.slow_mib)
            else:
                results[case] = _resume_case(host, work, args.mib, case)
            results[case]["seconds"] = time.monotonic() - started
        rollout_cases = [c for c in cases if c in rollouts.CASES]
        rollout_rows: list[list[object]] = []
        if rollout_cases:
            print(f"cases {', '.join(rollout_cases)} ({args.rollout_devices} simulated devices)...", flush=True)
            (work / "rollouts").mkdir()
            got, rollout_rows = rollouts.run(rollout_cases, args.rollout_devices, 100, work / "rollouts")
            results.update({c: got[c] for c in rollouts.CASES if c in got})
            results["rollout-baseline"] = {k: v for k, v in got.items() if k not in rollouts.CASES}
    rows: list[list[object]] = []
    if "fan-out" in results:
        f = results["fan-out"]
        rows.append(
            [
                "fan-out: host->broker bytes",
                f"{f['host_to_broker_bytes']:,}",
                f"bundle {f['bundle_bytes']:,}",
                f"{f['bytes_ratio']:.3f}",
                "<= 1.1",
            ]
        )
        rows.append(
            [
                "fan-out: delivery s",
                f"{f['delivery_s']:.2f}",
                f"raw paho fan-out {f['raw_fan_out_s']:.2f}",
                f"{f['delivery_ratio']:.2f}",
                "<= 1.5",
            ]
        )
        rows.append(["fan-out: host CPU ms/device", f"{f['host_cpu_ms_per_device']:.1f}", "-", "-", "<= 20"])
        if f["agent_cpu_ms_per_device"] is not None and f["raw_subscriber_cpu_ms"] is not None:
            rows.append(
                [
                    "fan-out: CPU ms per device",
                    f"agent {f['agent_cpu_ms_per_device']:.1f}",
                    f"raw subscriber {f['raw_subscriber_cpu_ms']:.1f}",
                    f"{f['agent_cpu_ms_per_device'] / f['raw_subscriber_cpu_ms']:.2f}",
                    "context",
                ]
            )
        overlapped = f.get("delivery_with_installs_s")
        if overlapped is not None:
            rows.append(
                [
                    "(v2, installs overlapping) delivery s",
                    f"{overlapped:.2f}",
                    f"raw paho fan-out {f['raw_fan_out_s']:.2f}",
                    f"{overlapped / f['raw_fan_out_s']:.2f}",
                    "context",
                ]
            )
    for case in ("agent-kill", "broker-kill", "edgectl-kill"):
        if case in results:
            c = results[case]
            rows.append(
                [
                    f"{case}: chunks sent again",
                    str(c["resent_chunks"]),
                    f"bundle {c['chunks']} chunks",
                    f"{c['chunk_frames_sent'] / c['chunks']:.3f}",
                    f"<= {WINDOW} chunks, installed: {c['installed']}",
                ]
            )
    if "forged" in results:
        c = results["forged"]
        rows.append(
            [
                "forged: installed",
                str(c["installed"]),
                f"{c['forged_sent']} forged chunks",
                f"{c['discarded_by_device']} discarded",
                "installed, every forgery refused",
            ]
        )
    if "delta" in results:
        c = results["delta"]
        rows.append(
            [
                "delta, last layer fine-tuned: bytes sent",
                f"{c['bytes_sent']:,}",
                f"changed {c['changed_tensor_bytes']:,}; full {c['full_bundle_bytes']:,}",
                f"{c['ratio_to_changed']:.3f}",
                "<= 1.2x changed",
            ]
        )
    if "slow-link" in results:
        c = results["slow-link"]
        rows.append(
            [
                "slow link 256 KB/s: extra bytes",
                f"{100 * c['extra_share']:.1f}%",
                f"bundle {c['bundle_bytes']:,}",
                f"{c['seconds']:.0f} s",
                "<= 5%, installed",
            ]
        )
    delivery_rows = len(rows)
    rows.extend(rollout_rows)
    if delivery_rows:
        kib = CHUNK // 1024
        print(f"fleet delivery, {args.devices} devices, {args.mib} MiB of weights, {kib} KiB chunks, Mosquitto")
    if rollout_rows:
        print(f"rollouts: {args.rollout_devices} simulated devices, 1 MB bundle (benchmarks/rollouts.py)")
    print_table(["measure", "edge-sdk", "baseline (same run)", "ratio", "goal"], rows)
    path = write_results(
        "fleet", {"devices": args.devices, "mib": args.mib, "chunk": CHUNK, "cases": results}, args.json_out
    )
    print(f"wrote {path}")
    missed = [c for c in rollouts.CASES if c in results and not results[c]["goals_met"]]
    if missed:
        print(f"GOALS NOT MET: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
