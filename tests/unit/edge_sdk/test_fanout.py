"""edge_sdk.protocol.FanOut: the host's pure plan for sending one file to many devices at once.

No broker and no clock: the tests play the devices (:class:`Devices` holds what reaches each one
and answers as the agent does) and pass the time in.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.protocol import INDEX_FRAME, PROGRESS_EVERY, FanOut, Send, decode_ranges, encode_ranges
from edge_sdk.protocol.transfer import MAX_RANGES


class Devices:
    """What reaches each device, as the agent would take it: chunks only once it has the index."""

    def __init__(self, plan: FanOut, progress_every: int = 1) -> None:
        self.plan = plan
        self.progress_every = progress_every
        self.held: dict[str, set[int]] = {}
        self.has_index: dict[str, bool] = {}
        self.reported: dict[str, int] = {}
        self.sent: list[Send] = []
        self.rounds: Counter[str] = Counter()  # need_chunks answers, per device

    def accept(self, device: str, held: Iterable[int] = (), has_index: bool = False, now: float = 0.0) -> None:
        self.held[device] = set(held)
        self.has_index[device] = has_index
        self.reported[device] = len(self.held[device])
        self.plan.offered(device, now)
        self.plan.accepted(device, self.lacking(device), has_index, now)

    def lacking(self, device: str) -> list[int]:
        return [i for i in range(self.plan.chunk_count) if i not in self.held[device]]

    def deliver(self, sends: list[Send], lost: Callable[[Send, str], bool] = lambda _s, _d: False) -> None:
        """Each frame reaches the devices it is for (all receiving ones on the transfer topic), unless lost."""
        self.sent += sends
        for send in sends:
            for device in [send.device] if send.device is not None else self.plan.receiving:
                if lost(send, device):
                    continue
                if send.index == INDEX_FRAME:
                    self.has_index[device] = True
                elif self.has_index[device]:
                    self.held[device].add(send.index)

    def progress(self, now: float) -> None:
        """Each device that holds ``progress_every`` more chunks since it last said so says so (as the agent does)."""
        for device in self.plan.receiving:
            have = len(self.held.get(device, ()))
            if device in self.held and have - self.reported[device] >= self.progress_every:
                self.reported[device] = have
                self.plan.progress(device, have, now)

    def answer_ends(self, now: float) -> list[str]:
        """``transfer_end`` to those due: the complete ones say received, the others what they lack."""
        due = self.plan.ends_due()
        for device in due:
            self.reported[device] = len(self.held[device])
            if len(self.held[device]) == self.plan.chunk_count:
                self.plan.finished(device)
            else:
                self.rounds[device] += 1
                self.plan.need(device, self.lacking(device), self.has_index[device], now)
        return due

    def broadcasts(self) -> Counter[int]:
        return Counter(s.index for s in self.sent if s.device is None)

    def unicasts(self) -> Counter[tuple[str, int]]:
        return Counter((s.device, s.index) for s in self.sent if s.device is not None)


W = PROGRESS_EVERY  # the smallest window: devices acknowledge every so many chunks


def sends(indices: Iterable[int], device: str | None = None) -> list[Send]:
    return [Send(i, device) for i in indices]


def run(devices: Devices, *, steps: int = 1000, limit: int = 64, dt: float = 0.01, **kw: object) -> float:
    """Send, deliver, report progress and answer ends until every device is done; return the time it took."""
    now = 0.0
    for _ in range(steps):
        if not devices.plan.receiving:
            return now
        devices.deliver(devices.plan.next_sends(now, limit=limit), **kw)  # type: ignore[arg-type]
        devices.progress(now)
        devices.answer_ends(now)
        now += dt
    raise AssertionError(f"not done after {steps} steps: {devices.plan.receiving} still receiving")


# --- one device ---------------------------------------------------------------------------------


def test_one_device_gets_the_index_then_every_chunk_once_then_its_end() -> None:
    plan = FanOut(40, window=W, stall_s=5.0)
    plan.offered("a", 0.0)
    assert plan.next_sends(0.0) == [] and plan.ends_due() == []  # nothing before it accepts
    assert plan.receiving == ["a"]
    plan.accepted("a", range(40), have_index=False, now=0.0)
    assert plan.next_sends(0.0, limit=100) == [Send(INDEX_FRAME), *sends(range(W))]
    assert plan.next_sends(0.5) == [] and plan.in_flight("a") == W  # the window is full
    assert plan.ends_due() == [] and not plan.idle
    plan.progress("a", 3, 1.0)
    assert plan.next_sends(1.0) == sends(range(W, W + 3))  # three acknowledged: three more
    plan.progress("a", W + 3, 2.0)
    assert plan.next_sends(2.0, limit=10) == sends(range(W + 3, W + 13))  # at most limit at a time
    assert plan.next_sends(2.0, limit=10) == sends(range(W + 13, W + 19))
    plan.progress("a", 39, 2.5)
    assert plan.next_sends(2.5) == sends(range(W + 19, 40))
    assert plan.next_sends(2.5) == []
    assert plan.ends_due() == ["a"]
    assert plan.ends_due() == [] and plan.idle  # once a round
    assert (plan.broadcast_chunks, plan.unicast_chunks) == (40, 0)
    plan.finished("a")  # it said received
    assert plan.receiving == [] and plan.next_sends(3.0) == [] and plan.ends_due() == []


def test_a_device_that_lacks_nothing_gets_its_end_at_once() -> None:
    plan = FanOut(4)
    plan.offered("a", 0.0)
    plan.accepted("a", [], have_index=True, now=0.0)
    assert plan.next_sends(0.0) == []
    assert plan.ends_due() == ["a"]


def test_the_window_bounds_what_is_in_flight_beyond_acknowledged_progress() -> None:
    window = W
    plan = FanOut(200, window=window, stall_s=60.0)
    devices = Devices(plan)
    rng = random.Random(7)
    for name in ("a", "b", "c"):
        devices.accept(name, held=rng.sample(range(200), 50), has_index=name == "c")
    start = {d: len(h) for d, h in devices.held.items()}
    reported = dict(start)
    lacked = {d: set(devices.lacking(d)) for d in devices.held}
    now = 0.0
    for step in range(2000):
        if not plan.receiving:
            break
        sends = plan.next_sends(now, limit=1000)
        devices.deliver(sends)
        for d in devices.held:  # what went out that it lacked, less what it acknowledged
            out = sum(1 for s in devices.sent if s.index in lacked[d] and s.device in (None, d))
            assert out - (reported[d] - start[d]) <= window, (step, d)
            assert plan.in_flight(d) <= window
        slow = step % 3 == 0  # acknowledgements come late and in bursts
        if not slow:
            for d in devices.held:
                reported[d] = len(devices.held[d])
                plan.progress(d, reported[d], now)
        devices.answer_ends(now)  # nothing is lost here: each says received once all went out
        now += 0.01
    else:
        raise AssertionError("never done")
    assert all(len(h) == 200 for h in devices.held.values())
    assert max(devices.broadcasts().values()) == 1


def test_a_stalled_device_stops_pacing_the_others_and_gets_its_end() -> None:
    plan = FanOut(3 * W, window=W, stall_s=5.0)
    for d in ("a", "b"):
        plan.offered(d, 0.0)
        plan.accepted(d, range(3 * W), have_index=False, now=0.0)
    assert plan.next_sends(0.0) == [Send(INDEX_FRAME), *sends(range(W))]
    plan.progress("a", W, 1.0)  # b says nothing from now on
    assert plan.next_sends(1.0) == []  # b's window is full: it paces the sending
    assert plan.next_sends(4.999) == []
    assert plan.next_sends(5.0) == sends(range(W, 2 * W))  # b is set aside; a paces alone
    plan.progress("a", 2 * W, 6.0)
    assert plan.next_sends(6.0) == sends(range(2 * W, 3 * W))
    plan.progress("a", 3 * W, 7.0)
    plan.finished("a")
    assert plan.ends_due() == ["b"]  # all it lacked went out: it is asked what it still lacks
    plan.need("b", [2, 9], True, 30.0)  # it speaks again: repaired on its own topic
    assert plan.next_sends(30.0) == [Send(2, "b"), Send(9, "b")]
    assert plan.ends_due() == ["b"]


def test_a_device_silent_with_nothing_in_flight_is_not_stalled() -> None:
    plan = FanOut(4, window=W, stall_s=1.0)
    plan.offered("a", 0.0)
    plan.accepted("a", range(4), have_index=True, now=0.0)
    assert plan.next_sends(0.0) == [Send(0), Send(1), Send(2), Send(3)]
    plan.progress("a", 4, 0.5)
    plan.offered("b", 0.5)
    plan.accepted("b", [], have_index=True, now=0.5)
    assert sorted(plan.ends_due()) == ["a", "b"]


# --- many devices -----------------------------------------------------------------------------


def test_twenty_devices_that_lack_different_chunks_get_each_chunk_broadcast_once() -> None:
    count = 64
    plan = FanOut(count, window=16, stall_s=60.0)
    devices = Devices(plan)
    rng = random.Random(20)
    for k in range(20):  # resumed transfers: each kept another part, some kept the index
        devices.accept(f"dev-{k:02}", held=rng.sample(range(count), rng.randrange(0, count)), has_index=k % 2 == 0)
    devices.accept("dev-fresh")
    lacked = set().union(*(devices.lacking(d) for d in devices.held))
    run(devices)
    assert devices.broadcasts() == Counter({INDEX_FRAME: 1, **dict.fromkeys(lacked, 1)})
    assert devices.unicasts() == Counter() and plan.unicast_chunks == 0
    assert plan.broadcast_chunks == len(lacked) and plan.given_up == {}


def test_no_index_goes_out_when_every_device_has_it() -> None:
    plan = FanOut(4)
    devices = Devices(plan)
    devices.accept("a", has_index=True)
    devices.accept("b", held=[1], has_index=True)
    run(devices)
    assert devices.broadcasts() == Counter({0: 1, 1: 1, 2: 1, 3: 1})
    assert INDEX_FRAME not in [s.index for s in devices.sent]


def test_a_late_acceptor_gets_what_already_went_out_on_its_own_topic() -> None:
    plan = FanOut(3 * W, window=W, stall_s=60.0)
    plan.offered("a", 0.0)
    plan.offered("b", 0.0)
    plan.accepted("a", range(3 * W), have_index=False, now=0.0)
    assert plan.next_sends(0.0) == [Send(INDEX_FRAME), *sends(range(W))]
    plan.accepted("b", range(3 * W), have_index=False, now=0.5)  # it answered after the broadcast began
    first = plan.next_sends(0.5, limit=100)
    assert first == [Send(INDEX_FRAME, "b"), *sends(range(W), "b")]  # a's window is full: b's own go
    plan.progress("a", W, 1.0)
    plan.progress("b", W, 1.0)
    rest = plan.next_sends(1.0, limit=100)
    assert rest == sends(range(W, 2 * W))  # what is still to go out goes once, to both
    assert plan.unicast_chunks == W and plan.broadcast_chunks == 2 * W


def test_a_late_acceptor_without_the_index_gets_it_when_the_others_had_it() -> None:
    plan = FanOut(5, window=W, stall_s=60.0)
    devices = Devices(plan)
    devices.accept("a", has_index=True)  # a resumed transfer: the index never had to go out
    devices.deliver(plan.next_sends(0.0))
    assert devices.broadcasts() == Counter(range(5))
    devices.accept("b", has_index=False, now=0.5)  # late, and without the index its chunks cannot be checked
    sends = plan.next_sends(0.5)
    assert sends[0] == Send(INDEX_FRAME, "b") and sorted(s.index for s in sends[1:]) == [0, 1, 2, 3, 4]
    devices.deliver(sends)
    assert devices.held["b"] == set(range(5))  # all taken in this round: no round lost to "no index"


def test_a_chunk_many_devices_ask_for_is_broadcast_once_more() -> None:
    plan = FanOut(10, window=100, stall_s=60.0)
    devices = Devices(plan)
    for d in ("a", "b", "c", "d"):
        devices.accept(d)
    devices.deliver(plan.next_sends(0.0), lost=lambda s, d: s.index == 3 and d != "d")  # a, b and c lose chunk 3
    devices.progress(0.1)
    assert devices.answer_ends(0.2) == ["a", "b", "c", "d"]
    assert plan.receiving == ["a", "b", "c"]  # d said received
    again = plan.next_sends(0.3)
    assert again == [Send(3)]  # once, on the transfer topic, for the three of them
    devices.deliver(again)
    devices.progress(0.4)
    assert devices.answer_ends(0.5) == ["a", "b", "c"] and plan.receiving == []


def test_answers_that_trickle_in_do_not_make_a_re_broadcast_each() -> None:
    plan = FanOut(10, window=100, stall_s=60.0)
    devices = Devices(plan)
    names = [f"d{k}" for k in range(8)]
    for d in names:
        devices.accept(d)
    devices.deliver(plan.next_sends(0.0), lost=lambda s, d: s.index == 3 and d != "d7")  # seven lose chunk 3
    due = plan.ends_due()
    assert due == names
    answers = {d: devices.lacking(d) for d in due}  # each answers its transfer_end at once ...
    for d in due:  # ... and the answers reach the host one by one, with sending in between
        if answers[d]:
            plan.need(d, answers[d], True, 1.0)
        else:
            plan.finished(d)
        devices.deliver(plan.next_sends(1.0))
    assert all(3 in devices.held[d] for d in names)
    assert devices.broadcasts()[3] <= 2  # the first pass, and at most one re-broadcast
    assert devices.broadcasts()[3] + sum(n for (_d, i), n in devices.unicasts().items() if i == 3) <= 3
    devices.answer_ends(2.0)
    assert plan.receiving == []


def test_a_chunk_one_device_asks_for_goes_to_it_alone() -> None:
    plan = FanOut(10, window=100, stall_s=60.0)
    devices = Devices(plan)
    for d in ("a", "b", "c"):
        devices.accept(d)
    devices.deliver(plan.next_sends(0.0), lost=lambda s, d: s.index == 6 and d == "b")
    devices.progress(0.1)
    devices.answer_ends(0.2)
    assert plan.receiving == ["b"]
    assert plan.next_sends(0.3) == [Send(6, "b")]
    assert plan.unicast_chunks == 1 and plan.broadcast_chunks == 10


def test_a_device_still_lacking_after_max_rounds_is_given_up() -> None:
    plan = FanOut(5, window=100, stall_s=60.0, max_rounds=2)
    devices = Devices(plan)
    devices.accept("a")
    devices.accept("b")
    cursed = lambda s, d: s.index == 1 and d == "a"  # noqa: E731  # chunk 1 never reaches a
    now = 0.0
    for _ in range(10):
        devices.deliver(plan.next_sends(now), lost=cursed)
        devices.progress(now)
        devices.answer_ends(now)
        now += 1.0
        if not plan.receiving:
            break
    assert list(plan.given_up) == ["a"] and "after 2 repair rounds without progress" in plan.given_up["a"]
    assert devices.held["b"] == set(range(5)) and plan.receiving == []
    # The first repair round brought progress (all but chunk 1 came by broadcast); then two
    # rounds without progress, and no more.
    assert devices.unicasts() == Counter({("a", 1): 3})
    assert plan.next_sends(now) == [] and plan.ends_due() == []


def test_lost_frames_are_repaired_until_every_device_has_the_file() -> None:
    plan = FanOut(40, window=W, stall_s=0.5, max_rounds=20)
    devices = Devices(plan)
    for k in range(10):
        devices.accept(f"d{k}")
    rng = random.Random(3)
    run(devices, lost=lambda _s, _d: rng.random() < 0.1)
    assert plan.given_up == {} and all(len(h) == 40 for h in devices.held.values())


def test_a_device_that_lost_frames_holds_the_others_back_once_at_most() -> None:
    # Frames a device lost stay "in flight" for the plan (it cannot tell them from frames on
    # their way) until the device's next round. A device that lost a window's worth is set
    # aside after stall_s; when it speaks again it must not block everyone for another stall_s
    # each time it reports progress.
    plan = FanOut(400, window=32, stall_s=1.0, max_rounds=20)
    devices = Devices(plan, progress_every=16)
    for k in range(5):
        devices.accept(f"d{k}")
    rng = random.Random(5)
    took = run(devices, steps=10_000, lost=lambda _s, d: d == "d0" and rng.random() < 0.2)  # d0's link is poor
    assert plan.given_up == {} and all(len(h) == 400 for h in devices.held.values())
    # Each round of d0's may end with it set aside once (what it lost fills its window); no more.
    assert took < (devices.rounds["d0"] + 1) * plan.stall_s + 0.5, (took, devices.rounds)


def test_a_device_whose_list_was_capped_is_paced_by_what_it_really_holds() -> None:
    # A device lacking more than MAX_RANGES ranges lists the lowest ones only: it holds fewer
    # chunks than the plan would reckon from the list, and its progress must still count.
    count = 4 * MAX_RANGES
    plan = FanOut(count, window=64, stall_s=1.0)
    devices = Devices(plan, progress_every=PROGRESS_EVERY)
    devices.held["a"], devices.has_index["a"] = set(range(0, count, 2)), True  # kept every other chunk
    devices.reported["a"] = count // 2
    plan.offered("a", 0.0)
    listed = decode_ranges(encode_ranges(devices.lacking("a")), count)
    assert len(listed) == MAX_RANGES < len(devices.lacking("a"))
    plan.accepted("a", listed, True, 0.0)
    now = 0.0
    while "a" not in plan.ends_due():
        assert now < plan.stall_s, "the device's own window stalled the sending"
        devices.deliver(plan.next_sends(now))
        devices.progress(now)
        now += 0.01
    assert set(listed) <= devices.held["a"]


def test_a_window_smaller_than_the_progress_interval_is_refused() -> None:
    # Devices acknowledge every PROGRESS_EVERY chunks: with fewer in flight they never would,
    # and every window would wait stall_s.
    with pytest.raises(ConfigError, match=f"at least {PROGRESS_EVERY}"):
        FanOut(100, window=PROGRESS_EVERY - 1)
    plan = FanOut(100, window=PROGRESS_EVERY, stall_s=1.0)
    devices = Devices(plan, progress_every=PROGRESS_EVERY)
    devices.accept("a")
    assert run(devices) < plan.stall_s  # never waits for a stall


# --- bad input --------------------------------------------------------------------------------


def test_malformed_answers_are_ignored_and_counted() -> None:
    plan = FanOut(10, window=W)
    plan.offered("a", 0.0)
    plan.progress("a", 3, 0.0)  # progress before it accepted
    assert plan.ignored == 1
    plan.accepted("ghost", range(10), False, 0.0)  # devices never offered anything
    plan.need("ghost", [1], False, 0.0)
    plan.progress("ghost", 1, 0.0)
    assert plan.ignored == 4 and plan.receiving == ["a"]
    plan.accepted("a", [0, 1, 10, -1, 1 << 40], False, 0.0)  # indices outside the file
    assert plan.ignored == 5
    sends = plan.next_sends(0.0, limit=100)
    assert sends == [Send(INDEX_FRAME), Send(0), Send(1)]
    plan.progress("a", 11, 1.0)  # more than the file has
    plan.progress("a", -1, 1.0)
    assert plan.ignored == 7 and plan.in_flight("a") == 2
    assert plan.ends_due() == ["a"]
    plan.need("a", [5, 99], True, 2.0)
    assert plan.ignored == 8
    assert plan.next_sends(2.0) == [Send(5, "a")]
    plan.finished("a")
    plan.accepted("a", range(10), False, 3.0)  # a device that is done says more
    plan.need("a", [1], True, 3.0)
    plan.progress("a", 1, 3.0)
    assert plan.ignored == 11 and plan.next_sends(3.0) == [] and plan.ends_due() == []
    plan.finished("nobody")  # harmless


def test_a_device_that_is_done_gets_nothing_more() -> None:
    plan = FanOut(10, window=100)
    devices = Devices(plan)
    devices.accept("a")
    devices.accept("b")
    plan.finished("b")  # refused, failed or timed out on the host's side
    sends = plan.next_sends(0.0)
    assert all(s.device is None for s in sends) and len(sends) == 11
    assert plan.ends_due() == ["a"] and plan.receiving == ["a"]
    plan.need("b", [1, 2], False, 1.0)
    assert plan.next_sends(1.0) == [] and plan.ends_due() == [] and plan.ignored == 1


def test_a_device_that_restarted_and_reports_before_accepting_is_taken_as_accepted() -> None:
    plan = FanOut(10, window=100)
    plan.offered("a", 0.0)
    plan.need("a", [7, 8], True, 0.0)  # it kept the rest on disk, and says so on connect
    assert plan.next_sends(0.0) == [Send(7), Send(8)]
    assert plan.ends_due() == ["a"]


@pytest.mark.parametrize(
    "kw",
    [
        {"chunk_count": 0},
        {"chunk_count": (1 << 15) + 1},
        {"window": 0},
        {"window": PROGRESS_EVERY - 1},
        {"stall_s": 0},
        {"max_rounds": -1},
        {"rebroadcast_share": 0},
        {"rebroadcast_share": 1.5},
    ],
    ids=repr,
)
def test_bounds_out_of_range_are_refused(kw: dict[str, float]) -> None:
    args: dict[str, float] = {"chunk_count": 10, **kw}
    count = int(args.pop("chunk_count"))
    with pytest.raises(ConfigError):
        FanOut(count, **args)  # type: ignore[arg-type]


def test_rounds_that_bring_progress_never_give_a_device_up() -> None:
    # A device whose missing list is capped says a part of what it lacks each round: many
    # rounds, each one progress, and it is not given up however few max_rounds allows.
    plan = FanOut(100, window=100, stall_s=60.0, max_rounds=1)
    plan.offered("a", 0.0)
    plan.accepted("a", range(100), True, 0.0)
    plan.next_sends(0.0, limit=1000)
    for round_no in range(10):
        lacking = range(10 * (round_no + 1), 100)
        plan.need("a", lacking, True, float(round_no))
        assert "a" not in plan.given_up, round_no
    plan.need("a", range(99, 100), True, 20.0)
    plan.need("a", range(99, 100), True, 21.0)
    assert "a" in plan.given_up and "without progress" in plan.given_up["a"]
