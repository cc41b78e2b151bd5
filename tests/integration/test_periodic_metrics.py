"""Periodic metrics reports from a real agent, through a real Mosquitto and `edgectl collect`, into SQLite.

An `edge-agent run --metrics-every 1` process installs a bundle, then measures it again every
second; a real `edgectl collect` process stores what it publishes in the operator's SQLite
registry. Each periodic report is a row of its own, marked ``mode: periodic`` beside the
install's report (no mode); a periodic report the broker delivers a second time (the same
signed bytes) is still one row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import BIN
from taps import BrokerTap

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import DeviceTopics
from host_tools.fleet.registry import Registry, open_registry

pytestmark = pytest.mark.integration

DEVICE = "tele-1"


def _rows(reg: Registry) -> list[tuple[float, dict]]:
    rows = reg._conn.execute("SELECT report_ts, report FROM metrics WHERE device_id = ?", (DEVICE,)).fetchall()
    return sorted((float(ts), json.loads(report)) for ts, report in rows)


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _periodic(rows: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    return [(ts, r) for ts, r in rows if r.get("mode") == "periodic"]


def test_periodic_reports_of_a_real_agent_are_rows_of_their_own_and_a_repeat_is_one(
    mosquitto, start_agent, host, tiny_model, tmp_path: Path
) -> None:
    agent = start_agent(mosquitto.url, DEVICE, host.root, "--metrics-every", "1", "--metrics-runs", "3")
    registry = host.home / "registry.db"
    with open_registry(registry) as reg:
        reg.ensure_schema()
    payloads: dict[float, bytes] = {}
    lock = threading.Lock()

    def keep(topic: str, payload: bytes) -> None:
        from harness import read_device_message

        msg = read_device_message(payload)
        with lock:
            payloads[msg.ts] = payload  # type: ignore[attr-defined]

    log_path = tmp_path / "collect.log"
    argv = [str(BIN / "edgectl"), "--registry", str(registry), "collect", "--broker", mosquitto.url]
    argv += ["--client-id", "collect-tele", "--every", "0.2", "--json"]
    env = host.env()
    with open(log_path, "w") as log, BrokerTap(mosquitto.url, (DeviceTopics(DEVICE).metrics,), keep):
        collector = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            _until(lambda: "collect: " in log_path.read_text(), 30, "the collector to subscribe")
            bundle = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "tiny.edge", "tiny", 1)
            installed = host.deploy_metrics(bundle, mosquitto.url, DEVICE, 5, 1)
            assert installed["bundle_version"] == 1
            with open_registry(registry) as reg:
                _until(lambda: len(_periodic(_rows(reg))) >= 4, 60, "4 periodic reports in the registry")
                rows = _rows(reg)
                periodic = _periodic(rows)
                after_install = [r for _, r in rows if r["command_id"]]
                assert len(after_install) == 1 and "mode" not in after_install[0]
                assert all(r["command_id"] == "" and r["every_s"] == 1.0 for _, r in periodic)
                assert all(r["bundle_name"] == "tiny" and r["bundle_version"] == 1 for _, r in periodic)
                assert all(r["latency"]["count"] == 3 and r["latency"]["p50_ms"] > 0 for _, r in periodic)
                times = [ts for ts, _ in periodic]
                assert len(set(times)) == len(times)  # each a row of its own
                # At most one a second: each report is taken within its own round's second (rounds keep
                # their phase; a round later than the next one's start is dropped), so n reports span
                # at least n - 2 seconds (less the time a measurement takes), however late the worker gets to each.
                assert times[-1] - times[0] > len(times) - 2.5
                # The same signed report again, as a broker redelivers it after a collector died: one row.
                again_ts = times[1]
                with lock:
                    payload = payloads[again_ts]
                client = MqttClient(mosquitto.url, MqttOptions(client_id="tele-again"))
                client.connect()
                try:
                    client.publish(DeviceTopics(DEVICE).metrics, payload, qos=1).wait(10)
                finally:
                    client.close()
                count_before = len(_periodic(_rows(reg)))
                _until(lambda: len(_periodic(_rows(reg))) >= count_before + 2, 30, "two more periodic reports")
                assert [ts for ts, _ in _rows(reg)].count(again_ts) == 1
        finally:
            collector.send_signal(signal.SIGTERM)
            out, _ = collector.communicate(timeout=30)
    assert collector.returncode == 0, log_path.read_text()[-2000:]
    assert json.loads(out)["stored"] >= 6
    assert agent.alive and "periodic measurement" not in agent.log()
    assert os.path.getsize(registry) > 0
