"""Tampered bundles against the real agent, and what verification costs.

Part 1, tampering: a real signed bundle (a small ONNX model and its sample input) is
mutated N times (bit flips, truncations, appended bytes, manifest edits under the old
signature, manifest edits re-signed by an unauthorised key, validly signed but expired or
old manifests, archive tricks: symlinks, hardlinks, device files, absolute and ``..``
paths, duplicate, extra and missing members, gzip compression). Each mutation is deployed
with a correctly signed command, through a real broker (Mosquitto when installed, else the
embedded amqtt), to a real ``edge-agent`` process. Reported: how many were accepted (must
be 0), refused with which specific error, whether the device's installed state ever
changed (must not), and whether the agent stayed up (must, always). A valid bundle is
deployed at the end as the control: it must install.

Part 2, cost: a bundle with a 50 MB payload is verified (every check, hashing every byte)
and, side by side in the same process, the file is hashed with sha256 alone. The target:
verification takes no more than 1.2x the hash alone.

Run: ``.venv/bin/python benchmarks/tamper.py`` (``--quick`` for 100 mutations and 10 MB).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/mosquitto.py: real broker helper

from _report import add_common_args, print_table, write_results

from edge_sdk.bundle import (
    BundleSpec,
    TensorInfo,
    canonical_json,
    pack_bundle,
    verify_bundle,
)
from edge_sdk.bundle.archive import BundleReader, _canonical_info
from edge_sdk.errors import EdgeError
from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.trust import PublicKey, SigningKey, encode_signatures
from host_tools.fleet.deployer import CommandAuthority, DeployOptions, deploy_bundle
from host_tools.fleet.enrolment import ReportGate
from host_tools.fleet.registry import EnrolmentRecord
from host_tools.fleet.router import Router
from host_tools.keys import init_keys

NAME = "tamper-target"
GENERIC_CODES = {"edge_error", "untrusted_input"}


# --- the real bundle --------------------------------------------------------------------------


def _model(d: Path) -> tuple[Path, Path]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["logits"])],
        "tamper",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = d / "model.onnx"
    path.write_bytes(model.SerializeToString())
    sample = d / "sample.npz"
    np.savez(sample, input=rng.standard_normal((2, 16)).astype(np.float32))
    return path, sample


def _spec(model: Path, sample: Path, version: int, ttl_s: float = 86400.0) -> BundleSpec:
    return BundleSpec(
        NAME, version, "onnxruntime", model, "fp32", (TensorInfo("input", (None, 16), "float32"),), sample, ttl_s=ttl_s
    )


# --- mutations ---------------------------------------------------------------------------------


def _parts(bundle: bytes, tmp: Path) -> tuple[bytes, bytes, dict[str, bytes]]:
    p = tmp / "parts.edge"
    p.write_bytes(bundle)
    with BundleReader(p) as r:
        payload = {rel: b"".join(r.iter_member(rel, info.size)) for rel, info in r.payload.items()}
        return r.manifest_bytes, r.signatures_bytes, payload


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return _canonical_info(name, len(data)), data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info, b""


class Mutator:
    """Builds mutated bundles from one valid bundle. Each method returns bytes."""

    def __init__(
        self,
        bundle: bytes,
        parts: tuple[bytes, bytes, dict[str, bytes]],
        evil: SigningKey,
        expired: bytes,
        old: bytes,
        rng: random.Random,
    ) -> None:
        self.bundle, self.rng, self.evil = bundle, rng, evil
        self.manifest, self.signatures, self.payload = parts
        self.expired, self.old = expired, old

    def _members(
        self, manifest: bytes | None = None, signatures: bytes | None = None, payload: dict[str, bytes] | None = None
    ) -> list[tuple[tarfile.TarInfo, bytes]]:
        payload = self.payload if payload is None else payload
        return [
            _reg("manifest.json", manifest or self.manifest),
            _reg("signatures.json", signatures or self.signatures),
            *(_reg(f"payload/{k}", v) for k, v in sorted(payload.items())),
        ]

    def bit_flips(self) -> bytes:
        data = bytearray(self.bundle)
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def truncation(self) -> bytes:
        return self.bundle[: self.rng.randrange(1, len(self.bundle))]

    def appended(self) -> bytes:
        return self.bundle + self.rng.randbytes(self.rng.choice([1, 512, 10240]))

    def _edited_manifest(self) -> bytes:
        d = json.loads(self.manifest)
        field = self.rng.choice(["version", "expires_at", "name", "files", "model", "runtime", "target", "extra"])
        if field == "version":
            d["version"] += self.rng.randint(1, 1000)
        elif field == "expires_at":
            d["expires_at"] += 86400 * 3650
        elif field == "name":
            d["name"] = "other-model"
        elif field == "files":
            f = self.rng.choice(d["files"])
            if self.rng.random() < 0.5:
                f["size"] += 1
            else:
                f["sha256"] = hashlib.sha256(self.rng.randbytes(8)).hexdigest()
        elif field == "model":
            d["model"] = "sample_input.npz"
        elif field == "runtime":
            d["runtime"] = "litert"
        elif field == "target":
            d["target"] = {"arch": ["riscv64"], "min_memory_bytes": 0, "accelerators": []}
        else:
            d["evil"] = {"run": "/bin/sh"}
        return canonical_json(d)

    def manifest_edit(self) -> bytes:
        return _tar(self._members(manifest=self._edited_manifest()))

    def resigned_unauthorised(self) -> bytes:
        m = self._edited_manifest() if self.rng.random() < 0.5 else self.manifest
        return _tar(self._members(manifest=m, signatures=encode_signatures([self.evil.sign(m)])))

    def expired_or_old(self) -> bytes:
        return self.expired if self.rng.random() < 0.5 else self.old

    def payload_swap(self) -> bytes:
        payload = dict(self.payload)
        k = self.rng.choice(sorted(payload))
        payload[k] = self.rng.randbytes(len(payload[k])) if self.rng.random() < 0.5 else payload[k][::-1]
        return _tar(self._members(payload=payload))

    def archive_trick(self) -> bytes:
        trick = self.rng.choice(
            [
                "symlink",
                "hardlink",
                "device",
                "fifo",
                "absolute",
                "dotdot",
                "duplicate",
                "extra",
                "missing",
                "gzip",
                "dir",
                "unexpected",
            ]
        )
        members = self._members()
        if trick == "symlink":
            members.append(_special("payload/evil", tarfile.SYMTYPE, "/etc/passwd"))
        elif trick == "hardlink":
            members.append(_special("payload/evil", tarfile.LNKTYPE, "/etc/shadow"))
        elif trick == "device":
            members.append(_special("payload/evil", tarfile.CHRTYPE))
        elif trick == "fifo":
            members.append(_special("payload/evil", tarfile.FIFOTYPE))
        elif trick == "dir":
            members.append(_special("payload/evil", tarfile.DIRTYPE))
        elif trick == "absolute":
            members.append(_reg("/tmp/edge-sdk-tamper-evil", b"owned"))
        elif trick == "dotdot":
            members.append(_reg("payload/../../edge-sdk-tamper-evil", b"owned"))
        elif trick == "duplicate":
            members.append(members[-1])
        elif trick == "extra":
            members.append(_reg("payload/evil.so", b"\x7fELF"))
        elif trick == "missing":
            members.pop()
        elif trick == "unexpected":
            members.append(_reg("evil.sh", b"#!/bin/sh"))
        else:
            return _tar([*members, _reg("payload/zeros", bytes(4 << 20))], mode="w:gz")
        return _tar(members)


KINDS: dict[str, Callable[[Mutator], bytes]] = {
    "bit flips": Mutator.bit_flips,
    "truncation": Mutator.truncation,
    "appended bytes": Mutator.appended,
    "manifest edit, old signature": Mutator.manifest_edit,
    "re-signed, unauthorised key": Mutator.resigned_unauthorised,
    "expired or old (valid key)": Mutator.expired_or_old,
    "payload swapped": Mutator.payload_swap,
    "archive tricks": Mutator.archive_trick,
}


# --- broker and agent ------------------------------------------------------------------------------


@contextmanager
def _broker(work: Path) -> Iterator[tuple[str, str]]:
    try:
        from mosquitto import MosquittoProcess, find_mosquitto

        binary = find_mosquitto()
    except Exception:
        binary = None
    if binary:
        broker = MosquittoProcess(work / "mosquitto", binary=binary).start()
        try:
            yield broker.url, "mosquitto"
        finally:
            broker.stop()
        return
    from host_tools.broker import EmbeddedBroker

    with EmbeddedBroker() as embedded:
        yield embedded.url, "amqtt (embedded)"


def _wait_online(client: MqttClient, device_id: str, agent: subprocess.Popen, timeout_s: float = 30.0) -> None:
    import queue

    from edge_sdk.mqtt import Incoming
    from edge_sdk.protocol import DeviceStatus, DeviceTopics, SignedReport, decode

    client.subscribe(DeviceTopics(device_id).status)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and agent.poll() is None:
        try:
            item = client.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(item, Incoming):
            msg = decode(item.payload)
            if isinstance(msg, SignedReport):  # a device signs what it says; the status is inside
                msg = decode(msg.message.encode())
            if isinstance(msg, DeviceStatus) and msg.state == "online":
                return
    raise RuntimeError("the agent did not come online")


def run_tamper(n: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    now = time.time()
    ring, _ = init_keys(work / "keys", now)
    model, sample = _model(work)
    bundle_keys = ring.role_keys("bundles")
    good = work / "good-v2.edge"
    pack_bundle(_spec(model, sample, 2), bundle_keys, good, now)
    expired, old = work / "expired.edge", work / "old-v1.edge"
    pack_bundle(_spec(model, sample, 3, ttl_s=60), bundle_keys, expired, now - 3600)
    pack_bundle(_spec(model, sample, 1), bundle_keys, old, now)
    control = work / "control-v3.edge"
    pack_bundle(_spec(model, sample, 3), bundle_keys, control, now)
    base = good.read_bytes()
    mutator = Mutator(base, _parts(base, work), SigningKey.generate(), expired.read_bytes(), old.read_bytes(), rng)
    authority = CommandAuthority(tuple(ring.role_keys("commands")), tuple(ring.chain()))
    options = DeployOptions(
        chunk_size=16 << 10,
        accept_timeout_s=10,
        finish_timeout_s=30,
        benchmark=BenchmarkSpec(runs=5, warmup=1),
        authority=authority,
    )
    results: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    accepted, down, state_changed, errors = [], 0, 0, collections.Counter()
    data_dir = work / "agent-data"
    with _broker(work) as (url, broker_name):
        client = MqttClient(url, MqttOptions(client_id=f"tamper-{os.getpid()}"))
        client.connect()
        log = open(work / "agent.log", "wb")  # noqa: SIM115 - closed below
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "device_agent.cli",
                "run",
                "--broker",
                url,
                "--device-id",
                "tamper-dev",
                "--data-dir",
                str(data_dir),
                "--root",
                str(ring.root_path),
                "--transfer-idle-timeout",
                "5",
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        router = None
        try:
            _wait_online(client, "tamper-dev", agent)
            # The host believes only enrolled devices' signed answers: enrol this agent's key.
            key = PublicKey.from_pem((data_dir / "identity" / "device.pub").read_bytes())
            gate = ReportGate([EnrolmentRecord("tamper-dev", key.raw.hex(), "approved", now, now)])
            router = Router(client, gate=gate)
            router.start()
            first = deploy_bundle(
                client, "tamper-dev", old, options, router=router
            )  # v1 installed: the state to protect
            assert first.state == "installed", first.error
            before = (data_dir / "state.json").read_bytes()
            path = work / "mutant.edge"
            started = time.monotonic()
            for i in range(n):
                kind = rng.choice(sorted(KINDS))
                data = KINDS[kind](mutator)
                if data == base:
                    data = mutator.bit_flips()
                path.write_bytes(data)
                try:
                    # The command names what the operator believes it sends; for the validly signed
                    # expired/old bundles it names what they are, so the device's own checks speak.
                    claim = None if kind == "expired or old (valid key)" else (NAME, 2)
                    outcome = deploy_bundle(client, "tamper-dev", path, options, claim=claim, router=router)
                    code = outcome.error.code if outcome.error else "ACCEPTED"
                except EdgeError as exc:
                    code = f"host:{exc.code}"
                results[kind][code] += 1
                errors[code] += 1
                if code == "ACCEPTED":
                    accepted.append((i, kind))
                if agent.poll() is not None:
                    down += 1
                    break
                if (data_dir / "state.json").read_bytes() != before:
                    state_changed += 1
                    before = (data_dir / "state.json").read_bytes()
            seconds = time.monotonic() - started
            ctrl = deploy_bundle(client, "tamper-dev", control, options, router=router)
        finally:
            if router is not None:
                router.close()
            client.close()
            alive = agent.poll() is None
            agent.terminate()
            agent.wait(timeout=15)
            log.close()
    return {
        "broker": broker_name,
        "mutations": n,
        "seed": seed,
        "accepted": len(accepted),
        "accepted_cases": accepted,
        "state_changed": state_changed,
        "agent_up_throughout": alive and down == 0,
        "seconds": seconds,
        "control_installed": ctrl.state == "installed",
        "by_kind": {k: dict(v) for k, v in results.items()},
        "by_error": dict(errors),
        "generic_refusals": sum(v for k, v in errors.items() if k in GENERIC_CODES),
        "leaked_outside_staging": Path("/tmp/edge-sdk-tamper-evil").exists(),
    }


# --- verification cost --------------------------------------------------------------------------------


def run_cost(size_mb: int, repeats: int, work: Path) -> dict:
    key = SigningKey.generate()
    from edge_sdk.trust import TrustedKeys

    payload = work / "big.onnx"
    with open(payload, "wb") as fh:
        rng = np.random.default_rng(1)
        for _ in range(size_mb):
            fh.write(rng.bytes(1 << 20))
    bundle = work / "big.edge"
    now = time.time()
    pack_bundle(BundleSpec("big", 1, "onnxruntime", payload, ttl_s=3600), [key], bundle, now)
    trusted = TrustedKeys((key.public_key,))

    def sha_only() -> None:
        h = hashlib.sha256()
        with open(bundle, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.hexdigest()

    def verify() -> None:
        verify_bundle(bundle, trusted, now)

    def verify_extract() -> None:
        with tempfile.TemporaryDirectory(dir=work) as d:
            verify_bundle(bundle, trusted, now, extract_to=Path(d))

    timings: dict[str, list[float]] = {
        "sha256 alone": [],
        "verify (every check)": [],
        "verify + extract to staging": [],
    }
    sha_only(), verify()  # warm the page cache
    for _ in range(repeats):
        for name, fn in (
            ("sha256 alone", sha_only),
            ("verify (every check)", verify),
            ("verify + extract to staging", verify_extract),
        ):
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "bundle_bytes": bundle.stat().st_size,
        "median_s": med,
        "runs_s": timings,
        "ratio_verify_to_sha256": med["verify (every check)"] / med["sha256 alone"],
        "ratio_extract_to_sha256": med["verify + extract to staging"] / med["sha256 alone"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.mutations, args.size_mb, args.repeats = 100, 10, 3
    with tempfile.TemporaryDirectory(prefix="edge-tamper-") as tmp:
        work = Path(tmp)
        (work / "t").mkdir()
        (work / "c").mkdir()
        tamper = run_tamper(args.mutations, args.seed, work / "t")
        cost = run_cost(args.size_mb, args.repeats, work / "c")

    print(
        f"\nTampered bundles -> real edge-agent through {tamper['broker']} ({tamper['mutations']} mutations, "
        f"seed {tamper['seed']}, {tamper['seconds']:.1f} s)\n"
    )
    rows = []
    for kind, codes in sorted(tamper["by_kind"].items()):
        total = sum(codes.values())
        rows.append(
            (
                kind,
                total,
                codes.get("ACCEPTED", 0),
                ", ".join(f"{c} {n}" for c, n in sorted(codes.items(), key=lambda x: -x[1])),
            )
        )
    print_table(["mutation", "sent", "accepted", "refused with"], rows)
    print(
        f"\naccepted: {tamper['accepted']} (must be 0); refused with a generic error: {tamper['generic_refusals']}; "
        f"installed state changed: {tamper['state_changed']} times (must be 0); agent up throughout: "
        f"{tamper['agent_up_throughout']}; valid control bundle installed afterwards: {tamper['control_installed']}"
    )

    print(
        f"\nVerification cost, {cost['bundle_bytes'] / 1e6:.1f} MB bundle, median of {args.repeats} (page cache warm)\n"
    )
    base = cost["median_s"]["sha256 alone"]
    print_table(
        ["", "median s", "MB/s", "x sha256"],
        [
            (k, f"{v:.4f}", f"{cost['bundle_bytes'] / v / 1e6:.0f}", f"{v / base:.3f}")
            for k, v in cost["median_s"].items()
        ],
    )
    ok_cost = cost["ratio_verify_to_sha256"] <= 1.2
    print(f"\nverify / sha256 = {cost['ratio_verify_to_sha256']:.3f} (target <= 1.2: {'met' if ok_cost else 'MISSED'})")
    path = write_results("tamper", {"tamper": tamper, "cost": cost}, args.json_out)
    print(f"results: {path}")
    ok = (
        tamper["accepted"] == 0
        and tamper["agent_up_throughout"]
        and tamper["state_changed"] == 0
        and tamper["control_installed"]
        and ok_cost
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
