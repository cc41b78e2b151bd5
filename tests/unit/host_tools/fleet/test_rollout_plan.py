"""The rollout planner: every rule of host_tools/fleet/rollout_plan.py, driven by a fleet in memory."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError
from host_tools.fleet.rollout_plan import (
    RETRYABLE_CODES,
    Abort,
    Aborted,
    AdvanceWave,
    Completed,
    Confirmed,
    Decision,
    Deferred,
    Event,
    Failed,
    Installed,
    Joined,
    MaintenanceWindow,
    Observed,
    Offline,
    Online,
    Pause,
    Resume,
    RollBack,
    RolledBack,
    RolloutPlanner,
    RolloutPolicy,
    Start,
    Target,
    Tick,
    TimedOut,
    wave_sizes,
)

BASE_P99 = 10.0
BASE_RSS = 50_000_000

Fate = Callable[[str, int], list[Event]]


def ok(device_id: str, attempt: int) -> list[Event]:
    return [Installed(device_id), Confirmed(device_id, BASE_P99 * 1.1, BASE_RSS)]


def targets(n: int, **kw: object) -> list[Target]:
    return [Target(f"d{i:04d}", 1, BASE_P99, BASE_RSS, **kw) for i in range(n)]  # type: ignore[arg-type]


class Fleet:
    """Answers every Start with each device's fate, and every RollBack with success; records all decisions."""

    def __init__(self, planner: RolloutPlanner, fate: Fate, now: float | None = None) -> None:
        self.planner = planner
        self.fate = fate
        self.now = planner.progress.created_at if now is None else now
        self.decisions: list[Decision] = []
        self.attempts: Counter[str] = Counter()
        self.rolled_back: dict[str, int | None] = {}
        self.hold: set[str] = set()  # devices whose outcome is not told yet

    def feed(self, event: Event) -> list[Decision]:
        todo: deque[Event] = deque([event])
        out: list[Decision] = []
        while todo:
            got = self.planner.accept(todo.popleft(), self.now)
            out.extend(got)
            for d in got:
                if isinstance(d, Start):
                    for device_id in d.device_ids:
                        self.attempts[device_id] += 1
                        if device_id not in self.hold:
                            todo.extend(self.fate(device_id, self.attempts[device_id]))
                elif isinstance(d, RollBack):
                    self.rolled_back[d.device_id] = d.to_version
                    todo.append(RolledBack(d.device_id, True))
        self.decisions.extend(out)
        return out

    def starts(self) -> list[Start]:
        return [d for d in self.decisions if isinstance(d, Start)]


def run(n: int, fate: Fate = ok, **policy: object) -> Fleet:
    planner = RolloutPlanner.plan(RolloutPolicy(**policy), targets(n), 1_000_000.0)  # type: ignore[arg-type]
    fleet = Fleet(planner, fate)
    fleet.feed(Tick())
    return fleet


# --- waves ------------------------------------------------------------------------------------


def test_waves_of_a_canary_share_double():
    assert wave_sizes(1000, RolloutPolicy(canary_share=0.01, wave_factor=2)) == [10, 20, 40, 80, 160, 320, 370]


def test_waves_of_a_fixed_size_after_a_canary_count():
    policy = RolloutPolicy(canary_count=1, canary_share=None, wave_factor=None, wave_size=4)
    assert wave_sizes(10, policy) == [1, 4, 4, 1]


@given(
    total=st.integers(1, 5000),
    share=st.floats(0.001, 1.0),
    factor=st.one_of(st.none(), st.floats(1.0, 4.0)),
    size=st.integers(1, 500),
)
def test_waves_cover_every_device_once(total: int, share: float, factor: float | None, size: int):
    policy = RolloutPolicy(canary_share=share, wave_factor=factor, wave_size=None if factor else size)
    sizes = wave_sizes(total, policy)
    assert sum(sizes) == total and all(s >= 1 for s in sizes)
    assert sizes[0] == min(total, max(1, math.ceil(total * share)))


@pytest.mark.parametrize(
    "bad",
    [
        {"canary_count": 2},  # both a count and the default share
        {"canary_share": 0.0},
        {"wave_size": 3},  # with the default factor
        {"wave_factor": 0.5},
        {"abort_threshold": 1.5},
        {"max_p99_ratio": 0.0},
        {"retries": -1},
        {"device_timeout_s": 0},
    ],
)
def test_a_policy_out_of_range_is_a_config_error(bad: dict[str, object]):
    with pytest.raises(ConfigError):
        RolloutPolicy(**bad)  # type: ignore[arg-type]


def test_a_maintenance_window_wraps_past_midnight():
    w = MaintenanceWindow.parse("22:00-04:30")
    assert str(w) == "22:00-04:30"
    day = 86400 * 20000
    assert w.contains(day + 23 * 3600) and w.contains(day + 4 * 3600) and not w.contains(day + 12 * 3600)
    with pytest.raises(ConfigError):
        MaintenanceWindow.parse("25:00-01:00")


def test_a_policy_survives_its_dict():
    p = RolloutPolicy(canary_count=3, canary_share=None, window=MaintenanceWindow.parse("01:00-02:00"))
    assert RolloutPolicy.from_dict(p.to_dict()) == p


# --- a rollout that goes well -----------------------------------------------------------------


def test_a_rollout_completes_wave_by_wave():
    fleet = run(100, canary_count=1, canary_share=None, wave_factor=None, wave_size=30)
    assert isinstance(fleet.decisions[-1], Completed)
    assert [d.wave for d in fleet.decisions if isinstance(d, AdvanceWave)] == [0, 1, 2, 3, 4]
    assert [len(s.device_ids) for s in fleet.starts()] == [1, 30, 30, 30, 9]
    assert fleet.planner.counts() == {"succeeded": 100}
    assert all(n == 1 for n in fleet.attempts.values())


def test_the_next_wave_waits_for_the_canary():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), targets(10), 0.0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0000"}
    fleet.feed(Tick())
    assert [s.device_ids for s in fleet.starts()] == [("d0000",)]
    fleet.feed(Installed("d0000"))
    assert len(fleet.starts()) == 1  # activated, not yet confirmed: no success yet
    fleet.feed(Confirmed("d0000", BASE_P99, BASE_RSS))
    assert len(fleet.starts()) > 1


def test_a_report_without_activation_is_no_success():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), targets(3), 0.0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0000"}
    fleet.feed(Tick())
    fleet.feed(Confirmed("d0000", BASE_P99, BASE_RSS))
    assert planner.devices["d0000"].state == "in_flight" and len(fleet.starts()) == 1


# --- abort ------------------------------------------------------------------------------------


def test_five_percent_failures_from_wave_3_abort_within_wave_3_at_a_3_percent_threshold():
    sizes = wave_sizes(1000, RolloutPolicy())
    first_of_wave3 = sum(sizes[:3])

    def fate(device_id: str, attempt: int) -> list[Event]:
        i = int(device_id[1:])
        if i >= first_of_wave3 and i % 20 == 0:  # 5% of the devices from wave 3 on
            return [Failed(device_id, "model_load")]
        return ok(device_id, attempt)

    fleet = run(1000, fate, canary_share=0.01, wave_factor=2, abort_threshold=0.03, success_threshold=0.9)
    aborted = [d for d in fleet.decisions if isinstance(d, Aborted)]
    assert len(aborted) == 1 and aborted[0].reason.startswith("wave 3:")
    assert max(s.wave for s in fleet.starts()) == 3  # no later wave started
    assert not [d for d in fleet.decisions if isinstance(d, AdvanceWave) and d.wave > 3]
    succeeded_before = {d for s in fleet.starts() for d in s.device_ids} - {
        d for d, p in fleet.planner.devices.items() if p.state == "failed"
    }
    assert set(fleet.rolled_back) == succeeded_before  # every device that installed goes back...
    assert set(fleet.rolled_back.values()) == {1}  # ... to the version it ran before
    counts = fleet.planner.counts()
    assert counts["rolled_back"] == len(succeeded_before)
    assert counts["skipped"] == 1000 - sum(sizes[:4])
    assert counts["failed"] == sizes[3] // 20  # those in flight at the abort still report
    assert f"{math.floor(0.03 * sizes[3]) + 1} of {sizes[3]} devices failed" in aborted[0].reason


def test_a_2x_p99_regression_on_10_percent_counts_as_failed_and_aborts():
    def fate(device_id: str, attempt: int) -> list[Event]:
        slow = int(device_id[1:]) % 10 == 3
        return [Installed(device_id), Confirmed(device_id, BASE_P99 * (2.0 if slow else 1.0), BASE_RSS)]

    fleet = run(200, fate, canary_count=20, canary_share=None, abort_threshold=0.05, max_p99_ratio=1.5)
    failed = {d: p for d, p in fleet.planner.devices.items() if p.error_code == "health_gate"}
    assert failed and all(int(d[1:]) % 10 == 3 for d in failed)
    assert all(p.state == "failed" for p in failed.values())
    aborted = [d for d in fleet.decisions if isinstance(d, Aborted)]
    assert len(aborted) == 1 and "wave 0" in aborted[0].reason
    assert all(s.wave == 0 for s in fleet.starts())
    assert set(failed) <= set(fleet.rolled_back)  # regressed devices are rolled back too


def test_a_device_regressed_but_reported_after_the_abort_is_still_named_by_the_gate():
    # One wave of four answers at once (as one deploy_many does): d0001's regression aborts
    # the rollout before d0002 (regressed too) and d0003 (fine) are judged.
    def fate(device_id: str, attempt: int) -> list[Event]:
        slow = device_id in ("d0001", "d0002")
        return [Installed(device_id), Confirmed(device_id, BASE_P99 * (2.0 if slow else 1.0), BASE_RSS)]

    fleet = run(4, fate, canary_count=4, canary_share=None, abort_threshold=0.05, max_p99_ratio=1.5)
    devices = fleet.planner.devices
    assert fleet.planner.progress.status == "aborted"
    assert (devices["d0001"].state, devices["d0001"].error_code) == ("failed", "health_gate")
    assert (devices["d0002"].state, devices["d0002"].error_code) == ("rolled_back", "health_gate")
    assert devices["d0002"].p99_ms == BASE_P99 * 2.0
    assert (devices["d0003"].state, devices["d0003"].error_code, devices["d0003"].p99_ms) == (
        "rolled_back",
        None,
        BASE_P99,
    )
    assert Counter(d.device_id for d in fleet.decisions if isinstance(d, RollBack)) == {
        "d0000": 1,
        "d0001": 1,
        "d0002": 1,
        "d0003": 1,
    }


def test_an_rss_regression_counts_as_failed_too():
    def fate(device_id: str, attempt: int) -> list[Event]:
        return [Installed(device_id), Confirmed(device_id, BASE_P99, BASE_RSS * 3)]

    fleet = run(5, fate, canary_count=1, canary_share=None, max_rss_ratio=2.0)
    assert fleet.planner.devices["d0000"].error_code == "health_gate"
    assert any(isinstance(d, Aborted) for d in fleet.decisions)


def test_without_a_baseline_the_gate_passes():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), [Target("a")], 0.0)
    fleet = Fleet(planner, lambda d, n: [Installed(d), Confirmed(d, 1e6, 1 << 40)])
    fleet.feed(Tick())
    assert planner.devices["a"].state == "succeeded"


def test_an_operator_abort_skips_the_queued_and_rolls_back_the_installed():
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=2, canary_share=None),
        [Target("a", 3), Target("b", None), Target("c", 3), Target("d", 3)],
        0.0,
    )
    fleet = Fleet(planner, ok)
    fleet.hold = {"c", "d"}
    fleet.feed(Tick())
    fleet.feed(Abort("stop"))
    assert fleet.rolled_back == {"a": 3, "b": None}  # b ran no version: its rollback removes the bundle
    assert planner.counts() == {"rolled_back": 2, "in_flight": 2}
    fleet.feed(Installed("c"))  # a transfer still under way lands after the abort: it goes back too
    fleet.feed(Failed("d", "device_timeout"))  # no retry after an abort
    assert fleet.rolled_back["c"] == 3
    assert planner.devices["d"].state == "failed"
    assert not planner.busy
    assert [d for d in fleet.decisions if isinstance(d, Aborted)] == [Aborted("stop")]


def test_a_wave_settled_below_the_success_threshold_aborts():
    fleet = run(
        10,
        lambda d, n: [Failed(d, "refused")] if d == "d0003" else ok(d, n),
        canary_count=5,
        canary_share=None,
        success_threshold=1.0,
        abort_threshold=0.5,
    )
    aborted = [d for d in fleet.decisions if isinstance(d, Aborted)]
    assert len(aborted) == 1 and "success threshold" in aborted[0].reason


# --- failures, retries, deferrals -------------------------------------------------------------


def test_retryable_failures_are_retried_up_to_the_bound_permanent_ones_never():
    def fate(device_id: str, attempt: int) -> list[Event]:
        if device_id == "d0001":
            return [Failed(device_id, "transport")]
        if device_id == "d0002":
            return [Failed(device_id, "target_mismatch")]
        if device_id == "d0003" and attempt == 1:
            return [TimedOut(device_id)]
        return ok(device_id, attempt)

    fleet = run(
        20,
        fate,
        canary_count=1,
        canary_share=None,
        wave_factor=None,
        wave_size=19,
        retries=2,
        success_threshold=0.5,
        abort_threshold=0.5,
    )
    assert fleet.attempts["d0001"] == 3 and fleet.planner.devices["d0001"].state == "failed"
    assert fleet.attempts["d0002"] == 1 and fleet.planner.devices["d0002"].state == "failed"
    assert fleet.attempts["d0003"] == 2 and fleet.planner.devices["d0003"].state == "succeeded"
    assert isinstance(fleet.decisions[-1], Completed)


def test_a_device_silent_past_its_timeout_is_retried():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None, device_timeout_s=60), targets(1), 0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0000"}
    fleet.feed(Tick())
    fleet.now = 59
    fleet.feed(Tick())
    assert fleet.attempts["d0000"] == 1
    fleet.now = 60
    fleet.hold = set()
    fleet.feed(Tick())
    assert fleet.attempts["d0000"] == 2 and planner.devices["d0000"].state == "succeeded"


def test_deferred_devices_are_neither_success_nor_failure():
    fleet = run(
        50,
        lambda d, n: [Deferred(d)] if int(d[1:]) % 4 == 0 else ok(d, n),
        canary_count=4,
        canary_share=None,
        abort_threshold=0.0,
        success_threshold=1.0,
    )
    assert isinstance(fleet.decisions[-1], Completed)
    assert fleet.planner.counts() == {"deferred": 13, "succeeded": 37}
    fleet.feed(Installed("d0000"))  # a deferred install that lands later
    fleet.feed(Confirmed("d0000", BASE_P99, BASE_RSS))
    assert fleet.planner.devices["d0000"].state == "succeeded"


# --- offline, joining, pause, window ----------------------------------------------------------


def test_offline_devices_get_it_when_they_return_within_the_lifetime():
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=1, canary_share=None, lifetime_s=1000),
        [Target("a"), Target("b", online=False), Target("c"), Target("d", online=False)],
        0.0,
    )
    fleet = Fleet(planner, ok)
    fleet.feed(Tick())
    assert {d for s in fleet.starts() for d in s.device_ids} == {"a", "c"}
    assert not any(isinstance(d, Completed) for d in fleet.decisions)
    assert planner.waiting_offline == ["b", "d"]
    fleet.now = 500
    fleet.feed(Online("b"))
    assert planner.devices["b"].state == "succeeded"
    fleet.now = 1000
    fleet.feed(Tick())
    assert planner.devices["d"].state == "missed"
    assert isinstance(fleet.decisions[-1], Completed)
    fleet.feed(Online("d"))
    assert fleet.attempts["d"] == 0


def test_a_device_going_offline_before_its_wave_waits():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), targets(3), 0.0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0000"}
    fleet.feed(Tick())
    fleet.feed(Offline("d0002"))
    fleet.hold = set()
    fleet.feed(Installed("d0000"))
    fleet.feed(Confirmed("d0000"))
    assert fleet.attempts == Counter({"d0000": 1, "d0001": 1})
    fleet.feed(Online("d0002"))
    assert fleet.attempts["d0002"] == 1 and isinstance(fleet.decisions[-1], Completed)


def test_a_device_joining_mid_rollout_joins_the_last_wave():
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=1, canary_share=None, wave_factor=None, wave_size=2), targets(5), 0.0
    )
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0000"}
    fleet.feed(Tick())
    fleet.feed(Joined(Target("late", 1)))
    assert planner.devices["late"].wave == 2 and fleet.attempts["late"] == 0  # not before the canary's gate
    fleet.hold = set()
    fleet.feed(Installed("d0000"))
    fleet.feed(Confirmed("d0000"))
    assert [s.device_ids for s in fleet.starts()][-1] == ("d0003", "d0004", "late")
    fleet.feed(Joined(Target("later")))  # the rollout completed: it no longer takes devices
    assert "later" not in planner.devices


def test_a_device_joining_after_the_last_wave_started_starts_at_once():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), targets(2), 0.0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0001"}
    fleet.feed(Tick())
    fleet.feed(Joined(Target("late")))
    assert fleet.attempts["late"] == 1


def test_pause_holds_new_starts_and_resume_goes_on():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), targets(10), 0.0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"d0000"}
    fleet.feed(Tick())
    fleet.feed(Pause())
    fleet.hold = set()
    fleet.feed(Installed("d0000"))
    fleet.feed(Confirmed("d0000"))  # in flight when paused: it still counts
    fleet.feed(Tick())
    assert planner.devices["d0000"].state == "succeeded"
    assert len(fleet.starts()) == 1 and planner.progress.status == "paused"
    fleet.feed(Resume())
    assert isinstance(fleet.decisions[-1], Completed) and planner.counts() == {"succeeded": 10}


def test_devices_start_only_inside_the_maintenance_window():
    day = 86400 * 20000
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=1, canary_share=None, window=MaintenanceWindow.parse("02:00-03:00")),
        targets(3),
        day,
    )
    fleet = Fleet(planner, ok, now=day + 3600)
    fleet.feed(Tick())
    assert not fleet.starts()
    fleet.now = day + 2 * 3600
    fleet.feed(Tick())
    assert isinstance(fleet.decisions[-1], Completed)


# --- invariants over any sequence of events ---------------------------------------------------

_IDS = [f"d{i:04d}" for i in range(12)]
_device_events = st.sampled_from([Installed, Deferred, TimedOut, Online, Offline])
_events = st.one_of(
    st.builds(lambda cls, d: cls(d), _device_events, st.sampled_from(_IDS)),
    st.builds(Confirmed, st.sampled_from(_IDS), st.floats(1, 30), st.integers(1, BASE_RSS * 3)),
    st.builds(Failed, st.sampled_from(_IDS), st.sampled_from(["transport", "refused", "health_check"])),
    st.builds(RolledBack, st.sampled_from(_IDS), st.booleans()),
    st.builds(Joined, st.builds(Target, st.sampled_from(["j1", "j2"]))),
    st.just(Tick()),
    st.just(Pause()),
    st.just(Resume()),
    st.just(Abort()),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(_events, st.integers(0, 50)), max_size=80), retries=st.integers(0, 2))
def test_no_device_is_ever_started_twice_except_as_a_counted_retry(events: list[tuple[Event, int]], retries: int):
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=2, canary_share=None, wave_factor=None, wave_size=3, retries=retries,
                      device_timeout_s=30, abort_threshold=0.3),
        targets(12),
        0.0,
    )  # fmt: skip
    now = 0.0
    in_flight: set[str] = set()
    starts: Counter[str] = Counter()
    aborted = False
    for event, dt in events:
        now += dt
        before = {d: p.state for d, p in planner.devices.items()}
        for decision in planner.accept(event, now):
            if isinstance(decision, Start):
                assert not aborted
                for d in decision.device_ids:
                    was = before.get(d, "queued")
                    # from in flight only as a retry within this step (a timeout on this tick)
                    assert was in ("queued", "retry") or (
                        was == "in_flight" and planner.devices[d].error_code in RETRYABLE_CODES
                    ), (d, was)
                    starts[d] += 1
                    in_flight.add(d)
            elif isinstance(decision, Aborted):
                assert not aborted
                aborted = True
            elif isinstance(decision, RollBack):
                assert planner.devices[decision.device_id].state in ("rolling_back", "failed")
        assert all(n <= 1 + retries for n in starts.values())
        assert all(p.attempts == starts[d] for d, p in planner.devices.items())
        if aborted:
            assert not any(p.state == "queued" for p in planner.devices.values())


def test_a_status_fresher_than_the_plan_updates_what_a_device_goes_back_to():
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), [Target("a"), Target("b")], 0.0)
    fleet = Fleet(planner, ok)
    fleet.hold = {"a"}
    fleet.feed(Tick())
    fleet.feed(Observed(Target("a", 7)))  # started already: what it ran is fixed
    fleet.feed(Observed(Target("b", 4, 2.0, 100)))
    assert planner.devices["a"].previous_version is None
    assert (planner.devices["b"].previous_version, planner.devices["b"].base_p99_ms) == (4, 2.0)
    fleet.feed(Abort())
    fleet.feed(Installed("a"))
    assert fleet.rolled_back == {"a": None}
