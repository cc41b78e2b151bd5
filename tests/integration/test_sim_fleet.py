"""A simulated fleet: 50 real agents in two processes against a real Mosquitto.

One fleet serves the first two tests (starting it is the slow part): the devices come online
and are listed; a deploy installs on every device without a fault; the devices picked for an
injected install failure, and only those, report a failed install; gate-closed devices
report deferred; a stand-in latency regression shows in the metrics of the devices it hits.
Then link faults on a small fleet of their own, and `edgectl sim` itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, build_tiny_model, read_device_message
from taps import BrokerTap

from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import DeviceStatus, DeviceTopics, MetricsReport
from edge_sdk.simulation import FaultPlan, LatencyModel
from host_tools.fleet.deployer import DeployOptions, deploy_many
from host_tools.fleet.registry import open_registry
from host_tools.fleet.simulator import SimFleet, SimOptions, start_sim_fleet
from host_tools.keys import KeyRing, command_authority

pytestmark = pytest.mark.integration

DEVICES = 50
FAULTS = (
    "install-fail:share=0.1",
    "gate-closed:share=0.1",
    "latency:share=0.2,factor=3,version=1",
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, mosquitto) -> Iterator[tuple[Host, SimFleet, Path]]:
    tmp = tmp_path_factory.mktemp("sim")
    host = Host(tmp / "home")
    assert host.run("keys", "init").code == 0
    model = build_tiny_model(tmp)
    bundle = tmp / "v1.edge"
    host.pack(model.path, model.sample, bundle, "simmodel", 1)
    options = SimOptions(
        devices=DEVICES,
        broker=mosquitto.url,
        root=tmp / "fleet",
        per_process=25,
        faults=FaultPlan.of(FAULTS, seed=11),
        latency=LatencyModel(median_ms=4.0, sigma=0.1),
    )
    with open_registry(host.home / "registry.db") as reg:
        fleet = start_sim_fleet(options, reg, host.root)
    with fleet:
        yield host, fleet, bundle


def _listed(host: Host, url: str, want: int, timeout_s: float = 60.0) -> dict[str, str]:
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = host.run("devices", "--broker", url, "--wait", "2", "--json")
        assert r.code == 0, r.stderr
        states = {d["device_id"]: d["status"] for d in r.json()}  # type: ignore[attr-defined]
        if sum(s == "online" for s in states.values()) >= want:
            break
        time.sleep(1)
    return states


def test_fifty_simulated_devices_in_two_processes_come_online_and_are_listed(sim, mosquitto):
    host, fleet, _ = sim
    assert len(fleet.processes) == 2 and len(set(fleet.pids)) == 2
    states = _listed(host, mosquitto.url, DEVICES)
    assert {d: states.get(d) for d in fleet.device_ids} == dict.fromkeys(fleet.device_ids, "online")
    # each device has its own identity: fifty distinct enrolled keys
    with open_registry(host.home / "registry.db") as reg:
        keys = {e.device_id: e.public_key for e in reg.list_enrolments("approved")}
    assert len({keys[d] for d in fleet.device_ids}) == DEVICES


def test_a_deploy_installs_fails_exactly_where_injected_defers_behind_gates_and_shows_the_regression(sim, mosquitto):
    host, fleet, bundle = sim
    _listed(host, mosquitto.url, DEVICES)
    failing, gated = set(fleet.devices_with("install-fail")), set(fleet.devices_with("gate-closed"))
    slow = set(fleet.devices_with("latency"))
    assert len(failing) == 5 and len(gated) == 5 and len(slow) == 10  # the shares, picked with the seed
    client = MqttClient(mosquitto.url, MqttOptions(client_id="sim-test-host"))
    client.connect()
    try:
        authority = command_authority(KeyRing(host.home / "keys"))
        options = DeployOptions(authority=authority, finish_timeout_s=120)
        with open_registry(host.home / "registry.db") as reg:
            outcomes = {o.device_id: o for o in deploy_many(client, reg, fleet.device_ids, bundle, options)}
    finally:
        client.close()
    states = {d: o.state for d, o in outcomes.items()}
    assert {d for d, s in states.items() if s == "failed"} == failing - gated
    assert {d for d, s in states.items() if s == "deferred"} == gated
    assert {d for d, s in states.items() if s == "installed"} == set(fleet.device_ids) - failing - gated
    for d in failing - gated:
        err = outcomes[d].error
        assert err is not None and err.code == "storage" and "No space left on device" in err.message
        assert outcomes[d].detail.get("name") is None  # no installed event: the failure came from the installer
    p50 = {d: o.metrics.latency.p50_ms for d, o in outcomes.items() if o.metrics is not None and o.metrics.latency}
    assert all(outcomes[d].metrics.runtime == "simulated" for d in p50)  # type: ignore[union-attr]
    regressed = [p50[d] for d in slow if d in p50]
    plain = [p50[d] for d in set(p50) - slow]
    assert regressed and plain
    assert min(regressed) > 2 * max(plain), (regressed, plain)


def test_a_cut_link_and_a_switched_off_device_go_offline_and_come_back_and_a_slow_link_still_connects(
    tmp_path: Path, mosquitto
):
    host = Host(tmp_path / "home")
    assert host.run("keys", "init").code == 0
    seen: dict[str, list[str]] = {}

    def record(topic: str, payload: bytes) -> None:
        msg = read_device_message(payload)
        if isinstance(msg, DeviceStatus) and (not seen.get(msg.device_id) or seen[msg.device_id][-1] != msg.state):
            seen.setdefault(msg.device_id, []).append(msg.state)

    options = SimOptions(
        devices=3,
        broker=mosquitto.url,
        root=tmp_path / "fleet",
        per_process=3,
        id_prefix="link",
        faults=FaultPlan.of(
            [
                "drop-link:devices=link-00000,after=8,every=120,for=6",
                "offline:devices=link-00001,after=8,every=120,for=6",
                "slow-link:devices=link-00002,rate=20000",
            ]
        ),
    )
    with (
        BrokerTap(mosquitto.url, ["edge/v1/devices/+/status"], record),
        open_registry(host.home / "registry.db") as reg,
        start_sim_fleet(options, reg, host.root) as fleet,
    ):
        deadline = time.monotonic() + 60
        want = {"link-00000": ["online", "offline", "online"], "link-00001": ["online", "offline", "online"]}
        while time.monotonic() < deadline and any(seen.get(d) != w for d, w in want.items()):
            time.sleep(0.2)
        assert fleet.device_ids == ["link-00000", "link-00001", "link-00002"]
        heard = {d: list(states) for d, states in seen.items()}  # before the fleet stops (each says goodbye)
    assert heard.get("link-00000") == ["online", "offline", "online"], heard
    assert heard.get("link-00001") == ["online", "offline", "online"], heard
    assert heard.get("link-00002") == ["online"], heard  # through the throttled proxy, never cut


def test_simulated_devices_publish_periodic_metrics_reports_of_their_active_bundle(tmp_path: Path, mosquitto):
    host = Host(tmp_path / "home")
    assert host.run("keys", "init").code == 0
    model = build_tiny_model(tmp_path)
    bundle = host.pack(model.path, model.sample, tmp_path / "tele.edge", "tele", 1)
    reports: list[MetricsReport] = []

    def record(topic: str, payload: bytes) -> None:
        msg = read_device_message(payload)
        if isinstance(msg, MetricsReport):
            reports.append(msg)

    # Ids of this test's own, and a tap on their topics only: the broker is the session's,
    # and other tests leave retained metrics (forged ones too) on other devices' topics.
    options = SimOptions(
        devices=4, broker=mosquitto.url, root=tmp_path / "fleet", per_process=4, metrics_every_s=1.0, id_prefix="tele"
    )
    client = MqttClient(mosquitto.url, MqttOptions(client_id="sim-tele-host"))
    client.connect()
    with (
        BrokerTap(mosquitto.url, [DeviceTopics(d).metrics for d in options.device_ids], record),
        open_registry(host.home / "registry.db") as reg,
        start_sim_fleet(options, reg, host.root) as fleet,
    ):
        try:
            authority = command_authority(KeyRing(host.home / "keys"))
            outcomes = deploy_many(client, reg, fleet.device_ids, bundle, DeployOptions(authority=authority))
        finally:
            client.close()
        assert {o.state for o in outcomes} == {"installed"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            sum(1 for r in list(reports) if r.device_id == d and r.periodic) >= 3 for d in fleet.device_ids
        ):
            time.sleep(0.2)
    periodic = [r for r in reports if r.periodic]
    for d in fleet.device_ids:
        mine = [r for r in periodic if r.device_id == d]
        assert len(mine) >= 3 and len({r.ts for r in mine}) == len(mine), d
        assert all(r.bundle_name == "tele" and r.runtime == "simulated" and r.command_id == "" for r in mine)
        assert all(r.latency is not None and r.latency.count == 10 for r in mine)


def test_edgectl_sim_runs_for_a_while_and_says_which_devices_each_fault_hits(tmp_path: Path, mosquitto):
    host = Host(tmp_path / "home")
    assert host.run("keys", "init").code == 0
    args = ["sim", "--devices", "4", "--per-process", "2", "--broker", mosquitto.url, "--root", str(tmp_path / "f")]
    r = host.run(
        *args, "--fault", "install-fail:share=0.5", "--seed", "3", "--for", "1", "--json", "--id-prefix", "cli"
    )
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["devices"] == 4 and len(out["processes"]) == 2 and out["simulated_latency"] is True  # type: ignore[index]
    assert len(out["faults"]["install-fail"]) == 2  # type: ignore[index]
    assert out["metrics_every_s"] is None  # type: ignore[index]
    bad = host.run(*args, "--fault", "install-fail:share=2")
    assert bad.code == 2 and "share" in bad.stderr
    r = host.run(*args, "--metrics-every", "2", "--for", "1", "--json", "--id-prefix", "cli")
    assert r.code == 0 and r.json()["metrics_every_s"] == 2.0, r.stderr  # type: ignore[index]
    bad = host.run(*args, "--metrics-every", "0.1")
    assert bad.code == 2 and "--metrics-every must be a number of seconds from 1" in bad.stderr
