"""The simulated fleet's fault plan and stand-in runtime: pure values, seeded."""

from __future__ import annotations

import random

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.metrics import benchmark
from edge_sdk.runtime import StandInSession
from edge_sdk.simulation import DeviceFaults, Fault, FaultPlan, LatencyModel, parse_fault

FLEET = [f"sim-{i:05d}" for i in range(1000)]


def test_a_share_picks_exactly_that_many_devices_the_same_ones_for_the_same_seed() -> None:
    plan = FaultPlan.of(["install-fail:share=0.05"], seed=3)
    picked = plan.devices_of(0, FLEET)
    assert len(picked) == 50
    assert picked == FaultPlan.of(["install-fail:share=0.05"], seed=3).devices_of(0, list(reversed(FLEET)))
    assert picked != FaultPlan.of(["install-fail:share=0.05"], seed=4).devices_of(0, FLEET)


def test_two_faults_of_one_plan_pick_independently_and_listed_devices_are_added() -> None:
    plan = FaultPlan.of(["gate-closed:share=0.1", "gate-closed:share=0.1,devices=sim-00007+sim-00008"], seed=1)
    first, second = plan.devices_of(0, FLEET), plan.devices_of(1, FLEET)
    assert first != second
    assert {"sim-00007", "sim-00008"} <= second and len(second) <= 102


def test_resolve_gives_every_device_its_faults_and_only_them() -> None:
    plan = FaultPlan.of(["install-fail:share=0.1", "latency:devices=sim-00001,factor=2,version=3"], seed=9)
    resolved = plan.resolve(FLEET)
    assert set(resolved) == set(FLEET)
    failing = {d for d, f in resolved.items() if f.install_fails(0.0)}
    assert failing == plan.devices_of(0, FLEET)
    assert resolved["sim-00001"].factor("latency", 3) == 2.0
    assert resolved["sim-00001"].factor("latency", 2) == 1.0
    assert resolved["sim-00002"].factor("latency", 3) == 1.0


def test_a_share_among_listed_devices_picks_exactly_that_share_of_them_and_nothing_else() -> None:
    wave = FLEET[70:150]  # e.g. the devices of one rollout wave
    among = "+".join(wave)
    plan = FaultPlan.of([f"install-fail:share=0.05,among={among},version=3"], seed=2)
    picked = plan.devices_of(0, FLEET)
    assert len(picked) == 4 and picked <= set(wave)
    assert picked == FaultPlan.of([f"install-fail:share=0.05,among={among}"], seed=2).devices_of(0, FLEET)
    assert picked != FaultPlan.of([f"install-fail:share=0.05,among={among}"], seed=3).devices_of(0, FLEET)
    fault = plan.faults[0]
    assert Fault.from_dict(fault.to_dict()) == fault
    with pytest.raises(ConfigError, match="sim-99999"):
        FaultPlan.of(["install-fail:share=0.5,among=sim-00001+sim-99999"]).resolve(FLEET)
    with pytest.raises(ConfigError, match="give share"):
        parse_fault("install-fail:devices=sim-00001,among=sim-00002")


def test_an_install_failure_for_one_version_fails_only_installs_of_that_version() -> None:
    resolved = FaultPlan.of(["install-fail:devices=sim-00001,version=3"]).resolve(FLEET)
    f = resolved["sim-00001"]
    assert [f.install_fails(0.0, 1, v) for v in (1, 2, 3, 4)] == [False, False, True, False]
    assert not f.install_fails(0.0, 1)  # the version not known: a fault for one version does not apply
    assert DeviceFaults("d", (parse_fault("install-fail:share=1"),)).install_fails(0.0, 1, 7)  # no version: all
    with pytest.raises(ConfigError, match="takes no version"):
        parse_fault("gate-closed:share=1,version=3")


def test_a_listed_device_that_is_not_in_the_fleet_is_refused() -> None:
    with pytest.raises(ConfigError, match="sim-99999"):
        FaultPlan.of(["offline:devices=sim-99999,every=60,for=10"]).resolve(FLEET)


def test_install_failures_start_at_their_time_and_stop_at_until() -> None:
    f = DeviceFaults("d", (parse_fault("install-fail:share=1,after=100,until=200"),))
    assert [f.install_fails(t) for t in (0, 99.9, 100, 199.9, 200)] == [False, False, True, True, False]


def test_install_failures_at_a_rate_fail_about_that_share_of_installs_and_always_the_same_ones() -> None:
    f = DeviceFaults("d", (parse_fault("install-fail:share=1,rate=0.25"),), seed=5)
    answers = [f.install_fails(0.0, attempt) for attempt in range(1, 2001)]
    assert 400 <= sum(answers) <= 600
    assert answers == [f.install_fails(0.0, attempt) for attempt in range(1, 2001)]


def test_periodic_outages_cover_for_s_of_every_period_from_after() -> None:
    f = DeviceFaults("d", (parse_fault("drop-link:share=1,after=10,every=30,for=5"),))
    down = [t for t in range(0, 80) if f.link_down(t)]
    assert down == [10, 11, 12, 13, 14, 40, 41, 42, 43, 44, 70, 71, 72, 73, 74]
    assert not f.offline(11)


def test_the_slowest_active_link_rate_wins_and_a_gate_closes_within_its_window() -> None:
    f = DeviceFaults(
        "d",
        (
            parse_fault("slow-link:share=1,rate=100000"),
            parse_fault("slow-link:share=1,rate=5000,after=50"),
            parse_fault("gate-closed:share=1,until=20"),
        ),
    )
    assert f.link_rate(0) == 100000 and f.link_rate(60) == 5000
    assert f.gate_closed(19) and not f.gate_closed(20)
    assert f.needs_link_proxy and not DeviceFaults("e").needs_link_proxy


@pytest.mark.parametrize(
    "text",
    [
        "meltdown:share=0.1",
        "install-fail",
        "install-fail:share=1.5",
        "slow-link:share=0.1",
        "drop-link:share=0.1,every=10,for=10",
        "latency:share=0.1",
        "gate-closed:share=0.1,factor=2",
        "install-fail:among=sim-00001+sim-00002",
        "install-fail:share=x",
        "install-fail:share",
        "install-fail:share=0.1,after=10,until=5",
    ],
)
def test_a_malformed_fault_is_refused_with_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_fault(text)


def test_faults_travel_as_dicts_unchanged() -> None:
    plan = FaultPlan.of(["offline:share=0.2,every=60,for=10,after=5", "rss:share=0.1,factor=1.5,version=2"], seed=2)
    for faults in plan.resolve(FLEET[:20]).values():
        assert DeviceFaults.from_dict(faults.to_dict()) == faults
    assert Fault.from_dict(parse_fault("slow-link:share=0.5,rate=1000").to_dict()).rate == 1000
    with pytest.raises(ConfigError, match="unknown fault field"):
        Fault.from_dict({"kind": "offline", "share": 0.1, "every_s": 10, "for_s": 1, "colour": "red"})


def test_the_stand_in_session_draws_the_configured_latency_and_scales_it_by_the_factor() -> None:
    model = LatencyModel(median_ms=8.0, sigma=0.2)
    plain = StandInSession(model, "dev:1")
    slow = StandInSession(model, "dev:1", factor=2.0)
    a = benchmark(lambda: plain.run({}), warmup=0, runs=400, clock=plain.clock)
    b = benchmark(lambda: slow.run({}), warmup=0, runs=400, clock=slow.clock)
    assert 7.0 < a.p50_ms < 9.0
    assert b.p50_ms == pytest.approx(2 * a.p50_ms)  # same seed, same draws, twice as long
    assert plain.runtime == plain.providers[0] == "simulated" and plain.inputs() == plain.outputs() == []


def test_a_latency_model_without_spread_always_takes_its_median() -> None:
    assert LatencyModel(median_ms=3.0, sigma=0.0).draw_s(random.Random(1)) == pytest.approx(0.003)
    with pytest.raises(ConfigError):
        LatencyModel(median_ms=0.0)
