"""A simulated fleet on one machine: start time, memory per device and CPU, beside real agent processes.

``N`` simulated devices (``host_tools.fleet.simulator``: real agent code, ``--per-process``
devices per OS process, the stand-in runtime) start against a real Mosquitto; each is
waited for until its retained status says ``online`` on the broker. Then, with every device
idle, the simulator processes' memory (RSS and PSS, summed over the processes) and their CPU
over ``--idle-s`` seconds are read; then a 1 MB bundle goes to all of them with
``deploy_many`` (one transfer, the host in this process), and the simulator processes' CPU
over the deploy is read, with the deploy's wall time and outcomes (the retained statuses the
deploy heard are recorded in the registry: ``registry online``).

Baseline, in the same run: ``--baseline`` (20) real ``edge-agent run`` processes on the same
broker; their start (spawn to all online), memory and idle CPU are measured and
**extrapolated** to ``N`` devices (times ``N / 20``); their CPU per device for the same
bundle (real onnxruntime benchmark, 5 runs) likewise.

Broker: the test helper's Mosquitto with ``max_queued_messages`` raised (the host's client
hears a thousand devices' events at once; Mosquitto's default queue of 1,000 would drop).

    .venv/bin/python benchmarks/sim_fleet.py [--devices 1000] [--per-process 100] [--baseline 20]
    .venv/bin/python benchmarks/sim_fleet.py --quick        # 100 devices, baseline 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _report import add_common_args, print_table, processes_cpu_s, write_results
from agent_models import big_model
from fleet import Fleet
from harness import Host, read_device_message
from mosquitto import MosquittoProcess, find_mosquitto
from taps import BrokerTap

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import DeviceStatus
from host_tools.fleet.deployer import DeployOptions, deploy_many
from host_tools.fleet.registry import open_registry
from host_tools.fleet.simulator import SimOptions, start_sim_fleet
from host_tools.keys import KeyRing, command_authority

MB = 1 << 20


class Online:
    """The devices whose latest retained status on the broker says online."""

    def __init__(self, url: str) -> None:
        self.online: set[str] = set()
        self._lock = threading.Lock()
        self._tap = BrokerTap(url, ("edge/v1/devices/+/status",), self._seen)

    def _seen(self, topic: str, payload: bytes) -> None:
        msg = read_device_message(payload)
        if isinstance(msg, DeviceStatus):
            with self._lock:
                (self.online.add if msg.state == "online" else self.online.discard)(msg.device_id)

    def wait(self, devices: Sequence[str], timeout_s: float) -> float:
        """Seconds until every one of ``devices`` is online (raises after ``timeout_s``)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with self._lock:
                if self.online.issuperset(devices):
                    return time.monotonic() - started
            time.sleep(0.1)
        with self._lock:
            missing = len(set(devices) - self.online)
        raise SystemExit(f"{missing} of {len(devices)} devices not online within {timeout_s:g} s")

    def close(self) -> None:
        self._tap.close()


def _memory(pids: Sequence[int]) -> tuple[int, int]:
    """RSS and PSS of these processes together, bytes."""
    rss = pss = 0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss += info.rss
        pss += info.pss
    return rss, pss


def _cpu_share(pids: Sequence[int], seconds: float) -> float:
    """CPU of these processes over ``seconds`` of idling, in % of one core."""
    before, t0 = processes_cpu_s(pids), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (processes_cpu_s(pids) - before) / (time.monotonic() - t0)


def _deploy(url: str, home: Path, devices: list[str], bundle: Path, pids: Sequence[int]) -> dict[str, object]:
    client = MqttClient(url, MqttOptions(client_id="sim-bench-host", connect_timeout_s=30))
    client.connect()
    options = DeployOptions(authority=command_authority(KeyRing(home / "keys")), finish_timeout_s=600)
    try:
        with open_registry(home / "registry.db") as reg:
            cpu0, t0 = processes_cpu_s(pids), time.monotonic()
            outcomes = deploy_many(client, reg, devices, bundle, options)
            wall, cpu = time.monotonic() - t0, processes_cpu_s(pids) - cpu0
            records = [reg.get_device(d, url) for d in devices]
            in_registry = sum(1 for rec in records if rec is not None and rec.status == "online")
    finally:
        client.close()
    states: dict[str, int] = {}
    for o in outcomes:
        states[o.state] = states.get(o.state, 0) + 1
    simulated = sum(1 for o in outcomes if o.metrics is not None and o.metrics.runtime == "simulated")
    return {"wall_s": wall, "cpu_s": cpu, "states": states, "registry_online": in_registry, "simulated": simulated}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-process", type=int, default=100)
    parser.add_argument("--baseline", type=int, default=20, help="real edge-agent processes measured")
    parser.add_argument("--idle-s", type=float, default=20.0, help="seconds of idle CPU measured")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.per_process, args.baseline, args.idle_s = 100, 50, 5, 5.0
    n, nb = args.devices, args.baseline
    with tempfile.TemporaryDirectory(prefix="sim-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoProcess(
            tmp / "mosquitto", binary=find_mosquitto(), extra_config=("max_queued_messages 100000",)
        )
        broker.start()
        try:
            host = Host(tmp / "home")
            assert host.run("keys", "init").code == 0
            model, sample = big_model(tmp, mib=1)
            bundle = host.pack(model, sample, tmp / "v1.edge", "simbench", 1)
            online = Online(broker.url)
            try:
                # --- simulated devices -------------------------------------------------------------
                options = SimOptions(devices=n, broker=broker.url, root=tmp / "sim", per_process=args.per_process)
                t0 = time.monotonic()
                with open_registry(host.home / "registry.db") as reg:
                    fleet = start_sim_fleet(options, reg, host.root)
                with fleet:
                    _note(f"simulated devices started in {time.monotonic() - t0:.1f} s")
                    online.wait(fleet.device_ids, 900)
                    sim_start = time.monotonic() - t0
                    time.sleep(3)
                    sim_rss, sim_pss = _memory(fleet.pids)
                    sim_idle = _cpu_share(fleet.pids, args.idle_s)
                    _note(
                        f"simulated: all online in {sim_start:.1f} s; RSS {sim_rss / n / MB:.2f} MB, "
                        f"PSS {sim_pss / n / MB:.2f} MB per device; idle CPU {sim_idle:.1f}% of one core"
                    )
                    sim_deploy = _deploy(broker.url, host.home, fleet.device_ids, bundle, fleet.pids)
                    _note(f"simulated deploy: {sim_deploy}")
                # --- baseline: real agent processes --------------------------------------------------
                (tmp / "real").mkdir()
                real = Fleet(host, broker.url, host.root, tmp / "real")
                ids = [f"real-{i:03d}" for i in range(nb)]
                t0 = time.monotonic()
                try:
                    real.start(ids)
                    online.wait(ids, 300)
                    real_start = time.monotonic() - t0
                    pids = [a.proc.pid for a in real.agents.values()]
                    time.sleep(3)
                    real_rss, real_pss = _memory(pids)
                    real_idle = _cpu_share(pids, args.idle_s)
                    _note(
                        f"real: all online in {real_start:.1f} s; RSS {real_rss / nb / MB:.2f} MB, "
                        f"PSS {real_pss / nb / MB:.2f} MB per agent; idle CPU {real_idle:.1f}% of one core"
                    )
                    real_deploy = _deploy(broker.url, host.home, ids, bundle, pids)
                    _note(f"real deploy: {real_deploy}")
                finally:
                    real.stop()
            finally:
                online.close()
        finally:
            broker.stop()
    scale = n / nb
    sim = {"start_s": sim_start, "rss": sim_rss, "pss": sim_pss, "idle_cpu_pct": sim_idle, "deploy": sim_deploy}
    real = {"start_s": real_start, "rss": real_rss, "pss": real_pss, "idle_cpu_pct": real_idle, "deploy": real_deploy}
    sim_cpu, real_cpu = float(sim_deploy["cpu_s"]) / n, float(real_deploy["cpu_s"]) / nb  # type: ignore[arg-type]
    rows = [
        _row("start, all online (s)", sim_start, real_start * scale, 1),
        _row("memory RSS per device (MB)", sim_rss / n / MB, real_rss / nb / MB, 2),
        _row("memory PSS per device (MB)", sim_pss / n / MB, real_pss / nb / MB, 2),
        _row(f"memory PSS, {n} devices (GB)", sim_pss / 1e9, real_pss * scale / 1e9, 2),
        _row(f"CPU idle, {n} devices (% of one core)", sim_idle, real_idle * scale, 1),
        _row("CPU per device, 1 MB deploy (ms)", 1000 * sim_cpu, 1000 * real_cpu, 1),
    ]
    print(f"{n} simulated devices ({args.per_process} per process, stand-in runtime) beside {nb} real edge-agent")
    print(f"processes, whose figures are extrapolated x{scale:g} to {n} devices")
    print_table(["figure", "simulated", f"real x{scale:g} (extrapolated)", "ratio real/simulated"], rows)
    for what, d in ((f"{n} simulated devices", sim_deploy), (f"{nb} real agents", real_deploy)):
        print(f"deploy of 1 MB to {what}: {d['wall_s']:.1f} s, {d['states']}, registry online {d['registry_online']}, ")
        print(f"  reports labelled simulated: {d['simulated']}")
    results = {"devices": n, "per_process": args.per_process, "baseline_agents": nb, "baseline_extrapolated_by": scale}
    write_results("sim_fleet", {**results, "rows": rows, "simulated": sim, "real": real}, args.json_out)
    return 0


def _note(line: str) -> None:
    """A figure as soon as it is measured (stderr), so a long run that is cut short still says what it saw."""
    print(line, file=sys.stderr, flush=True)


def _row(label: str, simulated: float, real: float, digits: int) -> list[object]:
    return [label, round(simulated, digits), round(real, digits), round(real / simulated, 1) if simulated else None]


if __name__ == "__main__":
    sys.exit(main())
