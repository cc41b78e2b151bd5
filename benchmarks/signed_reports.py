"""Host verification of signed device reports per second, beside decoding the same reports unsigned.

Every message a device sends is signed by its own Ed25519 key (edge_sdk.trust.device); the
host verifies each one before it believes it (host_tools.fleet.enrolment.ReportGate: parse,
signature, device id from the topic, sequence, time, then decode the message inside). This
measures that on one core, single-threaded, against the baseline of decoding the same
reports without signatures, in the same run, in alternating rounds.

The reports are a realistic mix from a fleet of devices: installed / accepted events and
metrics reports with latency, memory, CPU and power, as the agent sends them.

Goal: at least 5,000 verified reports per second on one core.

Usage::

    .venv/bin/python benchmarks/signed_reports.py [--reports 20000] [--devices 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import add_common_args, print_table, write_results

from edge_sdk.metrics import CpuMeasurement, LatencyStats, ModelMemory, PowerMeasurement
from edge_sdk.protocol import DeviceTopics, Event, EventKind, MetricsReport, decode, encode, seal
from edge_sdk.trust import SigningKey
from host_tools.fleet.enrolment import ReportGate, Verified
from host_tools.fleet.registry import EnrolmentRecord

GOAL_PER_S = 5000.0


def _reports(
    devices: int, count: int, now: float
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], list[EnrolmentRecord]]:
    """``count`` reports from ``devices`` devices: (topic, unsigned bytes), (topic, signed bytes), the enrolments."""
    keys = {f"bench-{i:04d}": SigningKey.generate() for i in range(devices)}
    enrolments = [EnrolmentRecord(d, k.public_key.raw.hex(), "approved", 1.0, 1.0) for d, k in keys.items()]
    plain: list[tuple[str, bytes]] = []
    signed: list[tuple[str, bytes]] = []
    ids = list(keys)
    for n in range(count):
        device = ids[n % devices]
        topics = DeviceTopics(device)
        seq = n // devices + 1
        msg: Event | MetricsReport
        if n % 3 == 2:
            msg = MetricsReport(
                device, "digits", 3, "onnxruntime", "int8", now, command_id=f"{n:032x}", threads=2,
                providers=("CPUExecutionProvider",),
                latency=LatencyStats(200, 1.3, 0.2, 1.0, 2.5, 1.2, 1.6, 2.4, 769.2),
                memory=ModelMemory(10 << 20, 12 << 20, 2 << 20, 12 << 20, 13 << 20, 13 << 20, None, 40),
                cpu=CpuMeasurement.from_deltas(2.0, 1.0, 4),
                power=PowerMeasurement(6.0, 2.0, 3.0, "estimate:generic", True, 0.1),
            )  # fmt: skip
            topic = topics.metrics
        else:
            kind = EventKind.INSTALLED if n % 3 else EventKind.ACCEPTED
            msg = Event(device, kind, now, command_id=f"{n:032x}", transfer_id=f"{n + 1:032x}", detail={"slot": "v3"})
            topic = topics.events
        plain.append((topic, encode(msg)))
        signed.append((topic, seal(msg, keys[device], seq, now)))
    return plain, signed, enrolments


def _timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Reports per second of one run of ``fn`` (which returns how many reports it handled)."""
    started = time.perf_counter()
    handled = fn()
    return handled / (time.perf_counter() - started), handled


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=20000, help="reports per round")
    parser.add_argument("--devices", type=int, default=100, help="devices they come from")
    parser.add_argument("--rounds", type=int, default=5)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.reports, args.devices, args.rounds = 600, 10, 2
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    now = time.time()
    plain, signed, enrolments = _reports(args.devices, args.reports, now)

    def decode_plain() -> int:
        return sum(1 for _topic, payload in plain if decode(payload) is not None)

    key = SigningKey.generate()
    raw = [(key.sign(payload).sig, payload) for _topic, payload in plain]

    def ed25519_alone() -> int:
        return sum(1 for sig, data in raw if key.public_key.verifies(sig, data))

    def verify_signed() -> int:
        gate = ReportGate(enrolments)  # a fresh gate each round: every sequence starts again
        return sum(1 for topic, payload in signed if isinstance(gate.check(topic, payload, now), Verified))

    runs: dict[str, list[float]] = {"decode": [], "verify": [], "ed25519": []}
    for _ in range(args.rounds):  # alternating rounds, so that other load on the host slows both alike
        rate, _handled = _timed(decode_plain)
        runs["decode"].append(rate)
        rate, handled = _timed(verify_signed)
        if handled != len(signed):
            raise SystemExit(f"only {handled} of {len(signed)} signed reports verified")
        runs["verify"].append(rate)
        runs["ed25519"].append(_timed(ed25519_alone)[0])
    base, verify = statistics.median(runs["decode"]), statistics.median(runs["verify"])
    ed = statistics.median(runs["ed25519"])
    rows = [
        ["decode unsigned (baseline)", f"{base:,.0f}", f"{1e6 / base:.1f}", "1.00"],
        ["verify signed (ReportGate.check)", f"{verify:,.0f}", f"{1e6 / verify:.1f}", f"{base / verify:.2f}"],
        ["(an Ed25519 verify alone, the floor)", f"{ed:,.0f}", f"{1e6 / ed:.1f}", f"{base / ed:.2f}"],
    ]
    print(f"{len(signed)} reports from {args.devices} devices, one core, median of {args.rounds} alternating rounds")
    print_table(["path", "reports/s", "us/report", "x baseline cost"], rows)
    met = verify >= GOAL_PER_S
    print(f"goal >= {GOAL_PER_S:,.0f} verified reports/s on one core: {'met' if met else 'NOT met'}")
    path = write_results(
        "signed_reports",
        {
            "reports": len(signed),
            "devices": args.devices,
            "rounds": args.rounds,
            "decode_unsigned_per_s": base,
            "verify_signed_per_s": verify,
            "ed25519_verify_alone_per_s": ed,
            "cost_ratio": base / verify,
            "goal_per_s": GOAL_PER_S,
            "goal_met": met,
        },
        args.json_out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
