"""Who this device is: its own Ed25519 key, and the sequence numbers of what it says.

The key is made on the device at first start (``data_dir/identity/device.key``, mode 0600;
it never leaves the device) unless a provisioned key file is named in the config
(``identity_key``). The public half is written beside it (``device.pub``) and travels in
every ``online`` status, so the operator can enrol the device (``edgectl devices approve``).

Every message the device publishes carries a sequence number that only grows, across
restarts too: the counter reserves numbers in blocks, writing the end of the block
durably before using any number in it. A restart continues from the end of the last
reserved block, so a number is never used twice, at the cost of a gap after a restart.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from edge_sdk.durable import atomic_write_bytes, read_json
from edge_sdk.errors import KeyStoreError, StorageError
from edge_sdk.protocol import DeviceMessage, DeviceStatus, seal, seal_bytes
from edge_sdk.trust import PublicKey, SigningKey
from edge_sdk.trust.device import MAX_SEQ

__all__ = ["SEQ_BLOCK", "DeviceIdentity", "SequenceCounter", "load_identity"]

#: How many sequence numbers one durable write reserves.
SEQ_BLOCK = 1000
_KEY_NAME = "device.key"
_PUB_NAME = "device.pub"
_SEQ_NAME = "seq.json"


def _load_key(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyStoreError(f"cannot read device key {path}: {exc.strerror}") from exc
    return SigningKey.from_pem(data)


def load_identity(identity_dir: Path, provisioned: Path | None = None) -> SigningKey:
    """The device's key: the provisioned file if given, else the one made at first start.

    Args:
        identity_dir: where the key is kept (created 0700 when missing).
        provisioned: a PEM private key file given in the config, if any.

    Returns:
        The key; its public half is written to ``identity_dir/device.pub``.

    Raises:
        KeyStoreError: the key file cannot be read or is not an Ed25519 key.
        StorageError: the directory cannot be written.
    """
    try:
        identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {identity_dir}: {exc.strerror}") from exc
    key_path = identity_dir / _KEY_NAME
    if provisioned is not None:
        key = _load_key(provisioned)
    elif key_path.exists():
        key = _load_key(key_path)
    else:
        key = SigningKey.generate()
        atomic_write_bytes(key_path, key.to_pem(), mode=0o600)
    pub = key.public_key.to_pem()
    pub_path = identity_dir / _PUB_NAME
    with contextlib.suppress(OSError):
        if not pub_path.exists() or pub_path.read_bytes() != pub:
            atomic_write_bytes(pub_path, pub)
    return key


class SequenceCounter:
    """Sequence numbers that only grow, across restarts, reserved on disk in blocks.

    Args:
        path: the file holding the end of the reserved block.
        block: how many numbers one write reserves.

    Raises:
        StorageError: the file cannot be read or written.
    """

    def __init__(self, path: Path, block: int = SEQ_BLOCK) -> None:
        self.path = path
        self.block = block
        stored = read_json(path, {"reserved": 0})
        reserved = stored.get("reserved") if isinstance(stored, dict) else None
        if not isinstance(reserved, int) or isinstance(reserved, bool) or not 0 <= reserved <= MAX_SEQ:
            raise StorageError(f"sequence file {path} is corrupt; refusing to reuse sequence numbers")
        self._next = reserved + 1
        self._reserved = reserved
        self._lock = threading.Lock()

    def next(self) -> int:
        """The next number; reserves a new block durably first when the current one is used up."""
        with self._lock:
            if self._next > self._reserved:
                self._reserved = self._next + self.block - 1
                atomic_write_bytes(self.path, b'{"reserved": %d}' % self._reserved)
            n = self._next
            self._next += 1
            return n


class DeviceIdentity:
    """Signs what this device publishes: its key, and its sequence counter.

    The number :attr:`will_seq` is taken at start for the last will, which the broker
    publishes later on the agent's behalf (each ``online`` status names it, so the host
    accepts that one offline status although later numbers came before it).

    Args:
        device_id: this device.
        identity_dir: where key and counter live (``data_dir/identity``).
        provisioned: a provisioned key file, if the config names one.

    Raises:
        KeyStoreError, StorageError: as :func:`load_identity` and :class:`SequenceCounter`.
    """

    def __init__(self, device_id: str, identity_dir: Path, provisioned: Path | None = None) -> None:
        self.device_id = device_id
        self.key = load_identity(identity_dir, provisioned)
        self.counter = SequenceCounter(identity_dir / _SEQ_NAME)
        self.will_seq = self.counter.next()
        if os.name == "posix" and provisioned is None:
            with contextlib.suppress(OSError):
                os.chmod(identity_dir / _KEY_NAME, 0o600)

    @property
    def public_key(self) -> PublicKey:
        return self.key.public_key

    def seal(self, msg: DeviceMessage, ts: float, seq: int | None = None) -> bytes:
        """``msg`` signed as this device's next message (or as number ``seq``), encoded."""
        return seal(msg, self.key, self.counter.next() if seq is None else seq, ts)

    def will(self, agent_version: str, ts: float) -> bytes:
        """The signed ``offline`` status the broker publishes if the agent vanishes (number :attr:`will_seq`)."""
        status = DeviceStatus(self.device_id, "offline", ts, agent_version=agent_version)
        return self.seal(status, ts, seq=self.will_seq)

    def seal_bytes(self, payload: bytes, ts: float) -> bytes:
        """An encoded message signed as this device's next message."""
        return seal_bytes(payload, self.device_id, self.key, self.counter.next(), ts)
