"""Rollouts in waves to a simulated fleet: completion, abort and rollback, the health gate; beside their baselines.

One simulated fleet (``host_tools.fleet.simulator``: real agent code, the stand-in runtime,
``--per-process`` devices per OS process) on a real Mosquitto; the host (router, deployer,
rollout runner) runs in this process, as ``edgectl rollout start`` runs them, with an inbox
of 50,000 messages; the simulated devices' threads run 5 nice steps below it (they stand
for other machines; sharing two cores, they would otherwise starve the host). Bundles
``v1``..``v4`` of one 1 MB model (1 MiB MatMul). Every rollout: canary 1%, then waves
doubling (the canary's size x 2**k), success threshold 95%, health gate p99 and RSS <= 1.5x
what the device measured on the version it ran before.

Cases (issue 15's table), in this order on the same devices:

- baseline: ``deploy_many`` of v1 to every device, one fan-out (wall time, host CPU).
- ``rollout``: v2 in waves, abort threshold 5%. Goal: completes; every device succeeded.
  Wall time and host CPU (this process) per wave; the ratio is to the baseline's fan-out.
- ``rollout-abort``: v3, abort threshold 3%; the fault plan fails the install of v3 on
  exactly 5% of the devices of each wave from wave 3 on (wave 0 is the canary; the share is
  picked among each wave's devices, ``FaultPlan``'s ``among``). Goal: aborts within wave 3,
  no device of a later wave is started, and every device runs v2 again, **read from the
  devices**: each simulated device's own state file (``DATA/state.json``) and its signed
  retained status. Baseline: the clean rollout ``rollout``.
- ``rollout-health``: v4, abort threshold 5%; the fault plan doubles the stand-in's latency
  for v4 on a seeded 10% of the fleet. Goal: every regressed device that was started failed
  by the health gate (and no other device did), the rollout aborts at its failure threshold,
  and every device runs v2 again (read from the devices). Baseline: ``rollout``.

The benchmark's checks are its goals: a case that misses one says so in the table and in
``goals_met``, and the program exits 1.

Usage::

    flock /tmp/edge-bench.lock nice -n 5 .venv/bin/python benchmarks/rollouts.py [--devices 1000]
    .venv/bin/python benchmarks/rollouts.py --quick        # 200 devices
    .venv/bin/python benchmarks/fleet.py --cases rollout,rollout-abort,rollout-health --rollout-devices 1000
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _report import add_common_args, print_table, write_results
from agent_models import big_model
from harness import Host
from mosquitto import MosquittoProcess, find_mosquitto
from sim_fleet import Online

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.simulation import Fault, FaultPlan
from host_tools.fleet.deployer import DeployOptions, deploy_many
from host_tools.fleet.registry import Registry, open_registry
from host_tools.fleet.rollout_plan import RolloutPolicy, wave_sizes
from host_tools.fleet.rollouts import RolloutReport, RolloutRunner, RunSettings, create_rollout
from host_tools.fleet.router import FLEET_INBOX_MAX, gated
from host_tools.fleet.simulator import SimFleet, SimOptions, start_sim_fleet
from host_tools.keys import KeyRing, command_authority

CASES = ("rollout", "rollout-abort", "rollout-health")
NAME = "rolloutbench"
FAIL_SHARE, FAIL_FROM_WAVE, FAIL_THRESHOLD = 0.05, 3, 0.03
SLOW_SHARE, SLOW_FACTOR = 0.10, 2.0
SIM_NICE = 5  # the simulated devices' threads run this much nicer than the host's


def policy(abort_threshold: float) -> RolloutPolicy:
    """Canary 1%, then waves doubling; the health gate at 1.5x p99 and RSS."""
    return RolloutPolicy(
        canary_share=0.01,
        wave_factor=2.0,
        abort_threshold=abort_threshold,
        success_threshold=0.95,
        device_timeout_s=900.0,
        max_p99_ratio=1.5,
        max_rss_ratio=1.5,
    )


def waves_of(device_ids: Sequence[str], p: RolloutPolicy) -> list[list[str]]:
    """The devices of each wave, as the planner cuts them (the selector's devices sorted by id)."""
    ids, out, at = sorted(device_ids), [], 0
    for size in wave_sizes(len(ids), p):
        out.append(ids[at : at + size])
        at += size
    return out


def fault_plan(device_ids: Sequence[str], seed: int) -> FaultPlan:
    """v3 fails to install on 5% of each wave from wave 3; v4 runs 2x slower on 10% of the fleet."""
    faults = [
        Fault("install-fail", share=FAIL_SHARE, among=tuple(wave), version=3)
        for wave in waves_of(device_ids, policy(FAIL_THRESHOLD))[FAIL_FROM_WAVE:]
    ]
    faults.append(Fault("latency", share=SLOW_SHARE, factor=SLOW_FACTOR, version=4))
    return FaultPlan(tuple(faults), seed)


# --- measuring a run --------------------------------------------------------------------------


@dataclass
class WaveClock:
    """Wall time and this process's CPU at each wave's start, from the runner's progress reports."""

    marks: list[tuple[int, float, float]] = field(default_factory=list)  # (wave, monotonic, cpu)
    aborted_at: tuple[float, float] | None = None

    def __call__(self, report: RolloutReport) -> None:
        wave = report.record.wave
        if wave >= 0 and (not self.marks or wave > self.marks[-1][0]):
            self.marks.append((wave, time.monotonic(), time.process_time()))
        if report.record.status == "aborted" and self.aborted_at is None:
            self.aborted_at = (time.monotonic(), time.process_time())

    def per_wave(self, end: tuple[float, float], sizes: Sequence[int]) -> list[dict[str, Any]]:
        """Each started wave: its devices, seconds and host CPU seconds until the next wave (or ``end``)."""
        out = []
        for i, (wave, t, cpu) in enumerate(self.marks):
            t_next, cpu_next = (self.marks[i + 1][1], self.marks[i + 1][2]) if i + 1 < len(self.marks) else end
            if self.aborted_at is not None and i + 1 == len(self.marks):
                t_next, cpu_next = self.aborted_at  # the rollback is counted apart
            out.append({"wave": wave, "devices": sizes[wave], "wall_s": t_next - t, "host_cpu_s": cpu_next - cpu})
        return out


def _client(url: str, name: str) -> MqttClient:
    options = MqttOptions(client_id=f"rollout-bench-{name}", connect_timeout_s=30, inbox_max=FLEET_INBOX_MAX)
    client = MqttClient(url, options)
    client.connect()
    return client


def _options(home: Path) -> DeployOptions:
    return DeployOptions(authority=command_authority(KeyRing(home / "keys")), finish_timeout_s=900)


def baseline_fan_out(url: str, home: Path, reg: Registry, devices: list[str], bundle: Path) -> dict[str, Any]:
    """One ``deploy_many`` of ``bundle`` to every device: wall time, this process's CPU, outcomes."""
    client = _client(url, "baseline")
    try:
        with gated(client, reg) as router:
            t0, cpu0 = time.monotonic(), time.process_time()
            outcomes = deploy_many(client, reg, devices, bundle, _options(home), router=router)
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    finally:
        client.close()
    states: dict[str, int] = {}
    for o in outcomes:
        states[o.state] = states.get(o.state, 0) + 1
    return {"devices": len(devices), "wall_s": wall, "host_cpu_s": cpu, "states": states}


def run_rollout(
    url: str, home: Path, reg: Registry, devices: list[str], bundle: Path, p: RolloutPolicy
) -> tuple[RolloutReport, dict[str, Any]]:
    """Create and run one rollout to its end; the report and its timings per wave."""
    record = create_rollout(reg, bundle, ",".join(devices), p, time.time())
    clock = WaveClock()
    client = _client(url, record.id)
    try:
        with gated(client, reg) as router:
            t0, cpu0 = time.monotonic(), time.process_time()
            settings = RunSettings(command_timeout_s=60.0, settle_s=60.0)
            report = RolloutRunner(client, reg, router, record.id, _options(home), settings, progress=clock).run()
            end = (time.monotonic(), time.process_time())
    finally:
        client.close()
    sizes = wave_sizes(len(devices), p)
    timing: dict[str, Any] = {
        "wall_s": end[0] - t0,
        "host_cpu_s": end[1] - cpu0,
        "waves_planned": len(sizes),
        "wave_sizes": sizes,
        "per_wave": clock.per_wave(end, sizes),
    }
    if clock.aborted_at is not None:
        timing["rollback_wall_s"] = end[0] - clock.aborted_at[0]
        timing["rollback_host_cpu_s"] = end[1] - clock.aborted_at[1]
        timing["to_abort_s"] = clock.aborted_at[0] - t0
    return report, timing


def lower_priority(pids: Sequence[int], by: int) -> None:
    """Lower every thread of these processes by ``by`` nice steps: simulated devices stand for
    other machines and must not starve the host they share this one with."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), min(19, os.getpriority(os.PRIO_PROCESS, int(tid)) + by))


def runs_on_device(fleet: SimFleet, device_id: str) -> int | None:
    """The version of the bundle a simulated device runs, from its own state file (None: none)."""
    state = json.loads((fleet.data_dir(device_id) / "state.json").read_text())
    active = state.get("bundles", {}).get(NAME, {}).get("active")
    return None if active is None else int(active["version"])


def where_devices_ended(fleet: SimFleet, report: RolloutReport) -> dict[str, Any]:
    """Each device's version from its own state file and from its signed status (the report's ``runs``)."""
    on_disk = {d: runs_on_device(fleet, d) for d in fleet.device_ids}
    heard = {e.device_id: e.runs for e in report.devices if e.heard}
    return {"on_disk": on_disk, "heard": heard}


def _states(report: RolloutReport) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in report.devices:
        out[e.state] = out.get(e.state, 0) + 1
    return out


def _summary(report: RolloutReport, timing: dict[str, Any]) -> dict[str, Any]:
    r = report.record
    return {
        "status": r.status,
        "reason": r.reason,
        "highest_wave_started": r.wave,
        "states": _states(report),
        "devices_started": sum(1 for e in report.devices if e.attempts > 0),
        **timing,
    }


# --- the cases --------------------------------------------------------------------------------


def case_rollout(report: RolloutReport, timing: dict[str, Any], fleet: SimFleet) -> dict[str, Any]:
    out = _summary(report, timing)
    ended = where_devices_ended(fleet, report)
    out["devices_on_v2_on_disk"] = sum(1 for v in ended["on_disk"].values() if v == 2)
    out["goals_met"] = (
        report.record.status == "completed"
        and out["states"] == {"succeeded": len(fleet.device_ids)}
        and out["devices_on_v2_on_disk"] == len(fleet.device_ids)
    )
    return out


def case_abort(report: RolloutReport, timing: dict[str, Any], fleet: SimFleet) -> dict[str, Any]:
    out = _summary(report, timing)
    injected = set(fleet.devices_with("install-fail"))
    by_id = {e.device_id: e for e in report.devices}
    later = [e for e in report.devices if e.wave > FAIL_FROM_WAVE]
    failed = {e.device_id for e in report.devices if e.state == "failed"}
    installed = [e for e in report.devices if e.attempts > 0 and e.device_id not in failed]
    ended = where_devices_ended(fleet, report)
    not_back_on_disk = sorted(d for d, v in ended["on_disk"].items() if v != 2)
    not_back_heard = sorted(d for d, v in ended["heard"].items() if v != 2)
    out.update(
        {
            "injected_in_wave_3": sorted(d for d in injected if by_id[d].wave == FAIL_FROM_WAVE),
            "failed": sorted(failed),
            "failed_codes": sorted({str(by_id[d].error_code) for d in failed}),
            "later_waves_started": sum(1 for e in later if e.attempts > 0),
            "installed_then_rolled_back": sum(1 for e in installed if e.state == "rolled_back"),
            "installed": len(installed),
            "devices_not_back_on_v2_on_disk": not_back_on_disk,
            "statuses_heard": len(ended["heard"]),
            "devices_not_back_on_v2_heard": not_back_heard,
        }
    )
    out["goals_met"] = (
        report.record.status == "aborted"
        and report.record.wave == FAIL_FROM_WAVE
        and report.record.reason.startswith(f"wave {FAIL_FROM_WAVE}:")
        and "failed" in report.record.reason
        and out["later_waves_started"] == 0
        and failed == set(out["injected_in_wave_3"])
        and out["installed_then_rolled_back"] == len(installed)
        and not not_back_on_disk
        and not not_back_heard
        and len(ended["heard"]) == len(fleet.device_ids)
    )
    return out


def case_health(
    report: RolloutReport, timing: dict[str, Any], fleet: SimFleet, base_p99: dict[str, float]
) -> dict[str, Any]:
    """``base_p99``: each device's p99 on v2 (from the clean rollout), for the noise margin of the others."""
    out = _summary(report, timing)
    slow = set(fleet.devices_with("latency"))
    started = [e for e in report.devices if e.attempts > 0]
    gated_out = {e.device_id for e in report.devices if e.error_code and e.error_code.startswith("health_gate")}
    slow_started = {e.device_id for e in started if e.device_id in slow}
    ratios = [
        e.p99_ms / b
        for e in started
        if e.p99_ms is not None and (b := base_p99.get(e.device_id)) and e.device_id not in slow
    ]
    ended = where_devices_ended(fleet, report)
    not_back_on_disk = sorted(d for d, v in ended["on_disk"].items() if v != 2)
    abort_wave = report.record.wave
    wave_devs = [e for e in report.devices if e.wave == abort_wave]
    failed_in_wave = sum(1 for e in wave_devs if e.state == "failed")
    out.update(
        {
            "regressed_devices": len(slow),
            "regressed_started": len(slow_started),
            "failed_by_health_gate": len(gated_out),
            "gate_failures_not_regressed": sorted(gated_out - slow),
            "regressed_started_not_failed": sorted(slow_started - gated_out),
            "abort_wave_failed_share": failed_in_wave / len(wave_devs) if wave_devs else None,
            "devices_not_back_on_v2_on_disk": not_back_on_disk,
            "max_p99_ratio_not_regressed": max(ratios) if ratios else None,
        }
    )
    out["goals_met"] = (
        report.record.status == "aborted"
        and "more than the abort threshold" in report.record.reason
        and bool(slow_started)
        and gated_out == slow_started
        and not not_back_on_disk
    )
    return out


# --- running them -----------------------------------------------------------------------------


def run(
    cases: Sequence[str], devices: int, per_process: int, work: Path, seed: int = 15
) -> tuple[dict[str, Any], list[list[Any]]]:
    """Run the rollout cases on one simulated fleet; their results and table rows.

    The cases run in order (``rollout`` is the baseline of the other two, and each later
    one's devices run what the one before left, v2); asking for a later case runs the ones
    before it too.
    """
    wanted = max(CASES.index(c) for c in cases)
    host = Host(work / "home")
    if host.run("keys", "init").code:
        raise SystemExit("edgectl keys init failed")
    broker = MosquittoProcess(work / "mosquitto", binary=find_mosquitto(), extra_config=("max_queued_messages 100000",))
    broker.start()
    results: dict[str, Any] = {"devices": devices, "per_process": per_process, "seed": seed}
    try:
        model, sample = big_model(work, mib=1)
        bundles = {v: host.pack(model, sample, work / f"v{v}.edge", NAME, v) for v in range(1, 2 + wanted + 1)}
        results["bundle_bytes"] = bundles[1].stat().st_size
        plain = SimOptions(devices=devices, broker=broker.url, root=work / "sim", per_process=per_process)
        options = dataclasses.replace(plain, faults=fault_plan(plain.device_ids, seed))
        online = Online(broker.url)
        with open_registry(host.home / "registry.db") as reg:
            t0 = time.monotonic()
            with start_sim_fleet(options, reg, host.root) as fleet:
                lower_priority(fleet.pids, SIM_NICE)
                online.wait(fleet.device_ids, 900)
                online.close()
                results["fleet_online_s"] = time.monotonic() - t0
                _note(f"{devices} simulated devices online in {results['fleet_online_s']:.1f} s")
                ids = fleet.device_ids
                base = baseline_fan_out(broker.url, host.home, reg, ids, bundles[1])
                results["baseline"] = base
                _note(f"baseline deploy_many v1: {base}")
                report, timing = run_rollout(broker.url, host.home, reg, ids, bundles[2], policy(0.05))
                results["rollout"] = case_rollout(report, timing, fleet)
                base_p99 = {e.device_id: e.p99_ms for e in report.devices if e.p99_ms is not None}
                _note(f"rollout v2: {_brief(results['rollout'])}")
                if wanted >= 1:
                    report, timing = run_rollout(broker.url, host.home, reg, ids, bundles[3], policy(FAIL_THRESHOLD))
                    results["rollout-abort"] = case_abort(report, timing, fleet)
                    _note(f"rollout v3, failures: {_brief(results['rollout-abort'])}")
                if wanted >= 2:
                    report, timing = run_rollout(broker.url, host.home, reg, ids, bundles[4], policy(0.05))
                    results["rollout-health"] = case_health(report, timing, fleet, base_p99)
                    _note(f"rollout v4, latency: {_brief(results['rollout-health'])}")
    finally:
        broker.stop()
    return results, rows(results)


def _brief(case: dict[str, Any]) -> str:
    keys = ("status", "reason", "highest_wave_started", "states", "wall_s", "host_cpu_s", "goals_met")
    return json.dumps({k: case.get(k) for k in keys}, default=str)


def rows(results: dict[str, Any]) -> list[list[Any]]:
    """Table rows: measure, edge-sdk, baseline (same run), ratio, goal."""
    out: list[list[Any]] = []
    base = results.get("baseline")
    a = results.get("rollout")
    if base is None or a is None:
        return out
    n = results["devices"]
    out.append(
        [f"rollout v2 to {n}: wall s", f"{a['wall_s']:.1f}", f"deploy_many {base['wall_s']:.1f}",
         f"{a['wall_s'] / base['wall_s']:.2f}", f"completes: {a['status']}"]
    )  # fmt: skip
    out.append(
        [f"rollout v2 to {n}: host CPU s", f"{a['host_cpu_s']:.1f}", f"deploy_many {base['host_cpu_s']:.1f}",
         f"{a['host_cpu_s'] / base['host_cpu_s']:.2f}", f"succeeded {a['states'].get('succeeded', 0)}/{n}"]
    )  # fmt: skip
    for w in a["per_wave"]:
        share = w["devices"] / n
        out.append(
            [f"  wave {w['wave']} ({w['devices']} devices): wall s / host CPU s",
             f"{w['wall_s']:.1f} / {w['host_cpu_s']:.1f}",
             f"deploy_many x{share:.3f}: {base['wall_s'] * share:.1f} / {base['host_cpu_s'] * share:.1f}",
             f"{w['wall_s'] / max(base['wall_s'] * share, 1e-9):.2f}", "context"]
        )  # fmt: skip
    b = results.get("rollout-abort")
    if b is not None:
        out.append(
            [f"abort at {FAIL_THRESHOLD:.0%}, {FAIL_SHARE:.0%} fail from wave {FAIL_FROM_WAVE}: devices started",
             str(b["devices_started"]), f"clean rollout {a['devices_started']}",
             f"{b['devices_started'] / a['devices_started']:.3f}",
             f"aborted in wave {b['highest_wave_started']} ({b['status']}); later waves started: "
             f"{b['later_waves_started']}"]
        )  # fmt: skip
        out.append(
            ["  abort: wall s (to abort + rollback)",
             f"{b.get('to_abort_s', 0):.1f} + {b.get('rollback_wall_s', 0):.1f}",
             f"clean rollout {a['wall_s']:.1f}", f"{b['wall_s'] / a['wall_s']:.2f}",
             f"rolled back {b['installed_then_rolled_back']}/{b['installed']}; not on v2: "
             f"{len(b['devices_not_back_on_v2_on_disk'])} on disk, {len(b['devices_not_back_on_v2_heard'])} heard"]
        )  # fmt: skip
        out.append(
            ["  abort: host CPU s", f"{b['host_cpu_s']:.1f}", f"clean rollout {a['host_cpu_s']:.1f}",
             f"{b['host_cpu_s'] / a['host_cpu_s']:.2f}", f"goals met: {b['goals_met']}"]
        )  # fmt: skip
    c = results.get("rollout-health")
    if c is not None:
        out.append(
            [f"health gate, {SLOW_SHARE:.0%} at {SLOW_FACTOR:g}x p99: devices started", str(c["devices_started"]),
             f"clean rollout {a['devices_started']}", f"{c['devices_started'] / a['devices_started']:.3f}",
             f"{c['status']} in wave {c['highest_wave_started']}"]
        )  # fmt: skip
        out.append(
            ["  health gate: regressed started / failed by gate",
             f"{c['regressed_started']} / {c['failed_by_health_gate']}",
             "-", "-", f"others failed: {len(c['gate_failures_not_regressed'])}; goals met: {c['goals_met']}"]
        )  # fmt: skip
        out.append(
            ["  health gate: wall s", f"{c['wall_s']:.1f}", f"clean rollout {a['wall_s']:.1f}",
             f"{c['wall_s'] / a['wall_s']:.2f}", "context"]
        )  # fmt: skip
    return out


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices")
    parser.add_argument("--per-process", type=int, default=100, help="simulated devices per OS process")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.per_process = 200, 100
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown or not cases:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}" if unknown else "no case given")
    with tempfile.TemporaryDirectory(prefix="edge-rollout-bench-") as tmp:
        results, table = run(cases, args.devices, args.per_process, Path(tmp))
    print(f"rollouts to {args.devices} simulated devices, 1 MB bundle, canary 1% then waves doubling, Mosquitto")
    print_table(["measure", "edge-sdk", "baseline (same run)", "ratio", "goal"], table)
    path = write_results("rollouts", results, args.json_out)
    print(f"wrote {path}")
    missed = [c for c in CASES if c in results and not results[c]["goals_met"]]
    if missed:
        print(f"GOALS NOT MET: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
