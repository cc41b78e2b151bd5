"""host_tools.fleet.delivery: TransferRun, the shell around FanOut, with a fake client and scripted devices.

The fake client hands every frame it is asked to publish to the fake devices at once, in this
thread; the devices check what they get with the real :class:`ChunkReceiver` (index, digests)
and answer as the agent does. The real broker and agents drive the same code in the
integration tests.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_sdk.errors import DeviceTimeoutError, TransportError
from edge_sdk.mqtt import BrokerAddress
from edge_sdk.protocol import (
    INDEX_FRAME,
    PROGRESS_EVERY,
    ChunkReceiver,
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    MetricsReport,
    TransferEnd,
    WriteAt,
    decode,
    decode_chunk,
    encode,
    encode_ranges,
    transfer_topic,
)
from host_tools.fleet.delivery import PreparedFile, TransferResult, TransferRun, prepare_file
from host_tools.fleet.deployer import DeployOptions, transfer_command

CHUNK = 1024
OPTIONS = DeployOptions(
    chunk_size=CHUNK,
    window=32,
    accept_timeout_s=0.5,
    finish_timeout_s=2.0,
    stall_s=0.5,
    reconnect_timeout_s=0.25,
    max_resend_rounds=4,
)

Outbox = deque[tuple[str, Event | MetricsReport]]


class FakeDevice:
    """Answers as the agent does: accepted, progress, need_chunks on transfer_end, received when whole."""

    def __init__(
        self,
        device_id: str,
        outbox: Outbox,
        *,
        lose: Callable[[int, int], bool] = lambda _index, _nth: False,
        accepts: bool = True,
    ) -> None:
        self.id = device_id
        self.outbox = outbox
        self.lose = lose  # (chunk index, how many times it arrived before) -> lost on the way
        self.accepts = accepts
        self.cmd: DeployCommand | None = None
        self.receiver: ChunkReceiver | None = None
        self.arrivals: Counter[int] = Counter()
        self.frames: list[tuple[str, int]] = []  # (topic, index) of what reached it
        self.ends = 0
        self.done = False

    def say(self, kind: str, **kw: object) -> None:
        assert self.cmd is not None
        event = Event(
            self.id, kind, time.time(), command_id=self.cmd.command_id, transfer_id=self.cmd.transfer.transfer_id, **kw
        )  # type: ignore[arg-type]
        self.outbox.append((self.id, event))

    def command(self, cmd: DeployCommand) -> None:
        self.cmd = cmd
        if self.accepts:
            self.receiver = ChunkReceiver(cmd.transfer)
            self.say(
                EventKind.ACCEPTED,
                missing_ranges=encode_ranges(self.receiver.missing()),
                detail={"have": 0, "have_index": False},
            )

    def frame(self, topic: str, payload: bytes) -> None:
        chunk = decode_chunk(payload)
        if self.receiver is None or self.done:
            return
        nth = self.arrivals[chunk.index]
        self.arrivals[chunk.index] += 1
        if self.lose(chunk.index, nth):
            return
        self.frames.append((topic, chunk.index))
        if chunk.index == INDEX_FRAME:
            self.receiver.take_index(chunk.data)
            return
        action = self.receiver.accept(chunk.index, chunk.data)
        if not isinstance(action, WriteAt):
            return
        if self.receiver.complete:
            self.done = True
            self.say(EventKind.RECEIVED)
        elif self.receiver.have_count % PROGRESS_EVERY == 0:
            self.say(EventKind.PROGRESS, detail={"have": self.receiver.have_count})

    def transfer_end(self) -> None:
        self.ends += 1
        if self.receiver is not None and not self.done:
            self.say(
                EventKind.NEED_CHUNKS,
                missing_ranges=encode_ranges(self.receiver.missing()),
                detail={"have_index": self.receiver.index is not None},
            )


class _Handle:
    def __init__(self, lost: bool) -> None:
        self.lost = lost

    def wait(self, timeout_s: float | None = None) -> None:
        if self.lost:
            raise TransportError("publish was not acknowledged in time")


class FakeClient:
    """Publishes straight to the fake devices; can fail a publish, and come back or not."""

    address = BrokerAddress("127.0.0.1", 1, False)

    def __init__(self, devices: list[FakeDevice], *, fail: set[int] = frozenset(), comes_back: bool = True) -> None:
        self.devices = {d.id: d for d in devices}
        self.fail = set(fail)  # publish numbers (0 = the first) that raise TransportError
        self.comes_back = comes_back
        self.published: list[tuple[str, bytes]] = []
        self.attempts = 0
        self.reconnect_waits: list[float] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> _Handle:
        n = self.attempts
        self.attempts += 1
        if n in self.fail:
            raise TransportError("not connected")
        self.published.append((topic, payload))
        if topic.startswith("edge/v1/transfers/"):
            for device in self.devices.values():
                device.frame(topic, payload)
            return _Handle(False)
        device_id, channel = topic.split("/")[3:5]
        if channel == "data":
            self.devices[device_id].frame(topic, payload)
        elif channel == "cmd" and isinstance(decode(payload), TransferEnd):
            self.devices[device_id].transfer_end()
        return _Handle(False)

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.publish(topic, payload, qos, retain).wait()

    def wait_connected(self, timeout_s: float) -> bool:
        self.reconnect_waits.append(timeout_s)
        return self.comes_back

    def frames(self) -> list[tuple[str, int]]:
        """(topic, chunk index) of every frame published, in order."""
        return [(t, decode_chunk(p).index) for t, p in self.published if not t.endswith("/cmd")]


def inbound_from(outbox: Outbox) -> Callable[[float], tuple[str, Event | MetricsReport] | None]:
    def inbound(deadline: float) -> tuple[str, Event | MetricsReport] | None:
        if outbox:
            return outbox.popleft()
        time.sleep(max(0.0, min(deadline - time.monotonic(), 0.005)))
        return None

    return inbound


@pytest.fixture
def prepared(tmp_path: Path) -> PreparedFile:
    path = tmp_path / "bundle.edge"
    path.write_bytes(os.urandom(20 * CHUNK + 300))  # 21 chunks
    return prepare_file(path, CHUNK)


def _run(
    client: FakeClient,
    prepared: PreparedFile,
    options: DeployOptions = OPTIONS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TransferRun, dict[str, TransferResult]]:
    sent_commands: list[str] = []

    def publish_command(topics: DeviceTopics, cmd: DeployCommand) -> None:
        client.publish_wait(topics.cmd, encode(cmd))  # in the signed command's place
        sent_commands.append(topics.device_id)
        client.devices[topics.device_id].command(cmd)

    outbox: Outbox = deque()
    for device in client.devices.values():
        device.outbox = outbox
    commands = {
        d: transfer_command(d, prepared.path, options, time.time, claim=("tiny", 1), prepared=prepared)
        for d in client.devices
    }
    run = TransferRun(client, prepared, options, publish_command, progress)  # type: ignore[arg-type]
    started = time.monotonic()
    results = run.run(commands, inbound_from(outbox))
    assert time.monotonic() - started < 10
    assert sent_commands == list(client.devices)
    return run, results


def test_one_device_gets_the_index_and_every_chunk_then_asks_for_what_it_lost(prepared: PreparedFile) -> None:
    device = FakeDevice("pi-1", deque(), lose=lambda i, nth: i in (2, 7) and nth == 0)
    client = FakeClient([device])
    progress: list[tuple[int, int]] = []
    run, results = _run(client, prepared, progress=lambda done, total: progress.append((done, total)))
    result = results["pi-1"]
    assert result.event is not None and result.event.kind == EventKind.RECEIVED
    assert result.error is None
    count, topic = prepared.chunk_count, transfer_topic(prepared.transfer_id)
    frames = client.frames()
    assert frames[0] == (topic, INDEX_FRAME)  # the index first, then every chunk once, on the transfer topic
    assert frames[1 : 1 + count] == [(topic, i) for i in range(count)]
    assert frames[1 + count :] == [(DeviceTopics("pi-1").data, 2), (DeviceTopics("pi-1").data, 7)]  # repairs
    assert device.ends == 2 and run.malformed == 0
    assert (run.frames_sent, run.bytes_sent) == (count + 3, prepared.size + len(prepared.index.digests) + 2 * CHUNK)
    assert progress[-1] == (prepared.size, prepared.size)


def test_each_chunk_goes_out_once_to_many_devices_and_a_refusal_ends_one(prepared: PreparedFile) -> None:
    outbox: Outbox = deque()
    devices = [FakeDevice(f"pi-{k}", outbox) for k in range(5)]
    devices[3].accepts = False
    client = FakeClient(devices)
    original = devices[3].command

    def refuse(cmd: DeployCommand) -> None:
        original(cmd)
        devices[3].say(EventKind.REFUSED)

    devices[3].command = refuse  # type: ignore[method-assign]
    _, results = _run(client, prepared)
    kinds = {d: r.event.kind for d, r in results.items()}
    assert kinds == {"pi-0": "received", "pi-1": "received", "pi-2": "received", "pi-3": "refused", "pi-4": "received"}
    assert Counter(i for _t, i in client.frames()) == Counter(range(-1, prepared.chunk_count))  # once each
    assert all(t == transfer_topic(prepared.transfer_id) for t, _i in client.frames())


def test_malformed_answers_are_ignored_and_counted_and_send_nothing(prepared: PreparedFile) -> None:
    device = FakeDevice("pi-1", deque())
    client = FakeClient([device])
    count = prepared.chunk_count
    real_command, real_end = device.command, device.transfer_end

    def command(cmd: DeployCommand) -> None:
        device.cmd = cmd
        device.say(EventKind.ACCEPTED, missing_ranges=f"0-{count}")  # one past the end
        device.say(EventKind.ACCEPTED, missing_ranges="5,3")  # descending
        device.say(EventKind.PROGRESS, detail={"have": "many"})
        real_command(cmd)

    def transfer_end() -> None:
        if device.ends == 0:
            device.say(EventKind.NEED_CHUNKS, missing_ranges="junk")
            device.say(EventKind.NEED_CHUNKS, missing_ranges="1,1")
        real_end()

    device.command = command  # type: ignore[method-assign]
    device.transfer_end = transfer_end  # type: ignore[method-assign]
    device.lose = lambda i, nth: i == 4 and nth == 0
    run, results = _run(client, prepared)
    assert results["pi-1"].event.kind == EventKind.RECEIVED
    assert run.malformed == 5
    resent = [i for _t, i in client.frames()[1 + count :]]
    assert resent == [4]  # only what the well-formed need_chunks asked for


def test_a_device_that_never_accepts_times_out(prepared: PreparedFile) -> None:
    silent = FakeDevice("pi-1", deque(), accepts=False)
    client = FakeClient([silent])
    started = time.monotonic()
    run, results = _run(client, prepared)
    error = results["pi-1"].error
    assert isinstance(error, DeviceTimeoutError) and "did not accept the offer within 0.5 s" in error.message
    assert error.details == {"device_id": "pi-1", "last_status": "unknown"}
    assert 0.5 <= time.monotonic() - started < 5
    assert client.frames() == [] and run.frames_sent == 0  # nothing sent to no one


def test_a_silent_device_does_not_keep_the_others_waiting(prepared: PreparedFile) -> None:
    outbox: Outbox = deque()
    client = FakeClient([FakeDevice("pi-1", outbox), FakeDevice("pi-2", outbox, accepts=False)])
    _, results = _run(client, prepared)
    assert results["pi-1"].event.kind == EventKind.RECEIVED
    assert isinstance(results["pi-2"].error, DeviceTimeoutError)


def test_a_lost_connection_is_waited_for_and_the_transfer_goes_on(prepared: PreparedFile) -> None:
    device = FakeDevice("pi-1", deque())
    client = FakeClient([device], fail={4})  # the command, the index, chunks 0 and 1, then chunk 2 fails
    _, results = _run(client, prepared)
    assert client.reconnect_waits == [OPTIONS.reconnect_timeout_s]
    assert results["pi-1"].event.kind == EventKind.RECEIVED
    frames = [i for _t, i in client.frames()]
    assert frames.count(2) == 1 and frames[-1] == 2  # lost with the connection, asked for and repaired
    assert device.ends == 2


def test_a_connection_that_does_not_come_back_ends_the_run(prepared: PreparedFile) -> None:
    client = FakeClient([FakeDevice("pi-1", deque())], fail={6}, comes_back=False)
    with pytest.raises(TransportError, match=r"did not come back within 0\.25 s") as info:
        _run(client, prepared)
    assert info.value.details["broker"] == str(client.address)
    assert not isinstance(info.value, DeviceTimeoutError)
    assert client.reconnect_waits == [OPTIONS.reconnect_timeout_s]


def test_a_command_for_another_transfer_is_a_bug(prepared: PreparedFile, tmp_path: Path) -> None:
    other = tmp_path / "other.edge"
    other.write_bytes(b"x" * 5000)
    cmd = transfer_command("pi-1", other, OPTIONS, time.time, claim=("tiny", 1))
    run = TransferRun(FakeClient([]), prepared, OPTIONS, lambda _t, _c: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="another transfer"):
        run.run({"pi-1": cmd}, lambda _deadline: None)
