"""Devices for tests: each with its own key and sequence, signing what it says as a real agent does."""

from __future__ import annotations

import itertools
import time

from edge_sdk.protocol import DeviceMessage, seal, seal_bytes
from edge_sdk.trust import SigningKey


class TestDevice:
    """A device id with its own Ed25519 key; :meth:`sign` seals a message with the next sequence number."""

    __test__ = False  # not a pytest test class

    def __init__(self, device_id: str, key: SigningKey | None = None) -> None:
        self.device_id = device_id
        self.key = key or SigningKey.generate()
        self._seq = itertools.count(1)

    @property
    def public_hex(self) -> str:
        return self.key.public_key.raw.hex()

    def sign(self, msg: DeviceMessage, ts: float | None = None, seq: int | None = None) -> bytes:
        """``msg`` signed by this device's key, as number ``seq`` (default: the next one)."""
        return seal(msg, self.key, next(self._seq) if seq is None else seq, time.time() if ts is None else ts)

    def sign_bytes(self, payload: bytes, device_id: str | None = None, ts: float | None = None) -> bytes:
        """Raw message bytes signed by this key as device ``device_id`` (default: this device)."""
        now = time.time() if ts is None else ts
        return seal_bytes(payload, device_id or self.device_id, self.key, next(self._seq), now)

    def enrolment(self) -> object:
        """This device's approved enrolment, as the registry would hold it."""
        from host_tools.fleet.registry import EnrolmentRecord

        return EnrolmentRecord(self.device_id, self.public_hex, "approved", 1.0, 1.0)


def enrolled_gate(*devices: TestDevice) -> object:
    """A :class:`~host_tools.fleet.enrolment.ReportGate` that has ``devices`` enrolled."""
    from host_tools.fleet.enrolment import ReportGate

    return ReportGate([d.enrolment() for d in devices])  # type: ignore[misc]
