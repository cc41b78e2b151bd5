"""host_tools.fleet.liveness: online, stale or offline, computed with a fake clock."""

from __future__ import annotations

import pytest

from host_tools.fleet.liveness import liveness

BIRTH = 1_000_000.0


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def advance(self, s: float) -> float:
        self.t += s
        return self.t


def test_a_device_turns_stale_after_factor_intervals_unheard_and_a_heartbeat_revives_it() -> None:
    clock = FakeClock(BIRTH)
    last_heard = None
    assert liveness("online", BIRTH, last_heard, 60.0, clock.t) == "online"
    assert liveness("online", BIRTH, last_heard, 60.0, clock.advance(180.0)) == "online"  # exactly 3 intervals
    assert liveness("online", BIRTH, last_heard, 60.0, clock.advance(0.5)) == "stale"
    last_heard = clock.t
    assert liveness("online", BIRTH, last_heard, 60.0, clock.t) == "online"
    assert liveness("online", BIRTH, last_heard, 60.0, clock.advance(181.0)) == "stale"


def test_the_factor_and_interval_are_the_stored_ones() -> None:
    assert liveness("online", BIRTH, BIRTH + 10, 5.0, BIRTH + 20, factor=2.0) == "online"
    assert liveness("online", BIRTH, BIRTH + 10, 5.0, BIRTH + 20.5, factor=2.0) == "stale"
    assert liveness("online", BIRTH, None, 600.0, BIRTH + 1700) == "online"
    with pytest.raises(ValueError, match="positive"):
        liveness("online", BIRTH, None, 60.0, BIRTH, factor=0)


def test_offline_is_offline_unless_heard_from_after() -> None:
    assert liveness("offline", BIRTH, None, 60.0, BIRTH + 1) == "offline"
    assert liveness("offline", BIRTH, BIRTH - 5, 60.0, BIRTH + 1) == "offline"  # a heartbeat before the goodbye
    assert liveness("offline", BIRTH, BIRTH + 5, 60.0, BIRTH + 6) == "online"  # back, its birth not seen yet
    assert liveness("offline", BIRTH, None, None, BIRTH + 1e6) == "offline"


def test_an_agent_without_heartbeats_is_online_while_its_status_says_so() -> None:
    assert liveness("online", BIRTH, None, None, BIRTH + 1e6) == "online"
    assert liveness("online", BIRTH, None, 0.0, BIRTH + 1e6) == "online"
