"""The host's record of the fleet: devices, deployments and metrics reports.

One :class:`Registry` class works on two databases:

* a SQLite file (the default: a filesystem path or ``sqlite:///abs/path``), opened in
  WAL mode with a busy timeout so a CLI can read while a collector writes;
* PostgreSQL (a ``postgresql://`` URL), shared by several collectors at once when the
  host side is scaled out (``$share/...`` subscriptions). psycopg 3 is imported only
  when such a URL is opened.

Both run the same schema and the same SQL. What differs lives in a small dialect
object (:class:`_Dialect`): the parameter style (``?`` or ``%s``), the identity
column, the float type, the names of the two-argument min/max functions, how a
schema transaction is opened and how a new row id comes back. JSON is stored as TEXT
on both, so the schema stays portable.

Concurrency: every write is one atomic statement (``INSERT ... ON CONFLICT DO UPDATE``
for devices), so collectors sharing a registry never race on a read-modify-write.
The registry reads no clock: every timestamp is passed in by the caller as float
unix seconds.

Errors: a bad URL is a :class:`~edge_sdk.errors.ConfigError`; any database failure
(locked, unreachable, unwritable) is a :class:`~edge_sdk.errors.StorageError` naming
the database with its password masked, raised ``from`` the driver's exception. A stored
row that does not make a valid record (a report that fails validation, a bad state) is
a :class:`~edge_sdk.errors.StorageError` naming its table and row, so a renderer never
meets a half-read record.

Schema: ``schema_version`` holds the version reached; :data:`_MIGRATIONS` lists the
steps in order, each run once inside the schema lock (``BEGIN IMMEDIATE`` on SQLite, an
advisory lock on PostgreSQL), so two processes opening an old file upgrade it once.
Version 2 makes bundle versions integers (they sort 9 before 10): the deployments and
metrics tables are rebuilt with an integer column, every row kept, and the devices'
active bundle is rewritten with an integer version. Version 3 keys devices by
``(device_id, broker)``: a device id seen on two brokers is two rows, told apart by the
broker's address (``mqtt://host:port`` as :class:`~edge_sdk.mqtt.BrokerAddress` writes
it); rows from before version 3 have the broker ``""`` (unknown) and are adopted by the
first status seen for that device on a broker. It also stores every active bundle
(``active_bundles``, a JSON list; ``[]`` when the device runs none) instead of one.
Version 4 adds device identity:
``enrolments`` binds each device id to its public key (``pending`` until an operator
approves it, ``approved``, or ``revoked``); ``device_sequences`` keeps the last sequence
number accepted from each device on each channel (status, events, metrics: a retained
status is older than the events after it); ``report_drops`` counts the device messages the
host dropped, per device and reason.
Version 5 adds what selects and watches devices: the device's own labels (``labels``, a
JSON object from its status) and its heartbeat (``heartbeat_s``, ``last_heard``) on each
device row; ``operator_labels`` (set with ``edgectl devices label``, overriding the
device's own on the same key); ``installed_versions``, the installed and previous version
of each bundle name per device, derived from the statuses (when the active version of a
bundle changes, the old one becomes ``previous``); ``device_groups``, selectors saved by
name.
Version 6 makes reports idempotent: a metrics report is keyed by its device and its own
(signed) time, ``report_ts``, so one heard twice (a retained report, a message the broker
delivered again after a collector died) is one row; duplicates stored before are removed,
the earliest row of each kept. It adds ``events``, what devices reported about commands,
keyed the same way by device, time and kind.
Version 7 adds rollouts (``rollouts``: one row per
rollout, its policy, status and wave; ``rollout_devices``: where each of its devices stands,
with its attempts), written by :mod:`host_tools.fleet.rollout_store`.
Version 8 adds ``runs``: every compression, profile, deploy and rollout kept with an id, its
kind, its time, its parameters and its results (JSON), so two can be compared later.

Values are checked before they are stored: times must be finite and between 1970 and
2100 (:func:`check_time`), numbers in a metrics report finite, so that no stored row can
make a command fail.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from edge_sdk.errors import ConfigError, MessageError, StorageError

if TYPE_CHECKING:  # imported where a report is read back: listing devices does without the protocol
    from edge_sdk.protocol import Event, MetricsReport

__all__ = [
    "DEPLOYMENT_STATES",
    "DEVICE_PAGE",
    "DEVICE_STATUSES",
    "ENROLMENT_STATES",
    "LATEST_TIME",
    "RUN_KINDS",
    "SCHEMA_VERSION",
    "UNKNOWN_DEVICE",
    "BundleRef",
    "DeploymentRecord",
    "DeploymentState",
    "DeviceRecord",
    "DeviceRow",
    "DeviceStatus",
    "EnrolmentRecord",
    "ForgetResult",
    "GroupRecord",
    "InstalledVersion",
    "MetricsRecord",
    "Registry",
    "RunRecord",
    "change_token",
    "check_time",
    "open_registry",
    "stored_bundles",
]

logger = logging.getLogger(__name__)

DeviceStatus = Literal["online", "offline"]
DeploymentState = Literal["sent", "installed", "refused", "failed", "deferred"]

#: Every status a device row may hold.
DEVICE_STATUSES: frozenset[str] = frozenset({"online", "offline"})
#: Device rows a listing reads per query (:meth:`Registry.iter_device_rows`).
DEVICE_PAGE = 5_000
#: Every state a deployment row may hold.
DEPLOYMENT_STATES: frozenset[str] = frozenset({"sent", "installed", "refused", "failed", "deferred"})

#: Every kind of run the registry keeps.
RUN_KINDS: frozenset[str] = frozenset({"compress", "profile", "deploy", "rollout"})

#: Every state an enrolment may hold.
ENROLMENT_STATES: frozenset[str] = frozenset({"pending", "approved", "revoked"})
#: The latest time a registry row may hold (2100-01-01 UTC); later is not plausible.
LATEST_TIME = 4_102_444_800.0
#: Device id under which drops of messages from devices the host does not know are counted.
UNKNOWN_DEVICE = "*"

_DEFAULT_TIMEOUT_S = 10.0
_POSTGRES_SCHEMES = ("postgresql", "postgres")
# Any 64-bit constant: serialises schema creation between collectors on PostgreSQL.
_PG_SCHEMA_LOCK_KEY = 0x6564_6765_7265_6701


# --- records ---------------------------------------------------------------------------


def check_time(value: object, what: str) -> float:
    """``value`` as unix seconds, if it is a plausible time for a registry row.

    Args:
        value: the candidate.
        what: its name, for the error.

    Returns:
        The time as a float.

    Raises:
        ValueError: not a number, not finite, before 1970 or after 2100.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of unix seconds, got {value!r}")
    t = float(value)
    if not math.isfinite(t) or not 0.0 <= t <= LATEST_TIME:
        raise ValueError(f"{what} {value!r} is not a plausible time (1970 to 2100)")
    return t


def _check_finite(value: object, where: str) -> None:
    """Raise ValueError if any number inside ``value`` (JSON-like) is not finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_finite(v, f"{where}[]")


@dataclass(frozen=True)
class BundleRef:
    """A bundle named by name and version, as a device reports its active bundle.

    Args:
        name: bundle name.
        version: bundle version, a positive integer as in the manifest.

    Raises:
        ValueError: if the name is empty or the version not a positive integer.
    """

    name: str
    version: int

    def __post_init__(self) -> None:
        if not self.name or type(self.version) is not int or self.version < 1:
            raise ValueError(f"bundle reference needs a name and a positive integer version, got {self!r}")

    def to_dict(self) -> dict[str, str]:
        """The JSON form ``edgectl devices --json`` has always shown: ``{"name": ..., "version": "3"}``.

        The version is written as a string there for the scripts that read it; the
        registry stores it as a number.
        """
        return {"name": self.name, "version": str(self.version)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BundleRef:
        """Build from :meth:`to_dict`'s form or the stored one (the version an integer or its digits).

        Args:
            data: mapping with ``name`` and ``version``.

        Returns:
            The reference.

        Raises:
            ValueError: if a field is missing, the name is empty or the version not a positive integer.
        """
        try:
            name, raw = data["name"], data["version"]
        except KeyError as exc:
            raise ValueError(f"bundle reference lacks {exc.args[0]!r}") from exc
        version = _bundle_version(raw)
        if version is None:
            raise ValueError(f"bundle reference has version {raw!r}, not a positive integer")
        return cls(name=str(name), version=version)


_DIGITS = re.compile(r"[0-9]{1,18}")


def _bundle_version(raw: object) -> int | None:
    """A bundle version as an integer: an int, or a string of decimal digits as v1 stored it.

    Args:
        raw: the value read.

    Returns:
        The positive version, or ``None`` when ``raw`` is not one.
    """
    if isinstance(raw, str) and _DIGITS.fullmatch(raw):
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        return None
    return raw


@dataclass(frozen=True)
class DeviceRecord:
    """What the host knows about one device, as seen on one broker.

    ``None`` in ``platform``, ``runtimes``, ``agent_version`` or ``active_bundles`` means
    "not reported in this update": :meth:`Registry.upsert_device` keeps the stored value,
    so a bare status change (a will message) never erases what the birth message said.
    An empty ``active_bundles`` means the device reported that it runs nothing (after a
    ``remove``), and replaces what was stored.

    Args:
        device_id: the device's id.
        status: ``"online"`` or ``"offline"``: the last status recorded, not a claim
            that it is still true (see :mod:`host_tools.fleet.inventory`).
        last_seen: unix seconds of the message this record came from.
        first_seen: unix seconds the device was first seen; defaults to ``last_seen``
            on insert and is never moved later by an upsert.
        platform: what the device is (board, OS, CPU), as reported.
        runtimes: which inference runtimes it has, as reported.
        agent_version: the agent's version string.
        active_bundles: every bundle it runs now, ordered by name.
        broker: the address of the broker it was seen on (``mqtt://host:port``);
            ``""`` for rows recorded before the registry knew brokers.
        labels: the device's own labels, from its status; ``None``: not reported in this
            update (kept), ``{}``: it has none (replaces).
        heartbeat_s: the heartbeat interval its status announced; ``None``: not reported.
        last_heard: unix seconds of its last heartbeat (read only: heartbeats are recorded
            with :meth:`Registry.record_heartbeat`).

    Raises:
        ValueError: if ``device_id`` is empty or ``status`` is unknown.
    """

    device_id: str
    status: DeviceStatus
    last_seen: float
    first_seen: float | None = None
    platform: Mapping[str, Any] | None = None
    runtimes: Mapping[str, Any] | None = None
    agent_version: str | None = None
    active_bundles: tuple[BundleRef, ...] | None = None
    broker: str = ""
    labels: Mapping[str, str] | None = None
    heartbeat_s: float | None = None
    last_heard: float | None = None

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if self.status not in DEVICE_STATUSES:
            raise ValueError(f"unknown device status {self.status!r}; expected one of {sorted(DEVICE_STATUSES)}")
        if self.active_bundles is not None:
            object.__setattr__(self, "active_bundles", tuple(sorted(self.active_bundles, key=_bundle_order)))
        check_time(self.last_seen, "last_seen")
        if self.first_seen is not None:
            check_time(self.first_seen, "first_seen")

    @property
    def active_bundle(self) -> BundleRef | None:
        """The first active bundle by name (what ``--json`` showed as ``active_bundle`` before)."""
        return self.active_bundles[0] if self.active_bundles else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field.

        ``active_bundles`` lists every bundle with an integer version; ``active_bundle``
        (the first of them, version as a string) is kept for scripts written against it.
        """
        return {
            "device_id": self.device_id,
            "broker": self.broker,
            "status": self.status,
            "platform": dict(self.platform) if self.platform is not None else None,
            "runtimes": dict(self.runtimes) if self.runtimes is not None else None,
            "agent_version": self.agent_version,
            "active_bundles": (
                None
                if self.active_bundles is None
                else [{"name": b.name, "version": b.version} for b in self.active_bundles]
            ),
            "active_bundle": self.active_bundle.to_dict() if self.active_bundle else None,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "device_labels": dict(self.labels) if self.labels is not None else None,
            "heartbeat_s": self.heartbeat_s,
            "last_heard": self.last_heard,
        }


@dataclass(frozen=True)
class InstalledVersion:
    """What a device runs of one bundle name, and what it ran before.

    Args:
        device_id: the device.
        bundle_name: the bundle name.
        version: the version active now; None once the bundle was removed.
        previous: the version active before the last change; None if none is known.
        changed_at: unix seconds of the status that showed the last change.
    """

    device_id: str
    bundle_name: str
    version: int | None
    previous: int | None
    changed_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class GroupRecord:
    """A selector saved under a name (``edgectl groups add``).

    Args:
        name: the group's name.
        selector: the selector text (see :mod:`host_tools.fleet.selectors`).
        created_at: unix seconds it was saved (or last replaced).
    """

    name: str
    selector: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def _bundle_order(ref: BundleRef) -> tuple[str, int]:
    return (ref.name, ref.version)


@dataclass(frozen=True)
class ForgetResult:
    """What :meth:`Registry.forget_device` deleted.

    Args:
        device_id: the device forgotten.
        brokers: the brokers its device rows named (``""`` for unknown).
        devices: device rows deleted.
        deployments: deployment rows deleted.
        metrics: metrics reports deleted.
    """

    device_id: str
    brokers: tuple[str, ...]
    devices: int
    deployments: int
    metrics: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {**asdict(self), "brokers": list(self.brokers)}


@dataclass(frozen=True)
class DeploymentRecord:
    """One bundle sent to one device, and what became of it.

    Args:
        id: row id assigned by the registry.
        device_id: target device.
        bundle_name: bundle name.
        bundle_version: bundle version.
        bundle_sha256: hex sha256 of the bundle file.
        transfer_id: id of the chunked transfer that carried it, if any.
        state: ``sent``, ``installed``, ``refused``, ``failed`` or ``deferred``.
        error_code: the device's error code (an ``EdgeError.code``) on refusal or failure.
        error_message: the device's error message.
        started_at: unix seconds the deploy command was sent.
        finished_at: unix seconds the outcome arrived, if it has.

    Raises:
        ValueError: if ``state`` is unknown.
    """

    id: int
    device_id: str
    bundle_name: str
    bundle_version: int
    bundle_sha256: str
    transfer_id: str | None
    state: DeploymentState
    error_code: str | None
    error_message: str | None
    started_at: float
    finished_at: float | None

    def __post_init__(self) -> None:
        _check_deployment_state(self.state)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (all of them plain strings and numbers)."""
        return asdict(self)


@dataclass(frozen=True)
class MetricsRecord:
    """One metrics report from one device about one bundle, stored whole.

    Args:
        id: row id assigned by the registry.
        device_id: reporting device.
        bundle_name: bundle the report is about.
        bundle_version: its version.
        received_at: unix seconds the host received the report.
        report: the report as the device sent it, typed.
    """

    id: int
    device_id: str
    bundle_name: str
    bundle_version: int
    received_at: float
    report: MetricsReport

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field; ``report`` in its wire form."""
        return {
            "id": self.id,
            "device_id": self.device_id,
            "bundle_name": self.bundle_name,
            "bundle_version": self.bundle_version,
            "received_at": self.received_at,
            "report": self.report.to_dict(),
        }


@dataclass(frozen=True)
class RunRecord:
    """One kept run: a compression, profile, deploy or rollout, with what it was asked and what it found.

    Args:
        id: row id assigned by the registry (``edgectl compare A B`` takes two of them).
        kind: one of :data:`RUN_KINDS`.
        started_at: unix seconds the run was recorded.
        parameters: what it was asked to do (files with their sha256, options).
        results: what it produced (a compression report, device metrics reports).

    Raises:
        ValueError: an unknown kind, an implausible time, or a number that is not finite.
    """

    id: int
    kind: str
    started_at: float
    parameters: Mapping[str, Any]
    results: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.kind not in RUN_KINDS:
            raise ValueError(f"unknown run kind {self.kind!r}; expected one of {sorted(RUN_KINDS)}")
        check_time(self.started_at, "started_at")
        _check_finite(self.parameters, "parameters")
        _check_finite(self.results, "results")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "id": self.id,
            "kind": self.kind,
            "started_at": self.started_at,
            "parameters": dict(self.parameters),
            "results": dict(self.results),
        }


@dataclass(frozen=True)
class EnrolmentRecord:
    """A device id bound to its public key, and what the host knows of its messages.

    Args:
        device_id: the device.
        public_key: its Ed25519 public key, 64 hex digits.
        state: ``pending`` (seen, waiting for an operator), ``approved`` or ``revoked``.
        requested_at: unix seconds the key was first seen or enrolled.
        decided_at: unix seconds it was approved or revoked.
        sequences: channel (``status``, ``events``, ``metrics``) -> highest sequence number
            accepted from the device on it.
        will_seq: the sequence number of its last will, as its latest status says.

    Raises:
        ValueError: a bad key, state or time.
    """

    device_id: str
    public_key: str
    state: str
    requested_at: float
    decided_at: float | None = None
    sequences: Mapping[str, int] = field(default_factory=dict)
    will_seq: int | None = None

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if not re.fullmatch(r"[0-9a-f]{64}", self.public_key):
            raise ValueError("public_key must be 64 lowercase hex digits")
        if self.state not in ENROLMENT_STATES:
            raise ValueError(f"unknown enrolment state {self.state!r}; expected one of {sorted(ENROLMENT_STATES)}")
        check_time(self.requested_at, "requested_at")
        if self.decided_at is not None:
            check_time(self.decided_at, "decided_at")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {**asdict(self), "sequences": dict(self.sequences)}


def _check_deployment_state(state: str) -> None:
    if state not in DEPLOYMENT_STATES:
        raise ValueError(f"unknown deployment state {state!r}; expected one of {sorted(DEPLOYMENT_STATES)}")


# --- dialects --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    """What differs between SQLite and PostgreSQL; everything else is shared SQL.

    Shared SQL is written with ``?`` placeholders, ``{id}``, ``{float}``, ``{least}`` and
    ``{greatest}``; :meth:`sql` turns it into this dialect's text. Shared SQL must
    contain no literal ``?`` or ``%``.
    """

    name: str
    placeholder: str
    id_column: str
    float_type: str
    least: str
    greatest: str
    driver_errors: tuple[type[BaseException], ...]
    begin_schema_change: Callable[[Any], contextlib.AbstractContextManager[None]]
    returns_id_by_clause: bool
    begin_batch: Callable[[Any], contextlib.AbstractContextManager[None]]
    #: After rows were copied with their ids into a rebuilt table ``{table}``, makes the
    #: next generated id follow the largest; ``None`` where the database does it itself.
    reset_identity: str | None = None

    def sql(self, text: str) -> str:
        """Render shared SQL for this dialect."""
        rendered = text.format(id=self.id_column, float=self.float_type, least=self.least, greatest=self.greatest)
        return rendered.replace("?", self.placeholder)


@contextlib.contextmanager
def _sqlite_schema_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so two processes creating the
    # schema at once queue on the busy timeout instead of failing half-way.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _postgres_batch(conn: Any) -> contextlib.AbstractContextManager[None]:
    return conn.transaction()  # type: ignore[no-any-return]


@contextlib.contextmanager
def _postgres_schema_transaction(conn: Any) -> Iterator[None]:
    # CREATE TABLE IF NOT EXISTS is not safe against a concurrent twin on PostgreSQL;
    # a transaction-scoped advisory lock makes collectors create the schema one by one.
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK_KEY,))
        yield


def _sqlite_dialect() -> _Dialect:
    return _Dialect(
        name="sqlite",
        placeholder="?",
        id_column="INTEGER PRIMARY KEY AUTOINCREMENT",
        float_type="REAL",
        least="min",
        greatest="max",
        driver_errors=(sqlite3.Error,),
        begin_schema_change=_sqlite_schema_transaction,
        # RETURNING needs SQLite 3.35; lastrowid works on every version with upserts.
        returns_id_by_clause=False,
        begin_batch=_sqlite_schema_transaction,
    )


def _postgres_dialect(driver_error: type[BaseException]) -> _Dialect:
    return _Dialect(
        name="postgresql",
        placeholder="%s",
        id_column="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        float_type="DOUBLE PRECISION",
        least="LEAST",
        greatest="GREATEST",
        driver_errors=(driver_error,),
        begin_schema_change=_postgres_schema_transaction,
        returns_id_by_clause=True,
        begin_batch=_postgres_batch,
        reset_identity=(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM {table}"
        ),
    )


# --- schema ----------------------------------------------------------------------------

#: The schema version this code writes and understands.
SCHEMA_VERSION = 9

#: One step of a migration: shared SQL, or a function of the connection and dialect for
#: what SQL alone cannot say portably (checking rows, rewriting JSON).
_Step = str | Callable[[Any, _Dialect], None]

_V2_REBUILDS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "deployments",
        """
        CREATE TABLE deployments_v2 (
            id {id},
            device_id TEXT NOT NULL,
            bundle_name TEXT NOT NULL,
            bundle_version BIGINT NOT NULL,
            bundle_sha256 TEXT NOT NULL,
            transfer_id TEXT,
            state TEXT NOT NULL,
            error_code TEXT,
            error_message TEXT,
            started_at {float} NOT NULL,
            finished_at {float}
        )
        """,
        (
            "id",
            "device_id",
            "bundle_name",
            "bundle_version",
            "bundle_sha256",
            "transfer_id",
            "state",
            "error_code",
            "error_message",
            "started_at",
            "finished_at",
        ),
        (
            "CREATE INDEX deployments_device ON deployments (device_id, started_at)",
            "CREATE INDEX deployments_started ON deployments (started_at)",
        ),
    ),
    (
        "metrics",
        """
        CREATE TABLE metrics_v2 (
            id {id},
            device_id TEXT NOT NULL,
            bundle_name TEXT NOT NULL,
            bundle_version BIGINT NOT NULL,
            received_at {float} NOT NULL,
            report TEXT NOT NULL
        )
        """,
        ("id", "device_id", "bundle_name", "bundle_version", "received_at", "report"),
        (
            "CREATE INDEX metrics_device_bundle ON metrics (device_id, bundle_name, bundle_version, received_at)",
            "CREATE INDEX metrics_bundle ON metrics (bundle_name, bundle_version, received_at)",
        ),
    ),
)


def _integer_bundle_versions(conn: Any, dialect: _Dialect) -> None:
    """Migration 2: bundle versions become integers in deployments, metrics and devices.

    Every row is checked first: a version that is not a whole number (only a caller of
    the v1 API could have written one) stops the migration with an error naming the row,
    and the schema transaction leaves the file as it was. The two tables are rebuilt
    (SQLite cannot change a column's type) with their ids; the devices' active bundle
    JSON is rewritten with an integer version.
    """
    for table, create, columns, indexes in _V2_REBUILDS:
        for row_id, version in conn.execute(f"SELECT id, bundle_version FROM {table} ORDER BY id").fetchall():
            if _bundle_version(version) is None:
                raise StorageError(
                    f"cannot migrate the registry: {table} row {row_id} has bundle version {version!r}, "
                    "which is not a positive whole number; correct or delete that row, then open it again",
                    table=table,
                    row_id=row_id,
                    bundle_version=version,
                )
        listed = ", ".join(columns)
        selected = ", ".join("CAST(bundle_version AS BIGINT)" if c == "bundle_version" else c for c in columns)
        conn.execute(dialect.sql(create))
        conn.execute(f"INSERT INTO {table}_v2 ({listed}) SELECT {selected} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_v2 RENAME TO {table}")
        for index in indexes:
            conn.execute(index)
        if dialect.reset_identity is not None:
            conn.execute(dialect.reset_identity.format(table=table))
    rows = conn.execute("SELECT device_id, active_bundle FROM devices WHERE active_bundle IS NOT NULL").fetchall()
    for device_id, text in rows:
        try:
            ref = BundleRef.from_dict(json.loads(text))
        except (ValueError, TypeError, AttributeError) as exc:
            raise StorageError(
                f"cannot migrate the registry: devices row {device_id!r} has active bundle {text!r}: {exc}",
                table="devices",
                row_id=device_id,
            ) from exc
        conn.execute(
            dialect.sql("UPDATE devices SET active_bundle = ? WHERE device_id = ?"),
            (_bundle_json(ref), device_id),
        )


def _devices_by_broker(conn: Any, dialect: _Dialect) -> None:
    """Migration 3: devices are keyed by ``(device_id, broker)`` and keep every active bundle.

    The devices table is rebuilt with a ``broker`` column (``""`` for every existing row:
    where it was seen is not known) and ``active_bundles``, a JSON list made from the
    stored single ``active_bundle``.
    """
    conn.execute(
        dialect.sql(
            """
            CREATE TABLE devices_v3 (
                device_id TEXT NOT NULL,
                broker TEXT NOT NULL DEFAULT '',
                status TEXT NOT NULL,
                platform TEXT,
                runtimes TEXT,
                agent_version TEXT,
                active_bundles TEXT,
                first_seen {float} NOT NULL,
                last_seen {float} NOT NULL,
                PRIMARY KEY (device_id, broker)
            )
            """
        )
    )
    rows = conn.execute(
        "SELECT device_id, status, platform, runtimes, agent_version, active_bundle, first_seen, last_seen FROM devices"
    ).fetchall()
    for device_id, status, platform, runtimes, agent_version, active, first_seen, last_seen in rows:
        bundles = None if active is None else json.dumps([json.loads(active)], sort_keys=True, separators=(",", ":"))
        conn.execute(
            dialect.sql(
                "INSERT INTO devices_v3 (device_id, broker, status, platform, runtimes, agent_version, "
                "active_bundles, first_seen, last_seen) VALUES (?, '', ?, ?, ?, ?, ?, ?, ?)"
            ),
            (device_id, status, platform, runtimes, agent_version, bundles, first_seen, last_seen),
        )
    conn.execute("DROP TABLE devices")
    conn.execute("ALTER TABLE devices_v3 RENAME TO devices")


def _installed_from_active(conn: Any, dialect: _Dialect) -> None:
    """Migration 5: each device's stored active bundles become its installed versions (no previous known)."""
    rows = conn.execute("SELECT device_id, active_bundles, last_seen FROM devices WHERE active_bundles IS NOT NULL")
    for device_id, text, last_seen in rows.fetchall():
        try:
            refs = [BundleRef.from_dict(b) for b in json.loads(text)]
        except (ValueError, TypeError, AttributeError) as exc:
            logger.warning("registry migration 5: devices row %r has active bundles %r: %s", device_id, text, exc)
            continue
        for ref in refs:
            conn.execute(
                dialect.sql(_NOTE_INSTALLED), (device_id, ref.name, ref.version, last_seen or 0.0, last_seen or 0.0)
            )


def _keyed_metrics(conn: Any, dialect: _Dialect) -> None:
    """Migration 6: key each metrics row by its report's own time; drop the rows stored twice (earliest kept)."""
    conn.execute(dialect.sql("ALTER TABLE metrics ADD COLUMN report_ts {float}"))
    seen: set[tuple[str, float]] = set()
    twice: list[int] = []
    for row_id, device_id, report in conn.execute("SELECT id, device_id, report FROM metrics ORDER BY id").fetchall():
        try:
            ts = float(json.loads(report)["ts"])
        except (ValueError, TypeError, KeyError):
            continue  # unreadable rows are named when read, as before; they keep no key
        if (device_id, ts) in seen:
            twice.append(row_id)
            continue
        seen.add((device_id, ts))
        conn.execute(dialect.sql("UPDATE metrics SET report_ts = ? WHERE id = ?"), (ts, row_id))
    for row_id in twice:
        conn.execute(dialect.sql("DELETE FROM metrics WHERE id = ?"), (row_id,))
    if twice:
        logger.info("registry schema 6: removed %d metrics reports stored twice", len(twice))
    conn.execute("CREATE UNIQUE INDEX metrics_report ON metrics (device_id, report_ts)")


# Each entry brings the schema from version N-1 to N. Append; never edit a shipped one.
_MIGRATIONS: tuple[tuple[int, tuple[_Step, ...]], ...] = (
    (
        1,
        (
            """
            CREATE TABLE IF NOT EXISTS devices (
                device_id TEXT PRIMARY KEY,
                status TEXT NOT NULL,
                platform TEXT,
                runtimes TEXT,
                agent_version TEXT,
                active_bundle TEXT,
                first_seen {float} NOT NULL,
                last_seen {float} NOT NULL
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS deployments (
                id {id},
                device_id TEXT NOT NULL,
                bundle_name TEXT NOT NULL,
                bundle_version TEXT NOT NULL,
                bundle_sha256 TEXT NOT NULL,
                transfer_id TEXT,
                state TEXT NOT NULL,
                error_code TEXT,
                error_message TEXT,
                started_at {float} NOT NULL,
                finished_at {float}
            )
            """,
            "CREATE INDEX IF NOT EXISTS deployments_device ON deployments (device_id, started_at)",
            "CREATE INDEX IF NOT EXISTS deployments_started ON deployments (started_at)",
            """
            CREATE TABLE IF NOT EXISTS metrics (
                id {id},
                device_id TEXT NOT NULL,
                bundle_name TEXT NOT NULL,
                bundle_version TEXT NOT NULL,
                received_at {float} NOT NULL,
                report TEXT NOT NULL
            )
            """,
            """
            CREATE INDEX IF NOT EXISTS metrics_device_bundle
                ON metrics (device_id, bundle_name, bundle_version, received_at)
            """,
            """
            CREATE INDEX IF NOT EXISTS metrics_bundle
                ON metrics (bundle_name, bundle_version, received_at)
            """,
        ),
    ),
    (2, (_integer_bundle_versions,)),
    (3, (_devices_by_broker,)),
    (
        4,
        (
            """
            CREATE TABLE IF NOT EXISTS enrolments (
                device_id TEXT PRIMARY KEY,
                public_key TEXT NOT NULL,
                state TEXT NOT NULL,
                requested_at {float} NOT NULL,
                decided_at {float},
                will_seq BIGINT
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS device_sequences (
                device_id TEXT NOT NULL,
                channel TEXT NOT NULL,
                last_seq BIGINT NOT NULL,
                PRIMARY KEY (device_id, channel)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS report_drops (
                device_id TEXT NOT NULL,
                reason TEXT NOT NULL,
                count BIGINT NOT NULL,
                last_at {float} NOT NULL,
                PRIMARY KEY (device_id, reason)
            )
            """,
            # Rows written before times were checked (a status dated 2100 froze a row): 0 means unknown.
            "UPDATE devices SET last_seen = 0 WHERE NOT (last_seen BETWEEN 0 AND 4102444800) OR last_seen IS NULL",
            "UPDATE devices SET first_seen = 0 WHERE NOT (first_seen BETWEEN 0 AND 4102444800) OR first_seen IS NULL",
            "UPDATE metrics SET received_at = 0 WHERE NOT (received_at BETWEEN 0 AND 4102444800)",
        ),
    ),
    (
        5,
        (
            "ALTER TABLE devices ADD COLUMN labels TEXT",
            "ALTER TABLE devices ADD COLUMN heartbeat_s {float}",
            "ALTER TABLE devices ADD COLUMN last_heard {float}",
            """
            CREATE TABLE IF NOT EXISTS operator_labels (
                device_id TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                set_at {float} NOT NULL,
                PRIMARY KEY (device_id, key)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS installed_versions (
                device_id TEXT NOT NULL,
                bundle_name TEXT NOT NULL,
                version BIGINT,
                previous BIGINT,
                changed_at {float} NOT NULL,
                seen_at {float} NOT NULL,
                PRIMARY KEY (device_id, bundle_name)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS device_groups (
                name TEXT PRIMARY KEY,
                selector TEXT NOT NULL,
                created_at {float} NOT NULL
            )
            """,
            # What runs now, for devices known before: their active bundles as the first version seen.
            _installed_from_active,
        ),
    ),
    (
        6,
        (
            _keyed_metrics,
            """
            CREATE TABLE IF NOT EXISTS events (
                id {id},
                device_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                ts {float} NOT NULL,
                command_id TEXT NOT NULL,
                transfer_id TEXT NOT NULL,
                received_at {float} NOT NULL,
                event TEXT NOT NULL
            )
            """,
            "CREATE UNIQUE INDEX IF NOT EXISTS events_report ON events (device_id, ts, kind)",
        ),
    ),
    (
        7,
        (
            """
            CREATE TABLE IF NOT EXISTS rollouts (
                id TEXT PRIMARY KEY,
                bundle_name TEXT NOT NULL,
                bundle_version BIGINT NOT NULL,
                bundle_sha256 TEXT NOT NULL,
                bundle_path TEXT NOT NULL,
                selector TEXT NOT NULL,
                policy TEXT NOT NULL,
                status TEXT NOT NULL,
                wave BIGINT NOT NULL,
                waves BIGINT NOT NULL,
                reason TEXT NOT NULL,
                request TEXT,
                created_at {float} NOT NULL,
                updated_at {float} NOT NULL,
                runner TEXT,
                runner_seen {float}
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS rollout_devices (
                rollout_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                position BIGINT NOT NULL,
                wave BIGINT NOT NULL,
                state TEXT NOT NULL,
                attempts BIGINT NOT NULL,
                previous_version BIGINT,
                base_p99_ms {float},
                base_rss_bytes BIGINT,
                online INTEGER NOT NULL,
                started_at {float},
                finished_at {float},
                error_code TEXT,
                p99_ms {float},
                rss_bytes BIGINT,
                PRIMARY KEY (rollout_id, device_id)
            )
            """,
        ),
    ),
    (
        8,
        (
            """
            CREATE TABLE IF NOT EXISTS runs (
                id {id},
                kind TEXT NOT NULL,
                started_at {float} NOT NULL,
                parameters TEXT NOT NULL,
                results TEXT NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS runs_kind_started ON runs (kind, started_at)",
        ),
    ),
    # A report a device measured on its own schedule (metrics_every_s), told apart from the
    # profile after an install: a rollout's health gate compares installs with installs.
    (9, ("ALTER TABLE metrics ADD COLUMN periodic INTEGER NOT NULL DEFAULT 0",)),
)

_CREATE_SCHEMA_VERSION = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)"

# One statement, so concurrent collectors cannot interleave a read and a write.
# A field missing from the update (NULL) keeps the stored value; an update older than
# the stored row (a late, reordered message) fills gaps but overwrites nothing.
_UPSERT_DEVICE = """
INSERT INTO devices (device_id, broker, status, platform, runtimes, agent_version, active_bundles,
                     first_seen, last_seen, labels, heartbeat_s)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, broker) DO UPDATE SET
    status = CASE WHEN excluded.last_seen >= devices.last_seen
                  THEN excluded.status ELSE devices.status END,
    platform = CASE WHEN excluded.platform IS NULL THEN devices.platform
                    WHEN devices.platform IS NULL OR excluded.last_seen >= devices.last_seen
                    THEN excluded.platform ELSE devices.platform END,
    runtimes = CASE WHEN excluded.runtimes IS NULL THEN devices.runtimes
                    WHEN devices.runtimes IS NULL OR excluded.last_seen >= devices.last_seen
                    THEN excluded.runtimes ELSE devices.runtimes END,
    agent_version = CASE WHEN excluded.agent_version IS NULL THEN devices.agent_version
                         WHEN devices.agent_version IS NULL
                              OR excluded.last_seen >= devices.last_seen
                         THEN excluded.agent_version ELSE devices.agent_version END,
    active_bundles = CASE WHEN excluded.active_bundles IS NULL THEN devices.active_bundles
                          WHEN devices.active_bundles IS NULL
                               OR excluded.last_seen >= devices.last_seen
                          THEN excluded.active_bundles ELSE devices.active_bundles END,
    labels = CASE WHEN excluded.labels IS NULL THEN devices.labels
                  WHEN devices.labels IS NULL OR excluded.last_seen >= devices.last_seen
                  THEN excluded.labels ELSE devices.labels END,
    heartbeat_s = CASE WHEN excluded.heartbeat_s IS NULL THEN devices.heartbeat_s
                       WHEN devices.heartbeat_s IS NULL OR excluded.last_seen >= devices.last_seen
                       THEN excluded.heartbeat_s ELSE devices.heartbeat_s END,
    first_seen = {least}(devices.first_seen, excluded.first_seen),
    last_seen = {greatest}(devices.last_seen, excluded.last_seen)
"""

# A row from before schema 3 (broker unknown) becomes the row of the first broker the
# device is seen on, unless that broker already has one. Idempotent.
_ADOPT_UNKNOWN_BROKER = """
UPDATE devices SET broker = ? WHERE device_id = ? AND broker = ''
    AND NOT EXISTS (SELECT 1 FROM devices known WHERE known.device_id = ? AND known.broker = ?)
"""

# A heartbeat: when it was heard, and the interval it names. A device whose birth was not
# seen yet gets a row (online as of the heartbeat) that its status fills in later.
_RECORD_HEARTBEAT = """
INSERT INTO devices (device_id, broker, status, first_seen, last_seen, heartbeat_s, last_heard)
VALUES (?, ?, 'online', ?, ?, ?, ?)
ON CONFLICT (device_id, broker) DO UPDATE SET
    heartbeat_s = CASE WHEN devices.last_heard IS NULL OR excluded.last_heard >= devices.last_heard
                       THEN excluded.heartbeat_s ELSE devices.heartbeat_s END,
    last_heard = {greatest}(COALESCE(devices.last_heard, excluded.last_heard), excluded.last_heard)
"""

# The active version of one bundle, as a status seen at ``seen_at`` reports it. A change makes
# the stored version ``previous``; a status older than the stored one changes nothing; the
# same status twice changes nothing (right-hand sides read the row as it was).
_NOTE_INSTALLED = """
INSERT INTO installed_versions (device_id, bundle_name, version, previous, changed_at, seen_at)
VALUES (?, ?, ?, NULL, ?, ?)
ON CONFLICT (device_id, bundle_name) DO UPDATE SET
    previous = CASE WHEN excluded.seen_at >= installed_versions.seen_at
                         AND installed_versions.version IS NOT NULL
                         AND installed_versions.version <> excluded.version
                    THEN installed_versions.version ELSE installed_versions.previous END,
    changed_at = CASE WHEN excluded.seen_at >= installed_versions.seen_at
                           AND (installed_versions.version IS NULL
                                OR installed_versions.version <> excluded.version)
                      THEN excluded.changed_at ELSE installed_versions.changed_at END,
    version = CASE WHEN excluded.seen_at >= installed_versions.seen_at
                   THEN excluded.version ELSE installed_versions.version END,
    seen_at = {greatest}(installed_versions.seen_at, excluded.seen_at)
"""

_ENROLMENT_COLUMNS = "device_id, public_key, state, requested_at, decided_at, will_seq"

_DEVICE_COLUMNS = (
    "device_id, status, platform, runtimes, agent_version, active_bundles, first_seen, last_seen, broker, "
    "labels, heartbeat_s, last_heard"
)
_DEPLOYMENT_COLUMNS = (
    "id, device_id, bundle_name, bundle_version, bundle_sha256, transfer_id, state, "
    "error_code, error_message, started_at, finished_at"
)
_METRICS_COLUMNS = "id, device_id, bundle_name, bundle_version, received_at, report"
_RUN_COLUMNS = "id, kind, started_at, parameters, results"

# What an event reported later does to the deployment it is about: the newest row of that
# device and transfer (or bundle name and version) still waiting for an outcome, started
# before the host received the event; a row the host closed as a timeout waits too (the
# device was offline, and came back).
_FOLLOW_DEPLOYMENT = """
UPDATE deployments SET state = ?, error_code = ?, error_message = ?, finished_at = ?
WHERE id = (
    SELECT id FROM deployments
    WHERE device_id = ? AND (transfer_id = ? OR (bundle_name = ? AND bundle_version = ?))
      AND started_at <= ?
      AND (state IN ('sent', 'deferred') OR (state = 'failed' AND error_code = 'device_timeout'))
    ORDER BY started_at DESC, id DESC LIMIT 1
)
"""


_INSERT_METRICS = (
    "INSERT INTO metrics (device_id, bundle_name, bundle_version, received_at, report, report_ts, periodic) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, report_ts) DO NOTHING"
)


def _metrics_row(report: MetricsReport, received_at: float) -> tuple[Any, ...]:
    """The metrics row of a report; raises ValueError for an implausible time or a number not finite."""
    check_time(received_at, "received_at")
    check_time(report.ts, "report ts")
    stored = {**report.to_dict(), "schema": report.schema}
    try:
        text = json.dumps(stored, sort_keys=True, separators=(",", ":"), allow_nan=False)  # finite, checked in C
    except ValueError:
        _check_finite(stored, "report")  # names the number that is not
        raise
    return (
        report.device_id,
        report.bundle_name,
        report.bundle_version,
        received_at,
        text,
        report.ts,
        int(report.periodic),
    )


def _dump_json(value: Mapping[str, Any] | None) -> str | None:
    if value is None:
        return None
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))


def _load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _bundle_json(ref: BundleRef) -> str:
    """How the devices table stored an active bundle in schema 2 (the version a number)."""
    return json.dumps({"name": ref.name, "version": ref.version}, sort_keys=True, separators=(",", ":"))


def _bundles_json(refs: Sequence[BundleRef] | None) -> str | None:
    """How the devices table stores the active bundles since schema 3: a JSON list, ``[]`` for none."""
    if refs is None:
        return None
    return json.dumps([{"name": r.name, "version": r.version} for r in refs], sort_keys=True, separators=(",", ":"))


# --- the registry ----------------------------------------------------------------------


class Registry:
    """The fleet's devices, deployments and metrics in one SQL database.

    Build it with :func:`open_registry`. One instance holds one connection in
    autocommit mode; use it from one thread. Several processes (or several instances)
    may share one database.

    Args:
        conn: an open DB-API connection in autocommit mode.
        dialect: the dialect matching ``conn``.
        display_name: the database as shown in errors and logs, password masked.
    """

    def __init__(self, conn: Any, dialect: _Dialect, display_name: str) -> None:
        self._conn = conn
        self._dialect = dialect
        self._name = display_name
        self._closed = False

    # -- lifecycle --

    @property
    def name(self) -> str:
        """The database this registry writes to, password masked."""
        return self._name

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect.name

    def close(self) -> None:
        """Close the connection. Calling it twice is harmless.

        Raises:
            StorageError: if the driver fails to close the connection.
        """
        if self._closed:
            return
        self._closed = True
        with self._storage_errors("close"):
            self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self._name!r})"

    # -- schema --

    def ensure_schema(self) -> int:
        """Create the schema if missing and run any pending migrations.

        Idempotent, and safe when several processes open the same database at once.

        Returns:
            The schema version now in the database.

        Raises:
            StorageError: on a database failure, or if the database was written by a
                newer edge-sdk (its schema version is above :data:`SCHEMA_VERSION`).
        """
        # Fast path without the write lock, so a reader can open a registry that a
        # collector is busy writing. A missing table is an error here, hence the try.
        try:
            current = self._schema_version()
        except self._dialect.driver_errors:
            current = 0
        if current == SCHEMA_VERSION:
            return current
        with self._storage_errors("create schema"), self._dialect.begin_schema_change(self._conn):
            self._conn.execute(_CREATE_SCHEMA_VERSION)
            current = self._schema_version()
            for version, statements in _MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    if isinstance(statement, str):
                        self._conn.execute(self._dialect.sql(statement))
                    else:
                        statement(self._conn, self._dialect)
                self._conn.execute(
                    self._dialect.sql("INSERT INTO schema_version (version) VALUES (?)"),
                    (version,),
                )
                logger.info("registry %s: schema migrated to version %d", self._name, version)
                current = version
        return current

    def _schema_version(self) -> int:
        row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"registry {self._name} has schema version {current}, newer than "
                f"{SCHEMA_VERSION} which this edge-sdk understands; upgrade edge-sdk",
                database=self._name,
                schema_version=current,
            )
        return current

    # -- devices --

    def upsert_device(self, record: DeviceRecord) -> None:
        """Insert a device or merge an update into it, keyed by device id and broker.

        Merge rules: ``None`` fields keep what is stored; ``first_seen`` only moves
        earlier and ``last_seen`` only later; an update older than the stored row
        (messages reordered between collectors) fills empty fields but overwrites none.
        A row of this device recorded before brokers were known (broker ``""``) is
        first adopted by ``record.broker`` when that broker has no row of its own.

        Args:
            record: the device as this update reports it.

        Raises:
            StorageError: on a database failure.
        """
        first_seen = record.first_seen if record.first_seen is not None else record.last_seen
        params = (
            record.device_id,
            record.broker,
            record.status,
            _dump_json(record.platform),
            _dump_json(record.runtimes),
            record.agent_version,
            _bundles_json(record.active_bundles),
            first_seen,
            record.last_seen,
            _dump_json(record.labels),
            record.heartbeat_s,
        )
        with self._storage_errors(f"upsert device {record.device_id!r}"):
            if record.broker:
                self._conn.execute(
                    self._dialect.sql(_ADOPT_UNKNOWN_BROKER),
                    (record.broker, record.device_id, record.device_id, record.broker),
                )
            self._conn.execute(self._dialect.sql(_UPSERT_DEVICE), params)
            if record.active_bundles is not None:
                self._note_installed(record.device_id, record.active_bundles, record.last_seen)

    def get_device(self, device_id: str, broker: str | None = None) -> DeviceRecord | None:
        """One device by id: its row on ``broker``, or the row seen last on any broker.

        Args:
            device_id: the device's id.
            broker: the broker's address; ``None`` for any.

        Returns:
            The device, or ``None`` if the registry has never seen it (there).

        Raises:
            StorageError: on a database failure.
        """
        where, params = _where({"device_id": device_id, "broker": broker})
        query = f"SELECT {_DEVICE_COLUMNS} FROM devices{where} ORDER BY last_seen DESC, broker LIMIT 1"
        with self._storage_errors(f"read device {device_id!r}"):
            row = self._conn.execute(self._dialect.sql(query), params).fetchone()
        return None if row is None else self._device_from_row(row)

    def list_devices(self) -> list[DeviceRecord]:
        """Every device row, ordered by id, then broker.

        Returns:
            The devices; a device seen on two brokers appears once for each.

        Raises:
            StorageError: on a database failure.
        """
        with self._storage_errors("list devices"):
            rows = self._conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id, broker").fetchall()
        return [self._device_from_row(row) for row in rows]

    def iter_devices(self, after: tuple[str, str] | None = None, page: int = 20_000) -> Iterator[DeviceRecord]:
        """Every device row after ``after``, ordered by id then broker, as records (see :meth:`iter_device_rows`).

        Raises:
            ValueError: a page size below 1.
            StorageError: on a database failure or a malformed row.
        """
        for row in self.iter_device_rows(after, page):
            yield self.device_record(row)

    def iter_device_rows(self, after: tuple[str, str] | None = None, page: int = DEVICE_PAGE) -> Iterator[DeviceRow]:
        """Every device row after ``after``, ordered by id then broker, read in pages (keyset paging).

        Each page is one query that starts where the last one ended (on the primary key), so
        a listing of any size holds one page in memory and never skips or repeats a row
        that was there throughout. The rows come as stored, their JSON columns as text, each
        checked to decode to what it should (decoded once per distinct text): what a
        listing that writes JSON needs, without building a record per row.

        Args:
            after: ``(device_id, broker)`` of the last row already seen; None from the start.
            page: rows per query.

        Yields:
            The device rows.

        Raises:
            ValueError: a page size below 1.
            StorageError: on a database failure or a malformed row.
        """
        if page < 1:
            raise ValueError(f"page must be at least 1, got {page}")
        cursor_key = after
        make = functools.partial(tuple.__new__, DeviceRow)  # DeviceRow._make without its Python frame
        while True:
            if cursor_key is None:
                query, params = f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id, broker LIMIT ?", (page,)
            else:
                query = (  # a row value: both databases seek the primary key to it (an OR would scan up to it)
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE (device_id, broker) > (?, ?) "
                    "ORDER BY device_id, broker LIMIT ?"
                )
                params = (cursor_key[0], cursor_key[1], page)  # type: ignore[assignment]
            with self._storage_errors("list devices"):
                rows = list(map(make, self._conn.execute(self._dialect.sql(query), params).fetchall()))
            try:
                for row in rows:
                    _check_device_row(row)
            except (ValueError, TypeError) as exc:
                self._malformed("devices", row[0], exc)
            yield from rows  # checked whole first, then handed on without a Python frame per row
            if len(rows) < page:
                return
            cursor_key = (rows[-1][0], rows[-1][8])

    def device_record(self, row: DeviceRow) -> DeviceRecord:
        """The record a device row (:meth:`iter_device_rows`) makes.

        Raises:
            StorageError: the row is malformed.
        """
        return self._device_from_row(row)

    def record_heartbeat(self, device_id: str, broker: str, at: float, heartbeat_s: float) -> None:
        """Record that a device was heard from at ``at``, announcing ``heartbeat_s``.

        Never moves ``last_heard`` earlier (heartbeats may arrive out of order); a heartbeat
        from a device without a row yet makes one, ``online`` as of ``at``.

        Raises:
            ValueError: an implausible time or interval.
            StorageError: on a database failure.
        """
        check_time(at, "heartbeat time")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat interval must be a positive number, got {heartbeat_s!r}")
        with self._storage_errors(f"record heartbeat of {device_id!r}"):
            if broker:
                self._conn.execute(self._dialect.sql(_ADOPT_UNKNOWN_BROKER), (broker, device_id, device_id, broker))
            self._conn.execute(
                self._dialect.sql(_RECORD_HEARTBEAT), (device_id, broker, at, at, float(heartbeat_s), at)
            )

    # -- installed versions --

    def _note_installed(self, device_id: str, bundles: Sequence[BundleRef], seen_at: float) -> None:
        """Derive installed and previous versions from a status listing ``bundles`` (its time ``seen_at``)."""
        for ref in bundles:
            self._conn.execute(self._dialect.sql(_NOTE_INSTALLED), (device_id, ref.name, ref.version, seen_at, seen_at))
        names = sorted({ref.name for ref in bundles})
        gone = f" AND bundle_name NOT IN ({', '.join('?' * len(names))})" if names else ""
        self._conn.execute(
            self._dialect.sql(
                "UPDATE installed_versions SET previous = version, version = NULL, changed_at = ?, seen_at = ? "
                f"WHERE device_id = ? AND version IS NOT NULL AND seen_at <= ?{gone}"
            ),
            (seen_at, seen_at, device_id, seen_at, *names),
        )

    def installed_versions(self, device_id: str | None = None) -> list[InstalledVersion]:
        """Installed and previous version per bundle name, for one device or all.

        Returns:
            Ordered by device, then bundle name.

        Raises:
            StorageError: on a database failure.
        """
        where, params = _where({"device_id": device_id})
        query = (
            "SELECT device_id, bundle_name, version, previous, changed_at FROM installed_versions"
            f"{where} ORDER BY device_id, bundle_name"
        )
        with self._storage_errors("read installed versions"):
            rows = self._conn.execute(self._dialect.sql(query), params).fetchall()
        return [
            InstalledVersion(
                str(r[0]),
                str(r[1]),
                None if r[2] is None else int(r[2]),
                None if r[3] is None else int(r[3]),
                float(r[4]),
            )
            for r in rows
        ]

    # -- operator labels --

    def operator_labels(self, device_id: str | None = None) -> dict[str, dict[str, str]]:
        """Labels set by the operator: device id -> key -> value (one device, or every device).

        Raises:
            StorageError: on a database failure.
        """
        where, params = _where({"device_id": device_id})
        query = f"SELECT device_id, key, value FROM operator_labels{where} ORDER BY device_id, key"
        with self._storage_errors("read operator labels"):
            rows = self._conn.execute(self._dialect.sql(query), params).fetchall()
        out: dict[str, dict[str, str]] = {}
        for dev, key, value in rows:
            out.setdefault(str(dev), {})[str(key)] = str(value)
        return out

    def set_operator_labels(
        self, device_id: str, labels: Mapping[str, str], remove: Sequence[str] = (), *, at: float
    ) -> dict[str, str]:
        """Set (or replace) and remove a device's operator labels; setting the same twice changes nothing.

        Args:
            device_id: the device.
            labels: key -> value to set (checked by the caller: :func:`edge_sdk.protocol.labels.check_labels`).
            remove: keys to remove (a key not set is ignored).
            at: unix seconds.

        Returns:
            The device's operator labels now.

        Raises:
            ConfigError: a key both set and removed, or more labels than allowed in all.
            StorageError: on a database failure.
        """
        from edge_sdk.protocol.labels import MAX_LABELS

        both = sorted(set(labels) & set(remove))
        if both:
            raise ConfigError(f"label(s) {', '.join(both)} both set and removed")
        check_time(at, "label time")
        current = self.operator_labels(device_id).get(device_id, {})
        after = {k: v for k, v in {**current, **labels}.items() if k not in remove}
        if len(after) > MAX_LABELS:
            raise ConfigError(f"device {device_id!r} would have {len(after)} operator labels; at most {MAX_LABELS}")
        with self._storage_errors(f"set labels of {device_id!r}"):
            for key, value in labels.items():
                self._conn.execute(
                    self._dialect.sql(
                        "INSERT INTO operator_labels (device_id, key, value, set_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value, "
                        "set_at = CASE WHEN operator_labels.value = excluded.value "
                        "THEN operator_labels.set_at ELSE excluded.set_at END"
                    ),
                    (device_id, key, value, at),
                )
            for key in remove:
                self._conn.execute(
                    self._dialect.sql("DELETE FROM operator_labels WHERE device_id = ? AND key = ?"), (device_id, key)
                )
        return self.operator_labels(device_id).get(device_id, {})

    # -- groups --

    def save_group(self, name: str, selector: str, at: float) -> GroupRecord:
        """Save ``selector`` under ``name`` (replacing what that name held). Saving the same twice is one row.

        Raises:
            StorageError: on a database failure.
        """
        check_time(at, "group time")
        with self._storage_errors(f"save group {name!r}"):
            self._conn.execute(
                self._dialect.sql(
                    "INSERT INTO device_groups (name, selector, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET selector = excluded.selector, "
                    "created_at = CASE WHEN device_groups.selector = excluded.selector "
                    "THEN device_groups.created_at ELSE excluded.created_at END"
                ),
                (name, selector, at),
            )
        return self.get_group(name) or GroupRecord(name, selector, at)

    def get_group(self, name: str) -> GroupRecord | None:
        """One group, or None.

        Raises:
            StorageError: on a database failure.
        """
        with self._storage_errors(f"read group {name!r}"):
            row = self._conn.execute(
                self._dialect.sql("SELECT name, selector, created_at FROM device_groups WHERE name = ?"), (name,)
            ).fetchone()
        return None if row is None else GroupRecord(str(row[0]), str(row[1]), float(row[2]))

    def list_groups(self) -> list[GroupRecord]:
        """Every group, by name.

        Raises:
            StorageError: on a database failure.
        """
        with self._storage_errors("list groups"):
            rows = self._conn.execute("SELECT name, selector, created_at FROM device_groups ORDER BY name").fetchall()
        return [GroupRecord(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def remove_group(self, name: str) -> bool:
        """Delete a group; removing one that is not there is harmless.

        Returns:
            Whether it was there.

        Raises:
            StorageError: on a database failure.
        """
        with self._storage_errors(f"remove group {name!r}"):
            cursor = self._conn.execute(self._dialect.sql("DELETE FROM device_groups WHERE name = ?"), (name,))
        return bool(cursor.rowcount > 0)

    def forget_device(self, device_id: str) -> ForgetResult:
        """Delete every row about a device: its device rows (all brokers), deployments, metrics and events.

        Args:
            device_id: the device's id.

        Returns:
            What was deleted, and the brokers the device was seen on.

        Raises:
            StorageError: on a database failure.
        """
        counts: dict[str, int] = {}
        with self._storage_errors(f"forget device {device_id!r}"):
            brokers = self._conn.execute(
                self._dialect.sql("SELECT broker FROM devices WHERE device_id = ? ORDER BY broker"), (device_id,)
            ).fetchall()
            for table in ("devices", "deployments", "metrics", "operator_labels", "installed_versions", "events"):
                cursor = self._conn.execute(self._dialect.sql(f"DELETE FROM {table} WHERE device_id = ?"), (device_id,))
                counts[table] = max(0, cursor.rowcount)
        return ForgetResult(
            device_id=device_id,
            brokers=tuple(str(row[0]) for row in brokers),
            devices=counts["devices"],
            deployments=counts["deployments"],
            metrics=counts["metrics"],
        )

    # -- deployments --

    def record_deployment(
        self,
        device_id: str,
        bundle_name: str,
        bundle_version: int,
        bundle_sha256: str,
        *,
        started_at: float,
        transfer_id: str | None = None,
        state: DeploymentState = "sent",
    ) -> int:
        """Record that a bundle was sent (or is about to be) to a device.

        Args:
            device_id: target device.
            bundle_name: bundle name.
            bundle_version: bundle version.
            bundle_sha256: hex sha256 of the bundle file.
            started_at: unix seconds the deploy command was sent.
            transfer_id: id of the chunked transfer carrying it, if any.
            state: initial state, ``"sent"`` unless told otherwise.

        Returns:
            The new deployment's id.

        Raises:
            ValueError: if ``state`` is unknown or the version is not a positive integer.
            StorageError: on a database failure.
        """
        _check_deployment_state(state)
        if type(bundle_version) is not int or bundle_version < 1:
            raise ValueError(f"bundle version must be a positive integer, got {bundle_version!r}")
        params = (
            device_id,
            bundle_name,
            bundle_version,
            bundle_sha256,
            transfer_id,
            state,
            started_at,
        )
        return self._insert(
            "INSERT INTO deployments (device_id, bundle_name, bundle_version, bundle_sha256, "
            "transfer_id, state, started_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            params,
            what=f"record deployment of {bundle_name} {bundle_version} to {device_id!r}",
        )

    def update_deployment(
        self,
        deployment_id: int,
        state: DeploymentState,
        error_code: str | None = None,
        error_message: str | None = None,
        finished_at: float | None = None,
    ) -> None:
        """Set a deployment's state and outcome; the error fields are replaced as given.

        Args:
            deployment_id: id returned by :meth:`record_deployment`.
            state: the new state.
            error_code: the device's error code, for ``refused`` or ``failed``.
            error_message: the device's error message.
            finished_at: unix seconds the outcome arrived.

        Raises:
            ValueError: if ``state`` is unknown.
            StorageError: on a database failure, or if no deployment has that id.
        """
        _check_deployment_state(state)
        with self._storage_errors(f"update deployment {deployment_id}"):
            cursor = self._conn.execute(
                self._dialect.sql(
                    "UPDATE deployments SET state = ?, error_code = ?, error_message = ?, finished_at = ? WHERE id = ?"
                ),
                (state, error_code, error_message, finished_at, deployment_id),
            )
            updated = cursor.rowcount
        if updated == 0:
            raise StorageError(
                f"registry {self._name} has no deployment {deployment_id}",
                database=self._name,
                deployment_id=deployment_id,
            )

    def list_deployments(self, device_id: str | None = None, limit: int = 100) -> list[DeploymentRecord]:
        """Deployments, newest first.

        Args:
            device_id: only this device's deployments; all devices when ``None``.
            limit: at most this many rows.

        Returns:
            The deployments, ordered by ``started_at`` then id, newest first.

        Raises:
            ValueError: if ``limit`` is below 1.
            StorageError: on a database failure.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where, params = _where({"device_id": device_id})
        query = f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments{where} ORDER BY started_at DESC, id DESC LIMIT ?"
        with self._storage_errors("list deployments"):
            rows = self._conn.execute(self._dialect.sql(query), (*params, limit)).fetchall()
        return [self._deployment_from_row(row) for row in rows]

    def installed_deployment(self, device_id: str, bundle_name: str, bundle_version: int) -> DeploymentRecord | None:
        """The latest deployment of this bundle version to this device that ended installed.

        Its ``bundle_sha256`` names the bundle file the device's slot of that version came
        from (what a delta to the next version starts from).

        Args:
            device_id: the device.
            bundle_name: bundle name.
            bundle_version: bundle version.

        Returns:
            The deployment, newest by ``started_at`` then id; None when none was recorded.

        Raises:
            StorageError: on a database failure.
        """
        where, params = _where(
            {"device_id": device_id, "bundle_name": bundle_name, "bundle_version": bundle_version, "state": "installed"}
        )
        query = f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments{where} ORDER BY started_at DESC, id DESC LIMIT 1"
        with self._storage_errors(f"find the installed deployment of {bundle_name} {bundle_version}"):
            rows = self._conn.execute(self._dialect.sql(query), params).fetchall()
        return self._deployment_from_row(rows[0]) if rows else None

    # -- metrics --

    def add_metrics(self, report: MetricsReport, received_at: float) -> int | None:
        """Store one metrics report whole, with the schema it was written in, once.

        A report is keyed by its device and its own time (``ts``, which the device signed):
        storing the same report again (a retained report heard again, a message delivered
        twice) changes nothing.

        Args:
            report: the report as received; device, bundle and version come from it.
            received_at: unix seconds the host received it.

        Returns:
            The new row's id; None when this report was stored before.

        Raises:
            ValueError: an implausible time or a number that is not finite (nothing is stored).
            StorageError: on a database failure.
        """
        return self._insert_once(
            _INSERT_METRICS, _metrics_row(report, received_at), what=f"add metrics from {report.device_id!r}"
        )

    def add_metrics_batch(
        self, reports: Sequence[MetricsReport], received_at: float
    ) -> list[tuple[MetricsReport, ValueError]]:
        """Store many metrics reports in one statement (``executemany``), each once (see :meth:`add_metrics`).

        Args:
            reports: the reports as received.
            received_at: unix seconds the host received them.

        Returns:
            The reports not stored (an implausible time, a number that is not finite), each with why.

        Raises:
            StorageError: on a database failure (nothing of the batch is stored).
        """
        rows: list[tuple[Any, ...]] = []
        refused: list[tuple[MetricsReport, ValueError]] = []
        for report in reports:
            try:
                rows.append(_metrics_row(report, received_at))
            except ValueError as exc:
                refused.append((report, exc))
        if rows:
            # a cursor: psycopg's connection has no executemany
            what = f"add {len(rows)} metrics reports"
            with self._storage_errors(what), contextlib.closing(self._conn.cursor()) as cur:
                cur.executemany(self._dialect.sql(_INSERT_METRICS), rows)
        return refused

    # -- events --

    def add_event(self, event: Event, received_at: float) -> bool:
        """Store one event a device reported, once (keyed by device, its own time and kind).

        Args:
            event: the event as received.
            received_at: unix seconds the host received it.

        Returns:
            True if stored now; False when it was stored before.

        Raises:
            ValueError: an implausible time (nothing is stored).
            StorageError: on a database failure.
        """
        check_time(received_at, "received_at")
        check_time(event.ts, "event ts")
        params = (
            event.device_id,
            event.kind,
            event.ts,
            event.command_id,
            event.transfer_id,
            received_at,
            json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":")),
        )
        row = self._insert_once(
            "INSERT INTO events (device_id, kind, ts, command_id, transfer_id, received_at, event) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, ts, kind) DO NOTHING",
            params,
            what=f"add an event from {event.device_id!r}",
        )
        return row is not None

    def count_events(self, device_id: str | None = None) -> int:
        """How many events are stored (of one device, or all).

        Raises:
            StorageError: on a database failure.
        """
        where, params = _where({"device_id": device_id})
        with self._storage_errors("count events"):
            row = self._conn.execute(self._dialect.sql(f"SELECT COUNT(*) FROM events{where}"), params).fetchone()
        return int(row[0])

    def follow_deployment(
        self,
        device_id: str,
        state: DeploymentState,
        *,
        seen_at: float,
        received_at: float,
        transfer_id: str = "",
        bundle: BundleRef | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Bring a deployment up to what its device reported after the deploy command ended.

        The row changed is the newest of ``device_id`` for ``transfer_id`` (or for
        ``bundle``'s name and version) that started before ``received_at`` and still waits
        for an outcome: ``sent``, ``deferred``, or ``failed`` by the host's timeout. Rows with
        a device's own outcome are never changed, so an event heard twice is harmless.

        Args:
            device_id: the device that reported.
            state: the outcome it reported.
            seen_at: when the device reported it (its time, never later than the host's): the row's end.
            received_at: when the host received the report (the host's clock, as ``started_at``).
            transfer_id: the transfer the event names (``""``: none).
            bundle: the bundle the event names, if it does.
            error_code: the device's error code, for ``refused`` or ``failed``.
            error_message: the device's error message.

        Returns:
            True if a deployment row changed.

        Raises:
            ValueError: if ``state`` is unknown.
            StorageError: on a database failure.
        """
        _check_deployment_state(state)
        name, version = (bundle.name, bundle.version) if bundle is not None else (None, None)
        params = (state, error_code, error_message, seen_at, device_id, transfer_id or None, name, version, received_at)
        with self._storage_errors(f"follow a deployment of {device_id!r}"):
            cursor = self._conn.execute(self._dialect.sql(_FOLLOW_DEPLOYMENT), params)
            return bool(cursor.rowcount)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction around several writes: all of them are stored, or none.

        A collector commits a batch of messages before it acknowledges any of them.

        Raises:
            StorageError: on a database failure (the transaction is rolled back).
        """
        with self._storage_errors("write a batch"), self._dialect.begin_batch(self._conn):
            yield

    def latest_metrics(
        self, device_id: str | None = None, bundle_name: str | None = None, *, periodic: bool = True
    ) -> list[MetricsRecord]:
        """The newest report for each (device, bundle, version).

        Args:
            device_id: only this device; all when ``None``.
            bundle_name: only this bundle (any version); all when ``None``.
            periodic: count reports a device measured on its own schedule
                (:attr:`~edge_sdk.protocol.MetricsReport.periodic`); False: only the profiles
                made after installs, as a rollout's health gate compares them.

        Returns:
            One record per (device, bundle, version), ordered by device, bundle, version.
            Ties on ``received_at`` go to the report stored last.

        Raises:
            StorageError: on a database failure, or a stored report that is not a valid one
                (the error names its row).
        """
        rows = self._latest_metrics_rows(device_id, bundle_name, None if periodic else 0)
        return [self._metrics_from_row(row) for row in rows]

    def latest_metrics_json(
        self,
        only: Collection[tuple[str, str, int]] | None = None,
        decoded: MutableMapping[Any, dict[str, Any]] | None = None,
    ) -> list[tuple[str, str, int, float, dict[str, Any]]]:
        """The newest report for each (device, bundle, version), as stored JSON, not rebuilt as typed records.

        For readers of a whole fleet (the report, the exporter) where rebuilding ten thousand
        typed reports costs more than the rest together: every report was validated when
        it was stored (:meth:`add_metrics`); the reader still checks each value it uses.

        Args:
            only: decode only these (device, bundle, version); all when ``None``.
            decoded: with ``only``, reports decoded by an earlier call, by row id, which this
                call uses instead of reading and decoding them again and leaves holding exactly
                the reports it returns (a metrics row never changes once stored). The reports
                are shared: readers must not change them.

        Returns:
            ``(device_id, bundle_name, bundle_version, received_at, report)`` ordered as
            :meth:`latest_metrics`; rows whose report is not a JSON object are left out.

        Raises:
            StorageError: on a database failure.
        """
        out = []
        if only is not None:
            fresh: dict[Any, dict[str, Any]] = {}
            for row_id, device_id, bundle_name, version, received_at, report in self._latest_metrics_of(only, decoded):
                if isinstance(report, str):
                    report = json.loads(report)
                if isinstance(report, dict):
                    fresh[row_id] = report
                    out.append((device_id, bundle_name, version, float(received_at), report))
            if decoded is not None:
                decoded.clear()
                decoded.update(fresh)
            return out
        for row in self._latest_metrics_rows(None, None):
            stored_version = _bundle_version(row[3])
            if stored_version is None:
                continue
            stored = json.loads(row[5])
            if isinstance(stored, dict):
                out.append((str(row[1]), str(row[2]), stored_version, float(row[4]), stored))
        return out

    def _latest_metrics_of(
        self, only: Collection[tuple[str, str, int]], decoded: Mapping[Any, dict[str, Any]] | None
    ) -> list[tuple[Any, str, str, int, float, str | dict[str, Any]]]:
        """The newest rows of ``only``'s keys, ordered as :meth:`latest_metrics`; each report as
        stored text, or from ``decoded`` where it holds the row.

        Which rows are newest is found from the keys and times alone (a scan of the covering
        index, a third of what the window query over every row costs), and only the wanted
        rows' reports not yet decoded are read, a page of ids at a time.
        """
        newest: dict[tuple[str, str, int], tuple[float, Any]] = {}
        known = decoded if decoded is not None else {}
        with self._storage_errors("read latest metrics"):
            keys = self._conn.execute(
                self._dialect.sql("SELECT id, device_id, bundle_name, bundle_version, received_at FROM metrics")
            )
            for row_id, device_id, bundle_name, raw_version, received_at in keys:
                # Versions are integers since schema 2: checked in full only when one is not.
                version = raw_version if type(raw_version) is int and raw_version > 0 else _bundle_version(raw_version)
                key = (str(device_id), str(bundle_name), version if version is not None else -1)
                if key in only:
                    seen = newest.get(key)  # ties on received_at go to the row stored last, as latest_metrics
                    if seen is None or (received_at, row_id) > seen:
                        newest[key] = (received_at, row_id)
            wanted = sorted((key, when, row_id) for key, (when, row_id) in newest.items())
            reports: dict[Any, str | dict[str, Any]] = {r: known[r] for _, _, r in wanted if r in known}
            missing = [row_id for _, _, row_id in wanted if row_id not in reports]
            for start in range(0, len(missing), 500):
                page = missing[start : start + 500]
                marks = ", ".join("?" * len(page))
                query = f"SELECT id, report FROM metrics WHERE id IN ({marks})"
                reports.update(self._conn.execute(self._dialect.sql(query), page).fetchall())
        return [(row_id, *key, when, reports[row_id]) for key, when, row_id in wanted if row_id in reports]

    def _latest_metrics_rows(
        self, device_id: str | None, bundle_name: str | None, periodic: int | None = None
    ) -> list[Sequence[Any]]:
        where, params = _where({"device_id": device_id, "bundle_name": bundle_name, "periodic": periodic})
        query = (
            f"SELECT {_METRICS_COLUMNS} FROM ("
            f"SELECT {_METRICS_COLUMNS}, ROW_NUMBER() OVER ("
            "PARTITION BY device_id, bundle_name, bundle_version "
            f"ORDER BY received_at DESC, id DESC) AS newest FROM metrics{where}"
            ") ranked WHERE newest = 1 ORDER BY device_id, bundle_name, bundle_version"
        )
        with self._storage_errors("read latest metrics"):
            return list(self._conn.execute(self._dialect.sql(query), params).fetchall())

    # -- enrolment --

    def enroll(self, device_id: str, public_key: str, at: float) -> EnrolmentRecord:
        """Bind ``device_id`` to ``public_key``, approved now (pre-provisioning, or a new key).

        A new key starts new sequences; a revoked device can be enrolled again this way.

        Raises:
            ValueError: a bad key or time.
            StorageError: on a database failure.
        """
        record = EnrolmentRecord(device_id, public_key, "approved", at, at)
        current = self.get_enrolment(device_id)
        with self._storage_errors(f"enroll device {device_id!r}"):
            if current is not None and current.public_key != public_key:
                self._conn.execute(self._dialect.sql("DELETE FROM device_sequences WHERE device_id = ?"), (device_id,))
            self._conn.execute(
                self._dialect.sql(
                    "INSERT INTO enrolments (device_id, public_key, state, requested_at, decided_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                    "state = excluded.state, decided_at = excluded.decided_at, "
                    "will_seq = CASE WHEN enrolments.public_key = excluded.public_key "
                    "THEN enrolments.will_seq ELSE NULL END, "
                    "public_key = excluded.public_key"
                ),
                (device_id, public_key, "approved", at, at),
            )
        return self.get_enrolment(device_id) or record

    def request_enrolment(self, device_id: str, public_key: str, at: float, max_pending: int) -> bool:
        """Record that ``device_id`` announced ``public_key`` and waits for approval.

        Never touches an approved or revoked device; a pending one takes the newest key.

        Args:
            device_id: the device, as its topic names it.
            public_key: the key its status carried (and was signed with).
            at: unix seconds.
            max_pending: most devices that may wait at once; beyond, nothing is recorded.

        Returns:
            True if the device is now pending with this key.

        Raises:
            ValueError: a bad key or time.
            StorageError: on a database failure.
        """
        EnrolmentRecord(device_id, public_key, "pending", at)
        current = self.get_enrolment(device_id)
        if current is not None and current.state != "pending":
            return False
        with self._storage_errors(f"record enrolment request of {device_id!r}"):
            if current is None:
                row = self._conn.execute("SELECT COUNT(*) FROM enrolments WHERE state = 'pending'").fetchone()
                if int(row[0]) >= max_pending:
                    return False
            self._conn.execute(
                self._dialect.sql(
                    "INSERT INTO enrolments (device_id, public_key, state, requested_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET public_key = excluded.public_key "
                    "WHERE enrolments.state = 'pending'"
                ),
                (device_id, public_key, "pending", at),
            )
        return True

    def decide_enrolment(self, device_id: str, state: str, at: float) -> EnrolmentRecord:
        """Approve a pending device, or revoke any enrolled one.

        Args:
            device_id: the device.
            state: ``approved`` or ``revoked``.
            at: unix seconds.

        Returns:
            The enrolment as it is now.

        Raises:
            ConfigError: no such device, or approving one that is not pending.
            StorageError: on a database failure.
        """
        current = self.get_enrolment(device_id)
        if current is None:
            raise ConfigError(f"device {device_id!r} has neither asked to be enrolled nor been enrolled")
        if state == "approved" and current.state != "pending":
            raise ConfigError(f"device {device_id!r} is {current.state}, not pending; enroll it with --key")
        check_time(at, "decided_at")
        with self._storage_errors(f"{state} device {device_id!r}"):
            self._conn.execute(
                self._dialect.sql("UPDATE enrolments SET state = ?, decided_at = ? WHERE device_id = ?"),
                (state, at, device_id),
            )
        return self.get_enrolment(device_id) or current

    def get_enrolment(self, device_id: str) -> EnrolmentRecord | None:
        """One device's enrolment, or None.

        Raises:
            StorageError: on a database failure or a malformed row.
        """
        with self._storage_errors(f"read enrolment of {device_id!r}"):
            row = self._conn.execute(
                self._dialect.sql(f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE device_id = ?"), (device_id,)
            ).fetchone()
        return None if row is None else self._enrolment_from_row(row)

    def list_enrolments(self, state: str | None = None) -> list[EnrolmentRecord]:
        """Every enrolment (or those in ``state``), ordered by device id.

        Raises:
            StorageError: on a database failure or a malformed row.
        """
        where, params = _where({"state": state})
        with self._storage_errors("list enrolments"):
            rows = self._conn.execute(
                self._dialect.sql(f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments{where} ORDER BY device_id"), params
            ).fetchall()
        return [self._enrolment_from_row(row) for row in rows]

    def advance_sequence(self, device_id: str, channel: str, seq: int, will_seq: int | None = None) -> None:
        """Raise the device's last accepted sequence number on ``channel`` to ``seq`` (never lowers it).

        Args:
            device_id: the device.
            channel: ``status``, ``events`` or ``metrics``.
            seq: a sequence number just accepted.
            will_seq: the will number its latest ``online`` status named, if known.

        Raises:
            StorageError: on a database failure.
        """
        self.advance_sequences([(device_id, channel, seq, will_seq)])

    def advance_sequences(self, advanced: Sequence[tuple[str, str, int, int | None]]) -> None:
        """:meth:`advance_sequence` for many ``(device_id, channel, seq, will_seq)`` at once
        (one ``executemany`` per statement).

        Raises:
            StorageError: on a database failure.
        """
        if not advanced:
            return
        what = f"advance sequence of {advanced[0][0]!r}" if len(advanced) == 1 else "advance sequences"
        wills = [(will, device_id) for device_id, _channel, _seq, will in advanced if will is not None]
        # a cursor: psycopg's connection has no executemany
        with self._storage_errors(what), contextlib.closing(self._conn.cursor()) as cur:
            cur.executemany(
                self._dialect.sql(
                    "INSERT INTO device_sequences (device_id, channel, last_seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id, channel) DO UPDATE SET "
                    "last_seq = {greatest}(device_sequences.last_seq, excluded.last_seq)"
                ),
                [(device_id, channel, seq) for device_id, channel, seq, _will in advanced],
            )
            if wills:
                cur.executemany(self._dialect.sql("UPDATE enrolments SET will_seq = ? WHERE device_id = ?"), wills)

    def count_drops(self, counts: Mapping[tuple[str, str], int], at: float) -> None:
        """Add dropped-message counts, per (device, reason).

        Raises:
            StorageError: on a database failure.
        """
        with self._storage_errors("count dropped messages"):
            for (device_id, reason), n in counts.items():
                if n <= 0:
                    continue
                self._conn.execute(
                    self._dialect.sql(
                        "INSERT INTO report_drops (device_id, reason, count, last_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (device_id, reason) DO UPDATE SET "
                        "count = report_drops.count + excluded.count, last_at = excluded.last_at"
                    ),
                    (device_id, reason, n, at),
                )

    def drop_counts(self) -> dict[str, dict[str, int]]:
        """Dropped device messages: device id (``*`` for unknown devices) -> reason -> count.

        Raises:
            StorageError: on a database failure.
        """
        with self._storage_errors("read dropped-message counts"):
            rows = self._conn.execute("SELECT device_id, reason, count FROM report_drops ORDER BY device_id").fetchall()
        out: dict[str, dict[str, int]] = {}
        for device_id, reason, count in rows:
            out.setdefault(str(device_id), {})[str(reason)] = int(count)
        return out

    # -- runs --

    def add_run(self, kind: str, started_at: float, parameters: Mapping[str, Any], results: Mapping[str, Any]) -> int:
        """Keep one run.

        Args:
            kind: one of :data:`RUN_KINDS`.
            started_at: unix seconds.
            parameters: what the run was asked (JSON-ready).
            results: what it produced (JSON-ready).

        Returns:
            The new run's id.

        Raises:
            ValueError: an unknown kind, an implausible time or a number that is not finite (nothing is stored).
            StorageError: on a database failure.
        """
        RunRecord(0, kind, started_at, parameters, results)
        return self._insert(
            "INSERT INTO runs (kind, started_at, parameters, results) VALUES (?, ?, ?, ?)",
            (kind, started_at, _dump_json(parameters), _dump_json(results)),
            what=f"keep a {kind} run",
        )

    def get_run(self, run_id: int) -> RunRecord | None:
        """One run by id, or ``None``.

        Raises:
            StorageError: on a database failure or a malformed row.
        """
        with self._storage_errors(f"read run {run_id}"):
            row = self._conn.execute(
                self._dialect.sql(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?"), (run_id,)
            ).fetchone()
        return None if row is None else self._run_from_row(row)

    def list_runs(self, kind: str | None = None, since: float | None = None, limit: int = 1000) -> list[RunRecord]:
        """Kept runs, newest first.

        Args:
            kind: only this kind; all when ``None``.
            since: only runs started at or after this time.
            limit: at most this many.

        Raises:
            StorageError: on a database failure or a malformed row.
        """
        where, params = _where({"kind": kind})
        if since is not None:
            where += (" AND" if where else " WHERE") + " started_at >= ?"
            params = (*params, since)
        query = f"SELECT {_RUN_COLUMNS} FROM runs{where} ORDER BY started_at DESC, id DESC LIMIT ?"
        with self._storage_errors("list runs"):
            rows = self._conn.execute(self._dialect.sql(query), (*params, int(limit))).fetchall()
        return [self._run_from_row(row) for row in rows]

    def _run_from_row(self, row: Sequence[Any]) -> RunRecord:
        with self._row("runs", row[0]):
            return RunRecord(int(row[0]), row[1], row[2], json.loads(row[3]), json.loads(row[4]))

    # -- reading rows --

    @contextlib.contextmanager
    def _row(self, table: str, key: object) -> Iterator[None]:
        """Turn a stored row that makes no valid record into a StorageError naming it."""
        try:
            yield
        except (MessageError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self._malformed(table, key, exc)

    def _malformed(self, table: str, key: object, exc: Exception) -> None:
        """Raise the StorageError that names a malformed row, from what was wrong with it."""
        text = exc.message if isinstance(exc, MessageError) else str(exc)
        raise StorageError(
            f"registry {self._name}: {table} row {key!r} is malformed: {text}",
            database=self._name,
            table=table,
            row_id=key,
        ) from exc

    def _device_from_row(self, row: Sequence[Any]) -> DeviceRecord:
        with self._row("devices", row[0]):
            return _device_from_row(row)

    def _enrolment_from_row(self, row: Sequence[Any]) -> EnrolmentRecord:
        with self._storage_errors(f"read sequences of {row[0]!r}"):
            seqs = self._conn.execute(
                self._dialect.sql("SELECT channel, last_seq FROM device_sequences WHERE device_id = ?"), (row[0],)
            ).fetchall()
        with self._row("enrolments", row[0]):
            return EnrolmentRecord(
                device_id=row[0],
                public_key=row[1],
                state=row[2],
                requested_at=row[3],
                decided_at=row[4],
                sequences={str(c): int(n) for c, n in seqs},
                will_seq=None if row[5] is None else int(row[5]),
            )

    def _deployment_from_row(self, row: Sequence[Any]) -> DeploymentRecord:
        with self._row("deployments", row[0]):
            version = _bundle_version(row[3])
            if version is None:
                raise ValueError(f"bundle version {row[3]!r} is not a positive integer")
            return DeploymentRecord(
                id=row[0],
                device_id=row[1],
                bundle_name=row[2],
                bundle_version=version,
                bundle_sha256=row[4],
                transfer_id=row[5],
                state=row[6],
                error_code=row[7],
                error_message=row[8],
                started_at=row[9],
                finished_at=row[10],
            )

    def _metrics_from_row(self, row: Sequence[Any]) -> MetricsRecord:
        with self._row("metrics", row[0]):
            from edge_sdk.protocol import MetricsReport

            report = MetricsReport.from_dict(json.loads(row[5]))
            version = _bundle_version(row[3])
            if version is None:
                raise ValueError(f"bundle version {row[3]!r} is not a positive integer")
            return MetricsRecord(
                id=row[0],
                device_id=row[1],
                bundle_name=row[2],
                bundle_version=version,
                received_at=row[4],
                report=report,
            )

    # -- for the stores of other tables (host_tools.fleet.rollout_store) --

    def query(self, sql: str, params: Sequence[Any] = (), *, what: str) -> list[tuple[Any, ...]]:
        """Run one statement of shared SQL (``?`` placeholders) and return its rows.

        Raises:
            StorageError: on a database failure; ``what`` names the operation.
        """
        with self._storage_errors(what):
            cursor = self._conn.execute(self._dialect.sql(sql), tuple(params))
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def write(self, statements: Sequence[tuple[str, Sequence[Any]]], *, what: str) -> list[int]:
        """Run statements of shared SQL as one transaction: all of them, or none.

        Returns:
            The rows each statement changed.

        Raises:
            StorageError: on a database failure (nothing was written); ``what`` names the operation.
        """
        counts: list[int] = []
        with self._storage_errors(what), self._dialect.begin_schema_change(self._conn):
            for sql, params in statements:
                counts.append(max(0, self._conn.execute(self._dialect.sql(sql), tuple(params)).rowcount))
        return counts

    # -- internals --

    def _insert_once(self, query: str, params: Sequence[Any], *, what: str) -> int | None:
        """Run an ``INSERT ... ON CONFLICT DO NOTHING``; the new row's id, or None if it was there."""
        with self._storage_errors(what):
            if self._dialect.returns_id_by_clause:
                row = self._conn.execute(self._dialect.sql(query + " RETURNING id"), params).fetchone()
                return None if row is None else int(row[0])
            cursor = self._conn.execute(self._dialect.sql(query), params)
            return int(cursor.lastrowid) if cursor.rowcount == 1 else None

    def _insert(self, query: str, params: Sequence[Any], *, what: str) -> int:
        with self._storage_errors(what):
            if self._dialect.returns_id_by_clause:
                row = self._conn.execute(self._dialect.sql(query + " RETURNING id"), params).fetchone()
                return int(row[0])
            cursor = self._conn.execute(self._dialect.sql(query), params)
            return int(cursor.lastrowid)

    @contextlib.contextmanager
    def _storage_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._dialect.driver_errors as exc:
            raise StorageError(
                f"registry {self._name}: cannot {what}: {exc}",
                database=self._name,
                backend=self._dialect.name,
            ) from exc


def _where(filters: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    # Column names come from this module only; values always go through parameters.
    used = {column: value for column, value in filters.items() if value is not None}
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(f"{column} = ?" for column in used), tuple(used.values())


@functools.lru_cache(maxsize=4096)
def _load_shared_json(text: str) -> Any:
    """JSON that many device rows hold alike (platform, runtimes, labels, bundles), decoded once.

    The result is shared between records: records are frozen and read-only, and nothing
    that reads them mutates what they hold.
    """
    return json.loads(text)


@functools.lru_cache(maxsize=4096)
def stored_bundles(text: str) -> tuple[BundleRef, ...]:
    """The active bundles a devices row's JSON lists, ordered by name then version.

    Decoded once for every row that lists the same (an LRU of 4,096 texts).

    Args:
        text: the ``active_bundles`` column.

    Returns:
        The bundles.

    Raises:
        ValueError: not a JSON list of bundle references.
    """
    active = json.loads(text)
    if not isinstance(active, list):
        raise ValueError("active_bundles must be a JSON list")
    return tuple(sorted((BundleRef.from_dict(b) for b in active), key=_bundle_order))


def stored_object(text: str | None, what: str) -> Mapping[str, Any] | None:
    """A devices row's JSON object column (platform, runtimes, labels), decoded once per distinct text.

    Args:
        text: the column; ``None`` when not reported.
        what: the column's name, for the error.

    Returns:
        The object (shared between rows: read it, never change it), or ``None``.

    Raises:
        ValueError: the text is not a JSON object.
    """
    if text is None:
        return None
    value = _load_shared_json(text)
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


class DeviceRow(NamedTuple):
    """One row of the devices table as stored: the JSON columns as their text.

    :meth:`Registry.iter_device_rows` yields these checked (a valid status, a plausible
    ``last_seen``, JSON that decodes to what each column should hold), so a listing can
    write their JSON text without decoding it again; :meth:`Registry.device_record` makes
    the :class:`DeviceRecord`.
    """

    device_id: str
    status: str
    platform: str | None
    runtimes: str | None
    agent_version: str | None
    active_bundles: str | None
    first_seen: float | None
    last_seen: float
    broker: str
    labels: str | None
    heartbeat_s: float | None
    last_heard: float | None

    def device_labels(self) -> Mapping[str, str] | None:
        """The device's own labels (shared between rows: read them, never change them); None: never reported.

        Raises:
            ValueError: the column is not a JSON object.
        """
        return stored_object(self.labels, "labels")


def _check_device_row(row: DeviceRow) -> None:
    """Raise ValueError or TypeError if a row makes no valid record (what :func:`_device_from_row` checks)."""
    device_id, status, platform, runtimes, _, bundles, first_seen, last_seen, _, labels, _, _ = row
    if status not in DEVICE_STATUSES:
        raise ValueError(f"unknown device status {status!r}")
    if not device_id:
        raise ValueError("device_id must not be empty")
    # What check_time accepts, without a call for the float in range that a row holds (NaN fails too).
    if type(last_seen) is not float or not 0.0 <= last_seen <= LATEST_TIME:
        check_time(last_seen, "last_seen")
    if first_seen is not None and (type(first_seen) is not float or not 0.0 <= first_seen <= LATEST_TIME):
        check_time(first_seen, "first_seen")
    _check_json_columns(platform, runtimes, bundles, labels)


@functools.lru_cache(maxsize=4096)
def _check_json_columns(platform: str | None, runtimes: str | None, bundles: str | None, labels: str | None) -> None:
    """Raise ValueError unless a row's JSON columns hold what they should; once per distinct combination."""
    stored_object(platform, "platform")
    stored_object(runtimes, "runtimes")
    stored_object(labels, "labels")
    if bundles is not None:
        stored_bundles(bundles)


def _device_from_row(row: Sequence[Any]) -> DeviceRecord:
    """A device record from its row; raises ValueError, TypeError, KeyError or AttributeError when malformed."""
    return DeviceRecord(
        device_id=row[0],
        status=row[1],
        platform=stored_object(row[2], "platform"),
        runtimes=stored_object(row[3], "runtimes"),
        agent_version=row[4],
        active_bundles=None if row[5] is None else stored_bundles(row[5]),
        first_seen=row[6],
        last_seen=row[7],
        broker=row[8],
        labels=stored_object(row[9], "labels"),
        heartbeat_s=row[10],
        last_heard=row[11],
    )


# --- opening ---------------------------------------------------------------------------


def open_registry(url_or_path: str | Path, *, timeout: float = _DEFAULT_TIMEOUT_S) -> Registry:
    """Open (and if needed create) the fleet registry.

    Args:
        url_or_path: a filesystem path or ``sqlite:///abs/path`` for a SQLite file
            (parent directories are created), or a ``postgresql://`` URL.
        timeout: seconds to wait for a locked SQLite database, or for a PostgreSQL
            connection when the URL sets no ``connect_timeout``.

    Returns:
        An open registry whose schema is current.

    Raises:
        ConfigError: if the URL's scheme is not understood, or psycopg is missing
            for a PostgreSQL URL.
        StorageError: if the database cannot be opened, created or migrated.
    """
    if isinstance(url_or_path, Path):
        return _open_sqlite(url_or_path, timeout)
    text = str(url_or_path)
    if not text.strip():
        raise ConfigError("registry location is empty", url=text)
    if "://" not in text:
        return _open_sqlite(Path(text), timeout)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "sqlite":
        path = text[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise ConfigError(
                f"registry URL {text!r} must name an absolute file: sqlite:///abs/path",
                url=text,
            )
        return _open_sqlite(Path(path), timeout)
    if scheme in _POSTGRES_SCHEMES:
        return _open_postgres(text, timeout)
    shown = _mask_password(text)
    raise ConfigError(
        f"registry URL {shown!r} is neither a path, sqlite:/// nor postgresql://",
        url=shown,
    )


def change_token(url_or_path: str | Path) -> tuple[object, ...] | None:
    """A value that differs after every write to a SQLite registry, read without opening it.

    For readers that keep what they rendered (the exporter): the inode, size and modification
    time of the database file and of its write-ahead log, which every commit appends to (or a
    checkpoint rewrites). A reader compares it with the token taken before its last read, so a
    write during that read shows as a change too.

    Returns:
        The token, or ``None`` where there is no such cheap sign (PostgreSQL).
    """
    text = str(url_or_path)
    if isinstance(url_or_path, Path) or "://" not in text:
        path = Path(text)
    elif text.lower().startswith("sqlite://"):
        path = Path(text[len("sqlite://") :])
    else:
        return None
    path = path.expanduser()
    token: list[object] = []
    for file in (path, path.with_name(path.name + "-wal")):
        try:
            st = file.stat()
        except OSError:
            token.append(None)
        else:
            token.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(token)


def _open_sqlite(path: Path, timeout: float) -> Registry:
    path = path.expanduser()
    name = f"sqlite://{path.resolve()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"registry {name}: cannot create directory {path.parent}: {exc}",
            database=name,
            backend="sqlite",
        ) from exc
    dialect = _sqlite_dialect()
    try:
        # isolation_level=None: autocommit; every write is one statement, and the
        # schema transaction is opened explicitly with BEGIN IMMEDIATE.
        conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"registry {name}: cannot open: {exc}", database=name, backend="sqlite") from exc

    def configure(registry: Registry) -> None:
        with registry._storage_errors("configure"):
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                logger.warning("registry %s: WAL mode unavailable, journal mode %s", name, mode)

    return _registry_on(conn, dialect, name, configure)


def _open_postgres(url: str, timeout: float) -> Registry:
    name = _mask_password(url)
    try:
        # Optional dependency, imported only when a PostgreSQL URL is opened.
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ImportError as exc:
        raise ConfigError(f"registry {name} needs psycopg 3: install edge-sdk[postgres]", url=name) from exc
    dialect = _postgres_dialect(psycopg.Error)
    kwargs: dict[str, Any] = {"autocommit": True}
    try:
        given = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigError(
            f"registry URL {name!r} is not a valid PostgreSQL URL: {_scrub(str(exc), url)}",
            url=name,
        ) from exc
    if "connect_timeout" not in given:
        kwargs["connect_timeout"] = max(2, int(timeout))
    try:
        conn = psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        raise StorageError(
            f"registry {name}: cannot connect: {_scrub(str(exc), url)}",
            database=name,
            backend="postgresql",
        ) from exc
    return _registry_on(conn, dialect, name)


def _registry_on(
    conn: Any, dialect: _Dialect, name: str, configure: Callable[[Registry], None] | None = None
) -> Registry:
    """A registry on the fresh connection ``conn``, configured and its schema current.

    If either step fails the connection is closed before the error propagates, so a
    failed open leaves no connection behind.
    """
    registry = Registry(conn, dialect, name)
    try:
        if configure is not None:
            configure(registry)
        registry.ensure_schema()
    except BaseException:
        conn.close()
        raise
    logger.debug("registry %s opened", name)
    return registry


def _mask_password(url: str) -> str:
    """The URL with any password replaced by ``***``, in the netloc or the query."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable registry URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode(
            [(key, "***" if key.lower() == "password" else value) for key, value in pairs],
            safe="*=",
        )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(message: str, url: str) -> str:
    """Remove any password found in ``url`` from a driver's message."""
    try:
        parts = urllib.parse.urlsplit(url)
        secrets = [parts.password] if parts.password else []
        secrets += [value for key, value in urllib.parse.parse_qsl(parts.query) if key.lower() == "password" and value]
    except ValueError:
        return message
    for secret in secrets:
        for form in {secret, urllib.parse.unquote(secret), urllib.parse.quote(secret)}:
            message = message.replace(form, "***")
    return message
