"""device_agent.agent: a whole Agent driven through an in-memory transport.

Real installer, trust store, outbox, onnxruntime and models; only the broker is played
by :class:`memory_transport.MemoryTransport`. The real-process tests are in
tests/integration/test_agent_*.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_models import nan_model
from harness import build_tiny_model
from memory_transport import MemoryTransport

from device_agent import agent as agent_module
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.sdnotify import Liveness, Notifier, should_feed
from edge_sdk.bundle import BundleSpec, pack_bundle
from edge_sdk.errors import TransportError
from edge_sdk.mqtt import Incoming
from edge_sdk.protocol import (
    INDEX_FRAME,
    PROGRESS_EVERY,
    BenchmarkSpec,
    ChunkIndex,
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    RemoveCommand,
    RollbackCommand,
    RootUpdate,
    TransferEnd,
    TransferOffer,
    content_transfer_id,
    decode_ranges,
    encode,
    encode_chunk,
    sign_command,
    transfer_topic,
)
from edge_sdk.trust import Role, Root, SigningKey, sign_root

DEVICE = "pi-unit"
CHUNK = 1024
TOPICS = DeviceTopics(DEVICE)


class Fleet:
    """The host's side: keys, bundles, signed commands and chunks for one device."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.root_key, self.bundle_key, self.command_key = (SigningKey.generate() for _ in range(3))
        every = {k.keyid: k.public_key for k in (self.root_key, self.bundle_key, self.command_key)}
        root = Root(
            1,
            time.time() + 86400,
            every,
            {
                "root": Role((self.root_key.keyid,)),
                "bundles": Role((self.bundle_key.keyid,)),
                "commands": Role((self.command_key.keyid,)),
            },
        )
        self.root_path = d / "root.json"
        self.root_path.write_bytes(sign_root(root, [self.root_key]).to_bytes())
        self.model = build_tiny_model(d)

    def bundle(self, version: int, name: str = "tiny", model: tuple[Path, Path] | None = None) -> bytes:
        path, sample = model or (self.model.path, self.model.sample)
        out = self.dir / f"{name}-v{version}.edge"
        pack_bundle(
            BundleSpec(name, version, "onnxruntime", path, sample_input=sample), [self.bundle_key], out, now=time.time()
        )
        return out.read_bytes()

    def signed(self, cmd: DeployCommand | RollbackCommand | RemoveCommand) -> bytes:
        return encode(sign_command(cmd, [self.command_key]))

    def deploy(self, data: bytes, name: str, version: int) -> DeployCommand:
        sha256 = hashlib.sha256(data).hexdigest()
        offer = TransferOffer(
            content_transfer_id(sha256, CHUNK), len(data), sha256, CHUNK, ChunkIndex.of_chunks(parts(data)).sha256
        )
        return DeployCommand(
            uuid.uuid4().hex,
            name,
            version,
            offer,
            time.time(),
            benchmark=BenchmarkSpec(runs=3, warmup=1),
            device_id=DEVICE,
            expires_at=time.time() + 300,
        )


def parts(data: bytes) -> list[bytes]:
    return [data[off : off + CHUNK] for off in range(0, len(data), CHUNK)]


def chunks(cmd: DeployCommand, data: bytes) -> list[bytes]:
    tid = cmd.transfer.transfer_id
    return [encode_chunk(tid, i, part) for i, part in enumerate(parts(data))]


def have(agent: Agent, transfer_id: str) -> int:
    """Chunks the agent holds of a transfer (-1: not held)."""
    t = agent.receiving.get(transfer_id)
    return -1 if t is None else t.receiver.have_count


def index_frame(cmd: DeployCommand, data: bytes) -> bytes:
    """The frame that carries the chunk index the offer binds (sent ahead of the chunks)."""
    return encode_chunk(cmd.transfer.transfer_id, INDEX_FRAME, ChunkIndex.of_chunks(parts(data)).digests)


def send_frames(transport: MemoryTransport, cmd: DeployCommand, frames: list[bytes]) -> None:
    """Frames on the transfer's topic, as the host broadcasts them."""
    for frame in frames:
        transport.deliver(transfer_topic(cmd.transfer.transfer_id), frame)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    d = tmp_path / "host"
    d.mkdir()
    return Fleet(d)


@pytest.fixture
def make_agent(tmp_path: Path, fleet: Fleet) -> Iterator[Callable[..., tuple[Agent, MemoryTransport]]]:
    made: list[Agent] = []

    def make(**options: object) -> tuple[Agent, MemoryTransport]:
        (tmp_path / "sys").mkdir(exist_ok=True)
        config = AgentConfig(
            broker="mqtt://127.0.0.1:1",
            device_id=DEVICE,
            data_dir=tmp_path / "data",
            root=fleet.root_path,
            sysfs_root=tmp_path / "sys",
            **options,  # type: ignore[arg-type]
        )
        transport = MemoryTransport()
        agent = Agent(config, transport)
        agent.start()
        made.append(agent)
        return agent, transport

    yield make
    for agent in made:
        agent.shutdown()


def drive(agent: Agent, until: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Step the agent until ``until()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the agent did not get there in time"
        agent.step(0.02)


def kinds(transport: MemoryTransport, command_id: str) -> list[str]:
    return [e.kind for e in transport.events() if e.command_id == command_id]


def last(transport: MemoryTransport, command_id: str) -> Event:
    return [e for e in transport.events() if e.command_id == command_id][-1]


def settled(transport: MemoryTransport, command_id: str) -> Callable[[], bool]:
    final = {EventKind.INSTALLED, EventKind.REFUSED, EventKind.FAILED, EventKind.DONE, EventKind.ERROR}
    return lambda: any(k in final for k in kinds(transport, command_id))


def send_deploy(
    fleet: Fleet, transport: MemoryTransport, data: bytes, name: str, version: int, tamper: int | None = None
) -> DeployCommand:
    cmd = fleet.deploy(data, name, version)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    frames = [index_frame(cmd, data), *chunks(cmd, data)]
    if tamper is not None:
        chunk = frames[1 + tamper]
        frames[1 + tamper] = chunk[:-1] + bytes([chunk[-1] ^ 0xFF])  # same length, other bytes
    send_frames(transport, cmd, frames)
    return cmd


def test_a_deploy_is_received_installed_and_reported(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = send_deploy(fleet, transport, data, "tiny", 1)
    drive(agent, settled(transport, cmd.command_id))
    assert kinds(transport, cmd.command_id) == [EventKind.ACCEPTED, EventKind.RECEIVED, EventKind.INSTALLED]
    accepted = transport.events()[0]
    assert accepted.transfer_id == cmd.transfer.transfer_id
    assert decode_ranges(accepted.missing_ranges, cmd.transfer.chunk_count) == list(range(cmd.transfer.chunk_count))
    assert accepted.missing_ranges == f"0-{cmd.transfer.chunk_count - 1}"
    assert accepted.detail == {"have": 0, "have_index": False}
    assert agent.installer.active("tiny").version == 1  # type: ignore[union-attr]
    assert agent.installer.pending() == []
    assert transport.statuses()[-1].active == {"bundles": [{"name": "tiny", "version": 1, "precision": "fp32"}]}
    (report,) = transport.metrics()
    assert report.bundle_version == 1 and report.command_id == cmd.command_id
    assert report.latency is not None and report.latency.p50_ms > 0
    assert [p.retain for p in transport.published if p.topic == TOPICS.metrics] == [True]
    assert list((agent.config.data_dir / "staging").iterdir()) == []
    assert transport.subscriptions == [TOPICS.cmd, TOPICS.data]  # the transfer's topic is left once it is in
    assert sum(agent.receiving.discarded.values()) == 0


def test_a_receiving_agent_listens_on_the_transfer_topic(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    drive(agent, lambda: bool(kinds(transport, cmd.command_id)))
    assert transport.subscriptions == [TOPICS.cmd, TOPICS.data, transfer_topic(cmd.transfer.transfer_id)]
    # Repairs come on the device's own data topic: the same checks apply there.
    for frame in [index_frame(cmd, data), *chunks(cmd, data)]:
        transport.deliver(TOPICS.data, frame)
    drive(agent, settled(transport, cmd.command_id))
    assert last(transport, cmd.command_id).kind == EventKind.INSTALLED
    assert transport.subscriptions == [TOPICS.cmd, TOPICS.data]


def test_rollback_and_remove_commands(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    for version in (1, 2):
        cmd = send_deploy(fleet, transport, fleet.bundle(version), "tiny", version)
        drive(agent, settled(transport, cmd.command_id))
        assert kinds(transport, cmd.command_id)[-1] == EventKind.INSTALLED
    now = time.time()
    wrong = RollbackCommand(uuid.uuid4().hex, "tiny", 3, now, device_id=DEVICE, expires_at=now + 60)
    transport.deliver(TOPICS.cmd, fleet.signed(wrong))
    drive(agent, settled(transport, wrong.command_id))
    refusal = last(transport, wrong.command_id)
    assert refusal.kind == EventKind.REFUSED and refusal.error is not None
    assert refusal.error.code == "rollback" and "keeps v1" in refusal.error.message
    back = RollbackCommand(uuid.uuid4().hex, "tiny", 1, now, device_id=DEVICE, expires_at=now + 60)
    transport.deliver(TOPICS.cmd, fleet.signed(back))
    drive(agent, settled(transport, back.command_id))
    assert last(transport, back.command_id).detail == {"action": "rollback", "name": "tiny", "version": 1}
    assert agent.installer.active("tiny").version == 1  # type: ignore[union-attr]
    remove = RemoveCommand(uuid.uuid4().hex, "tiny", now, device_id=DEVICE, expires_at=now + 60)
    transport.deliver(TOPICS.cmd, fleet.signed(remove))
    drive(agent, settled(transport, remove.command_id))
    assert last(transport, remove.command_id).detail == {"action": "remove", "name": "tiny", "removed": 1}
    assert agent.installer.active("tiny") is None
    assert transport.statuses()[-1].active == {"bundles": []}
    # Rollback protection outlives the removal: v1 again is refused as not newer.
    again = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)
    drive(agent, settled(transport, again.command_id))
    assert last(transport, again.command_id).kind == EventKind.REFUSED


def test_a_failed_health_check_rolls_back(make_agent, fleet: Fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    good = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)
    drive(agent, settled(transport, good.command_id))
    bad_model = nan_model(tmp_path)
    bad = send_deploy(fleet, transport, fleet.bundle(2, model=bad_model), "tiny", 2)
    drive(agent, settled(transport, bad.command_id))
    failure = last(transport, bad.command_id)
    assert failure.kind == EventKind.FAILED and failure.error is not None
    assert failure.error.code == "health_check" and "NaN" in failure.error.message
    assert failure.error.details["rolled_back_to"] == 1
    assert agent.installer.active("tiny").version == 1  # type: ignore[union-attr]
    assert agent.installer.pending() == []


def _ended_and_asked_for(agent: Agent, transport: MemoryTransport, cmd: DeployCommand) -> list[int]:
    """Send transfer_end; the chunks the device then says it lacks."""
    before = len([e for e in transport.events() if e.kind == EventKind.NEED_CHUNKS])
    transport.deliver(TOPICS.cmd, encode(TransferEnd(cmd.command_id, cmd.transfer.transfer_id)))
    drive(agent, lambda: len([e for e in transport.events() if e.kind == EventKind.NEED_CHUNKS]) > before)
    need = [e for e in transport.events() if e.kind == EventKind.NEED_CHUNKS][-1]
    assert need.command_id == cmd.command_id and need.transfer_id == cmd.transfer.transfer_id
    return decode_ranges(need.missing_ranges, cmd.transfer.chunk_count)


def test_a_tampered_chunk_is_discarded_and_the_real_one_installs(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = send_deploy(fleet, transport, data, "tiny", 1, tamper=2)  # forged on the transfer topic
    drive(agent, lambda: agent.receiving.discarded["digest"] == 1 and transport.inbox.empty() and not agent.inbound)
    assert kinds(transport, cmd.command_id) == [EventKind.ACCEPTED]  # not refused: the transfer goes on
    assert agent.installer.active("tiny") is None and len(agent.receiving) == 1
    assert _ended_and_asked_for(agent, transport, cmd) == [2]
    send_frames(transport, cmd, [chunks(cmd, data)[2]])
    drive(agent, settled(transport, cmd.command_id))
    assert kinds(transport, cmd.command_id)[-2:] == [EventKind.RECEIVED, EventKind.INSTALLED]
    assert agent.installer.active("tiny").version == 1  # type: ignore[union-attr]
    assert EventKind.REFUSED not in kinds(transport, cmd.command_id)
    assert list((agent.config.data_dir / "staging").iterdir()) == []


def test_a_forged_index_and_a_chunk_longer_than_declared_are_discarded(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    tid = cmd.transfer.transfer_id
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    forged = ChunkIndex.of_chunks(parts(bytes(len(data))))  # well formed, not the one the offer binds
    send_frames(transport, cmd, [encode_chunk(tid, INDEX_FRAME, forged.digests), index_frame(cmd, data)[:-1]])
    send_frames(transport, cmd, [encode_chunk(tid, 0, data[: CHUNK + 1]), encode_chunk(tid, 99, data[:CHUNK])])
    drive(agent, lambda: sum(agent.receiving.discarded.values()) == 4)
    assert agent.receiving.discarded == {"index": 2, "length": 1, "outside_offer": 1}
    assert kinds(transport, cmd.command_id) == [EventKind.ACCEPTED]
    assert _ended_and_asked_for(agent, transport, cmd) == list(range(cmd.transfer.chunk_count))
    need = [e for e in transport.events() if e.kind == EventKind.NEED_CHUNKS][-1]
    assert need.detail["have_index"] is False
    send_frames(transport, cmd, [index_frame(cmd, data), *chunks(cmd, data)])
    drive(agent, settled(transport, cmd.command_id))
    assert last(transport, cmd.command_id).kind == EventKind.INSTALLED


def test_missing_chunks_are_asked_for_and_the_transfer_resumes(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    frames = chunks(cmd, data)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), *frames[1:]])
    assert _ended_and_asked_for(agent, transport, cmd) == [0]
    need = last(transport, cmd.command_id)
    assert need.missing_ranges == "0" and need.detail == {"have": len(frames) - 1, "missing": 1, "have_index": True}
    transport.deliver(TOPICS.data, frames[0])
    drive(agent, settled(transport, cmd.command_id))
    assert last(transport, cmd.command_id).kind == EventKind.INSTALLED


def test_malformed_and_unsigned_messages_become_error_events(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    transport.deliver(TOPICS.cmd, b"{not json")
    transport.deliver(TOPICS.data, b"\x00\x01")
    cmd = fleet.deploy(fleet.bundle(1), "tiny", 1)
    transport.deliver(TOPICS.cmd, encode(cmd))  # unsigned
    drive(agent, lambda: len([e for e in transport.events() if e.kind == EventKind.ERROR]) == 3)
    errors = [e.error for e in transport.events() if e.kind == EventKind.ERROR]
    assert all(e is not None for e in errors)
    assert errors[2].code == "signature_invalid"  # type: ignore[union-attr]
    assert not kinds(transport, cmd.command_id)
    # The agent goes on working.
    ok = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)
    drive(agent, settled(transport, ok.command_id))
    assert last(transport, ok.command_id).kind == EventKind.INSTALLED


def test_a_flood_of_junk_is_not_answered_by_a_flood_of_error_events(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    for _ in range(300):
        transport.deliver(TOPICS.cmd, b"{not json")
    drive(
        agent,
        lambda: len([e for e in transport.events() if e.kind == EventKind.ERROR]) + agent.errors_not_reported == 300,
    )
    errors = [e for e in transport.events() if e.kind == EventKind.ERROR]
    assert 20 <= len(errors) <= 30 and len(errors) + agent.errors_not_reported == 300  # a burst, then a few a second
    ok = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)  # a real command is answered at once
    drive(agent, settled(transport, ok.command_id))
    assert last(transport, ok.command_id).kind == EventKind.INSTALLED


def test_events_wait_in_the_outbox_while_offline(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    drive(agent, lambda: bool(transport.statuses()))
    transport.disconnect()
    now = time.time()
    remove = RemoveCommand(uuid.uuid4().hex, "tiny", now, device_id=DEVICE, expires_at=now + 60)
    transport.deliver(TOPICS.cmd, fleet.signed(remove))
    drive(agent, lambda: agent.reporter.outbox.pending == 1)
    assert not kinds(transport, remove.command_id)
    transport.reconnect()
    drive(agent, settled(transport, remove.command_id))
    assert agent.reporter.outbox.pending == 0


def test_a_full_inbound_queue_drops_counts_and_reports(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(inbound_queue_max=16)
    # The worker is not stepping: the transport fills the queue, and the rest is dropped.
    for i in range(40):
        transport.deliver(TOPICS.data, encode_chunk("0" * 32, i, b"x"))
    deadline = time.monotonic() + 10
    while agent.inbound.dropped + len(agent.inbound) < 40 + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The start's ConnectionChange is always kept; 16 chunks fit beside it.
    assert agent.inbound.dropped == 40 - 16
    assert len(agent.inbound) == 16 + 1
    transport.reconnect()
    drive(agent, lambda: len(transport.statuses()) >= 2)
    assert transport.statuses()[-1].extra == {"inbound_dropped": 24}


def test_shutdown_says_goodbye_and_keeps_partial_transfers(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), chunks(cmd, data)[0]])
    drive(agent, lambda: len(agent.receiving) == 1 and not agent.inbound and transport.inbox.empty())
    agent.shutdown()
    assert transport.closed
    assert transport.statuses()[-1].state == "offline"
    tid = cmd.transfer.transfer_id
    staging = agent.config.data_dir / "staging"
    assert sorted(p.name for p in staging.iterdir()) == [f"{tid}.cmd", f"{tid}.index", f"{tid}.part"]


def test_an_agent_restarted_mid_transfer_says_what_it_lacks_and_resumes(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    tid, count = cmd.transfer.transfer_id, cmd.transfer.chunk_count
    frames = chunks(cmd, data)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), *frames[::2]])
    drive(agent, lambda: have(agent, tid) == len(frames[::2]))
    agent.shutdown()  # the device reboots half-way
    again, transport = make_agent()
    assert transfer_topic(tid) in transport.subscriptions  # listening again before anything is said
    drive(again, lambda: EventKind.NEED_CHUNKS in kinds(transport, cmd.command_id))  # on connect, unasked
    need = last(transport, cmd.command_id)
    # What is on disk is checked against the index: the tar's zero padding at the end already
    # matches in the reserved (zero-filled) file, so only the real chunks never written are lacking.
    lacking = [i for i in range(1, count, 2) if any(parts(data)[i])]
    assert lacking and len(lacking) < len(frames[1::2])
    assert decode_ranges(need.missing_ranges, count) == lacking and need.transfer_id == tid
    assert need.detail == {"have": count - len(lacking), "missing": len(lacking), "have_index": True}
    send_frames(transport, cmd, [frames[i] for i in lacking])  # only the rest
    drive(again, settled(transport, cmd.command_id))
    assert kinds(transport, cmd.command_id)[-2:] == [EventKind.RECEIVED, EventKind.INSTALLED]
    assert again.installer.active("tiny").version == 1  # type: ignore[union-attr]
    assert list((again.config.data_dir / "staging").iterdir()) == []


def test_a_retried_deploy_after_a_restart_resumes_the_kept_transfer(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    tid, count = cmd.transfer.transfer_id, cmd.transfer.chunk_count
    frames = chunks(cmd, data)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), *frames[:3]])
    drive(agent, lambda: have(agent, tid) == 3)
    agent.shutdown()
    again, transport = make_agent()
    retry = fleet.deploy(data, "tiny", 1)  # the host tried again: a new command, the same content
    assert retry.transfer.transfer_id == tid and retry.command_id != cmd.command_id
    transport.deliver(TOPICS.cmd, fleet.signed(retry))
    drive(again, lambda: EventKind.ACCEPTED in kinds(transport, retry.command_id))
    accepted = last(transport, retry.command_id)
    lacking = [i for i in range(3, count) if any(parts(data)[i])]  # zero padding is on disk already
    assert decode_ranges(accepted.missing_ranges, count) == lacking and lacking
    assert accepted.detail == {"have": count - len(lacking), "have_index": True}
    send_frames(transport, retry, [frames[i] for i in lacking])
    drive(again, settled(transport, retry.command_id))
    assert kinds(transport, retry.command_id)[-2:] == [EventKind.RECEIVED, EventKind.INSTALLED]


def test_other_content_offered_under_a_held_transfer_id_is_checked_before_any_chunk(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    agent, transport = make_agent()
    installed = send_deploy(fleet, transport, fleet.bundle(2), "tiny", 2)
    drive(agent, settled(transport, installed.command_id))
    data = fleet.bundle(3)
    held = fleet.deploy(data, "tiny", 3)
    tid = held.transfer.transfer_id
    transport.deliver(TOPICS.cmd, fleet.signed(held))
    send_frames(transport, held, [index_frame(held, data), chunks(held, data)[0]])
    drive(agent, lambda: have(agent, tid) == 1)
    # A host that does not name transfers by content offers v1 under the id of the transfer held.
    old = fleet.deploy(fleet.bundle(1), "tiny", 1)
    old = dataclasses.replace(old, transfer=dataclasses.replace(old.transfer, transfer_id=tid))
    transport.deliver(TOPICS.cmd, fleet.signed(old))
    drive(agent, settled(transport, old.command_id))
    assert kinds(transport, old.command_id) == [EventKind.REFUSED]  # the version check was not skipped
    assert last(transport, old.command_id).error.code == "rollback"  # type: ignore[union-attr]
    assert have(agent, tid) == 1  # what was held is untouched


def test_a_transfer_evicted_for_a_new_one_is_no_longer_listened_to(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    import os

    agent, transport = make_agent()
    held = agent.receiving.max_transfers
    cmds = [fleet.deploy(os.urandom(3 * CHUNK), f"b{k}", 1) for k in range(held + 1)]
    for cmd in cmds:  # each begun, none finished: the first one is the oldest idle one when the last comes
        transport.deliver(TOPICS.cmd, fleet.signed(cmd))
        drive(agent, lambda cmd=cmd: EventKind.ACCEPTED in kinds(transport, cmd.command_id))
    assert len(agent.receiving) == held and agent.receiving.get(cmds[0].transfer.transfer_id) is None
    listening = [t for t in transport.subscriptions if t.startswith("edge/v1/transfers/")]
    assert listening == [transfer_topic(c.transfer.transfer_id) for c in cmds[1:]]  # its broadcast costs nothing


def test_progress_is_reported_every_so_many_chunks(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    data = bytes(range(256)) * (41 * CHUNK // 256)  # 41 chunks; never finished here
    cmd = fleet.deploy(data, "big", 1)
    frames = chunks(cmd, data)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    # Duplicates and forgeries are not progress.
    forged = encode_chunk(cmd.transfer.transfer_id, 5, bytes(CHUNK))
    send_frames(
        transport, cmd, [index_frame(cmd, data), *frames[:10], frames[3], forged, *frames[10 : 2 * PROGRESS_EVERY + 3]]
    )
    drive(agent, lambda: have(agent, cmd.transfer.transfer_id) == 2 * PROGRESS_EVERY + 3)
    progress = [e for e in transport.events() if e.kind == EventKind.PROGRESS]
    assert [e.detail for e in progress] == [{"have": PROGRESS_EVERY}, {"have": 2 * PROGRESS_EVERY}]
    assert all(e.command_id == cmd.command_id and e.transfer_id == cmd.transfer.transfer_id for e in progress)


def test_the_memory_transport_satisfies_the_protocol() -> None:
    from device_agent.transport import Transport
    from edge_sdk.mqtt import MqttClient, MqttOptions

    def accepts(_t: Transport) -> None:
        return None

    accepts(MemoryTransport())
    accepts(MqttClient("mqtt://127.0.0.1:1", MqttOptions(client_id="x")))  # structurally, unchanged
    assert isinstance(Incoming("t", b"", False), Incoming)


# --- cheap checks first: the signed offer is checked before any chunk moves -----------------


def _deploy_with_facts(fleet: Fleet, version: int, name: str = "tiny", **facts: object) -> tuple[DeployCommand, bytes]:
    """A deploy command as today's host builds it: the manifest's facts in the signed offer."""
    import dataclasses

    from host_tools.fleet.deployer import bundle_facts, read_manifest

    data = fleet.bundle(version, name)
    offered = dataclasses.replace(bundle_facts(read_manifest(fleet.dir / f"{name}-v{version}.edge")), **facts)
    return dataclasses.replace(fleet.deploy(data, name, version), bundle=offered), data


def _refused_at_once(agent: Agent, transport: MemoryTransport, fleet: Fleet, cmd: DeployCommand) -> Event:
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    drive(agent, settled(transport, cmd.command_id))
    assert kinds(transport, cmd.command_id) == [EventKind.REFUSED]  # no ACCEPTED: the host sends no chunk
    assert list((agent.config.data_dir / "staging").iterdir()) == []  # no staging file reserved
    event = last(transport, cmd.command_id)
    assert event.error is not None
    return event


def test_an_older_version_is_refused_before_any_chunk(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    for version in (1, 2):
        cmd = send_deploy(fleet, transport, fleet.bundle(version), "tiny", version)
        drive(agent, settled(transport, cmd.command_id))
    old, _ = _deploy_with_facts(fleet, 1)
    event = _refused_at_once(agent, transport, fleet, old)
    assert event.error is not None and event.error.code == "rollback"
    assert event.error.message == "tiny v1 is not newer than the floor v2 (the version this device runs; installed: v2)"


def test_a_missing_runtime_expiry_and_target_are_refused_before_any_chunk(  # type: ignore[no-untyped-def]
    make_agent, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    import device_agent.install as install_module

    agent, transport = make_agent()
    monkeypatch.setattr(install_module, "available_runtimes", lambda: {"onnxruntime": "1.0"})
    cmd, _ = _deploy_with_facts(fleet, 1, runtime="litert")
    event = _refused_at_once(agent, transport, fleet, cmd)
    assert event.error is not None and event.error.code == "target_mismatch"
    assert "needs runtime litert, which this device lacks (it has onnxruntime)" in event.error.message
    cmd, _ = _deploy_with_facts(fleet, 1, expires_at=time.time() - 5)
    assert _refused_at_once(agent, transport, fleet, cmd).error.code == "expired"  # type: ignore[union-attr]
    cmd, _ = _deploy_with_facts(fleet, 1, arch=("riscv64",))
    event = _refused_at_once(agent, transport, fleet, cmd)
    assert event.error is not None and event.error.details["constraint"] == "arch"
    assert agent.installer.all_active() == []


def test_storage_for_the_unpacked_payload_is_checked_before_any_chunk(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    cmd, data = _deploy_with_facts(fleet, 1)
    assert cmd.bundle is not None
    free = len(data) + cmd.bundle.unpacked_bytes // 2  # room for the download, not for unpacking it too
    agent.installs.free_bytes = lambda _path: free
    event = _refused_at_once(agent, transport, fleet, cmd)
    assert event.error is not None and event.error.code == "storage"
    assert f"{len(data)} bytes to download + {cmd.bundle.unpacked_bytes} bytes unpacked" in event.error.message
    assert f"{free} bytes free" in event.error.message
    agent.installs.free_bytes = lambda _path: 1 << 40
    ok, data = _deploy_with_facts(fleet, 1)
    transport.deliver(TOPICS.cmd, fleet.signed(ok))
    send_frames(transport, ok, [index_frame(ok, data), *chunks(ok, data)])
    drive(agent, settled(transport, ok.command_id))
    assert kinds(transport, ok.command_id)[-1] == EventKind.INSTALLED


def test_a_bundle_that_is_not_the_content_the_offer_named_is_refused(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    cmd, data = _deploy_with_facts(fleet, 1, content="0" * 64)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), *chunks(cmd, data)])
    drive(agent, settled(transport, cmd.command_id))
    event = last(transport, cmd.command_id)
    assert event.kind == EventKind.REFUSED and event.error is not None and event.error.code == "manifest_invalid"
    assert "does not hold the content the signed command describes" in event.error.message
    assert agent.installer.all_active() == []


def test_an_offer_whose_index_names_another_bundle_is_refused_at_the_install(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    # The device does not hash the whole file once its chunks are in (device_agent.receiving,
    # "Why no whole-file hash"): an offer that names one bundle by its sha256 and binds the
    # chunk index of another yields the other's bytes, and the install refuses them.
    agent, transport = make_agent()
    named, other = fleet.bundle(1, "tiny"), fleet.bundle(1, "other")
    cmd = fleet.deploy(named, "tiny", 1)
    mixed = dataclasses.replace(
        cmd, transfer=dataclasses.replace(cmd.transfer, chunks_sha256=ChunkIndex.of_chunks(parts(other)).sha256)
    )
    mixed = dataclasses.replace(mixed, transfer=dataclasses.replace(mixed.transfer, size=len(other)))
    transport.deliver(TOPICS.cmd, fleet.signed(mixed))
    send_frames(transport, mixed, [index_frame(mixed, other), *chunks(mixed, other)])
    drive(agent, settled(transport, mixed.command_id))
    assert EventKind.RECEIVED in kinds(transport, mixed.command_id)
    event = last(transport, mixed.command_id)
    assert event.kind == EventKind.REFUSED and event.error is not None, event
    assert event.error.code == "manifest_invalid" and "other" in event.error.message, event.error
    assert agent.installer.all_active() == []


def test_an_old_command_without_facts_still_installs_and_is_checked_after_receipt(  # type: ignore[no-untyped-def]
    make_agent, fleet: Fleet, tmp_path: Path
) -> None:
    agent, transport = make_agent()
    ran = {}
    for version in (1, 2):
        ran[version] = fleet.bundle(version)
        cmd = send_deploy(fleet, transport, ran[version], "tiny", version)
        drive(agent, settled(transport, cmd.command_id))
        assert cmd.bundle is None and kinds(transport, cmd.command_id)[-1] == EventKind.INSTALLED
    now = time.time()
    back = RollbackCommand(uuid.uuid4().hex, "tiny", 1, now, device_id=DEVICE, expires_at=now + 60)
    transport.deliver(TOPICS.cmd, fleet.signed(back))
    drive(agent, settled(transport, back.command_id))
    # Other content under v2, which ran here: refused once received (the old offer does not name content).
    other = send_deploy(fleet, transport, fleet.bundle(2, model=nan_model(tmp_path)), "tiny", 2)
    drive(agent, settled(transport, other.command_id))
    event = last(transport, other.command_id)
    assert kinds(transport, other.command_id)[0] == EventKind.ACCEPTED
    assert event.kind == EventKind.REFUSED and event.error is not None
    assert "tiny v2 differs from the v2 this device already ran" in event.error.message
    # The v2 that ran deploys again after the signed rollback.
    again = send_deploy(fleet, transport, ran[2], "tiny", 2)
    drive(agent, settled(transport, again.command_id))
    assert kinds(transport, again.command_id)[-1] == EventKind.INSTALLED


# --- an agent that cannot be deafened; time the device can trust --------------------------
# Periodic work under a trickle of junk, the watchdog decision, the time floor against a
# clock set back, an expired root against signed commands. The same attacks against real
# agent processes through a real Mosquitto: tests/integration/test_agent_liveness.py.


class Recording(Notifier):
    """A notifier that records what it would send."""

    def __init__(self) -> None:
        super().__init__("/unused", watchdog_usec=2, clock=time.monotonic)  # ping whenever asked
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *fields: str) -> bool:
        self.sent.append(fields)
        return True

    @property
    def pings(self) -> int:
        return sum(1 for f in self.sent if f == ("WATCHDOG=1",))


def _fake_deploy(device: str, now: float, ttl: float) -> DeployCommand:
    offer = TransferOffer(uuid.uuid4().hex, 4096, "0" * 64, 1024, "1" * 64)
    return DeployCommand(uuid.uuid4().hex, "tiny", 1, offer, now, device_id=device, expires_at=now + ttl)


def _answer(transport: MemoryTransport, command_id: str) -> Callable[[], bool]:
    return lambda: any(e.command_id == command_id for e in transport.events())


# --- periodic work under traffic ----------------------------------------------------------


def test_a_trickle_of_junk_does_not_stop_idle_reports(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(transfer_idle_timeout_s=1.0)
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    drive(agent, lambda: len(agent.receiving) == 1)
    # From now on the worker always finds something waiting: a junk message, never a chunk.
    deadline = time.monotonic() + 10
    while EventKind.NEED_CHUNKS not in kinds(transport, cmd.command_id):
        assert time.monotonic() < deadline, "the idle transfer was never reported"
        transport.deliver(TOPICS.data, b"junk")
        transport.deliver(TOPICS.data, b"junk")
        time.sleep(0.05)
        assert agent.step(0.3)  # an item was there: before the fix, periodic work never ran
    need = last(transport, cmd.command_id)
    assert decode_ranges(need.missing_ranges, cmd.transfer.chunk_count) == list(range(cmd.transfer.chunk_count))
    assert len(agent.receiving) == 1  # idle is not abandoned: the transfer is kept for the host to go on
    assert EventKind.REFUSED not in kinds(transport, cmd.command_id)


def test_a_duplicate_chunk_does_not_keep_a_transfer_from_being_reported_idle(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(transfer_idle_timeout_s=1.0)
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    first = chunks(cmd, data)[0]
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), first])
    drive(agent, lambda: have(agent, cmd.transfer.transfer_id) == 1)
    started = time.monotonic()
    while EventKind.NEED_CHUNKS not in kinds(transport, cmd.command_id):
        assert time.monotonic() - started < 5, "duplicates kept the transfer from being reported idle"
        send_frames(transport, cmd, [first])  # the same chunk, again and again
        agent.step(0.1)
    assert time.monotonic() - started < 2.5
    assert last(transport, cmd.command_id).missing_ranges == f"1-{cmd.transfer.chunk_count - 1}"


def test_an_abandoned_transfer_is_removed_after_staging_max_age(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(staging_max_age_s=0.5)
    data = fleet.bundle(1)
    cmd = fleet.deploy(data, "tiny", 1)
    transport.deliver(TOPICS.cmd, fleet.signed(cmd))
    send_frames(transport, cmd, [index_frame(cmd, data), chunks(cmd, data)[0]])
    drive(agent, lambda: len(agent.receiving) == 1)
    assert transfer_topic(cmd.transfer.transfer_id) in transport.subscriptions
    drive(agent, lambda: len(agent.receiving) == 0, timeout_s=10)
    assert list((agent.config.data_dir / "staging").iterdir()) == []
    assert transport.subscriptions == [TOPICS.cmd, TOPICS.data]
    assert EventKind.REFUSED not in kinds(transport, cmd.command_id)


# --- the watchdog --------------------------------------------------------------------------


def test_should_feed_needs_the_receiving_thread_alive() -> None:
    assert should_feed(Liveness(network_alive=True))
    assert not should_feed(Liveness(network_alive=False))


def test_a_dead_network_thread_stops_the_watchdog_and_the_agent(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    notifier = Recording()
    agent._notifier = notifier
    agent.step(0.01)
    assert notifier.pings == 1
    transport.network_alive = False  # paho's thread died (an exception escaped, MemoryError)
    for _ in range(5):
        agent.step(0.01)
    assert notifier.pings == 1  # no more: systemd's watchdog fires and restarts the agent
    assert any(f[0].startswith("STATUS=") and "deaf" in f[0] for f in notifier.sent)
    transport.network_alive = True  # it does not come back in practice, but the decision is live
    agent.step(0.01)
    assert notifier.pings == 2


def test_run_ends_with_an_error_when_the_agent_is_deaf(fleet: Fleet, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(agent_module, "_DEAF_GRACE_S", 0.2)
    (tmp_path / "sys").mkdir()
    config = AgentConfig("mqtt://127.0.0.1:1", DEVICE, tmp_path / "data", fleet.root_path, sysfs_root=tmp_path / "sys")
    transport = MemoryTransport(network_alive=False)
    agent = Agent(config, transport)
    with pytest.raises(TransportError, match="network thread"):
        agent.run(threading.Event())
    assert transport.closed  # it said goodbye and disconnected on the way out


# --- time the device can trust ---------------------------------------------------------------


def test_a_command_replayed_after_the_clock_went_back_is_refused(fleet: Fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = time.time()
    offset = [0.0]
    (tmp_path / "sys").mkdir()
    config = AgentConfig("mqtt://127.0.0.1:1", DEVICE, tmp_path / "data", fleet.root_path, sysfs_root=tmp_path / "sys")

    def boot() -> tuple[Agent, MemoryTransport]:
        transport = MemoryTransport()
        agent = Agent(config, transport, clock=lambda: time.time() + offset[0])
        agent.start()
        return agent, transport

    agent, transport = boot()
    original = _fake_deploy(DEVICE, base, ttl=600)
    recorded = fleet.signed(original)  # the attacker keeps a copy
    transport.deliver(TOPICS.cmd, recorded)
    drive(agent, lambda: bool(transport.events()))
    assert transport.events()[-1].kind == EventKind.ACCEPTED
    agent.shutdown()
    offset[0] = 1200.0  # 20 minutes on: the recorded command has expired by the clock
    agent, transport = boot()
    later = _fake_deploy(DEVICE, base, ttl=1800)
    transport.deliver(TOPICS.cmd, fleet.signed(later))
    drive(agent, _answer(transport, later.command_id))
    assert last(transport, later.command_id).kind == EventKind.ACCEPTED
    agent.shutdown()
    offset[0] = 1200.0 - 900  # reboot with the clock 15 minutes early: the command looks fresh again
    agent, transport = boot()
    transport.deliver(TOPICS.cmd, recorded)
    drive(agent, lambda: EventKind.REFUSED in kinds(transport, original.command_id))
    refused = last(transport, original.command_id)
    assert refused.kind == EventKind.REFUSED and refused.error is not None and refused.error.code == "replay"
    # The partial transfers both commands began are kept across the reboots and reported on connect.
    reported = {e.command_id for e in transport.events() if e.kind == EventKind.NEED_CHUNKS}
    assert reported == {original.command_id, later.command_id}
    agent.shutdown()


def test_the_floor_survives_restarts_and_outranks_an_early_clock(fleet: Fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "sys").mkdir()
    config = AgentConfig("mqtt://127.0.0.1:1", DEVICE, tmp_path / "data", fleet.root_path, sysfs_root=tmp_path / "sys")
    now = time.time()
    agent = Agent(config, MemoryTransport(), clock=lambda: now)
    agent.start()
    cmd = _fake_deploy(DEVICE, now + 100, ttl=600)  # issued a little ahead of this device's clock
    agent.transport.deliver(TOPICS.cmd, fleet.signed(cmd))  # type: ignore[attr-defined]
    drive(agent, lambda: agent.trust.floor == now + 100)
    agent.shutdown()
    assert json.loads((config.data_dir / "trust" / "time.json").read_text()) == {"floor": now + 100}
    # Rebooted with a clock an hour early: the device believes the floor, not the clock.
    agent = Agent(config, MemoryTransport(), clock=lambda: now - 3600)
    assert agent.trusted_now() == now + 100
    stale = _fake_deploy(DEVICE, now - 3600, ttl=600)  # valid by the early clock, expired by the floor
    agent.start()
    agent.transport.deliver(TOPICS.cmd, fleet.signed(stale))  # type: ignore[attr-defined]
    drive(agent, _answer(agent.transport, stale.command_id))  # type: ignore[arg-type]
    ev = last(agent.transport, stale.command_id)  # type: ignore[arg-type]
    assert ev.kind == EventKind.REFUSED and ev.error is not None and ev.error.code == "expired"
    agent.shutdown()


def test_an_expired_root_refuses_every_command_until_a_new_root_arrives(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    ahead = 2 * 86400.0  # the device's clock is past the root's expiry (one day)
    agent, transport = make_agent(debug_clock_offset_s=ahead)
    data = fleet.bundle(1)
    drive(agent, lambda: bool(transport.statuses()))
    now = time.time() + ahead
    remove = RemoveCommand(uuid.uuid4().hex, "tiny", now, device_id=DEVICE, expires_at=now + 60)
    deploy = fleet.deploy(data, "tiny", 1)
    deploy = DeployCommand(
        uuid.uuid4().hex,
        "tiny",
        1,
        deploy.transfer,
        now,
        benchmark=deploy.benchmark,
        device_id=DEVICE,
        expires_at=now + 60,
    )
    for cmd in (remove, deploy):
        transport.deliver(TOPICS.cmd, fleet.signed(cmd))
        drive(agent, _answer(transport, cmd.command_id))
        ev = last(transport, cmd.command_id)
        assert ev.kind == EventKind.REFUSED and ev.error is not None and ev.error.code == "expired", ev
        assert "root" in ev.error.message
    assert len(agent.receiving) == 0 and agent.installer.active("tiny") is None
    # Root updates still apply (they carry their own signatures); then commands are obeyed again.
    old = agent.trust.root
    new = Root(2, now + 86400, dict(old.keys), {n: Role(r.keyids, r.threshold) for n, r in old.roles.items()})
    transport.deliver(TOPICS.cmd, encode(RootUpdate(json.loads(sign_root(new, [fleet.root_key]).to_bytes()))))
    drive(agent, lambda: agent.trust.root.version == 2)
    again = RemoveCommand(uuid.uuid4().hex, "tiny", now, device_id=DEVICE, expires_at=now + 60)
    transport.deliver(TOPICS.cmd, fleet.signed(again))
    drive(agent, settled(transport, again.command_id))
    assert last(transport, again.command_id).kind == EventKind.DONE


def test_periodic_metrics_reports_measure_each_active_bundle_again_live_only(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(metrics_every_s=1.0, metrics_runs=3)
    cmd = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)
    drive(agent, settled(transport, cmd.command_id))
    other = send_deploy(fleet, transport, fleet.bundle(1, name="other"), "other", 1)
    drive(agent, settled(transport, other.command_id))
    drive(agent, lambda: sum(1 for m in transport.metrics() if m.extra.get("mode") == "periodic") >= 4, timeout_s=20)
    reports = transport.metrics()
    installed = [m for m in reports if m.command_id in (cmd.command_id, other.command_id)]
    periodic = [m for m in reports if m.extra.get("mode") == "periodic"]
    assert len(installed) == 2 and all("mode" not in m.extra for m in installed)
    assert {m.bundle_name for m in periodic} == {"tiny", "other"}
    assert all(m.command_id == "" and m.extra["every_s"] == 1.0 for m in periodic)
    assert all(m.latency is not None and m.latency.count == 3 and m.latency.p50_ms > 0 for m in periodic)
    times = [m.ts for m in reports]
    assert times == sorted(times) and len(set(times)) == len(times)  # each its own key in the registry
    retained = {p.retain for p in transport.published if p.topic == TOPICS.metrics}
    assert retained == {True, False}  # the install's report is retained, periodic ones are not
    assert agent.telemetry is not None and agent.telemetry.failures == 0
    transport.disconnect()  # offline: nothing measured, nothing buffered
    sent = len(transport.metrics())
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        agent.step(0.05)
    assert len(transport.metrics()) == sent and agent.reporter.outbox.pending == 0


def test_a_periodic_measurement_that_fails_is_counted_and_not_reported(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(metrics_every_s=1.0, metrics_runs=2)
    cmd = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)
    drive(agent, settled(transport, cmd.command_id))
    active = agent.installer.active("tiny")
    assert active is not None
    active.model_path.write_bytes(b"not a model any more")  # the disk under it went bad
    assert agent.telemetry is not None
    drive(agent, lambda: agent.telemetry is not None and agent.telemetry.failures >= 2, timeout_s=10)
    assert [m.command_id for m in transport.metrics()] == [cmd.command_id]  # only the install's report
    assert agent.telemetry.reports == 0


def test_no_periodic_metrics_reports_unless_configured(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent()
    cmd = send_deploy(fleet, transport, fleet.bundle(1), "tiny", 1)
    drive(agent, settled(transport, cmd.command_id))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        agent.step(0.05)
    assert agent.telemetry is None and len(transport.metrics()) == 1


def test_status_carries_labels_and_heartbeats_follow_live_only(make_agent, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    agent, transport = make_agent(labels={"site": "depot-3", "hw": "pi5"}, heartbeat_s=1.0)
    drive(agent, lambda: bool(transport.statuses()))
    birth = transport.statuses()[-1]
    assert birth.labels == {"hw": "pi5", "site": "depot-3"} and birth.heartbeat_s == 1.0
    assert not transport.heartbeats()  # the birth message counts as the first
    drive(agent, lambda: len(transport.heartbeats()) >= 2, timeout_s=10)
    beats = transport.heartbeats()
    assert all(b.device_id == DEVICE and b.heartbeat_s == 1.0 for b in beats)
    assert beats[1].ts - beats[0].ts >= 0.9
    published = [p for p in transport.published if p.topic == TOPICS.heartbeat]
    assert published and not any(p.retain for p in published)
    transport.disconnect()  # offline: no heartbeat is buffered for later
    sent = len(transport.heartbeats())
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        agent.step(0.05)
    assert len(transport.heartbeats()) == sent and agent.reporter.outbox.pending == 0
