"""Deltas end to end: a device that runs v1 is sent only what changed in v2, and rebuilds v2 from its slot.

Real agents, a real Mosquitto, real `edgectl`. v1 is an MLP packed with `edgectl pack`; v2 is
the same model fine-tuned in its last layer only. A tap on the broker counts the bytes the
host publishes on each transfer topic. A device without v1, or whose v1 slot is damaged,
takes the whole bundle; every device ends on v2 with exactly v2's files.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sparse_models import mlp
from taps import BrokerTap

from edge_sdk.bundle.archive import BundleReader
from edge_sdk.protocol import INDEX_FRAME, decode_chunk

pytestmark = pytest.mark.integration

DIMS = [64, 512, 512, 10]
NAME = "tuned"


class _Tap:
    """Chunk bytes (the chunk index apart) the host publishes on each transfer topic."""

    def __init__(self, url: str) -> None:
        self.chunk_bytes: Counter[str] = Counter()
        self.index_bytes: Counter[str] = Counter()
        self._tap = BrokerTap(url, ("edge/v1/transfers/#",), self._count)

    def _count(self, topic: str, payload: bytes) -> None:
        chunk = decode_chunk(payload)
        counter = self.index_bytes if chunk.index == INDEX_FRAME else self.chunk_bytes
        counter[chunk.transfer_id] += len(chunk.data)

    def close(self) -> None:
        self._tap.close()


def _finetuned(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, int]:
    """The model with its last layer (W2, B2) fine-tuned, and the bytes of the tensors changed."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    rng = np.random.default_rng(seed)
    changed = 0
    for init in tuned.graph.initializer:
        if init.name in ("W2", "B2"):
            values = numpy_helper.to_array(init)
            values = (values + rng.standard_normal(values.shape) * 0.01).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
            changed += values.nbytes
    return tuned, changed


def _versions(host, d: Path, count: int = 2) -> tuple[list[Path], int]:
    """Bundles v1..v``count`` of one MLP, each the last fine-tuned in its last layer; the bytes that changes."""
    models = [mlp(DIMS, 0.0, seed=0)]
    changed = 0
    for seed in range(1, count):
        tuned, changed = _finetuned(models[-1], seed)
        models.append(tuned)
    sample = d / "sample.npz"
    np.savez(sample, x=np.ones((1, DIMS[0]), np.float32))
    bundles = []
    for version, model in enumerate(models, start=1):
        path = d / f"mlp-v{version}.onnx"
        path.write_bytes(model.SerializeToString())
        bundles.append(host.pack(path, sample, d / f"{NAME}-v{version}.edge", NAME, version))
    return bundles, changed


def _overhead(bundle: Path) -> int:
    """What a delta carries besides changed tensors, as the delta library's tests measure it: the new
    manifest and signatures, and up to 128 bytes per tar header (manifest, signatures, each payload file)."""
    with BundleReader(bundle) as reader:
        return len(reader.manifest_bytes) + len(reader.signatures_bytes) + 128 * (2 + len(reader.payload))


def _deploy(host, bundle: Path, url: str, devices: list[str], *extra: str) -> dict[str, dict]:
    args = ["deploy", str(bundle), "--broker", url, "--runs", "5", "--warmup", "1", "--min-duration", "0", "--json"]
    for d in devices:
        args += ["--device", d]
    args += extra
    r = host.run(*args)
    assert r.code == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.json()
    rows = out.get("outcomes", [out])
    return {row["device_id"]: row for row in rows}


def _assert_runs_exactly(agent, bundle: Path, version: int) -> None:
    """The agent's active version of the bundle is ``version``, its slot holding exactly the bundle's files."""
    state = json.loads((agent.data_dir / "state.json").read_text())
    assert state["bundles"][NAME]["active"]["version"] == version
    payload = agent.data_dir / "slots" / NAME / f"v{version}" / "payload"
    with BundleReader(bundle) as reader:
        expected = {rel: b"".join(reader.iter_member(rel, info.size)) for rel, info in reader.payload.items()}
    found = {p.relative_to(payload).as_posix(): p.read_bytes() for p in payload.rglob("*") if p.is_file()}
    assert found == expected
    assert list((agent.data_dir / "staging").iterdir()) == []  # nothing half-written is left


def test_a_fine_tune_of_the_last_layer_travels_as_a_delta(host, mosquitto, start_agent, tmp_path):
    (v1, v2), changed = _versions(host, tmp_path)
    agent = start_agent(mosquitto.url, "delta-one", host.root)
    first = _deploy(host, v1, mosquitto.url, [agent.device_id])[agent.device_id]
    assert first["state"] == "installed" and first["delivery"]["method"] == "full"
    assert (host.home / "bundles" / NAME).is_dir()  # v1 kept: the base of the next delta
    tap = _Tap(mosquitto.url)
    try:
        second = _deploy(host, v2, mosquitto.url, [agent.device_id])[agent.device_id]
        time.sleep(0.5)
    finally:
        tap.close()
    assert second["state"] == "installed", second
    delivery = second["delivery"]
    assert (delivery["method"], delivery["base_version"], delivery["why_full"]) == ("delta", 1, "")
    assert delivery["full_bytes"] == v2.stat().st_size
    # On the wire: one transfer, the delta's, and nothing of the full bundle.
    assert len(tap.chunk_bytes) == 1, tap.chunk_bytes
    sent = sum(tap.chunk_bytes.values())
    assert sent == delivery["delta_bytes"]  # each chunk once, no repairs
    # Measured: 20,520 bytes of changed tensors (W2, B2) -> a delta of about 21,950 bytes
    # (1.07x), out of a bundle of about 1.22 MB; the fixed overhead allowed is about 1,150 bytes.
    assert sent <= 1.2 * changed + _overhead(v2), (sent, changed, _overhead(v2))
    assert sent < delivery["full_bytes"] / 40
    _assert_runs_exactly(agent, v2, 2)
    assert f"taking {NAME} v2 as a delta from v1" in agent.log()


def test_one_deploy_sends_the_delta_where_it_fits_and_the_bundle_elsewhere(host, mosquitto, start_agent, tmp_path):
    (v1, v2), _changed = _versions(host, tmp_path)
    based, fresh, damaged = (start_agent(mosquitto.url, f"delta-{n}", host.root) for n in ("based", "fresh", "damaged"))
    first = _deploy(host, v1, mosquitto.url, [based.device_id, damaged.device_id])
    assert {row["state"] for row in first.values()} == {"installed"}
    (model,) = (damaged.data_dir / "slots" / NAME / "v1" / "payload").rglob("*.onnx")
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size, one bit off: found only when the delta is applied
    model.write_bytes(bytes(data))

    rows = _deploy(host, v2, mosquitto.url, [based.device_id, fresh.device_id, damaged.device_id])

    assert {d: row["state"] for d, row in rows.items()} == dict.fromkeys(rows, "installed")
    by = {d: row["delivery"] for d, row in rows.items()}
    assert by[based.device_id]["method"] == "delta"
    assert by[fresh.device_id] == {
        "method": "full",
        "full_bytes": v2.stat().st_size,
        "delta_bytes": None,
        "base_version": None,
        "why_full": "",
    }
    assert by[damaged.device_id]["method"] == "full" and by[damaged.device_id]["delta_bytes"] is not None
    assert "does not match the slot's manifest" in by[damaged.device_id]["why_full"]
    for agent in (based, fresh, damaged):
        _assert_runs_exactly(agent, v2, 2)
    assert "taking it whole" in damaged.log()


def test_delta_from_gives_the_base_the_store_lacks_and_no_delta_sends_the_bundle(
    host, mosquitto, start_agent, tmp_path
):
    (v1, v2, v3), _changed = _versions(host, tmp_path, 3)
    agent = start_agent(mosquitto.url, "delta-from", host.root)
    assert _deploy(host, v1, mosquitto.url, [agent.device_id])[agent.device_id]["state"] == "installed"
    shutil.rmtree(host.home / "bundles")  # the host kept nothing: only --delta-from has the base
    second = _deploy(host, v2, mosquitto.url, [agent.device_id], "--delta-from", str(v1))[agent.device_id]
    assert (second["state"], second["delivery"]["method"], second["delivery"]["base_version"]) == (
        "installed",
        "delta",
        1,
    )
    third = _deploy(host, v3, mosquitto.url, [agent.device_id], "--no-delta")[agent.device_id]
    assert third["state"] == "installed" and third["delivery"]["delta_bytes"] is None  # v2 was kept, not used
    assert (host.home / "bundles" / NAME).is_dir() and len(list((host.home / "bundles" / NAME).iterdir())) == 2
    _assert_runs_exactly(agent, v3, 3)
    both = host.run(
        "deploy", str(v3), "--device", agent.device_id, "--broker", mosquitto.url, "--no-delta", "--delta-from", str(v2)
    )
    assert both.code == 2 and "--no-delta" in both.stderr
