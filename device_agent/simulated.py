"""Many simulated devices in one process: real agents, each with its own directory, key and connection.

``edgectl sim`` (``host_tools/fleet/simulator.py``) provisions a fleet and starts
``edge-agent simulate SPEC.json`` once per group of devices. Each
device is a real :class:`~device_agent.agent.Agent` (its config, identity, trust store,
receiving, installer and reporter), on its own worker thread with its own MQTT connection;
what is process-wide is set up once here: logging (each line names its thread, and so its
device), signal handlers, and no systemd notifications.

Faults (:mod:`edge_sdk.simulation`) act in the agent's real code paths:

- ``install-fail``: just before a verified bundle is activated (the agent's ``activating``
  hook, where the installer's step ``staged`` writes the state file) the hook raises the
  :class:`~edge_sdk.errors.StorageError` a full disk raises when that file is written;
  the install sequence reports it as a failed install, as it would on a device. A fault
  for one version fails only installs of that version.
- ``gate-closed``: the device's update-gate file exists while the fault holds (its first
  line is the reason); the agent defers installs and installs them when it is removed.
- ``offline``: the agent is stopped (it says goodbye) and started again later, as a device
  switched off and on.
- ``slow-link``, ``drop-link``: the device connects through a proxy in this process that
  carries the broker's bytes at the fault's rate, or cuts the connection (no goodbye: the
  broker publishes the device's will) and refuses new ones during each outage.
- ``latency``, ``rss``: the stand-in runtime draws latencies multiplied by the factor, and
  says the model takes that much more memory; with the real runtime each run is slowed by
  the factor (the agent's own benchmark times it) and the load holds that much more memory.

The stand-in runtime (``runtime: standin``) takes simulated time
(:class:`~edge_sdk.runtime.StandInSession`) timed by the agent's real health check and
benchmark; its reports say ``simulated`` (runtime, providers, cpu, power and memory
method). They are not measurements.

The spec file (written by the host)::

    {"broker": URL, "root": ROOT_JSON, "started_at": UNIX_TIME, "runtime": "standin"|"real",
     "latency": {...LatencyModel}, "gate_retry_s": S, "metrics_every_s": S|null, "ready_file": PATH,
     "devices": [{"device_id": ID, "data_dir": DIR, "identity_key": PEM_FILE,
                  "faults": {...DeviceFaults}}]}

The process writes ``ready_file`` once every device's agent has started, and stops them all
(each says goodbye) on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.agent import Agent, AgentHooks, mqtt_transport, open_identity
from device_agent.config import AgentConfig
from device_agent.install import ProfileHook
from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import ConfigError, EdgeError, StorageError
from edge_sdk.mqtt import parse_broker_url
from edge_sdk.simulation import DeviceFaults, LatencyModel

if TYPE_CHECKING:
    from device_agent.profiler import Profile
    from edge_sdk.bundle import Manifest
    from edge_sdk.protocol import BenchmarkSpec
    from edge_sdk.runtime import InferenceSession

__all__ = ["RUNTIMES", "LinkProxy", "SimDevice", "SimProcess", "SimSpec"]

log = logging.getLogger(__name__)

#: What a simulated device runs its models on.
RUNTIMES = ("standin", "real")
#: How often the fault schedule is applied (gate files, offline periods).
_SCHEDULE_S = 0.25
_GATE_REASON = "simulated: update gate closed"
#: Many agents share a machine's cores: a busy moment must not look like a dead link to the
#: broker (silent for 1.5 x keepalive), nor an answer a little late like a refused connection.
_KEEPALIVE_S = 120
_CONNACK_TIMEOUT_S = 60.0
_RECONNECT_MAX_S = 10.0


@dataclass(frozen=True)
class SimSpec:
    """The spec file, read."""

    broker: str
    root: Path
    started_at: float
    runtime: str
    latency: LatencyModel
    gate_retry_s: float
    ready_file: Path | None
    devices: tuple[tuple[str, Path, Path | None, DeviceFaults], ...]
    metrics_every_s: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SimSpec:
        """Raises: ConfigError: a field is missing or malformed."""
        try:
            runtime = str(d.get("runtime", "standin"))
            if runtime not in RUNTIMES:
                raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
            return cls(
                broker=str(d["broker"]),
                root=Path(d["root"]),
                started_at=float(d["started_at"]),
                runtime=runtime,
                latency=LatencyModel.from_dict(d.get("latency") or LatencyModel().to_dict()),
                gate_retry_s=float(d.get("gate_retry_s", 2.0)),
                metrics_every_s=float(d["metrics_every_s"]) if d.get("metrics_every_s") is not None else None,
                ready_file=Path(d["ready_file"]) if d.get("ready_file") else None,
                devices=tuple(
                    (
                        str(x["device_id"]),
                        Path(x["data_dir"]),
                        Path(x["identity_key"]) if x.get("identity_key") else None,
                        DeviceFaults.from_dict(x.get("faults") or {"device_id": x["device_id"]}),
                    )
                    for x in d["devices"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad simulation spec: {type(exc).__name__}: {exc}") from exc


# --- faults in the agent's code paths ---------------------------------------------------------


def install_fault(faults: DeviceFaults, state_path: Path, now: Callable[[], float]) -> Callable[[Manifest], None]:
    """The install's ``activating`` hook: fail as a full disk fails the state file's write, before activation.

    Each bundle about to be activated counts as one install (for failures at a rate); a
    fault for one version fails only installs of that version.
    """
    attempts = [0]  # installs that reached activation, for failures at a rate

    def hook(manifest: Manifest) -> None:
        attempts[0] += 1
        if faults.install_fails(now(), attempts[0], manifest.version):
            raise StorageError(
                f"cannot write {state_path}: No space left on device", path=str(state_path), injected="install-fail"
            )

    return hook


def standin_profile(model: LatencyModel, faults: DeviceFaults) -> ProfileHook:
    """Health check and benchmark on the stand-in runtime: the agent's own code, timing simulated runs."""

    def profile(manifest: Manifest, payload: Path, spec: BenchmarkSpec) -> Profile:
        from device_agent.profiler import Profile, health_check
        from edge_sdk.metrics import CpuMeasurement, ModelMemory, PowerMeasurement, benchmark
        from edge_sdk.runtime import StandInSession

        factor = faults.factor("latency", manifest.version)
        session = StandInSession(model, f"{faults.device_id}:{manifest.name}:{manifest.version}", factor, spec.threads)
        health_check(session, {}, manifest.health.max_latency_ms if manifest.health else None, clock=session.clock)
        start = session.clock()
        stats = benchmark(
            lambda: session.run({}),
            warmup=spec.warmup,
            runs=spec.runs,
            min_duration_s=spec.min_duration_s,
            clock=session.clock,
        )
        seconds = session.clock() - start
        model_bytes = int(model.model_bytes * faults.factor("rss", manifest.version))
        base = 32 << 20  # a simulated agent's resident memory before the model
        why = "simulated device: nothing measured"
        return Profile(
            runtime=session.runtime,
            precision=manifest.precision or session.precision,
            threads=spec.threads,
            providers=session.providers,
            latency=stats,
            memory=ModelMemory(
                rss_before_load_bytes=base,
                rss_after_load_bytes=base + model_bytes,
                model_bytes=model_bytes,
                start_bytes=base + model_bytes,
                peak_bytes=base + model_bytes,
                sampled_peak_bytes=base + model_bytes,
                hwm_bytes=None,
                samples=0,
                model_bytes_method=session.runtime,
            ),
            cpu=CpuMeasurement(seconds, None, os.cpu_count() or 1, None, None, spec.threads, insufficient_data=why),
            power=PowerMeasurement(None, seconds, None, session.runtime, True, None, insufficient_data=why),
            temperature=(),
        )

    return profile


class _Regressed:
    """A real session whose runs take ``factor`` times as long, and whose load holds ``extra_bytes`` more."""

    def __init__(self, inner: InferenceSession, factor: float, extra_bytes: int) -> None:
        self.inner = inner
        self.factor = factor
        self.runtime, self.providers = inner.runtime, inner.providers
        self.threads, self.precision = inner.threads, inner.precision
        self._ballast = bytearray(b"\1" * max(0, extra_bytes))

    def inputs(self) -> Any:
        return self.inner.inputs()

    def outputs(self) -> Any:
        return self.inner.outputs()

    def run(self, feeds: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner.run(feeds)
        if self.factor > 1:
            time.sleep((time.perf_counter() - t0) * (self.factor - 1))
        return out

    def close(self) -> None:
        self._ballast = bytearray()
        self.inner.close()

    def __enter__(self) -> _Regressed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def regressed_profile(config: AgentConfig, faults: DeviceFaults) -> ProfileHook:
    """The real runtime's health check and benchmark, with the device's latency and memory regressions."""

    def profile(manifest: Manifest, payload: Path, spec: BenchmarkSpec) -> Profile:
        from device_agent.profiler import profile_model
        from edge_sdk.metrics import detect_power_source
        from edge_sdk.runtime import SessionOptions, open_session

        model_path = payload / manifest.model
        latency, rss = faults.factor("latency", manifest.version), faults.factor("rss", manifest.version)

        def opener(options: SessionOptions) -> InferenceSession:
            inner = open_session(model_path, manifest.runtime, options, precision_hint=manifest.precision)
            extra = int((rss - 1) * model_path.stat().st_size)
            return _Regressed(inner, latency, extra)

        regressed = manifest.sparse is None and (latency != 1 or rss != 1)
        return profile_model(
            model_path,
            manifest.runtime,
            manifest.precision,
            payload / manifest.sample_input if manifest.sample_input else None,
            spec,
            detect_power_source(config.sysfs_root),
            config.sysfs_root,
            max_latency_ms=manifest.health.max_latency_ms if manifest.health else None,
            opener=opener if regressed else None,
        )

    return profile


# --- the link proxy ---------------------------------------------------------------------------


class LinkProxy:
    """Carries devices' MQTT connections to the broker, slowed or cut as their faults say.

    One event loop on its own thread serves every device of the process that needs it; each
    such device gets its own listening port on 127.0.0.1 (so the proxy knows whose
    connection it is).

    Args:
        broker: the real broker's URL.
        now: seconds since the fleet started.
    """

    def __init__(self, broker: str, now: Callable[[], float]) -> None:
        address = parse_broker_url(broker)
        self.host, self.port, self.tls = address.host, address.port, address.tls
        self.now = now
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sim-link-proxy", daemon=True)
        self._thread.start()

    def add(self, faults: DeviceFaults) -> str:
        """Listen for ``faults``' device; returns the broker URL it should connect to."""
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(lambda r, w: self._serve(faults, r, w), "127.0.0.1", 0), self.loop
        ).result(10)
        port = server.sockets[0].getsockname()[1]
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{port}"

    async def _serve(self, faults: DeviceFaults, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if faults.link_down(self.now()):
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, None)),
            asyncio.ensure_future(self._pump(up_reader, writer, faults)),
            asyncio.ensure_future(self._watch(faults)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for p in pumps:
            p.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.transport.abort()  # a cut link: no FIN from the device, as when a cable is pulled

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, faults: DeviceFaults | None) -> None:
        while data := await src.read(16384):
            dst.write(data)
            await dst.drain()
            rate = faults.link_rate(self.now()) if faults is not None else None
            if rate:
                await asyncio.sleep(len(data) / rate)

    async def _watch(self, faults: DeviceFaults) -> None:
        while not faults.link_down(self.now()):
            await asyncio.sleep(_SCHEDULE_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


# --- devices and the process ----------------------------------------------------------------


class SimDevice:
    """One simulated device: its config, its hooks, and its agent while it is switched on."""

    def __init__(self, config: AgentConfig, faults: DeviceFaults, hooks: AgentHooks) -> None:
        self.config = config
        self.faults = faults
        self.hooks = hooks
        self.agent: Agent | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        #: Whether the schedule changes anything on this device (its gate, or its power).
        self.scheduled = any(f.kind in ("gate-closed", "offline") for f in faults.faults)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Build the agent (recovering its directory, as at boot) and run it on its own thread.

        Raises:
            EdgeError: the agent cannot start (its directory, key or root).
        """
        identity = open_identity(self.config)
        self.agent = Agent(self.config, mqtt_transport(self.config, identity), identity=identity, hooks=self.hooks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.config.device_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.agent is not None
        try:
            self.agent.run(self._stop)
        except EdgeError as exc:
            self.failure = exc.message
            log.error("device %s stopped: %s", self.config.device_id, exc.message)

    def signal_stop(self) -> None:
        """Ask the agent to stop, without waiting (stopping many at once is faster)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop the agent (it says goodbye) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=20)
        self._thread = None


class SimProcess:
    """The devices of one process, and the schedule that applies their faults.

    Args:
        spec: what to run.
        clock: wall-clock seconds (the fleet's time is measured from ``spec.started_at``).
    """

    def __init__(self, spec: SimSpec, clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.clock = clock
        self.proxy: LinkProxy | None = None
        self.devices: list[SimDevice] = []
        for device_id, data_dir, key, faults in spec.devices:
            broker = spec.broker
            if faults.needs_link_proxy:
                if self.proxy is None:
                    self.proxy = LinkProxy(spec.broker, self.now)
                broker = self.proxy.add(faults)
            config = AgentConfig(
                broker=broker,
                device_id=device_id,
                data_dir=data_dir,
                root=spec.root,
                identity_key=key,
                update_gate_file=data_dir / "update-gate",
                update_gate_retry_s=spec.gate_retry_s,
                reconnect_max_s=_RECONNECT_MAX_S,
                keepalive_s=_KEEPALIVE_S,
                connack_timeout_s=_CONNACK_TIMEOUT_S,
                metrics_every_s=spec.metrics_every_s,
            )
            if spec.runtime == "standin":
                profile: ProfileHook | None = standin_profile(spec.latency, faults)
            elif any(f.kind in ("latency", "rss") for f in faults.faults):
                profile = regressed_profile(config, faults)
            else:
                profile = None
            hooks = AgentHooks(activating=install_fault(faults, data_dir / "state.json", self.now), profile=profile)
            self.devices.append(SimDevice(config, faults, hooks))

    def now(self) -> float:
        """Seconds since the fleet started."""
        return self.clock() - self.spec.started_at

    def apply_schedule(self) -> None:
        """Open or close gates, switch devices off or on, as the faults say for now."""
        t = self.now()
        for device in self.devices:
            if device.running and not device.scheduled:
                continue
            gate = device.config.update_gate_file
            assert gate is not None
            closed = device.faults.gate_closed(t)
            if closed and not gate.exists():
                gate.write_text(_GATE_REASON + "\n")
            elif not closed and gate.exists():
                gate.unlink()
            off = device.faults.offline(t)
            if off and device.running:
                log.info("device %s switched off", device.config.device_id)
                device.stop()
            elif not off and not device.running and device.failure is None:
                log.info("device %s switched on", device.config.device_id)
                device.start()

    def run(self, stop: threading.Event) -> None:
        """Start every device, say ready, apply the schedule until ``stop`` is set; then stop them all."""
        try:
            self.apply_schedule()
            if self.spec.ready_file is not None:
                ready = {"pid": os.getpid(), "devices": [d.config.device_id for d in self.devices]}
                atomic_write_bytes(self.spec.ready_file, json.dumps(ready).encode())
            while not stop.wait(_SCHEDULE_S):
                self.apply_schedule()
        finally:
            for device in self.devices:
                device.signal_stop()
            for device in self.devices:
                device.stop()
            if self.proxy is not None:
                self.proxy.close()
