"""A fleet on one machine: many real agents, several per process, each its own device.

:func:`start_sim_fleet` provisions ``N`` devices under one directory and starts them:

1. provisioning, in one pass: an Ed25519 identity key per device (``ROOT/devices/ID/identity.key``,
   0600; kept, so a second start is the same devices), each enrolled in the registry with
   it, so the host believes what the devices sign from their first message;
2. the fault plan (:class:`edge_sdk.simulation.FaultPlan`) resolved into each device's
   faults, so the caller knows beforehand which devices fail, defer or regress
   (:attr:`SimFleet.faults`);
3. one spec file and one process (``edge-agent simulate SPEC``) per
   ``per_process`` devices; each process runs its devices' agents on threads and says
   when all are started.

The host side never imports the agent (the package rule): it talks to the processes by
their spec and ready files, and to the devices over MQTT like any host.

Typical use in tests and benchmarks::

    options = SimOptions(devices=50, broker=url, root=tmp / "sim", per_process=25,
                         faults=FaultPlan.of(["install-fail:share=0.1"], seed=7))
    root = home / "keys" / "root.json"
    with open_registry(home / "registry.db") as reg, start_sim_fleet(options, reg, root) as fleet:
        failing = fleet.devices_with("install-fail")
        deploy_many(client, reg, fleet.device_ids, bundle, opts)
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import ConfigError, EdgeError, StorageError
from edge_sdk.mqtt import parse_broker_url
from edge_sdk.protocol.messages import MAX_HEARTBEAT_S
from edge_sdk.protocol.topics import check_device_id
from edge_sdk.simulation import DeviceFaults, FaultPlan, LatencyModel
from edge_sdk.trust import SigningKey
from host_tools.fleet.registry import Registry

__all__ = ["SIM_RUNTIMES", "SimFleet", "SimOptions", "provision_sim", "start_sim_fleet"]

log = logging.getLogger(__name__)

#: What simulated devices run models on: the stand-in (simulated latency) or the real runtimes.
SIM_RUNTIMES = ("standin", "real")
_KEY_FILE = "identity.key"
#: The agent's command, installed beside this interpreter.
_AGENT = Path(sys.executable).parent / "edge-agent"
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SimOptions:
    """What fleet to simulate.

    Attributes:
        devices: how many devices.
        broker: the broker URL they connect to.
        root: the directory everything goes under (devices' data, keys, specs, logs).
        per_process: devices per OS process.
        runtime: ``standin`` (simulated latency, for large fleets) or ``real``.
        faults: what goes wrong where.
        latency: the stand-in runtime's latency and memory.
        id_prefix: device ids are ``PREFIX-00000``, ``PREFIX-00001``...
        gate_retry_s: how often a device with a deferred install asks its gate again.
        start_timeout_s: how long the processes have to start every device.
        log_level: the device processes' log level (their logs: ``root/logs/``).
        metrics_every_s: each device publishes a metrics report of each active bundle this
            often, measured again (the agent's ``metrics_every_s``; 1 s to a day); None: only
            after installs.

    Raises:
        ConfigError: a count, runtime, prefix, broker or report interval that cannot be used.
    """

    devices: int
    broker: str
    root: Path
    per_process: int = 50
    runtime: str = "standin"
    faults: FaultPlan = field(default_factory=FaultPlan)
    latency: LatencyModel = field(default_factory=LatencyModel)
    id_prefix: str = "sim"
    gate_retry_s: float = 2.0
    start_timeout_s: float = 300.0
    log_level: str = "WARNING"
    metrics_every_s: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 100_000:
            raise ConfigError(f"--devices must be within 1..100000, got {self.devices}", key="devices")
        if not 1 <= self.per_process <= 1000:
            raise ConfigError(f"--per-process must be within 1..1000, got {self.per_process}", key="per_process")
        if self.runtime not in SIM_RUNTIMES:
            raise ConfigError(f"--runtime must be one of {', '.join(SIM_RUNTIMES)}, got {self.runtime!r}")
        if not self.gate_retry_s > 0 or not self.start_timeout_s > 0:
            raise ConfigError("gate retry and start timeout must be positive seconds")
        every = self.metrics_every_s
        if every is not None and not 1 <= every <= MAX_HEARTBEAT_S:
            raise ConfigError(
                f"--metrics-every must be a number of seconds from 1 to {MAX_HEARTBEAT_S:g}, got {every!r}",
                key="metrics_every_s",
            )
        parse_broker_url(self.broker)
        check_device_id(f"{self.id_prefix}-0")

    @property
    def device_ids(self) -> list[str]:
        width = max(5, len(str(self.devices - 1)))
        return [f"{self.id_prefix}-{i:0{width}d}" for i in range(self.devices)]


@dataclass(frozen=True)
class ProvisionedSim:
    """What :func:`provision_sim` wrote: the devices, their faults and one spec file per process."""

    device_ids: tuple[str, ...]
    faults: dict[str, DeviceFaults]
    specs: tuple[Path, ...]
    seconds: float


def _identity_key(path: Path) -> SigningKey:
    """The device's key: the one kept from an earlier start, or a new one (written 0600)."""
    if path.exists():
        return SigningKey.from_pem(path.read_bytes())
    key = SigningKey.generate()
    atomic_write_bytes(path, key.to_pem(), mode=0o600)
    return key


def provision_sim(options: SimOptions, registry: Registry, root_of_trust: Path, now: float) -> ProvisionedSim:
    """Keys, enrolments, faults and spec files for a simulated fleet (nothing started).

    Args:
        options: the fleet.
        registry: devices are enrolled here with their keys.
        root_of_trust: the signed root devices are provisioned with (``HOME/keys/root.json``).
        now: the fleet's start; faults' times count from it.

    Returns:
        What was written.

    Raises:
        ConfigError: a fault names a device the fleet does not have.
        KeyStoreError: no root of trust (run ``edgectl keys init``), or a kept key that is unreadable.
        StorageError: the directory or registry cannot be written.
    """
    started = time.monotonic()
    if not root_of_trust.is_file():
        raise ConfigError(f"no root of trust at {root_of_trust}: run `edgectl keys init`", path=str(root_of_trust))
    ids = options.device_ids
    faults = options.faults.resolve(ids)
    root = options.root.resolve()
    try:
        for sub in ("devices", "specs", "logs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {root}: {exc.strerror}", path=str(root)) from exc
    entries = []
    registry.ensure_schema()
    for device_id in ids:
        device_dir = root / "devices" / device_id
        try:
            (device_dir / "data").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {device_dir}: {exc.strerror}", path=str(device_dir)) from exc
        key = _identity_key(device_dir / _KEY_FILE)
        current = registry.get_enrolment(device_id)
        public = key.public_key.raw.hex()
        if current is None or current.public_key != public or current.state != "approved":
            registry.enroll(device_id, public, now)
        entries.append(
            {
                "device_id": device_id,
                "data_dir": str(device_dir / "data"),
                "identity_key": str(device_dir / _KEY_FILE),
                "faults": faults[device_id].to_dict(),
            }
        )
    specs = []
    for n, start in enumerate(range(0, len(entries), options.per_process)):
        spec = {
            "broker": options.broker,
            "root": str(root_of_trust.resolve()),
            "started_at": now,
            "runtime": options.runtime,
            "latency": options.latency.to_dict(),
            "gate_retry_s": options.gate_retry_s,
            "metrics_every_s": options.metrics_every_s,
            "ready_file": str(root / "specs" / f"process-{n:03d}.ready"),
            "devices": entries[start : start + options.per_process],
        }
        path = root / "specs" / f"process-{n:03d}.json"
        atomic_write_bytes(path, json.dumps(spec, indent=1).encode())
        specs.append(path)
    return ProvisionedSim(tuple(ids), faults, tuple(specs), time.monotonic() - started)


class SimFleet:
    """A running simulated fleet: its processes, devices and faults. Stop it (or use ``with``).

    Attributes:
        options: what was asked for.
        provisioned: the devices, their faults and spec files.
        processes: one per spec file.
        started_in_s: from the call to every device started (provisioning included).
    """

    def __init__(self, options: SimOptions, provisioned: ProvisionedSim) -> None:
        self.options = options
        self.provisioned = provisioned
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started_in_s = 0.0

    @property
    def device_ids(self) -> list[str]:
        return list(self.provisioned.device_ids)

    @property
    def faults(self) -> dict[str, DeviceFaults]:
        return self.provisioned.faults

    def devices_with(self, kind: str) -> list[str]:
        """The devices that have a fault of ``kind`` (sorted)."""
        return sorted(d for d, f in self.faults.items() if any(x.kind == kind for x in f.faults))

    def to_dict(self) -> dict[str, Any]:
        """What runs: devices, processes, runtime, start time, and which devices each fault hits."""
        hits: dict[str, list[str]] = {}
        for device_id, faults in sorted(self.faults.items()):
            for kind in sorted({f.kind for f in faults.faults}):
                hits.setdefault(kind, []).append(device_id)
        return {
            "devices": len(self.provisioned.device_ids),
            "processes": [
                {"pid": p.pid, "spec": str(s)} for p, s in zip(self.processes, self.provisioned.specs, strict=False)
            ],
            "runtime": self.options.runtime,
            "simulated_latency": self.options.runtime == "standin",
            "broker": self.options.broker,
            "root": str(self.options.root.resolve()),
            "started_in_s": round(self.started_in_s, 3),
            "seed": self.options.faults.seed,
            "metrics_every_s": self.options.metrics_every_s,
            "faults": hits,
        }

    def data_dir(self, device_id: str) -> Path:
        """Where ``device_id``'s agent keeps its slots, state and identity."""
        return self.options.root.resolve() / "devices" / device_id / "data"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _start(self) -> None:
        started = time.monotonic()
        logs = self.options.root.resolve() / "logs"
        for spec in self.provisioned.specs:
            ready = spec.with_suffix(".ready")
            ready.unlink(missing_ok=True)
            argv = [str(_AGENT), "simulate", str(spec), "--log-level", self.options.log_level]
            with open(logs / f"{spec.stem}.log", "ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        argv,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        deadline = time.monotonic() + self.options.start_timeout_s
        waiting = [s.with_suffix(".ready") for s in self.provisioned.specs]
        while waiting:
            for proc, spec in zip(self.processes, self.provisioned.specs, strict=True):
                if proc.poll() is not None:
                    raise EdgeError(
                        f"simulated device process {spec.stem} exited with {proc.returncode} "
                        f"(log: {logs / (spec.stem + '.log')})"
                    )
            waiting = [w for w in waiting if not w.exists()]
            if waiting and time.monotonic() > deadline:
                limit = self.options.start_timeout_s
                raise EdgeError(f"{len(waiting)} simulated device process(es) did not start within {limit:g} s")
            time.sleep(0.1)
        self.started_in_s = time.monotonic() - started + self.provisioned.seconds

    def stop(self) -> list[int]:
        """Stop every process (each device says goodbye); returns their exit codes."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        codes = []
        for proc in self.processes:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_sim_fleet(
    options: SimOptions, registry: Registry, root_of_trust: Path, *, now: float | None = None
) -> SimFleet:
    """Provision and start a simulated fleet; returns once every device's agent has started.

    The devices then connect and announce themselves (birth messages) on their own; wait
    for them as for real devices.

    Args:
        options: the fleet.
        registry: devices are enrolled here.
        root_of_trust: ``HOME/keys/root.json``.
        now: the fleet's start for the faults' times (default: now).

    Returns:
        The running fleet; stop it with :meth:`SimFleet.stop` or a ``with`` block.

    Raises:
        ConfigError, KeyStoreError, StorageError: as :func:`provision_sim`.
        EdgeError: a process failed or did not start in time (all are stopped then).
    """
    provisioned = provision_sim(options, registry, root_of_trust, time.time() if now is None else now)
    fleet = SimFleet(options, provisioned)
    try:
        fleet._start()
    except BaseException:
        fleet.stop()
        raise
    return fleet
