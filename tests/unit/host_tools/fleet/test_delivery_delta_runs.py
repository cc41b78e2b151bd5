"""host_tools.fleet.delivery: a run of one file, and devices that take the command's other file instead.

A deploy command may offer a delta besides its bundle. A device offered the delta may take the
bundle whole (its ``accepted`` names the bundle's transfer): it leaves the delta's run, and the
bundle's run takes it as *joined*, without sending its command again. The broker and the
devices are played here: a fake client records what is published, and scripted devices answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections import deque
from pathlib import Path

import pytest

from edge_sdk.protocol import (
    INDEX_FRAME,
    DeltaOffer,
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    MetricsReport,
    TransferEnd,
    decode,
    decode_chunk,
    encode_ranges,
)
from host_tools.fleet.delivery import PreparedFile, TransferRun, prepare_file
from host_tools.fleet.deployer import DeployOptions

CHUNK = 1024
OPTIONS = DeployOptions(chunk_size=CHUNK, accept_timeout_s=5.0, finish_timeout_s=5.0)


class _Acked:
    def wait(self, timeout_s: float | None = None) -> None:
        return None


class Devices:
    """The broker and the devices: each device takes ``wants`` (a transfer id) when its command arrives."""

    address = "mqtt://127.0.0.1:1"

    def __init__(self, wants: dict[str, str]) -> None:
        self.wants = wants
        self.commands: list[str] = []  # devices sent their command, in order
        self.frames: list[tuple[str, int]] = []  # (transfer id, chunk index) published
        self.ends: list[tuple[str, str]] = []  # (device, transfer id) of each transfer_end
        self.answers: deque[tuple[str, Event | MetricsReport]] = deque()
        self.chunk_counts: dict[str, int] = {}
        self.got: dict[str, set[int]] = {}

    # the client's side
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> _Acked:
        if topic.endswith("/cmd"):
            msg = decode(payload)
            assert isinstance(msg, TransferEnd)
            self.ends.append((topic.split("/")[3], msg.transfer_id))
            return _Acked()
        chunk = decode_chunk(payload)
        self.frames.append((chunk.transfer_id, chunk.index))
        if chunk.index != INDEX_FRAME:
            for device, tid in self.wants.items():
                if tid == chunk.transfer_id and device in self.got:
                    self.got[device].add(chunk.index)
                    if len(self.got[device]) == self.chunk_counts[tid]:
                        del self.got[device]
                        self.say(device, EventKind.RECEIVED, tid)
        return _Acked()

    def wait_connected(self, timeout_s: float) -> bool:
        return True

    # the devices' side
    def publish_command(self, topics: DeviceTopics, cmd: DeployCommand) -> None:
        device = topics.device_id
        self.commands.append(device)
        offer = cmd.offer_named(self.wants[device])
        assert offer is not None
        self.chunk_counts[offer.transfer_id] = offer.chunk_count
        self.got[device] = set()
        self.say(device, EventKind.ACCEPTED, offer.transfer_id, cmd.command_id, range(offer.chunk_count))

    def say(self, device: str, kind: str, tid: str, command_id: str = "", missing: range = range(0)) -> Event:
        event = Event(device, kind, time.time(), command_id, tid, encode_ranges(missing), detail={"have_index": False})
        self.answers.append((device, event))
        return event

    def inbound(self, deadline: float) -> tuple[str, Event | MetricsReport] | None:
        if self.answers:
            return self.answers.popleft()
        time.sleep(0.001)
        return None


def _file(tmp_path: Path, name: str, size: int) -> PreparedFile:
    path = tmp_path / name
    path.write_bytes(hashlib.sha256(name.encode()).digest() * (size // 32))
    return prepare_file(path, CHUNK)


def _commands(bundle: PreparedFile, delta: PreparedFile, devices: list[str]) -> dict[str, DeployCommand]:
    offer = DeltaOffer(delta.offer(), 1, "c" * 64)
    return {
        d: DeployCommand(uuid.uuid4().hex, "mlp", 2, bundle.offer(), time.time(), device_id=d, delta=offer)
        for d in devices
    }


@pytest.fixture
def files(tmp_path: Path) -> tuple[PreparedFile, PreparedFile]:
    return _file(tmp_path, "bundle.edge", 20 * CHUNK), _file(tmp_path, "update.delta", 3 * CHUNK)


def test_a_device_that_accepts_the_other_transfer_leaves_the_run(files: tuple[PreparedFile, PreparedFile]) -> None:
    bundle, delta = files
    net = Devices({"dev-a": delta.transfer_id, "dev-b": bundle.transfer_id})
    commands = _commands(bundle, delta, ["dev-a", "dev-b"])
    run = TransferRun(net, delta, OPTIONS, net.publish_command)  # type: ignore[arg-type]

    results = run.run(commands, net.inbound)

    assert results["dev-a"].event is not None and results["dev-a"].event.kind == EventKind.RECEIVED
    left = results["dev-b"]
    assert left.event is None and left.error is None and left.left is not None
    assert (left.left.kind, left.left.transfer_id) == (EventKind.ACCEPTED, bundle.transfer_id)
    assert net.commands == ["dev-a", "dev-b"]
    # Only the delta went out, once; nothing of the bundle, and no transfer_end to the device that left.
    assert sorted(net.frames) == sorted([(delta.transfer_id, INDEX_FRAME), *((delta.transfer_id, i) for i in range(3))])
    assert all(device == "dev-a" and tid == delta.transfer_id for device, tid in net.ends)
    assert run.malformed == 0 and run.bytes_sent == delta.size + 32 * delta.chunk_count  # the chunks and their index


def test_what_a_device_says_of_the_other_transfer_before_or_after_leaving(
    files: tuple[PreparedFile, PreparedFile],
) -> None:
    """Progress or a need of the other transfer is not this run's (ignored); after leaving, it is kept for later."""
    bundle, delta = files
    net = Devices({"dev-a": delta.transfer_id})
    commands = _commands(bundle, delta, ["dev-a", "dev-b"])
    stray = net.say("dev-b", EventKind.PROGRESS, bundle.transfer_id)
    net.wants["dev-b"] = bundle.transfer_id
    run = TransferRun(net, delta, OPTIONS, net.publish_command)  # type: ignore[arg-type]
    need = Event("dev-b", EventKind.NEED_CHUNKS, time.time(), commands["dev-b"].command_id, bundle.transfer_id, "0-19")

    def inbound(deadline: float) -> tuple[str, Event | MetricsReport] | None:
        msg = net.inbound(deadline)
        if msg is not None and msg[1].kind == EventKind.ACCEPTED and msg[0] == "dev-b":
            net.answers.append(("dev-b", need))
        return msg

    results = run.run(commands, inbound)

    assert results["dev-b"].left is not None and results["dev-b"].later == [need]
    assert stray not in results["dev-b"].later and run.plan.ignored == 0 and run.malformed == 0


def test_a_joined_device_gets_the_file_without_its_command_again(files: tuple[PreparedFile, PreparedFile]) -> None:
    bundle, delta = files
    net = Devices({"dev-b": bundle.transfer_id, "dev-c": bundle.transfer_id})
    commands = _commands(bundle, delta, ["dev-b", "dev-c"])
    commands["dev-c"] = dataclasses.replace(commands["dev-c"], delta=None)  # a device offered no delta
    # dev-b left the delta's run: its command went out then, and it accepted the bundle's transfer.
    net.chunk_counts[bundle.transfer_id], net.got["dev-b"] = bundle.chunk_count, set()
    accepted = Event("dev-b", EventKind.ACCEPTED, time.time(), commands["dev-b"].command_id, bundle.transfer_id, "0-19")
    run = TransferRun(net, bundle, OPTIONS, net.publish_command)  # type: ignore[arg-type]

    results = run.run(commands, net.inbound, joined={"dev-b": [accepted]})

    assert net.commands == ["dev-c"]  # dev-b's command is not sent twice
    for device in ("dev-b", "dev-c"):
        event = results[device].event
        assert event is not None and event.kind == EventKind.RECEIVED
    broadcast = [i for tid, i in net.frames if tid == bundle.transfer_id and i != INDEX_FRAME]
    assert sorted(broadcast) == list(range(bundle.chunk_count))  # each chunk once for both
    assert {tid for _device, tid in net.ends} <= {bundle.transfer_id}


def test_a_command_that_offers_neither_file_is_a_bug(files: tuple[PreparedFile, PreparedFile], tmp_path: Path) -> None:
    bundle, delta = files
    other = _file(tmp_path, "other.delta", 2 * CHUNK)
    net = Devices({})
    run = TransferRun(net, other, OPTIONS, net.publish_command)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offers another transfer"):
        run.run(_commands(bundle, delta, ["dev-a"]), net.inbound)
    assert net.commands == []


def test_accepting_a_transfer_the_command_does_not_offer_is_not_leaving(
    files: tuple[PreparedFile, PreparedFile],
) -> None:
    bundle, delta = files
    net = Devices({"dev-a": delta.transfer_id})
    commands = _commands(bundle, delta, ["dev-a"])
    net.say("dev-a", EventKind.ACCEPTED, "ab" * 16, commands["dev-a"].command_id)  # names neither file
    run = TransferRun(net, delta, OPTIONS, net.publish_command)  # type: ignore[arg-type]

    results = run.run(commands, net.inbound)

    assert results["dev-a"].left is None
    assert results["dev-a"].event is not None and results["dev-a"].event.kind == EventKind.RECEIVED
