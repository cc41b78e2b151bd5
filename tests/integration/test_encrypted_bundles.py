"""Attack 6 of issue 13, "models travel in the clear", against real agents and a real Mosquitto.

Anyone who can subscribe on the broker sees every chunk of every transfer. With
``edgectl pack --encrypt-to`` what they reassemble is ciphertext: the model's weights do
not occur in it. A device that is not a recipient refuses the offer before any chunk
moves; tampered ciphertext is refused by its signed hash; a bundle for another key that
reaches a device anyway is refused at install; the device then installs a good bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import onnx
import pytest
from harness import BIN
from onnx import numpy_helper
from taps import BrokerTap

from edge_sdk.bundle.archive import BundleReader
from edge_sdk.mqtt import MqttClient, MqttOptions
from edge_sdk.protocol import decode_chunk
from edge_sdk.trust import RecipientPublicKey
from host_tools.fleet.deployer import DeployOptions, deploy_bundle
from host_tools.fleet.registry import open_registry
from host_tools.fleet.router import gated
from host_tools.keys import KeyRing, command_authority

pytestmark = pytest.mark.integration

EXIT_UNTRUSTED = 3


class _Spy:
    """Subscribes to every transfer topic and device data topic; keeps every chunk it sees, by transfer."""

    def __init__(self, url: str) -> None:
        self.frames = 0
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.topics: dict[str, set[str]] = {}
        self._tap = BrokerTap(url, ("edge/v1/devices/+/data", "edge/v1/transfers/#"), self._keep)

    def _keep(self, topic: str, payload: bytes) -> None:
        chunk = decode_chunk(payload)
        self.frames += 1
        if chunk.index < 0:  # the chunk index: digests, not bundle bytes
            return
        self.chunks.setdefault(chunk.transfer_id, {})[chunk.index] = chunk.data
        self.topics.setdefault(topic, set()).add(chunk.transfer_id)

    def reassembled(self) -> dict[str, bytes]:
        time.sleep(0.5)  # let the last chunks arrive
        return {tid: b"".join(parts[i] for i in sorted(parts)) for tid, parts in self.chunks.items()}

    def transfers_to(self, device_id: str) -> set[str]:
        return self.topics.get(f"edge/v1/devices/{device_id}/data", set())

    def close(self) -> None:
        self._tap.close()


def _pack(host, model, out: Path, version: int, *extra: str) -> Path:
    r = host.run(
        "pack", str(model.path), "-o", str(out), "--name", "tiny", "--version", str(version),
        "--sample", str(model.sample), *extra,
    )  # fmt: skip
    assert r.code == 0, r.stderr
    return out


def _deploy(host, bundle: Path, url: str, device: str):
    return host.run(
        "deploy", str(bundle), "--device", device, "--broker", url, "--runs", "5", "--warmup", "1", "--json",
    )  # fmt: skip


def _active(agent) -> int | None:
    entry = agent.state().get("bundles", {}).get("tiny") or {}
    return (entry.get("active") or {}).get("version")


def _weights(model_path: Path) -> list[bytes]:
    """The raw bytes of each weight matrix of the model (what must never travel readable)."""
    model = onnx.load(str(model_path))
    return [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.name.startswith("w")]


def _show_keys(data_dir: Path, out: Path) -> RecipientPublicKey:
    proc = subprocess.run(
        [str(BIN / "edge-agent"), "show-keys", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out.write_text(proc.stdout)
    return RecipientPublicKey.from_file_bytes(proc.stdout.encode())


def _flip_payload_byte(bundle: Path, out: Path) -> Path:
    """The same bundle with one byte of the model's ciphertext flipped; manifest and signature untouched."""
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tf:
        member = tf.getmember("payload/tiny.onnx")
        data[member.offset_data + member.size // 2] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def _no_plaintext_left(agent) -> None:
    for d in ("tmp", "staging"):
        assert list((agent.data_dir / d).iterdir()) == [], d


def test_encrypted_deploy_shows_only_ciphertext_and_refuses_non_recipients(
    host, tiny_model, mosquitto, start_agent, tmp_path
):
    url = mosquitto.url
    a = start_agent(url, "enc-a", host.root)
    b = start_agent(url, "enc-b", host.root)
    key_a = _show_keys(a.data_dir, tmp_path / "enc-a.pub")
    key_b = _show_keys(b.data_dir, tmp_path / "enc-b.pub")
    assert (a.data_dir / "decryption_key.pem").stat().st_mode & 0o777 == 0o600
    assert key_a.keyid != key_b.keyid
    weights = _weights(tiny_model.path)
    plain = _pack(host, tiny_model, tmp_path / "plain.edge", 1)
    assert all(w in plain.read_bytes() for w in weights)  # the attack works on a plain bundle

    spy = _Spy(url)
    try:
        # The operator learns a's key from the registry (its status publishes it) and packs for it.
        assert host.run("devices", "--broker", url).code == 0
        v1 = _pack(host, tiny_model, tmp_path / "v1.edge", 1, "--encrypt-to", "enc-a")
        with BundleReader(v1) as reader:
            manifest = json.loads(reader.manifest_bytes)
        assert [r["keyid"] for r in manifest["encryption"]["recipients"]] == [key_a.keyid]

        ok = _deploy(host, v1, url, a.device_id)
        assert ok.code == 0, ok.stderr + a.log()[-3000:]
        assert _active(a) == 1
        installed = a.data_dir / "slots" / "tiny" / "v1" / "payload" / "tiny.onnx"
        assert installed.read_bytes() == tiny_model.path.read_bytes()  # decrypted while installing

        # What a subscriber to the data topic reassembles is the bundle, and only ciphertext.
        seen = spy.reassembled()
        assert v1.read_bytes() in seen.values()
        for data in seen.values():
            for w in weights:
                assert w not in data

        # b is not a recipient: refused at the offer, before any chunk is sent.
        frames_before = spy.frames
        refused = _deploy(host, v1, url, b.device_id)
        assert refused.code == EXIT_UNTRUSTED, refused.stderr
        err = refused.json()["error"]
        assert err["code"] == "not_recipient" and key_b.keyid in err["message"], err
        assert err["details"]["recipients"] == [key_a.keyid]
        time.sleep(0.5)
        assert spy.transfers_to(b.device_id) == set() and spy.frames == frames_before
        assert b.state() == {} and b.alive

        # Tampered ciphertext: the signed manifest's hash refuses it; nothing changes on a.
        tampered = _flip_payload_byte(
            _pack(host, tiny_model, tmp_path / "v2.edge", 2, "--encrypt-to", str(tmp_path / "enc-a.pub")),
            tmp_path / "v2-tampered.edge",
        )
        bad = _deploy(host, tampered, url, a.device_id)
        assert bad.code == EXIT_UNTRUSTED and bad.json()["error"]["code"] == "hash_mismatch", bad.stdout
        assert _active(a) == 1
        _no_plaintext_left(a)

        # The wrong key: a bundle for b sent to a by a host that does not announce recipients
        # (an older edgectl); a receives it and refuses at install, with nothing left behind.
        for_b = _pack(host, tiny_model, tmp_path / "v2-for-b.edge", 2, "--encrypt-to", str(tmp_path / "enc-b.pub"))
        ring = KeyRing(host.home / "keys")
        client = MqttClient(url, MqttOptions(client_id=f"old-host-{os.getpid()}"))
        client.connect()
        try:
            options = DeployOptions(authority=command_authority(ring))
            # The host believes only enrolled devices' signed messages: a's key is in its registry.
            with open_registry(host.home / "registry.db") as registry, gated(client, registry) as router:
                outcome = deploy_bundle(client, a.device_id, for_b, options, claim=("tiny", 2), router=router)
        finally:
            client.close()
        assert outcome.state == "refused" and outcome.error is not None
        assert outcome.error.code == "not_recipient", outcome.error
        assert _active(a) == 1
        _no_plaintext_left(a)

        # And a still installs a good encrypted bundle, packed for a and b at once.
        v2 = _pack(
            host, tiny_model, tmp_path / "v2-good.edge", 2,
            "--encrypt-to", "enc-a", "--encrypt-to", str(tmp_path / "enc-b.pub"),
        )  # fmt: skip
        good = _deploy(host, v2, url, a.device_id)
        assert good.code == 0, good.stderr + a.log()[-3000:]
        assert _active(a) == 2 and a.alive
        again = _deploy(host, v2, url, b.device_id)
        assert again.code == 0, again.stderr + b.log()[-3000:]
        assert _active(b) == 2
    finally:
        spy.close()


def test_pack_for_an_unknown_device_says_how_to_get_its_key(host, tiny_model, tmp_path):
    r = host.run(
        "pack", str(tiny_model.path), "-o", str(tmp_path / "x.edge"), "--name", "tiny", "--version", "1",
        "--encrypt-to", "nobody-01",
    )  # fmt: skip
    assert r.code == 2, r.stderr
    assert "show-keys" in r.stderr and "nobody-01" in r.stderr
    assert not (tmp_path / "x.edge").exists()
