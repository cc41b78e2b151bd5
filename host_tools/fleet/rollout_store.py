"""Rollouts in the registry: each rollout's plan and where each of its devices stands.

Two tables (schema version 5 of :mod:`host_tools.fleet.registry`): ``rollouts`` (one row per
rollout: bundle, selector, policy, status, wave, an operator's pending request, and which
process runs it) and ``rollout_devices`` (one row per device: wave, state, attempts, what it
ran before and what it measured). :class:`RolloutStore` writes the planner's state after each
step in one transaction, and always *before* the shell sends a command: a device marked
``in_flight`` is never sent the bundle again by a resumed run unless it failed in a way that is
retried (:mod:`host_tools.fleet.rollout_plan`). Every write is an upsert keyed by the rollout
and device, so writing the same state twice is harmless.

The runner's lease (``runner``, ``runner_seen``): one process runs a rollout at a time; it
renews the lease as it goes, and another may take it over only once the lease is older than
``stale_s`` (the first was killed).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import ConfigError, StorageError
from host_tools.fleet.registry import Registry
from host_tools.fleet.rollout_plan import DeviceProgress, RolloutPlanner, RolloutPolicy, RolloutProgress

__all__ = ["OPERATOR_REQUESTS", "RolloutRecord", "RolloutStore"]

#: What an operator may ask of a rollout that another process runs.
OPERATOR_REQUESTS: frozenset[str] = frozenset({"pause", "resume", "abort"})

_ROLLOUT_COLUMNS = (
    "id, bundle_name, bundle_version, bundle_sha256, bundle_path, selector, policy, status, wave, waves, "
    "reason, request, created_at, updated_at, runner, runner_seen"
)
_DEVICE_COLUMNS = (
    "device_id, wave, state, attempts, previous_version, base_p99_ms, base_rss_bytes, online, "
    "started_at, finished_at, error_code, p99_ms, rss_bytes"
)

_UPSERT_DEVICE = f"""
INSERT INTO rollout_devices (rollout_id, position, {_DEVICE_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (rollout_id, device_id) DO UPDATE SET
    wave = excluded.wave, state = excluded.state, attempts = excluded.attempts,
    previous_version = excluded.previous_version, base_p99_ms = excluded.base_p99_ms,
    base_rss_bytes = excluded.base_rss_bytes, online = excluded.online, started_at = excluded.started_at,
    finished_at = excluded.finished_at, error_code = excluded.error_code, p99_ms = excluded.p99_ms,
    rss_bytes = excluded.rss_bytes
"""


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout as stored.

    Attributes:
        id: the rollout's id (12 hex digits).
        bundle_name, bundle_version, bundle_sha256: the bundle rolled out.
        bundle_path: where the host keeps the bundle file (a resumed run sends it from there).
        selector: which devices, as the operator wrote it.
        policy: how it proceeds.
        status: ``running``, ``paused``, ``aborted`` or ``completed``.
        wave: the highest wave started (-1: none); ``waves``: how many the plan has.
        reason: why it aborted.
        request: an operator's request not yet acted on (``pause``, ``resume``, ``abort``).
        created_at, updated_at: unix seconds.
        runner: the process running it (``host:pid``), if any; ``runner_seen``: when it last said so.
    """

    id: str
    bundle_name: str
    bundle_version: int
    bundle_sha256: str
    bundle_path: str
    selector: str
    policy: RolloutPolicy
    status: str
    wave: int
    waves: int
    reason: str
    request: str | None
    created_at: float
    updated_at: float
    runner: str | None = None
    runner_seen: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the policy as :meth:`RolloutPolicy.to_dict`."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["policy"] = self.policy.to_dict()
        return out


class RolloutStore:
    """Reads and writes rollouts in a :class:`~host_tools.fleet.registry.Registry`.

    Args:
        registry: an open registry (its schema brought up to date).
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(
        self,
        planner: RolloutPlanner,
        *,
        bundle: tuple[str, int, str, str],
        selector: str,
        now: float,
        rollout_id: str | None = None,
    ) -> RolloutRecord:
        """Store a new rollout and every device of its plan.

        Args:
            planner: the plan (:meth:`RolloutPlanner.plan`).
            bundle: name, version, sha256 and path of the bundle.
            selector: the selector as written.
            now: unix seconds.
            rollout_id: its id; a new one when None.

        Raises:
            StorageError: on a database failure.
        """
        rid = rollout_id or uuid.uuid4().hex[:12]
        name, version, sha256, path = bundle
        p = planner.progress
        insert = (
            f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rid, name, version, sha256, path, selector, json.dumps(planner.policy.to_dict()), p.status, p.wave,
             p.waves, p.reason, None, now, now, None, None),
        )  # fmt: skip
        self.registry.write([insert, *self._device_rows(rid, planner, planner.take_changed())], what="create rollout")
        return self.get(rid)

    def save(self, rollout_id: str, planner: RolloutPlanner, now: float) -> None:
        """Write the rollout's status and the devices changed since the last save, in one transaction.

        Raises:
            StorageError: on a database failure (nothing of this step is written).
        """
        p = planner.progress
        update = (
            "UPDATE rollouts SET status = ?, wave = ?, waves = ?, reason = ?, updated_at = ? WHERE id = ?",
            (p.status, p.wave, p.waves, p.reason, now, rollout_id),
        )
        self.registry.write(
            [update, *self._device_rows(rollout_id, planner, planner.take_changed())], what=f"save rollout {rollout_id}"
        )

    def _device_rows(
        self, rollout_id: str, planner: RolloutPlanner, devices: Sequence[DeviceProgress]
    ) -> list[tuple[str, tuple[Any, ...]]]:
        order = {d: i for i, d in enumerate(planner.devices)}
        return [
            (
                _UPSERT_DEVICE,
                (
                    rollout_id,
                    order[d.device_id],
                    d.device_id,
                    d.wave,
                    d.state,
                    d.attempts,
                    d.previous_version,
                    d.base_p99_ms,
                    d.base_rss_bytes,
                    int(d.online),
                    d.started_at,
                    d.finished_at,
                    d.error_code,
                    d.p99_ms,
                    d.rss_bytes,
                ),
            )
            for d in devices
        ]

    def get(self, rollout_id: str) -> RolloutRecord:
        """One rollout.

        Raises:
            ConfigError: no rollout has that id (the message lists the latest ones).
            StorageError: on a database failure, or a row that makes no valid rollout.
        """
        rows = self.registry.query(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,), what=f"read rollout {rollout_id}"
        )
        if not rows:
            known = [r.id for r in self.list(limit=10)]
            raise ConfigError(
                f"no rollout {rollout_id!r} in registry {self.registry.name} "
                f"(latest: {', '.join(known) if known else 'none'})",
                rollout_id=rollout_id,
            )
        return self._record(rows[0])

    def list(self, limit: int = 50) -> list[RolloutRecord]:
        """The latest rollouts, newest first."""
        rows = self.registry.query(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at DESC, id LIMIT ?",
            (limit,),
            what="list rollouts",
        )
        return [self._record(r) for r in rows]

    def load(self, rollout_id: str) -> tuple[RolloutRecord, RolloutPlanner]:
        """A rollout and its planner, as the last save left them.

        Raises:
            ConfigError: no such rollout.
            StorageError: on a database failure or a malformed row.
        """
        record = self.get(rollout_id)
        rows = self.registry.query(
            f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices WHERE rollout_id = ? ORDER BY position",
            (rollout_id,),
            what=f"read the devices of rollout {rollout_id}",
        )
        devices: dict[str, DeviceProgress] = {}
        for row in rows:
            try:
                devices[row[0]] = DeviceProgress(
                    device_id=row[0], wave=int(row[1]), state=row[2], attempts=int(row[3]),
                    previous_version=_int(row[4]), base_p99_ms=row[5], base_rss_bytes=_int(row[6]),
                    online=bool(row[7]), started_at=row[8], finished_at=row[9], error_code=row[10],
                    p99_ms=row[11], rss_bytes=_int(row[12]),
                )  # fmt: skip
            except (ValueError, TypeError) as exc:
                raise StorageError(
                    f"registry {self.registry.name}: rollout_devices row "
                    f"({rollout_id!r}, {row[0]!r}) is malformed: {exc}",
                    table="rollout_devices",
                ) from exc
        progress = RolloutProgress(record.status, record.wave, record.waves, record.created_at, record.reason)
        return record, RolloutPlanner(record.policy, progress, devices)

    def request(self, rollout_id: str, what: str, now: float) -> RolloutRecord:
        """Leave an operator's request (pause, resume, abort) for the process that runs the rollout.

        Raises:
            ConfigError: an unknown request, or no such rollout.
        """
        if what not in OPERATOR_REQUESTS:
            raise ConfigError(f"unknown rollout request {what!r}; expected one of {sorted(OPERATOR_REQUESTS)}")
        self.get(rollout_id)
        self.registry.write(
            [("UPDATE rollouts SET request = ?, updated_at = ? WHERE id = ?", (what, now, rollout_id))],
            what=f"request {what} of rollout {rollout_id}",
        )
        return self.get(rollout_id)

    def take_request(self, rollout_id: str) -> str | None:
        """The pending operator request, cleared as it is read (None: none)."""
        rows = self.registry.query(
            "SELECT request FROM rollouts WHERE id = ?", (rollout_id,), what=f"read requests of rollout {rollout_id}"
        )
        request = rows[0][0] if rows else None
        if request is not None:
            self.registry.write(
                [("UPDATE rollouts SET request = NULL WHERE id = ? AND request = ?", (rollout_id, request))],
                what=f"take the request of rollout {rollout_id}",
            )
        return request

    def claim(self, rollout_id: str, runner: str, now: float, stale_s: float) -> bool:
        """Take or renew the lease to run the rollout; False when another runner holds a fresh one."""
        (changed,) = self.registry.write(
            [
                (
                    "UPDATE rollouts SET runner = ?, runner_seen = ? WHERE id = ? AND "
                    "(runner IS NULL OR runner = ? OR runner_seen < ?)",
                    (runner, now, rollout_id, runner, now - stale_s),
                )
            ],
            what=f"claim rollout {rollout_id}",
        )
        return changed == 1

    def release(self, rollout_id: str, runner: str) -> None:
        """Give the lease back (idempotent)."""
        self.registry.write(
            [
                (
                    "UPDATE rollouts SET runner = NULL, runner_seen = NULL WHERE id = ? AND runner = ?",
                    (rollout_id, runner),
                )
            ],
            what=f"release rollout {rollout_id}",
        )

    def _record(self, row: Sequence[Any]) -> RolloutRecord:
        try:
            return RolloutRecord(
                id=row[0], bundle_name=row[1], bundle_version=int(row[2]), bundle_sha256=row[3], bundle_path=row[4],
                selector=row[5], policy=RolloutPolicy.from_dict(json.loads(row[6])), status=row[7], wave=int(row[8]),
                waves=int(row[9]), reason=row[10], request=row[11], created_at=row[12], updated_at=row[13],
                runner=row[14], runner_seen=row[15],
            )  # fmt: skip
        except (ValueError, TypeError, ConfigError) as exc:
            raise StorageError(
                f"registry {self.registry.name}: rollouts row {row[0]!r} is malformed: {exc}", table="rollouts"
            ) from exc


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
