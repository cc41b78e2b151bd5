"""device_agent.deltas and the agent's side of deltas: the delta when the active slot is its base, else the bundle.

Real bundles (an MLP and the same MLP with its last layer fine-tuned), a real delta from
:func:`host_tools.delta.build_delta`, a whole Agent driven through
:class:`memory_transport.MemoryTransport`. The base decision is checked on a slot laid out
as the installer lays it out; every fallback ends with the bundle installed whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from memory_transport import MemoryTransport
from onnx import numpy_helper
from sparse_models import mlp

from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.deltas import base_refusal
from device_agent.installer import ActiveBundle
from edge_sdk.bundle import BundleSpec, Manifest, content_digest, pack_bundle, verify_bundle
from edge_sdk.bundle.archive import BundleReader
from edge_sdk.protocol import (
    INDEX_FRAME,
    BenchmarkSpec,
    ChunkIndex,
    DeltaOffer,
    DeployCommand,
    DeviceTopics,
    Event,
    EventKind,
    TransferOffer,
    content_transfer_id,
    encode,
    encode_chunk,
    sign_command,
    transfer_topic,
)
from edge_sdk.trust import Role, Root, SigningKey, TrustedKeys, sign_root
from host_tools.delta import build_delta

DEVICE = "pi-delta"
TOPICS = DeviceTopics(DEVICE)
CHUNK = 1024
DIMS = [16, 128, 128, 4]
NAME = "mlp"


class Host:
    """Keys, bundles, deltas and signed commands, as the host makes them."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.root_key, self.bundle_key, self.command_key = (SigningKey.generate() for _ in range(3))
        every = {k.keyid: k.public_key for k in (self.root_key, self.bundle_key, self.command_key)}
        roles = {
            "root": Role((self.root_key.keyid,)),
            "bundles": Role((self.bundle_key.keyid,)),
            "commands": Role((self.command_key.keyid,)),
        }
        self.root_path = d / "root.json"
        self.root_path.write_bytes(sign_root(Root(1, time.time() + 86400, every, roles), [self.root_key]).to_bytes())
        self.sample = d / "sample.npz"
        np.savez(self.sample, x=np.ones((1, DIMS[0]), np.float32))

    def pack(self, version: int, model: onnx.ModelProto, tag: str = "") -> Path:
        src = self.dir / f"model-v{version}{tag}.onnx"
        src.write_bytes(model.SerializeToString())
        out = self.dir / f"{NAME}-v{version}{tag}.edge"
        spec = BundleSpec(NAME, version, "onnxruntime", src, sample_input=self.sample)
        pack_bundle(spec, [self.bundle_key], out, now=time.time())
        return out

    def delta(self, base: Path, new: Path) -> Path:
        out = self.dir / f"{base.stem}-to-{new.stem}.delta"
        assert build_delta(base, new, out) is not None
        return out

    def deploy(self, bundle: Path, version: int, delta: Path | None = None, base: Path | None = None) -> DeployCommand:
        """The deploy command of ``bundle``, offering ``delta`` from ``base`` when given."""
        offered = None
        if delta is not None and base is not None:
            with BundleReader(base) as reader:
                manifest = Manifest.from_bytes(reader.manifest_bytes, 1 << 20)
            offered = DeltaOffer(offer_of(delta.read_bytes()), manifest.version, content_digest(manifest.files))
        return DeployCommand(
            uuid.uuid4().hex,
            NAME,
            version,
            offer_of(bundle.read_bytes()),
            time.time(),
            benchmark=BenchmarkSpec(runs=3, warmup=1),
            device_id=DEVICE,
            expires_at=time.time() + 300,
            delta=offered,
        )

    def signed(self, cmd: DeployCommand) -> bytes:
        return encode(sign_command(cmd, [self.command_key]))


def _parts(data: bytes) -> list[bytes]:
    return [data[off : off + CHUNK] for off in range(0, len(data), CHUNK)]


def offer_of(data: bytes) -> TransferOffer:
    sha256 = hashlib.sha256(data).hexdigest()
    return TransferOffer(
        content_transfer_id(sha256, CHUNK), len(data), sha256, CHUNK, ChunkIndex.of_chunks(_parts(data)).sha256
    )


def send_file(transport: MemoryTransport, offer: TransferOffer, data: bytes) -> None:
    """The index and every chunk of ``data`` on its transfer's topic, as the host broadcasts them."""
    tid = offer.transfer_id
    frames = [encode_chunk(tid, INDEX_FRAME, ChunkIndex.of_chunks(_parts(data)).digests)]
    frames += [encode_chunk(tid, i, part) for i, part in enumerate(_parts(data))]
    for frame in frames:
        transport.deliver(transfer_topic(tid), frame)


def _finetuned(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    """The model with its last layer (W2, B2) nudged, as a fine-tune of that layer leaves it."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for init in tuned.graph.initializer:
        if init.name in ("W2", "B2"):
            values = numpy_helper.to_array(init)
            nudged = (values + rng.standard_normal(values.shape) * 0.01).astype(values.dtype)
            init.CopyFrom(numpy_helper.from_array(nudged, init.name))
    return tuned


@pytest.fixture
def host(tmp_path: Path) -> Host:
    d = tmp_path / "host"
    d.mkdir()
    return Host(d)


@pytest.fixture
def bundles(host: Host) -> tuple[Path, Path]:
    v1 = mlp(DIMS, 0.0, seed=0)
    return host.pack(1, v1), host.pack(2, _finetuned(v1))


@pytest.fixture
def make_agent(tmp_path: Path, host: Host) -> Iterator[Callable[[], tuple[Agent, MemoryTransport]]]:
    made: list[Agent] = []

    def make() -> tuple[Agent, MemoryTransport]:
        (tmp_path / "sys").mkdir(exist_ok=True)
        config = AgentConfig(
            broker="mqtt://127.0.0.1:1",
            device_id=DEVICE,
            data_dir=tmp_path / "data",
            root=host.root_path,
            sysfs_root=tmp_path / "sys",
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
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the agent did not get there in time"
        agent.step(0.02)


def events(transport: MemoryTransport, cmd: DeployCommand) -> list[Event]:
    """What the agent said about ``cmd``, its progress reports apart."""
    return [e for e in transport.events() if e.command_id == cmd.command_id and e.kind != EventKind.PROGRESS]


def _kinds(transport: MemoryTransport, cmd: DeployCommand) -> list[str]:
    return [e.kind for e in events(transport, cmd)]


def _said(transport: MemoryTransport, cmd: DeployCommand, kind: str, n: int = 1) -> Callable[[], bool]:
    final = {EventKind.REFUSED, EventKind.FAILED, EventKind.ERROR}
    return lambda: _kinds(transport, cmd).count(kind) >= n or any(k in final for k in _kinds(transport, cmd))


def install_whole(agent: Agent, transport: MemoryTransport, host: Host, bundle: Path, version: int) -> None:
    cmd = host.deploy(bundle, version)
    transport.deliver(TOPICS.cmd, host.signed(cmd))
    send_file(transport, cmd.transfer, bundle.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.INSTALLED))
    assert _kinds(transport, cmd)[-1] == EventKind.INSTALLED


def assert_runs(agent: Agent, bundle: Path, version: int) -> None:
    """The active version is ``version``, its slot holding exactly the bundle's files; staging is empty."""
    active = agent.installer.active(NAME)
    assert active is not None and active.version == version
    payload = active.slot / "payload"
    with BundleReader(bundle) as reader:
        expected = {rel: b"".join(reader.iter_member(rel, info.size)) for rel, info in reader.payload.items()}
    assert {p.relative_to(payload).as_posix(): p.read_bytes() for p in payload.rglob("*") if p.is_file()} == expected
    assert list((agent.config.data_dir / "staging").iterdir()) == []


# --- the decision: does the offered delta start from the active slot ---------------------------


@pytest.fixture
def slot(tmp_path: Path, host: Host, bundles: tuple[Path, Path]) -> ActiveBundle:
    """v1 installed as the installer lays out a slot (the verified payload and its manifest)."""
    root = tmp_path / "slots" / NAME / "v1"
    (root / "payload").mkdir(parents=True)
    verified = verify_bundle(
        bundles[0], TrustedKeys((host.bundle_key.public_key,)), time.time(), extract_to=root / "payload"
    )
    (root / "manifest.json").write_bytes(verified.manifest.to_bytes())
    return ActiveBundle(NAME, 1, root, verified.manifest)


def test_the_delta_is_taken_only_when_the_active_slot_is_its_base(
    host: Host, bundles: tuple[Path, Path], slot: ActiveBundle
) -> None:
    v1, v2 = bundles
    cmd = host.deploy(v2, 2, host.delta(v1, v2), v1)
    assert cmd.delta is not None and cmd.delta.base_content == content_digest(slot.manifest.files)
    assert base_refusal(cmd, slot) is None
    assert base_refusal(host.deploy(v2, 2), slot) == "no delta offered"
    assert base_refusal(cmd, None) == f"{NAME} is not installed"
    other_version = dataclasses.replace(cmd, delta=dataclasses.replace(cmd.delta, base_version=3))
    assert base_refusal(other_version, slot) == "v1 is installed, the delta starts from v3"
    other_content = dataclasses.replace(cmd, delta=dataclasses.replace(cmd.delta, base_content="0" * 64))
    assert base_refusal(other_content, slot) == "the installed v1 has other content than the delta's base"


@pytest.mark.parametrize("damage", ["truncated", "removed", "replaced by a directory"])
def test_a_slot_whose_files_are_not_its_manifests_is_no_base(
    host: Host, bundles: tuple[Path, Path], slot: ActiveBundle, damage: str
) -> None:
    v1, v2 = bundles
    cmd = host.deploy(v2, 2, host.delta(v1, v2), v1)
    model = slot.slot / "payload" / slot.manifest.model
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[:-1])
    else:
        model.unlink()
        if damage != "removed":
            model.mkdir()
    why = base_refusal(cmd, slot)
    expected = "lacks" if damage == "removed" else "is not the file its manifest lists"
    assert why is not None and expected in why and repr(slot.manifest.model) in why


# --- the agent: delta in, bundle rebuilt, or the whole bundle by itself ------------------------


def test_a_delta_that_fits_is_received_rebuilt_and_installed(
    make_agent: Callable[[], tuple[Agent, MemoryTransport]], host: Host, bundles: tuple[Path, Path]
) -> None:
    agent, transport = make_agent()
    v1, v2 = bundles
    install_whole(agent, transport, host, v1, 1)
    delta = host.delta(v1, v2)
    cmd = host.deploy(v2, 2, delta, v1)
    assert cmd.delta is not None
    delta_tid = cmd.delta.transfer.transfer_id
    transport.deliver(TOPICS.cmd, host.signed(cmd))
    drive(agent, _said(transport, cmd, EventKind.ACCEPTED))
    (accepted,) = events(transport, cmd)
    assert accepted.kind == EventKind.ACCEPTED and accepted.transfer_id == delta_tid
    assert accepted.detail == {"have": 0, "have_index": False, "delta": True, "base_version": 1}
    assert transfer_topic(delta_tid) in transport.subscriptions
    assert transfer_topic(cmd.transfer.transfer_id) not in transport.subscriptions

    send_file(transport, cmd.delta.transfer, delta.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.INSTALLED))

    assert _kinds(transport, cmd) == [EventKind.ACCEPTED, EventKind.RECEIVED, EventKind.INSTALLED]
    received = events(transport, cmd)[1]
    assert received.transfer_id == cmd.transfer.transfer_id  # the bundle is what was received, rebuilt
    assert_runs(agent, v2, 2)
    assert transfer_topic(delta_tid) not in transport.subscriptions


def test_a_device_that_runs_nothing_takes_the_whole_bundle_at_once(
    make_agent: Callable[[], tuple[Agent, MemoryTransport]], host: Host, bundles: tuple[Path, Path]
) -> None:
    agent, transport = make_agent()
    v1, v2 = bundles
    cmd = host.deploy(v2, 2, host.delta(v1, v2), v1)
    transport.deliver(TOPICS.cmd, host.signed(cmd))
    drive(agent, _said(transport, cmd, EventKind.ACCEPTED))
    (accepted,) = events(transport, cmd)
    assert accepted.transfer_id == cmd.transfer.transfer_id
    assert (accepted.detail["delta"], accepted.detail["why"]) == (False, f"{NAME} is not installed")
    send_file(transport, cmd.transfer, v2.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.INSTALLED))
    assert _kinds(transport, cmd) == [EventKind.ACCEPTED, EventKind.RECEIVED, EventKind.INSTALLED]
    assert_runs(agent, v2, 2)


def test_a_slot_damaged_inside_a_file_is_found_when_applying_and_the_whole_bundle_follows(
    make_agent: Callable[[], tuple[Agent, MemoryTransport]], host: Host, bundles: tuple[Path, Path]
) -> None:
    agent, transport = make_agent()
    v1, v2 = bundles
    install_whole(agent, transport, host, v1, 1)
    active = agent.installer.active(NAME)
    assert active is not None
    model = active.slot / "payload" / active.manifest.model
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # the same size: the offer's check passes, applying does not
    model.write_bytes(bytes(data))
    delta = host.delta(v1, v2)
    cmd = host.deploy(v2, 2, delta, v1)
    assert cmd.delta is not None
    transport.deliver(TOPICS.cmd, host.signed(cmd))
    send_file(transport, cmd.delta.transfer, delta.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.ACCEPTED, 2))

    first, second = events(transport, cmd)
    assert (first.transfer_id, first.detail["delta"]) == (cmd.delta.transfer.transfer_id, True)
    assert (second.kind, second.transfer_id, second.detail["delta"]) == (
        EventKind.ACCEPTED,
        cmd.transfer.transfer_id,
        False,
    )
    assert "the installed slot is damaged" in second.detail["why"]
    assert [p.name for p in (agent.config.data_dir / "staging").iterdir()] != []  # the full transfer, reserved
    assert not any(p.name.startswith(cmd.delta.transfer.transfer_id) for p in agent.installer.staging_dir.iterdir())

    send_file(transport, cmd.transfer, v2.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.INSTALLED))
    assert _kinds(transport, cmd)[-2:] == [EventKind.RECEIVED, EventKind.INSTALLED]
    assert_runs(agent, v2, 2)


def test_a_delta_that_rebuilds_another_bundle_than_the_command_offers_is_not_used(
    make_agent: Callable[[], tuple[Agent, MemoryTransport]], host: Host, bundles: tuple[Path, Path]
) -> None:
    """The signed offer binds a delta to another v2 (a host's mistake, or a replayed delta): the
    device sees it in the delta's header before applying anything, and takes the bundle whole."""
    agent, transport = make_agent()
    v1, v2 = bundles
    install_whole(agent, transport, host, v1, 1)
    other = host.pack(2, _finetuned(mlp(DIMS, 0.0, seed=0), seed=7), tag="-other")
    wrong = host.delta(v1, other)
    cmd = host.deploy(v2, 2, wrong, v1)
    assert cmd.delta is not None
    transport.deliver(TOPICS.cmd, host.signed(cmd))
    send_file(transport, cmd.delta.transfer, wrong.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.ACCEPTED, 2))
    fallback = events(transport, cmd)[-1]
    assert fallback.transfer_id == cmd.transfer.transfer_id and fallback.detail["delta"] is False
    assert fallback.detail["why"].startswith("delta_invalid: the delta rebuilds a file of")
    send_file(transport, cmd.transfer, v2.read_bytes())
    drive(agent, _said(transport, cmd, EventKind.INSTALLED))
    assert_runs(agent, v2, 2)
