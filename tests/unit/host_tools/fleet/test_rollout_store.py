"""Rollouts in the registry, on SQLite and PostgreSQL: a stored plan resumes exactly where it was."""

from __future__ import annotations

import pytest
from test_registry import db, open_db  # noqa: F401 - the registry's fixtures: both backends

from edge_sdk.errors import ConfigError
from host_tools.fleet.registry import Registry
from host_tools.fleet.rollout_plan import (
    Confirmed,
    Failed,
    Installed,
    RolloutPlanner,
    RolloutPolicy,
    Start,
    Target,
    Tick,
)
from host_tools.fleet.rollout_store import RolloutStore

BUNDLE = ("m", 2, "ab" * 32, "/bundles/m-2.edge")


def _plan(n: int = 5) -> RolloutPlanner:
    policy = RolloutPolicy(canary_count=1, canary_share=None, max_p99_ratio=2.0)
    return RolloutPlanner.plan(policy, [Target(f"d{i}", 1, 10.0, 1000, online=i != 3) for i in range(n)], 100.0)


def test_a_saved_rollout_loads_back_as_it_was(db: Registry) -> None:  # noqa: F811
    store = RolloutStore(db)
    planner = _plan()
    record = store.create(planner, bundle=BUNDLE, selector="d0,d1,d2,d3,d4", now=100.0)
    assert (record.bundle_name, record.bundle_version, record.status, record.waves) == ("m", 2, "running", 3)

    starts = planner.accept(Tick(), 101.0)
    store.save(record.id, planner, 101.0)  # before any command goes out
    assert starts and isinstance(starts[-1], Start)
    planner.accept(Installed("d0"), 102.0)
    planner.accept(Confirmed("d0", 12.5, 900), 102.0)
    store.save(record.id, planner, 102.0)
    store.save(record.id, planner, 102.0)  # the same state twice is one row per device

    again, loaded = store.load(record.id)
    assert again.policy == planner.policy and again.wave == planner.progress.wave
    assert list(loaded.devices) == list(planner.devices)  # plan order kept
    assert loaded.devices == planner.devices
    assert loaded.devices["d3"].online is False and loaded.devices["d0"].p99_ms == 12.5
    # the loaded planner goes on exactly as the original would
    assert loaded.accept(Failed("d1", "refused"), 103.0) == planner.accept(Failed("d1", "refused"), 103.0)


def test_a_device_in_flight_when_the_host_died_is_not_started_again(db: Registry) -> None:  # noqa: F811
    store = RolloutStore(db)
    planner = _plan()
    record = store.create(planner, bundle=BUNDLE, selector="x", now=100.0)
    planner.accept(Tick(), 101.0)
    store.save(record.id, planner, 101.0)
    _, resumed = store.load(record.id)  # the process that sent it was killed here
    assert resumed.devices["d0"].state == "in_flight"
    assert not [d for d in resumed.accept(Tick(), 102.0) if isinstance(d, Start)]


def test_requests_are_taken_once_and_unknown_ones_refused(db: Registry) -> None:  # noqa: F811
    store = RolloutStore(db)
    record = store.create(_plan(), bundle=BUNDLE, selector="x", now=100.0)
    assert store.request(record.id, "pause", 101.0).request == "pause"
    assert store.take_request(record.id) == "pause"
    assert store.take_request(record.id) is None
    with pytest.raises(ConfigError):
        store.request(record.id, "explode", 102.0)
    with pytest.raises(ConfigError, match="no rollout 'nope'"):
        store.get("nope")


def test_one_runner_at_a_time_until_its_lease_is_stale(db: Registry) -> None:  # noqa: F811
    store = RolloutStore(db)
    record = store.create(_plan(), bundle=BUNDLE, selector="x", now=100.0)
    assert store.claim(record.id, "host:1", 100.0, stale_s=30)
    assert store.claim(record.id, "host:1", 110.0, stale_s=30)  # renewing
    assert not store.claim(record.id, "host:2", 120.0, stale_s=30)
    assert store.claim(record.id, "host:2", 141.0, stale_s=30)  # the first stopped renewing
    store.release(record.id, "host:2")
    assert store.claim(record.id, "host:3", 142.0, stale_s=30)
    assert [r.id for r in store.list()] == [record.id]
