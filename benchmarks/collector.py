"""The collector (`edgectl collect`) beside a raw paho subscriber that INSERTs each message.

Two cases, each with our collector and the baseline in the same run, against a real
Mosquitto (queues unbounded) and PostgreSQL (a fresh schema of ``--postgres``):

* ``stream``: ``--devices`` devices publish one signed metrics report each per second for
  ``--seconds`` into two subscribers sharing a subscription group; at half time one of
  the two is SIGKILLed and started again ``--restart-after`` s later (as systemd's
  ``RestartSec`` would). Counted from the rows: reports lost, reports stored more than
  once, and publish -> row latency (the row's ``received_at`` minus the report's ``ts``,
  both the host's clock). Ours are two `edgectl collect` processes; the baseline is two
  paho subscribers with persistent sessions and paho's default acknowledgement on receipt,
  each message INSERTed as it comes (no verification, no key).
* ``burst``: ``--burst`` signed reports queued at the broker for a subscriber that is
  away, then the subscriber starts: ingest rate from its rows' ``received_at`` (first to
  last). Ours verifies each signature, batches and commits before acknowledging.

The devices are simulated: each has its own Ed25519 key, enrolled in the registry, and
signs its reports as the agent does (``tests/report_stream.py``); one connection carries
them all. The real agent publishes metrics only after an install, so it cannot make this
stream.

    python benchmarks/collector.py [--devices 200] [--seconds 60] [--burst 100000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # real broker, report publishers

from _report import EDGECTL, add_common_args, checkout_env, print_table, write_results
from mosquitto import MosquittoProcess, find_mosquitto
from report_stream import enroll_devices, publish_at_rate, publish_burst, publisher, reporting_devices

from host_tools.fleet.registry import open_registry

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
#: The issue's goal for a burst, per collector.
BURST_GOAL_PER_S = 5000
GROUP = "bench"
#: ``--verify-workers`` of our collectors (None: edgectl's default).
VERIFY_WORKERS: int | None = None


# --- the baseline: a raw paho subscriber, one INSERT per message ------------------------


def baseline_subscriber(broker_port: int, pg_url: str, client_id: str, group: str | None) -> None:
    """Run until SIGTERM: paho (persistent session, acknowledgement on receipt) -> queue -> INSERT."""
    import paho.mqtt.client as paho
    import psycopg
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    topic = "edge/v1/devices/+/metrics"
    subscription = f"$share/{group}/{topic}" if group else topic
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(subscription, qos=1)
    client.on_message = lambda _c, _u, m: inbox.put((m.topic, bytes(m.payload)))
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", broker_port, clean_start=False, properties=props)
    client.loop_start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        print("ready", file=sys.stderr, flush=True)
        while not stop.is_set():
            try:
                t, payload = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            body = json.loads(payload)
            conn.execute(
                "INSERT INTO baseline_metrics (device_id, ts, received_at) VALUES (%s, %s, %s)",
                (t.split("/")[3], body["ts"], time.time()),
            )
    client.disconnect()
    client.loop_stop()


# --- processes --------------------------------------------------------------------------


class Subscriber:
    """One subscriber process (ours or the baseline), startable again after a kill."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str, log: Path, began: str | None = None) -> None:
        self.args, self.env, self.ready, self.log, self.began = args, env, ready, log, began
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.ready_after = 0.0

    def start(self, wait: bool = True) -> Subscriber:
        """Start the process; with ``wait``, return once it says it is ready (see :meth:`wait_ready`)."""
        self.starts += 1
        self.started_at, self.ready_after = time.monotonic(), 0.0
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
        if wait:
            self.wait_ready()
        else:  # note when it is ready, without holding up the caller
            threading.Thread(target=self.wait_ready, daemon=True).start()
        return self

    def _ready_now(self) -> bool:
        """Ready since the last start: ``ready`` printed as many times as it started, or, with
        ``began`` (a line each start prints once), ``ready`` printed after the last ``began``."""
        text = self.log.read_text(errors="replace")
        if self.began is None:
            return text.count(self.ready) >= self.starts
        if text.count(self.began) < self.starts:
            return False
        return self.ready in text[text.rindex(self.began) :]

    def wait_ready(self) -> float:
        """Seconds from the last start until the process said it was ready (polled every 20 ms)."""
        assert self.proc is not None
        deadline = time.monotonic() + 120  # a loaded host starts processes slowly
        while not self._ready_now():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[:4]} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        self.ready_after = time.monotonic() - self.started_at
        return self.ready_after

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate()

    def stop(self) -> str:
        """SIGTERM; what it printed on stdout (ours: its final counts as JSON)."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def ours(broker: MosquittoProcess, pg_url: str, client_id: str, group: str | None, work: Path) -> Subscriber:
    args = [*EDGECTL, "--registry", pg_url, "collect", "--broker", broker.url, "--client-id", client_id]
    args += ["--every", "0.1", "--json"] + (["--group", group] if group else [])  # ready: its first progress line
    if VERIFY_WORKERS is not None:
        args += ["--verify-workers", str(VERIFY_WORKERS)]
    env = checkout_env(dict(os.environ, EDGE_SDK_HOME=str(work / "home")), pycache=work / "pycache")
    return Subscriber(args, env, "collect: ", work / f"{client_id}.log", began="edgectl: collecting from")


def baseline(broker: MosquittoProcess, pg_url: str, client_id: str, group: str | None, work: Path) -> Subscriber:
    args = [sys.executable, __file__, "--baseline-subscriber", str(broker.port), pg_url, client_id, group or ""]
    return Subscriber(args, dict(os.environ), "ready", work / f"{client_id}.log")


@contextmanager
def fresh_schema(admin_url: str) -> Iterator[str]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in admin_url else "?"
    url = f"{admin_url}{separator}options=-csearch_path%3D{schema}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE baseline_metrics (device_id TEXT, ts DOUBLE PRECISION, received_at DOUBLE PRECISION)"
        )
    try:
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _rows(pg_url: str, ours_side: bool) -> list[tuple[str, float, float]]:
    import psycopg

    query = (
        "SELECT device_id, report_ts, received_at FROM metrics"
        if ours_side
        else "SELECT device_id, ts, received_at FROM baseline_metrics"
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return [(str(d), float(t), float(r)) for d, t, r in conn.execute(query).fetchall()]


def _wait_rows(
    pg_url: str, ours_side: bool, want: int, quiet_s: float, limit_s: float
) -> list[tuple[str, float, float]]:
    """Rows once ``want`` are there (then ``quiet_s`` more for late repeats), or at ``limit_s``."""
    deadline = time.monotonic() + limit_s
    rows = _rows(pg_url, ours_side)
    while len(rows) < want and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = _rows(pg_url, ours_side)
    time.sleep(quiet_s)
    return _rows(pg_url, ours_side)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- cases ------------------------------------------------------------------------------


def stream_case(
    name: str, make: Callable[..., Subscriber], broker: MosquittoProcess, admin_url: str, args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:  # fmt: skip
    devices = reporting_devices(args.devices, f"s-{name}")
    with fresh_schema(admin_url) as pg_url:
        with open_registry(pg_url) as reg:
            enroll_devices(reg, devices)
        tag = uuid.uuid4().hex[:6]
        group = f"{GROUP}-{tag}"  # a group of its own: a stopped member's session still takes its share
        a = make(broker, pg_url, f"{name}-a-{tag}", group, work).start()
        b = make(broker, pg_url, f"{name}-b-{tag}", group, work).start()
        kill_at, back_at = args.seconds / 2, args.seconds / 2 + args.restart_after
        events: dict[str, float] = {}

        def tick(elapsed: float) -> None:
            if elapsed >= kill_at and "killed" not in events:
                a.kill()
                events["killed"] = time.time()
            elif "killed" in events and "restarted" not in events and elapsed >= back_at:
                a.start(wait=False)  # the stream goes on while it starts, as it would in the field
                events["restarted"] = time.time()

        client = publisher(broker.url, f"{name}-pub-{tag}")
        try:
            published = publish_at_rate(client, devices, 1.0, args.seconds, on_tick=tick)
        finally:
            client.close()
        deadline = time.monotonic() + 120
        while a.starts == 2 and a.ready_after == 0.0 and time.monotonic() < deadline:
            time.sleep(0.05)  # the watcher thread notes when the restarted one was ready
        start_up_s = a.ready_after
        rows = _wait_rows(pg_url, name == "ours", published, quiet_s=2.0, limit_s=30)
        a.stop()
        b.stop()
    sent = {(d.device_id, ts) for d in devices for ts in d.sent}
    keys = [(d, t) for d, t, _ in rows]
    stored = set(keys) & sent
    latencies = [r - t for d, t, r in rows if (d, t) in sent]
    outside = [
        r - t for d, t, r in rows if (d, t) in sent and not (events["killed"] - 1 <= t <= events["restarted"] + 5)
    ]
    return {
        "subscriber": name,
        "published": published,
        "rows": len(rows),
        "lost": len(sent - stored),
        "twice": len(keys) - len(set(keys)),
        "p50_s": _pct(latencies, 0.50),
        "p99_s": _pct(latencies, 0.99),
        "max_s": max(latencies) if latencies else None,
        "p99_outside_outage_s": _pct(outside, 0.99),
        "outage_s": round(events["restarted"] - events["killed"], 2),
        "restart_after_s": args.restart_after,
        "start_up_s": round(start_up_s, 2),
    }


def burst_case(broker: MosquittoProcess, admin_url: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    devices = reporting_devices(200, "burst")
    out = []
    with fresh_schema(admin_url) as pg_url:
        with open_registry(pg_url) as reg:
            enroll_devices(reg, devices)
        tag = uuid.uuid4().hex[:6]
        subs = {"ours": ours(broker, pg_url, f"burst-ours-{tag}", None, work),
                "baseline": baseline(broker, pg_url, f"burst-base-{tag}", None, work)}  # fmt: skip
        for s in subs.values():  # make the sessions, then go away: the broker queues for both
            s.start()
            s.stop()
        client = publisher(broker.url, f"burst-pub-{tag}")
        try:
            t0 = time.monotonic()
            published = publish_burst(client, devices, args.burst)
            publish_s = time.monotonic() - t0
        finally:
            client.close()
        for name, s in subs.items():
            s.start()
            rows = _wait_rows(pg_url, name == "ours", published, quiet_s=0.5, limit_s=args.wait)
            printed = s.stop()
            if printed.strip():
                print(f"{name}: {printed.strip()}")
            received = sorted(r for _, _, r in rows)
            span = received[-1] - received[0] if len(received) > 1 else None
            out.append({
                "subscriber": name, "queued": published, "rows": len(rows), "ingest_s": span,
                "per_s": round(len(rows) / span) if span else None, "publish_s": round(publish_s, 1),
            })  # fmt: skip
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-subscriber":
        port, pg_url, client_id, group = sys.argv[2:6]
        baseline_subscriber(int(port), pg_url, client_id, group or None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200, help="simulated devices in the stream")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the stream")
    parser.add_argument(
        "--restart-after", type=float, default=0.25, help="seconds before the killed one restarts (RestartSec)"
    )
    parser.add_argument("--burst", type=int, default=100_000, help="reports queued for the burst")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL server (a schema is made and dropped)")
    parser.add_argument("--cases", default="stream,burst")
    parser.add_argument("--wait", type=float, default=120.0, help="most seconds to wait for the burst's rows")
    parser.add_argument("--verify-workers", type=int, help="our collectors' --verify-workers (default: edgectl's)")
    add_common_args(parser)
    args = parser.parse_args()
    global VERIFY_WORKERS
    VERIFY_WORKERS = args.verify_workers
    if args.quick:
        args.devices, args.seconds, args.burst = 20, 10.0, 5000
    results: dict[str, Any] = {
        "devices": args.devices,
        "seconds": args.seconds,
        "burst": args.burst,
        "verify_workers": args.verify_workers,
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        work = Path(tmp)
        broker = MosquittoProcess(
            work / "mosquitto", binary=find_mosquitto(), extra_config=("max_queued_messages 1000000",)
        ).start()
        try:
            if "stream" in args.cases:
                results["stream"] = [
                    stream_case(name, make, broker, args.postgres, args, work)
                    for name, make in (("ours", ours), ("baseline", baseline))
                ]
                print(f"\nstream: {args.devices} simulated devices at 1 Hz for {args.seconds:g} s, "
                      f"two subscribers sharing a group, one SIGKILLed at half time")  # fmt: skip
                print_table(
                    ["subscriber", "published", "lost", "twice", "p50 s", "p99 s", "max s", "p99 outside outage s",
                     "restart after s", "start-up s"],
                    [[r["subscriber"], r["published"], r["lost"], r["twice"], _r(r["p50_s"]), _r(r["p99_s"]),
                      _r(r["max_s"]), _r(r["p99_outside_outage_s"]), r["restart_after_s"], r["start_up_s"]]
                     for r in results["stream"]],
                )  # fmt: skip
            if "burst" in args.cases:
                results["burst_rows"] = burst_case(broker, args.postgres, args, work)
                print(f"\nburst: {args.burst} reports queued for one subscriber that was away")
                ours_rate = results["burst_rows"][0]["per_s"]
                print_table(
                    ["subscriber", "rows", "ingest s", "reports/s", "ratio to baseline"],
                    [[r["subscriber"], r["rows"], _r(r["ingest_s"]), r["per_s"],
                      _r(ours_rate / r["per_s"]) if r["per_s"] and ours_rate else None]
                     for r in results["burst_rows"]],
                )  # fmt: skip
                ceiling = results["signature_checks_per_core_s"] = signature_checks_per_s()
                cores = os.cpu_count() or 1
                verdict = "met" if (ours_rate or 0) >= BURST_GOAL_PER_S else "NOT MET"
                print(
                    f"goal >= {BURST_GOAL_PER_S}/s per collector: {verdict}"
                    f"\none core here checks {ceiling} device signatures/s (Ed25519, measured now): "
                    f"{BURST_GOAL_PER_S}/s takes {BURST_GOAL_PER_S / ceiling:.2f} of this machine's {cores} cores "
                    "for the signatures alone, beside the broker, the database and the collector's own work"
                )
        finally:
            broker.stop()
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at the start {results['load_average_start']}, at the end {results['load_average_end']}")
    print(f"\nwrote {write_results('collector', results, args.json_out)}")


def signature_checks_per_s(n: int = 2000) -> int:
    """Device signatures one core checks per second here: the bound a burst meets first."""
    from edge_sdk.protocol import SignedReport, decode, signature_input
    from edge_sdk.trust import check_device_signatures

    devices = reporting_devices(20, "ceiling")
    checks = []
    for i in range(n):
        device = devices[i % len(devices)]
        signed = decode(device.report(time.time()))
        assert isinstance(signed, SignedReport)
        got = signature_input(signed)
        assert got is not None
        checks.append((device.key.public_key.raw, *got))
    started = time.process_time()
    assert all(check_device_signatures(checks))
    return round(n / (time.process_time() - started))


def _r(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


if __name__ == "__main__":
    main()
