"""Labels and heartbeats from a real agent through a real Mosquitto into the registry, and what
`edgectl devices` lists from it (the registry only, no broker read):

- the agent's labels and heartbeat interval reach the registry with its signed status, and its
  heartbeats keep `last_heard` moving;
- operator labels override the device's own, and selectors see the result;
- an agent that stops sending heartbeats (stopped, its connection still open: no will) turns
  `stale` within its interval x 3, and `online` again once it sends one.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions
from edge_sdk.protocol import Channel, fleet_filter
from host_tools.fleet.collector import record_message
from host_tools.fleet.enrolment import ReportGate, Verified
from host_tools.fleet.registry import DeviceRecord, Registry, open_registry

pytestmark = pytest.mark.integration


@contextmanager
def _listening(url: str) -> Iterator[MqttClient]:
    client = MqttClient(url, MqttOptions(client_id=f"test-collect-{os.getpid()}"))
    client.connect()
    try:
        client.subscribe(fleet_filter(Channel.STATUS), qos=1)
        client.subscribe(fleet_filter(Channel.HEARTBEAT), qos=1)
        yield client
    finally:
        client.close()


def _collect_until(
    client: MqttClient, reg: Registry, url: str, device_id: str, done: Callable[[DeviceRecord], bool], limit_s: float
) -> DeviceRecord:
    """Record what the broker delivers (verified, as the collector does) until ``done(row)``; bounded in time."""
    gate = ReportGate.from_registry(reg)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            item = client.inbox.get(timeout=0.2)
        except queue.Empty:
            item = None
        if isinstance(item, Incoming):
            verified = gate.check(item.topic, item.payload, time.time())
            if isinstance(verified, Verified):
                record_message(reg, verified.msg, time.time(), url)
            gate.flush(reg, time.time())
        row = reg.get_device(device_id)
        if row is not None and done(row):
            return row
    raise AssertionError(f"the registry did not get there in {limit_s} s: {reg.get_device(device_id)}")


def _listed(host, *args: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    r = host.run("devices", "--json", *args)
    assert r.code == 0, r.stderr
    return {d["device_id"]: d for d in r.json()}


def test_labels_and_heartbeats_reach_the_registry_and_a_silent_agent_turns_stale(host, mosquitto, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(
        mosquitto.url, "dev-live", host.root, "--label", "site=depot-3", "--label", "hw=pi5", "--heartbeat", "1"
    )
    with open_registry(host.home / "registry.db") as reg, _listening(mosquitto.url) as client:
        row = _collect_until(client, reg, mosquitto.url, agent.device_id, lambda r: r.last_heard is not None, 20)
        assert row.labels == {"hw": "pi5", "site": "depot-3"} and row.heartbeat_s == 1.0
        first_heard = row.last_heard
        assert first_heard is not None
        row = _collect_until(
            client, reg, mosquitto.url, agent.device_id, lambda r: (r.last_heard or 0) > first_heard + 1.5, 10
        )

        listed = _listed(host)[agent.device_id]
        assert listed["state"] == "online" and listed["heartbeat_s"] == 1.0
        assert listed["labels"] == {"hw": "pi5", "site": "depot-3"}
        assert listed["label_sources"] == {"hw": "device", "site": "device"}

        r = host.run("devices", "label", agent.device_id, "site=depot-9", "tier=canary")
        assert r.code == 0, r.stderr
        listed = _listed(host, "--select", "site=depot-9,hw=pi5,tier")[agent.device_id]
        assert listed["labels"] == {"hw": "pi5", "site": "depot-9", "tier": "canary"}
        assert listed["label_sources"] == {"hw": "device", "site": "operator", "tier": "operator"}
        assert _listed(host, "--select", "site=depot-3") == {}
        assert host.run("groups", "add", "canaries", "tier=canary").code == 0
        assert set(_listed(host, "--select", "@canaries")) == {agent.device_id}

        # Stopped: no heartbeat, and its connection stays open, so no will is published.
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            stopped_at = time.time()
            _collect_until(client, reg, mosquitto.url, agent.device_id, lambda r: time.time() - stopped_at > 4.0, 10)
            assert _listed(host, "--state", "stale")[agent.device_id]["state"] == "stale"
            assert agent.device_id not in _listed(host, "--state", "online")
            table = host.run("devices")
            assert table.code == 0
            line = next(x for x in table.stdout.splitlines() if x.startswith(agent.device_id))
            assert " stale " in line and "site=depot-9*" in line
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        resumed = time.time()
        _collect_until(client, reg, mosquitto.url, agent.device_id, lambda r: (r.last_heard or 0) > resumed, 20)
        assert _listed(host, "--state", "online")[agent.device_id]["state"] == "online"
