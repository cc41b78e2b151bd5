"""The device's root of trust and the nonces of the commands it obeyed, kept on disk.

Layout under ``data_dir/trust/``::

    root.json      the signed root this device trusts now (the shipped one, or a later one)
    nonces.json    {command_id: expires_at} of every signed command accepted whose expiry the
                   time floor has not yet passed
    time.json      {"floor": unix seconds}: the newest signed time this device has seen

The time floor is what makes expiry mean something on a device whose clock can be set
back (no RTC battery, a reboot before NTP, an attacker who spoofs NTP). It only rises, and
only with times that someone trusted signed: the issue time of each verified command and
the creation time of each verified manifest. The device never believes a clock earlier
than the floor (:meth:`TrustStore.now` is ``max(clock, floor)``), and a nonce is forgotten
only once the *floor* passes its command's expiry, never because the clock says so: a
recorded command replayed after the clock went back is still on record, and refused.

This is the I/O shell around the pure checks in :mod:`edge_sdk.trust` and
:mod:`edge_sdk.protocol.commands`. Every change is written durably (temp file, fsync,
rename, fsync the directory) *before* the agent acts on it, so a power cut can neither
lose a root rotation (which would bring a revoked key back) nor forget a nonce (which
would let the same command be replayed after a reboot).

How new roots reach a device: over MQTT, as ``root_update`` messages that ``edgectl``
sends ahead of every command (the whole chain; the device applies the versions it lacks,
one by one). They need no command signature: each root is signed by a threshold of the
previous root's keys and of its own, so a broker can only withhold roots, not forge
them, and withholding eventually shows as the root's expiry. Shipping roots inside
bundles was the alternative; it would tie key rotation to publishing a model.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from edge_sdk.durable import atomic_write_bytes, read_json
from edge_sdk.errors import ReplayError, StorageError, UntrustedInputError
from edge_sdk.trust import Root, SignedRoot, load_root, verify_root_update

__all__ = ["MAX_FLOOR_LEAD_S", "TrustStore"]

log = logging.getLogger(__name__)

#: A signed time further than this ahead of the device's trusted time does not raise the floor
#: (a bundle key cannot push every device into the far future; commands are bounded the same way
#: by :class:`edge_sdk.protocol.CommandPolicy`'s clock skew).
MAX_FLOOR_LEAD_S = 300.0


class TrustStore:
    """The current root, the seen command nonces and the time floor of one device.

    Args:
        trust_dir: where to keep them (created if missing).
        shipped_root: the signed root this device was provisioned with (already checked
            by the config loader). It is adopted when nothing newer is stored.
        max_nonces: most unexpired nonces kept; a device commanded faster than this
            refuses further commands until some expire (bounded memory and disk).

    Raises:
        StorageError: the directory cannot be written, or the stored files are corrupt.
    """

    def __init__(self, trust_dir: Path, shipped_root: bytes, max_nonces: int = 4096) -> None:
        self.dir = Path(trust_dir)
        self.root_path = self.dir / "root.json"
        self.nonces_path = self.dir / "nonces.json"
        self.floor_path = self.dir / "time.json"
        self.max_nonces = max_nonces
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror}") from exc
        shipped = SignedRoot.from_bytes(shipped_root)
        stored = self._load_stored_root()
        if stored is None or shipped.root.version > stored.root.version:
            # A newer shipped root is a re-provisioned device image: local, trusted like the first.
            atomic_write_bytes(self.root_path, shipped.to_bytes(), mode=0o644)
            stored = shipped
        self._signed = stored
        self._nonces = self._load_nonces()
        self._floor = self._load_floor()

    # --- root ---------------------------------------------------------------------------

    @property
    def root(self) -> Root:
        return self._signed.root

    def _load_stored_root(self) -> SignedRoot | None:
        try:
            data = self.root_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.root_path}: {exc.strerror}") from exc
        try:
            return load_root(data)
        except UntrustedInputError as exc:
            raise StorageError(f"{self.root_path} is corrupt: {exc.message}") from exc

    def update_root(self, document: bytes, now: float) -> bool:
        """Adopt the next root if ``document`` is it.

        Args:
            document: a signed root document as received.
            now: current time (unix seconds).

        Returns:
            True if adopted; False if it is a version this device already has (harmless repeat).

        Raises:
            RootError, SignatureError, UntrustedKeyError, ExpiredError: refused (see
                :func:`edge_sdk.trust.verify_root_update`).
            StorageError: it cannot be stored.
        """
        signed = SignedRoot.from_bytes(document)
        if signed.root.version <= self.root.version:
            return False
        new = verify_root_update(self.root, signed, now)
        atomic_write_bytes(self.root_path, signed.to_bytes(), mode=0o644)
        old = self.root
        self._signed = SignedRoot(new, signed.signatures)
        log.info(
            "root of trust rotated: v%d -> v%d; keys removed: %s",
            old.version,
            new.version,
            ", ".join(sorted(set(old.keys) - set(new.keys))) or "none",
        )
        return True

    # --- nonces -------------------------------------------------------------------------

    def _load_nonces(self) -> dict[str, float]:
        body = read_json(self.nonces_path, {})
        if not isinstance(body, dict) or not all(isinstance(v, (int, float)) for v in body.values()):
            raise StorageError(f"{self.nonces_path} is corrupt: unknown layout")
        return {str(k): float(v) for k, v in body.items()}

    def admit(self, nonce: str, expires_at: float, now: float) -> None:
        """Record a verified command's nonce, refusing one seen before. Durable before return.

        Nonces are kept until the time floor (not ``now``) passes their expiry, so a clock
        set back cannot make the device forget a command it obeyed.

        Args:
            nonce: the command id.
            expires_at: the command's expiry (unix seconds).
            now: the trusted time (:meth:`now`); used only in messages.

        Raises:
            ReplayError: the nonce was seen, or too many unexpired commands are on record.
            StorageError: the record cannot be written.
        """
        live = {n: e for n, e in self._nonces.items() if e > self._floor}
        if nonce in live:
            raise ReplayError(f"command {nonce} was already received: replay refused", nonce=nonce)
        if len(live) >= self.max_nonces:
            raise ReplayError(
                f"{len(live)} unexpired commands on record (limit {self.max_nonces}); refusing more until some expire",
                nonce=nonce,
            )
        live[nonce] = float(expires_at)
        atomic_write_bytes(self.nonces_path, json.dumps(live, sort_keys=True).encode(), mode=0o600)
        self._nonces = live

    # --- time floor ---------------------------------------------------------------------

    @property
    def floor(self) -> float:
        """The newest signed time this device has seen (unix seconds; 0 before any)."""
        return self._floor

    def now(self, clock: float) -> float:
        """The time to judge expiry by: the clock, but never earlier than the floor.

        Args:
            clock: what the device's clock says (unix seconds).

        Returns:
            ``max(clock, floor)``.
        """
        return max(clock, self._floor) if math.isfinite(clock) else self._floor

    def observe(self, signed_time: float, clock: float) -> bool:
        """Raise the floor to a verified, signed time. Durable before return.

        Args:
            signed_time: a time a trusted key signed (a command's issue time, a manifest's
                creation time).
            clock: what the device's clock says now.

        Returns:
            True if the floor rose. A time not newer than the floor, not finite, or more than
            :data:`MAX_FLOOR_LEAD_S` ahead of :meth:`now` changes nothing.

        Raises:
            StorageError: the floor cannot be written.
        """
        if not math.isfinite(signed_time) or signed_time <= self._floor:
            return False
        if signed_time > self.now(clock) + MAX_FLOOR_LEAD_S:
            log.warning("signed time %.0f is far ahead of this device's time %.0f: floor unchanged", signed_time, clock)
            return False
        atomic_write_bytes(self.floor_path, json.dumps({"floor": signed_time}).encode(), mode=0o600)
        self._floor = signed_time
        return True

    def _load_floor(self) -> float:
        body = read_json(self.floor_path, {"floor": 0.0})
        value = body.get("floor") if isinstance(body, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise StorageError(f"{self.floor_path} is corrupt: unknown layout")
        return float(value)
