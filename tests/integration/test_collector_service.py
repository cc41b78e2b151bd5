"""`edgectl collect` against a real Mosquitto, real agents and PostgreSQL (127.0.0.1:5432).

Each test gets a fresh PostgreSQL schema. Collectors run as real `edgectl collect`
processes; one is SIGKILLed mid-stream. The stream of signed reports comes from enrolled
device keys (tests/report_stream.py); real agents supply status and install events.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from harness import BIN, Host
from json_schemas import validate_output
from report_stream import enroll_devices, publish_at_rate, publisher, reporting_devices

from host_tools.fleet.registry import Registry, open_registry

ADMIN_URL = os.environ.get("EDGE_SDK_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/test"
#: A broker that queues without bound for a collector that is away (Mosquitto's default is 1,000).
UNBOUNDED_QUEUES = ("max_queued_messages 0",)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL server; dropped afterwards."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in ADMIN_URL else "?"
    try:
        yield f"{ADMIN_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class CollectorProcess:
    """One `edgectl collect` process, its stderr in a file."""

    def __init__(self, host: Host, broker_url: str, registry_url: str, client_id: str, *extra: str) -> None:
        self.args = [
            str(BIN / "edgectl"), "--registry", registry_url, "collect", "--broker", broker_url,
            "--client-id", client_id, "--every", "0.2", "--json", *extra,
        ]  # fmt: skip
        self.env = dict(os.environ, EDGE_SDK_HOME=str(host.home))
        self.env.pop("EDGE_SDK_BROKER", None)
        self.log_path = host.home.parent / f"collect-{client_id}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self) -> CollectorProcess:
        self.starts += 1
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env)
        _until(lambda: self.log().count("collect: ") >= self.starts, 20, "the collector to subscribe")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.communicate(timeout=10)

    def stop(self) -> tuple[int, dict[str, int]]:
        """SIGTERM; the exit code and the final counts (--json)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        if not out.strip():
            return self.proc.returncode, {}
        return self.proc.returncode, validate_output(self.args[1:], out)  # the counts meet collect's schema

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def collectors(host: Host) -> Iterator[Callable[..., CollectorProcess]]:
    made: list[CollectorProcess] = []

    def make(broker_url: str, registry_url: str, client_id: str, *extra: str) -> CollectorProcess:
        made.append(CollectorProcess(host, broker_url, registry_url, client_id, *extra))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _metrics_keys(reg: Registry) -> list[tuple[str, float]]:
    rows = reg._conn.execute("SELECT device_id, report_ts FROM metrics").fetchall()
    return sorted((str(d), float(ts)) for d, ts in rows)


def test_two_collectors_split_the_stream_and_a_killed_one_loses_nothing(
    start_mosquitto, collectors, start_agent, host, pg_url
) -> None:
    broker = start_mosquitto(extra_config=UNBOUNDED_QUEUES)
    devices = reporting_devices(20, "stream")
    with open_registry(pg_url) as reg:
        enroll_devices(reg, devices)
    agent = start_agent(broker.url, "real-1", host.root, enroll_key=False, wait=False)
    with open_registry(pg_url) as reg:
        from edge_sdk.trust import PublicKey

        reg.enroll(agent.device_id, PublicKey.from_pem(agent.wait_for_key()).raw.hex(), time.time())
    first = collectors(broker.url, pg_url, "collect-a", "--group", "fleet").start()
    second = collectors(broker.url, pg_url, "collect-b", "--group", "fleet").start()

    killed: list[float] = []

    def kill_and_restart(elapsed: float) -> None:
        if elapsed >= 2.0 and not killed:
            first.kill()  # SIGKILL mid-stream: its unacknowledged messages stay in its session
            killed.append(elapsed)
        elif killed and len(killed) == 1 and elapsed >= 3.5:
            first.start()
            killed.append(elapsed)

    client = publisher(broker.url, "stream-publisher")
    try:
        published = publish_at_rate(client, devices, rate_hz=10, duration_s=6, on_tick=kill_and_restart)
    finally:
        client.close()
    assert len(killed) == 2

    with open_registry(pg_url) as reg:
        _until(lambda: len(_metrics_keys(reg)) >= published, 30, f"{published} reports in the registry")
        time.sleep(1.0)  # anything counted twice would land by now
        keys = _metrics_keys(reg)
        real = reg.get_device(agent.device_id)
    expected = sorted((d.device_id, ts) for d in devices for ts in d.sent)
    assert len(keys) == published == len(set(keys)) == 20 * 60  # 0 lost, 0 twice
    assert keys == expected
    assert real is not None and real.status == "online"  # a real agent's status, device id from the topic

    codes = [first.stop(), second.stop()]
    assert [code for code, _ in codes] == [0, 0]
    counts = [c for _, c in codes]
    assert all(c["stored"] > 0 for c in counts)  # both carried part of the stream
    assert "lost the broker" not in second.log()


def test_a_restarted_collector_loses_nothing_the_broker_queued(start_mosquitto, collectors, pg_url) -> None:
    broker = start_mosquitto(extra_config=UNBOUNDED_QUEUES)
    devices = reporting_devices(10, "queued")
    with open_registry(pg_url) as reg:
        enroll_devices(reg, devices)
    collector = collectors(broker.url, pg_url, "collect-alone").start()
    code, _ = collector.stop()  # a clean stop keeps the session: the broker queues for it
    assert code == 0

    client = publisher(broker.url, "queued-publisher")
    try:
        published = publish_at_rate(client, devices, rate_hz=50, duration_s=1)
    finally:
        client.close()
    with open_registry(pg_url) as reg:
        assert _metrics_keys(reg) == []  # nobody listened
        collector.start()
        _until(lambda: len(_metrics_keys(reg)) >= published, 30, f"{published} queued reports")
        keys = _metrics_keys(reg)
    assert keys == sorted((d.device_id, ts) for d in devices for ts in d.sent) and len(keys) == published == 500
    code, counts = collector.stop()
    assert code == 0 and counts["stored"] == published and counts["dropped"] == 0


def test_a_deferred_install_that_lands_later_updates_its_deployment_row(
    mosquitto, collectors, start_agent, host, tiny_model, pg_url, tmp_path
) -> None:
    from edge_sdk.trust import PublicKey

    hold = tmp_path / "hold"
    hold.write_text("in flight\n")
    agent = start_agent(
        mosquitto.url, "held-1", host.root, "--update-gate-file", str(hold), "--update-gate-retry", "0.3",
        enroll_key=False, wait=False,
    )  # fmt: skip
    with open_registry(pg_url) as reg:
        reg.enroll(agent.device_id, PublicKey.from_pem(agent.wait_for_key()).raw.hex(), time.time())
    collector = collectors(mosquitto.url, pg_url, "collect-deploys").start()
    bundle = tmp_path / "held.edge"
    packed = host.run(
        "pack", str(tiny_model.path), "-o", str(bundle), "--name", "held", "--version", "1",
        "--sample", str(tiny_model.sample),
    )  # fmt: skip
    assert packed.code == 0, packed.stderr
    deployed = host.run(
        "--registry", pg_url, "deploy", str(bundle), "--device", agent.device_id, "--broker", mosquitto.url,
        "--runs", "10", "--warmup", "1", "--json",
    )  # fmt: skip
    assert deployed.code == 0 and deployed.json()["state"] == "deferred", deployed.stderr

    with open_registry(pg_url) as reg:
        (row,) = reg.list_deployments(agent.device_id)
        assert row.state == "deferred" and row.transfer_id
        hold.unlink()  # the gate opens after `edgectl deploy` ended: only the collector hears the install
        _until(
            lambda: reg.list_deployments(agent.device_id)[0].state == "installed", 30, "the deployment row to follow"
        )
        (row,) = reg.list_deployments(agent.device_id)
        assert row.finished_at is not None and row.finished_at >= row.started_at
        assert reg.count_events(agent.device_id) >= 2  # deferred, installed (and what came before)
        device = reg.get_device(agent.device_id)
    assert device is not None and [(b.name, b.version) for b in device.active_bundles or ()] == [("held", 1)]
    assert collector.stop()[0] == 0


def test_two_collectors_writing_the_same_devices_in_opposite_orders_do_not_deadlock(pg_url) -> None:
    """Each collector's batch holds heartbeats of devices a and b, in opposite orders (real agents'
    messages come in any order). Each transaction writes its first row, waits up to 1 s for the
    other to have written its first, then goes on: written in arrival order, the two would lock
    a and b in opposite orders and PostgreSQL would abort one as a deadlock."""
    import threading

    from edge_sdk.protocol import Heartbeat
    from host_tools.fleet.collector import record_messages

    now = time.time()
    with open_registry(pg_url) as reg:
        reg.ensure_schema()
        for d in ("dev-a", "dev-b"):
            reg.record_heartbeat(d, "mqtt://127.0.0.1:1", now, 60.0)
    firsts = [threading.Event(), threading.Event()]
    errors: list[BaseException] = []

    def collector(i: int, order: list[str]) -> None:
        try:
            with open_registry(pg_url) as reg:
                original = reg.record_heartbeat
                calls = [0]

                def record(*args: object) -> None:
                    original(*args)  # type: ignore[arg-type]
                    calls[0] += 1
                    if calls[0] == 1:
                        firsts[i].set()
                        firsts[1 - i].wait(1.0)

                reg.record_heartbeat = record  # type: ignore[method-assign]
                with reg.batch():
                    record_messages(reg, [Heartbeat(d, now + 1, 60.0) for d in order], now + 1, "mqtt://127.0.0.1:1")
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=collector, args=(0, ["dev-a", "dev-b"])),
        threading.Thread(target=collector, args=(1, ["dev-b", "dev-a"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
