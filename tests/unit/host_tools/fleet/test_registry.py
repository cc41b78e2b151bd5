"""The fleet registry against a real SQLite file and a real PostgreSQL server.

Every behavioural case runs on both backends through the ``open_db`` fixture.
PostgreSQL cases use ``EDGE_SDK_TEST_POSTGRES_URL`` if set (and then fail if it does
not answer), else ``postgresql://postgres@127.0.0.1:5432/test``; only when the
variable is unset and that default does not answer are they skipped, loudly.
Each PostgreSQL case gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import host_tools.fleet.registry as registry_module
from edge_sdk.errors import ConfigError, MessageError, StorageError
from edge_sdk.protocol import MetricsReport
from host_tools.fleet.registry import (
    SCHEMA_VERSION,
    BundleRef,
    DeviceRecord,
    Registry,
    open_registry,
)

POSTGRES_ENV = "EDGE_SDK_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

OpenDb = Callable[[], Registry]

DATA = Path(__file__).parent / "data"
#: A metrics report exactly as the v1 collector stored it (``MetricsReport.to_dict()``, keys sorted).
V1_REPORT = json.loads((DATA / "registry_v1_report.json").read_text())


# --- PostgreSQL availability -----------------------------------------------------------

_postgres_probe: dict[str, str | None] = {}


def _postgres_admin_url(config: pytest.Config) -> str:
    """The server URL to use, or skip (loudly) / fail as the module docstring says."""
    if "result" not in _postgres_probe:
        _postgres_probe["result"] = reason = _probe_postgres()
        if reason is not None:
            # Straight to the terminal, past output capture, once per run, so nobody
            # mistakes a skip for a pass.
            capture = config.pluginmanager.get_plugin("capturemanager")
            with capture.global_and_fixture_disabled() if capture else nullcontext():
                sys.stderr.write(f"\n*** {reason} ***\n")
    reason = _postgres_probe["result"]
    if reason is not None:
        pytest.skip(reason)
    return os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_URL


def _probe_postgres() -> str | None:
    explicit = os.environ.get(POSTGRES_ENV)
    try:
        import psycopg
    except ImportError:
        if explicit:
            raise
        reason = "PostgreSQL registry tests SKIPPED: psycopg is not installed"
    else:
        url = explicit or DEFAULT_POSTGRES_URL
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return None
        except psycopg.OperationalError as exc:
            if explicit:
                pytest.fail(f"{POSTGRES_ENV} is set but PostgreSQL does not answer: {exc}")
            reason = (
                f"PostgreSQL registry tests SKIPPED: {POSTGRES_ENV} is unset and "
                f"{DEFAULT_POSTGRES_URL} does not answer ({str(exc).strip()})"
            )
    return reason


def _with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenDb]:
    """A factory opening the same fresh database each call; closes all at teardown."""
    opened: list[Registry] = []
    cleanup: Callable[[], None] | None = None
    if request.param == "sqlite":
        target = str(tmp_path / "fleet" / "registry.db")
    else:
        import psycopg

        admin_url = _postgres_admin_url(request.config)
        schema = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        target = _with_search_path(admin_url, schema)

        def cleanup() -> None:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")

    def factory() -> Registry:
        registry = open_registry(target)
        opened.append(registry)
        return registry

    try:
        yield factory
    finally:
        for registry in opened:
            registry.close()
        if cleanup is not None:
            cleanup()


@pytest.fixture
def db(open_db: OpenDb) -> Registry:
    return open_db()


# --- devices ---------------------------------------------------------------------------

PLATFORM = {"board": "raspberry-pi-4", "os": "linux", "cpu": {"arch": "aarch64", "cores": 4}}
RUNTIMES = {"onnxruntime": "1.17.1", "litert": None}


def _birth(device_id: str = "pi-01", at: float = 1000.0) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        status="online",
        last_seen=at,
        platform=PLATFORM,
        runtimes=RUNTIMES,
        agent_version="0.1.0",
        active_bundles=(BundleRef("digits", 1),),
    )


def test_device_round_trip(db: Registry) -> None:
    db.upsert_device(_birth())

    got = db.get_device("pi-01")

    assert got == DeviceRecord(
        device_id="pi-01",
        status="online",
        last_seen=1000.0,
        first_seen=1000.0,
        platform=PLATFORM,
        runtimes=RUNTIMES,
        agent_version="0.1.0",
        active_bundles=(BundleRef("digits", 1),),
    )
    assert got.to_dict()["active_bundle"] == {"name": "digits", "version": "1"}
    assert db.get_device("nobody") is None


def test_status_update_keeps_platform_info(db: Registry) -> None:
    db.upsert_device(_birth(at=1000.0))

    db.upsert_device(DeviceRecord(device_id="pi-01", status="offline", last_seen=1060.0))

    got = db.get_device("pi-01")
    assert got is not None
    assert got.status == "offline"
    assert got.platform == PLATFORM
    assert got.runtimes == RUNTIMES
    assert got.agent_version == "0.1.0"
    assert got.active_bundle == BundleRef("digits", 1)
    assert (got.first_seen, got.last_seen) == (1000.0, 1060.0)


def test_newer_fields_replace_older(db: Registry) -> None:
    db.upsert_device(_birth(at=1000.0))

    db.upsert_device(
        DeviceRecord(
            device_id="pi-01",
            status="online",
            last_seen=2000.0,
            agent_version="0.2.0",
            active_bundles=(BundleRef("digits", 2),),
        )
    )

    got = db.get_device("pi-01")
    assert got is not None
    assert got.agent_version == "0.2.0"
    assert got.active_bundle == BundleRef("digits", 2)
    assert got.platform == PLATFORM


def test_late_stale_update_fills_gaps_but_overwrites_nothing(db: Registry) -> None:
    db.upsert_device(DeviceRecord(device_id="pi-01", status="offline", last_seen=2000.0, agent_version="0.2.0"))

    # A birth message from before, delivered late by another collector.
    db.upsert_device(_birth(at=1000.0))

    got = db.get_device("pi-01")
    assert got is not None
    assert got.status == "offline"
    assert got.agent_version == "0.2.0"
    assert got.platform == PLATFORM
    assert (got.first_seen, got.last_seen) == (1000.0, 2000.0)


def test_list_devices_sorted(db: Registry) -> None:
    for device_id in ("jetson-2", "android-7", "pi-01"):
        db.upsert_device(_birth(device_id))

    assert [d.device_id for d in db.list_devices()] == ["android-7", "jetson-2", "pi-01"]


def test_two_registries_share_one_database(open_db: OpenDb) -> None:
    first, second = open_db(), open_db()

    first.upsert_device(_birth(at=1000.0))
    second.upsert_device(DeviceRecord(device_id="pi-01", status="offline", last_seen=1001.0))

    got = first.get_device("pi-01")
    assert got is not None
    assert (got.status, got.platform) == ("offline", PLATFORM)


# --- deployments -----------------------------------------------------------------------


def test_deployment_round_trip_and_update(db: Registry) -> None:
    dep_id = db.record_deployment("pi-01", "digits", 1, "ab" * 32, started_at=100.0, transfer_id="tx-1")

    db.update_deployment(dep_id, "refused", error_code="rollback", error_message="1.0.0 < 1.1.0", finished_at=105.5)

    [got] = db.list_deployments()
    assert got.to_dict() == {
        "id": dep_id,
        "device_id": "pi-01",
        "bundle_name": "digits",
        "bundle_version": 1,
        "bundle_sha256": "ab" * 32,
        "transfer_id": "tx-1",
        "state": "refused",
        "error_code": "rollback",
        "error_message": "1.0.0 < 1.1.0",
        "started_at": 100.0,
        "finished_at": 105.5,
    }


def test_list_deployments_filters_newest_first_and_limits(db: Registry) -> None:
    ids = [
        db.record_deployment(device, "digits", 1, "00" * 32, started_at=at)
        for device, at in (("pi-01", 10.0), ("pi-02", 20.0), ("pi-01", 30.0), ("pi-01", 40.0))
    ]

    assert [d.id for d in db.list_deployments()] == [ids[3], ids[2], ids[1], ids[0]]
    assert [d.id for d in db.list_deployments("pi-01", limit=2)] == [ids[3], ids[2]]
    assert all(d.state == "sent" and d.finished_at is None for d in db.list_deployments())
    assert db.list_deployments("nobody") == []


def test_installed_deployment_is_the_latest_that_installed_that_version(db: Registry) -> None:
    def deployed(version: int, sha: str, at: float, state: str) -> int:
        dep = db.record_deployment("pi-01", "digits", version, sha * 32, started_at=at)
        db.update_deployment(dep, state, finished_at=at + 1)  # type: ignore[arg-type]
        return dep

    assert db.installed_deployment("pi-01", "digits", 1) is None
    first = deployed(1, "aa", 10.0, "installed")
    deployed(1, "bb", 20.0, "failed")  # a later attempt that did not install: not what runs
    db.record_deployment("pi-02", "digits", 1, "cc" * 32, started_at=30.0, state="installed")
    deployed(2, "dd", 40.0, "installed")
    got = db.installed_deployment("pi-01", "digits", 1)
    assert got is not None and (got.id, got.bundle_sha256) == (first, "aa" * 32)
    again = deployed(1, "ee", 50.0, "installed")  # reinstalled (after a rollback, say): the newest counts
    assert (db.installed_deployment("pi-01", "digits", 1) or got).id == again
    assert db.installed_deployment("pi-01", "other", 1) is None
    assert db.installed_deployment("pi-03", "digits", 1) is None


def test_update_unknown_deployment_is_storage_error(db: Registry) -> None:
    with pytest.raises(StorageError, match="no deployment 999"):
        db.update_deployment(999, "installed", finished_at=1.0)


def test_unknown_state_rejected(db: Registry) -> None:
    with pytest.raises(ValueError, match="unknown deployment state"):
        db.record_deployment("pi-01", "digits", 1, "00", started_at=1.0, state="lost")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device status"):
        DeviceRecord(device_id="pi-01", status="asleep", last_seen=1.0)  # type: ignore[arg-type]


# --- metrics ---------------------------------------------------------------------------


def _report(device_id: str = "pi-01", bundle: str = "digits", version: int = 1, n: int = 1) -> MetricsReport:
    """A report as today's agent sends it (see data/registry_v1_report.json); ``n`` goes in ``ts``."""
    return MetricsReport.from_dict(
        {**V1_REPORT, "device_id": device_id, "bundle_name": bundle, "bundle_version": version, "ts": float(n)}
    )


def test_metrics_round_trip(db: Registry) -> None:
    report = _report(version=1)

    row_id = db.add_metrics(report, received_at=50.0)

    [got] = db.latest_metrics()
    assert got.to_dict() == {
        "id": row_id,
        "device_id": "pi-01",
        "bundle_name": "digits",
        "bundle_version": 1,
        "received_at": 50.0,
        "report": report.to_dict(),
    }
    assert got.report == report and got.report.to_dict() == {**V1_REPORT, "bundle_version": 1, "ts": 1.0}
    assert got.report.power is not None and got.report.power.estimated is True
    assert got.report.execution is not None and got.report.execution.chosen == "sparse"


def test_latest_metrics_picks_newest_per_device_bundle_version(db: Registry) -> None:
    # Inserted out of order: the newest is not the last row written.
    db.add_metrics(_report("pi-01", "digits", 1, 2), received_at=20.0)
    db.add_metrics(_report("pi-01", "digits", 1, 3), received_at=30.0)
    db.add_metrics(_report("pi-01", "digits", 1, 1), received_at=10.0)
    db.add_metrics(_report("pi-01", "digits", 2, 4), received_at=5.0)
    db.add_metrics(_report("pi-02", "digits", 1, 5), received_at=1.0)
    db.add_metrics(_report("pi-02", "minilm", 2, 6), received_at=2.0)

    latest = [(m.device_id, m.bundle_name, m.bundle_version, m.report.ts) for m in db.latest_metrics()]
    assert latest == [
        ("pi-01", "digits", 1, 3),
        ("pi-01", "digits", 2, 4),
        ("pi-02", "digits", 1, 5),
        ("pi-02", "minilm", 2, 6),
    ]
    assert [m.report.ts for m in db.latest_metrics(device_id="pi-02")] == [5, 6]
    assert [m.report.ts for m in db.latest_metrics(bundle_name="minilm")] == [6]
    assert [m.report.ts for m in db.latest_metrics("pi-01", "digits")] == [3, 4]


def test_bundle_versions_sort_as_numbers(db: Registry) -> None:
    for version in (10, 9, 100, 2):
        db.add_metrics(_report(version=version, n=version), received_at=1.0)
        db.record_deployment("pi-01", "digits", version, "00", started_at=float(version))

    assert [m.bundle_version for m in db.latest_metrics()] == [2, 9, 10, 100]
    assert [d.bundle_version for d in db.list_deployments()] == [100, 10, 9, 2]
    with pytest.raises(ValueError, match="positive integer"):
        db.record_deployment("pi-01", "digits", "10", "00", started_at=1.0)  # type: ignore[arg-type]  # the v1 API took strings


def test_malformed_stored_report_is_storage_error_naming_the_row(db: Registry) -> None:
    row_id = db.add_metrics(_report(), received_at=1.0)
    damaged = {**V1_REPORT, "latency": {**V1_REPORT["latency"], "p50_ms": "fast"}}
    db._conn.execute(db._dialect.sql("UPDATE metrics SET report = ? WHERE id = ?"), (json.dumps(damaged), row_id))

    with pytest.raises(StorageError, match=rf"metrics row {row_id} is malformed: latency field 'p50_ms'") as info:
        db.latest_metrics()
    assert info.value.details["row_id"] == row_id and isinstance(info.value.__cause__, MessageError)

    db._conn.execute(db._dialect.sql("UPDATE metrics SET report = ? WHERE id = ?"), ("{not json", row_id))
    with pytest.raises(StorageError, match=f"metrics row {row_id}"):
        db.latest_metrics()


def test_malformed_device_and_deployment_rows_are_storage_errors(db: Registry) -> None:
    db.upsert_device(_birth())
    dep_id = db.record_deployment("pi-01", "digits", 1, "00", started_at=1.0)
    db._conn.execute("UPDATE devices SET status = 'asleep'")
    db._conn.execute("UPDATE deployments SET state = 'lost'")

    with pytest.raises(StorageError, match="devices row 'pi-01' is malformed"):
        db.list_devices()
    with pytest.raises(StorageError, match=f"deployments row {dep_id} is malformed"):
        db.list_deployments()


# --- durability and schema -------------------------------------------------------------


def test_reopen_keeps_data(open_db: OpenDb) -> None:
    with open_db() as first:
        first.upsert_device(_birth())
        dep_id = first.record_deployment("pi-01", "digits", 1, "00", started_at=1.0)
        first.add_metrics(_report(), received_at=2.0)

    with open_db() as again:
        assert again.get_device("pi-01") == replace(_birth(), first_seen=_birth().last_seen)
        assert [d.id for d in again.list_deployments()] == [dep_id]
        assert [m.report for m in again.latest_metrics()] == [_report()]
        assert again.ensure_schema() == SCHEMA_VERSION


def test_newer_schema_refused(open_db: OpenDb) -> None:
    db = open_db()
    db._conn.execute(  # a future edge-sdk was here
        db._dialect.sql("INSERT INTO schema_version (version) VALUES (?)"), (SCHEMA_VERSION + 1,)
    )

    with pytest.raises(StorageError, match="newer than"):
        open_db()


def test_close_twice_and_context_manager(open_db: OpenDb) -> None:
    with open_db() as db:
        assert db.backend in {"sqlite", "postgresql"}
    db.close()


# --- opening: SQLite specifics ---------------------------------------------------------


def test_sqlite_url_and_path_open_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "fleet.db"
    with open_registry(f"sqlite://{path}") as db:
        db.upsert_device(_birth())
        assert db.name == f"sqlite://{path}"
    with open_registry(path) as db:
        assert db.get_device("pi-01") is not None
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # one row per migration step run, the last one the version this code writes
        assert raw.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [
            (v,) for v in range(1, SCHEMA_VERSION + 1)
        ]


@pytest.mark.parametrize(
    "url",
    ["mysql://root@localhost/fleet", "sqlite://relative/path.db", "sqlite:///", "", "  "],
)
def test_bad_url_is_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_registry(url)
    assert not url.strip() or url in str(info.value)


def test_bad_url_message_hides_password() -> None:
    with pytest.raises(ConfigError) as info:
        open_registry("mysql://root:hunter2@localhost/fleet")
    assert "hunter2" not in str(info.value)
    assert "mysql://root:***@localhost/fleet" in str(info.value)


def test_parent_is_a_file_is_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")

    with pytest.raises(StorageError, match="not-a-dir") as info:
        open_registry(blocker / "registry.db")
    assert info.value.__cause__ is not None


def test_path_is_a_directory_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot") as info:
        open_registry(tmp_path)
    assert isinstance(info.value.__cause__, sqlite3.Error)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_directory_is_storage_error(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError):
            open_registry(locked / "registry.db")
    finally:
        locked.chmod(0o700)


def test_locked_sqlite_is_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    open_registry(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with open_registry(path, timeout=0.05) as db:
            with pytest.raises(StorageError, match=r"fleet\.db") as info:
                db.upsert_device(_birth())
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# --- opening: PostgreSQL specifics -----------------------------------------------------


def test_unreachable_postgres_is_storage_error_without_password() -> None:
    pytest.importorskip("psycopg", reason="psycopg not installed")
    url = "postgresql://postgres:s3cr%40t@127.0.0.1:1/test?connect_timeout=2"

    with pytest.raises(StorageError) as info:
        open_registry(url)

    text = f"{info.value} {info.value.details}"
    assert "postgres:***@127.0.0.1:1/test" in text
    assert "s3cr" not in text


def test_mask_password_in_query() -> None:
    masked = registry_module._mask_password("postgresql://h/db?user=u&password=pw%21")
    assert "pw" not in masked
    assert "password=***" in masked


def test_public_names() -> None:
    assert set(registry_module.__all__) == {
        "DEPLOYMENT_STATES",
        "DEVICE_PAGE",
        "DEVICE_STATUSES",
        "ENROLMENT_STATES",
        "LATEST_TIME",
        "SCHEMA_VERSION",
        "UNKNOWN_DEVICE",
        "EnrolmentRecord",
        "change_token",
        "check_time",
        "BundleRef",
        "DeploymentRecord",
        "DeploymentState",
        "DeviceRecord",
        "DeviceRow",
        "DeviceStatus",
        "ForgetResult",
        "GroupRecord",
        "InstalledVersion",
        "MetricsRecord",
        "RUN_KINDS",
        "Registry",
        "RunRecord",
        "open_registry",
        "stored_bundles",
    }


def test_psycopg_not_imported_for_sqlite(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys; from host_tools.fleet.registry import open_registry; "
        f"open_registry({str(tmp_path / 'x.db')!r}).close(); "
        "assert 'psycopg' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[4])


# --- migration from schema 1 (a file written by the v1 code) ----------------------------

#: The v1 dialects' renderings, copied from the v1 code: identity column, float type, placeholder.
_V1_DIALECTS = {
    "sqlite": ("INTEGER PRIMARY KEY AUTOINCREMENT", "REAL", "?"),
    "postgresql": ("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION", "%s"),
}


def _v1_statements() -> list[str]:
    text = "\n".join(line for line in (DATA / "registry_v1.sql").read_text().splitlines() if not line.startswith("--"))
    return [s.strip() for s in text.split("\n;") if s.strip()]


def _v1_report(device_id: str, version: str, ts: float) -> str:
    # Stored as the v1 collector did: MetricsReport.to_dict() with sorted keys (version an int inside).
    body = {**V1_REPORT, "device_id": device_id, "bundle_version": int(version), "ts": ts}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


#: Realistic v1 rows, versions as TEXT: "10" sorted before "9" in v1.
V1_DEVICES = [
    ("pi-01", "online", '{"arch":"aarch64"}', '{"onnxruntime":"1.17.1"}', "0.1.0", '{"name":"digits","version":"10"}'),
    ("pi-02", "online", None, None, "0.1.0", '{"name":"digits","version":"9"}'),
    ("pi-03", "offline", None, None, None, None),
]
V1_DEPLOYMENTS = [
    ("pi-01", "digits", "9", "aa" * 32, "t1", "installed", None, None, 10.0, 11.0),
    ("pi-01", "digits", "10", "bb" * 32, "t2", "installed", None, None, 20.0, 21.0),
    ("pi-02", "digits", "10", "bb" * 32, "t2", "refused", "rollback", "v10 refused", 22.0, 23.0),
    ("pi-02", "digits", "9", "aa" * 32, None, "sent", None, None, 30.0, None),
]
V1_METRICS = [
    ("pi-01", "digits", "10", 25.0),
    ("pi-01", "digits", "9", 12.0),
    ("pi-01", "digits", "10", 21.5),  # older report of the same version
    ("pi-02", "digits", "9", 31.0),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def v1_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
    """A database written as the v1 code wrote it; yields (target, raw connection factory)."""
    backend = request.param
    cleanup: Callable[[], None] | None = None
    if backend == "sqlite":
        target = str(tmp_path / "fleet-v1.db")

        def connect() -> Any:
            return sqlite3.connect(target, isolation_level=None)
    else:
        import psycopg

        admin_url = _postgres_admin_url(request.config)
        schema = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        target = _with_search_path(admin_url, schema)

        def connect() -> Any:
            return psycopg.connect(target, autocommit=True)

        def cleanup() -> None:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")

    ident, real, mark = _V1_DIALECTS[backend]
    conn = connect()
    try:
        for statement in _v1_statements():
            conn.execute(statement.format(id=ident, float=real))
        conn.execute(f"INSERT INTO schema_version (version) VALUES ({mark})", (1,))
        for row in V1_DEVICES:
            conn.execute(
                "INSERT INTO devices (device_id, status, platform, runtimes, agent_version, active_bundle, "
                f"first_seen, last_seen) VALUES ({', '.join([mark] * 8)})",
                (*row, 100.0, 200.0),
            )
        for row in V1_DEPLOYMENTS:
            conn.execute(
                "INSERT INTO deployments (device_id, bundle_name, bundle_version, bundle_sha256, transfer_id, "
                f"state, error_code, error_message, started_at, finished_at) VALUES ({', '.join([mark] * 10)})",
                row,
            )
        for device_id, bundle, version, at in V1_METRICS:
            conn.execute(
                "INSERT INTO metrics (device_id, bundle_name, bundle_version, received_at, report) "
                f"VALUES ({', '.join([mark] * 5)})",
                (device_id, bundle, version, at, _v1_report(device_id, version, at)),
            )
    finally:
        conn.close()
    try:
        yield target, connect
    finally:
        if cleanup is not None:
            cleanup()


def _counts(connect: Callable[[], Any]) -> dict[str, int]:
    conn = connect()
    try:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("devices", "deployments", "metrics")
        }
    finally:
        conn.close()


def test_v1_fixture_is_the_shipped_first_migration() -> None:
    # Migration 1 is shipped: it may never change, so the v1 fixture stays what v1 wrote.
    def norm(text: str) -> str:
        return " ".join(text.split())

    (version, steps), *_ = registry_module._MIGRATIONS
    shipped = [norm(s) for s in steps if isinstance(s, str)]
    assert version == 1 and shipped == [norm(s) for s in _v1_statements()[:-1]]


def test_v1_registry_upgrades_in_place_and_keeps_every_row(v1_database: tuple[str, Callable[[], Any]]) -> None:
    target, connect = v1_database
    before = _counts(connect)

    with open_registry(target) as db:
        assert db.ensure_schema() == SCHEMA_VERSION
        assert _counts(connect) == before == {"devices": 3, "deployments": 4, "metrics": 4}

        latest = db.latest_metrics()
        assert [(m.device_id, m.bundle_version, m.received_at) for m in latest] == [
            ("pi-01", 9, 12.0),
            ("pi-01", 10, 25.0),
            ("pi-02", 9, 31.0),
        ]
        for record in latest:  # the stored report reads back whole and typed
            assert record.report.to_dict() == json.loads(
                _v1_report(record.device_id, str(record.bundle_version), record.received_at)
            )
            assert record.report.latency is not None and record.report.latency.p50_ms == 0.405

        deployments = db.list_deployments(limit=10)
        assert [(d.device_id, d.bundle_version, d.state) for d in deployments] == [
            ("pi-02", 9, "sent"),
            ("pi-02", 10, "refused"),
            ("pi-01", 10, "installed"),
            ("pi-01", 9, "installed"),
        ]
        assert deployments[1].error_message == "v10 refused" and deployments[3].transfer_id == "t1"

        assert [(d.device_id, d.active_bundle) for d in db.list_devices()] == [
            ("pi-01", BundleRef("digits", 10)),
            ("pi-02", BundleRef("digits", 9)),
            ("pi-03", None),
        ]
        pi01 = db.get_device("pi-01")
        assert (
            pi01 is not None
            and pi01.platform == {"arch": "aarch64"}
            and pi01.to_dict()["active_bundle"]
            == {
                "name": "digits",
                "version": "10",
            }
        )

        # New rows get fresh ids after the rebuild, and versions sort as numbers in SQL.
        old_ids = {d.id for d in deployments}
        new_id = db.record_deployment("pi-03", "digits", 100, "cc" * 32, started_at=40.0)
        assert new_id > max(old_ids)
        db.add_metrics(_report("pi-01", "digits", 100, 50), received_at=50.0)
        assert [m.bundle_version for m in db.latest_metrics("pi-01")] == [9, 10, 100]
        raw = db._conn.execute("SELECT bundle_version FROM deployments ORDER BY bundle_version").fetchall()
        assert [r[0] for r in raw] == [9, 9, 10, 10, 100]

    with open_registry(target) as again:  # idempotent: a second open changes nothing
        assert again.ensure_schema() == SCHEMA_VERSION
        assert len(again.list_deployments(limit=100)) == 5
    conn = connect()
    try:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert [r[0] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
        stored = conn.execute("SELECT active_bundles, broker FROM devices WHERE device_id = 'pi-01'").fetchone()
        assert json.loads(stored[0]) == [{"name": "digits", "version": 10}] and stored[1] == ""
    finally:
        conn.close()


def test_two_processes_upgrade_one_v1_file_once(v1_database: tuple[str, Callable[[], Any]]) -> None:
    target, connect = v1_database
    before = _counts(connect)
    start = threading.Barrier(4)
    opened: list[int] = []
    failures: list[BaseException] = []

    def open_it() -> None:
        try:
            start.wait()
            with open_registry(target, timeout=30.0) as db:
                opened.append(db.ensure_schema())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == [] and opened == [SCHEMA_VERSION] * 4
    assert _counts(connect) == before
    conn = connect()
    try:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert [r[0] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        conn.close()


def test_v1_row_with_a_non_integer_version_stops_the_migration_and_changes_nothing(
    v1_database: tuple[str, Callable[[], Any]],
) -> None:
    target, connect = v1_database
    conn = connect()
    try:
        conn.execute("UPDATE deployments SET bundle_version = '1.0.0' WHERE transfer_id = 't1'")
        [(bad_id,)] = conn.execute("SELECT id FROM deployments WHERE transfer_id = 't1'").fetchall()
    finally:
        conn.close()
    before = _counts(connect)

    with pytest.raises(StorageError, match=rf"deployments row {bad_id} has bundle version '1.0.0'"):
        open_registry(target)

    assert _counts(connect) == before
    conn = connect()
    try:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
        versions = [r[0] for r in conn.execute("SELECT bundle_version FROM deployments ORDER BY id").fetchall()]
        assert versions == ["1.0.0", "10", "10", "9"]
    finally:
        conn.close()


# --- schema 6: a report or event stored twice is one row ---------------------------------


def test_a_metrics_report_stored_twice_is_one_row(db: Registry) -> None:
    report = _report(n=7)
    first = db.add_metrics(report, received_at=50.0)
    assert first is not None
    assert db.add_metrics(report, received_at=60.0) is None  # heard again: retained, or delivered twice
    assert db.add_metrics(_report(n=8), received_at=61.0) is not None  # a later report is a new row
    rows = db._conn.execute("SELECT id, received_at FROM metrics ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(first, 50.0), (rows[1][0], 61.0)]


def test_a_batch_of_reports_is_stored_as_one_by_one_each_once(db: Registry) -> None:
    good = [_report(n=n) for n in (1, 2, 3)]
    odd = MetricsReport.from_dict({**V1_REPORT, "ts": 4.0, "odd": [1.0, float("nan")]})  # kept unknown field
    late = _report(n=5_000_000_000)  # after 2100: not a plausible time
    db.add_metrics(good[0], received_at=40.0)  # stored before: stays as it was
    with db.batch():
        refused = db.add_metrics_batch([*good, odd, good[1], late], received_at=50.0)
    assert [(r.ts, type(e)) for r, e in refused] == [(4.0, ValueError), (5e9, ValueError)]
    assert "report.odd[] is not a finite number" in str(refused[0][1])
    rows = db._conn.execute("SELECT received_at, report FROM metrics ORDER BY report_ts").fetchall()
    assert [r[0] for r in rows] == [40.0, 50.0, 50.0]
    assert [json.loads(r[1]) for r in rows] == [{**g.to_dict(), "schema": g.schema} for g in good]
    assert db.add_metrics_batch([], received_at=60.0) == []


def test_an_event_stored_twice_is_one_row(db: Registry) -> None:
    from edge_sdk.protocol import Event

    installed = Event("pi-01", "installed", 100.0, command_id="c1", transfer_id="t" * 32)
    assert db.add_event(installed, received_at=101.0)
    assert not db.add_event(installed, received_at=102.0)
    assert db.add_event(Event("pi-01", "progress", 100.0), received_at=101.0)  # same time, other kind
    assert db.count_events("pi-01") == 2 and db.count_events("pi-02") == 0
    assert db.forget_device("pi-01").devices == 0 and db.count_events() == 0


def test_a_batch_is_stored_whole_or_not_at_all(db: Registry) -> None:
    with pytest.raises(RuntimeError), db.batch():
        db.add_metrics(_report(n=1), received_at=10.0)
        raise RuntimeError("the collector died mid-batch")
    assert db.latest_metrics() == []
    with db.batch():
        db.add_metrics(_report(n=1), received_at=10.0)
        db.add_metrics(_report(n=2), received_at=11.0)
    assert len(db._conn.execute("SELECT id FROM metrics").fetchall()) == 2


def test_a_later_outcome_follows_the_waiting_deployment_only(db: Registry) -> None:
    deferred = db.record_deployment(
        "pi-01", "digits", 2, "aa" * 32, started_at=100.0, transfer_id="t2", state="deferred"
    )
    done = db.record_deployment("pi-01", "digits", 1, "bb" * 32, started_at=50.0, transfer_id="t1", state="installed")
    timed_out = db.record_deployment("pi-02", "digits", 2, "aa" * 32, started_at=100.0, transfer_id="t2")
    db.update_deployment(timed_out, "failed", "device_timeout", "no answer", finished_at=160.0)
    refused = db.record_deployment("pi-03", "digits", 2, "aa" * 32, started_at=100.0, transfer_id="t2")
    db.update_deployment(refused, "refused", "bad_signature", "no", finished_at=101.0)

    assert not db.follow_deployment("pi-01", "installed", seen_at=90.0, received_at=90.0, transfer_id="t2")  # before it
    assert db.follow_deployment("pi-01", "installed", seen_at=300.0, received_at=301.0, transfer_id="t2")
    assert not db.follow_deployment("pi-01", "failed", seen_at=310.0, received_at=311.0, transfer_id="t1")
    assert db.follow_deployment(  # found by bundle name and version, the device back after the host gave up
        "pi-02", "installed", seen_at=400.0, received_at=401.0, bundle=BundleRef("digits", 2)
    )
    assert not db.follow_deployment("pi-03", "installed", seen_at=400.0, received_at=401.0, transfer_id="t2")
    states = {d.id: (d.state, d.finished_at, d.error_code) for d in db.list_deployments(limit=10)}
    assert states == {
        deferred: ("installed", 300.0, None),
        done: ("installed", None, None),
        timed_out: ("installed", 400.0, None),
        refused: ("refused", 101.0, "bad_signature"),
    }


def test_schema_5_removes_reports_stored_twice_keeping_the_first(
    v1_database: tuple[str, Callable[[], Any]],
) -> None:
    target, connect = v1_database
    conn = connect()
    try:
        mark = "?" if isinstance(conn, sqlite3.Connection) else "%s"
        device_id, bundle, version, at = V1_METRICS[0]
        conn.execute(  # what `edgectl metrics --broker` did with a retained report: the same report again
            "INSERT INTO metrics (device_id, bundle_name, bundle_version, received_at, report) "
            f"VALUES ({', '.join([mark] * 5)})",
            (device_id, bundle, version, at + 100, _v1_report(device_id, version, at)),
        )
    finally:
        conn.close()
    with open_registry(target) as db:
        rows = db._conn.execute("SELECT device_id, received_at, report_ts FROM metrics ORDER BY id").fetchall()
        assert [tuple(r) for r in rows] == [(d, a, a) for d, _, _, a in V1_METRICS]
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # the key holds from now on
            db._conn.execute(
                "INSERT INTO metrics (device_id, bundle_name, bundle_version, received_at, report, "
                f"report_ts) VALUES ('pi-01', 'digits', 9, 1, '{{}}', {V1_METRICS[0][3]})"
            )


# --- runs ------------------------------------------------------------------------------


def test_runs_round_trip_filter_and_order(db: Registry) -> None:
    first = db.add_run("compress", 100.0, {"model": {"sha256": "ab" * 32}}, {"report": {"final": {"size_bytes": 9}}})
    second = db.add_run("profile", 200.0, {"devices": ["pi-01"]}, {"outcomes": []})
    third = db.add_run("compress", 300.0, {}, {})
    got = db.get_run(first)
    assert got is not None and got.to_dict() == {
        "id": first, "kind": "compress", "started_at": 100.0,
        "parameters": {"model": {"sha256": "ab" * 32}}, "results": {"report": {"final": {"size_bytes": 9}}},
    }  # fmt: skip
    assert [r.id for r in db.list_runs()] == [third, second, first]
    assert [r.id for r in db.list_runs(kind="compress")] == [third, first]
    assert [r.id for r in db.list_runs(kind="compress", since=150.0)] == [third]
    assert [r.id for r in db.list_runs(limit=1)] == [third]
    assert db.get_run(third + 100) is None
    with pytest.raises(ValueError, match="unknown run kind"):
        db.add_run("train", 1.0, {}, {})


def test_latest_metrics_of_some_versions_are_those_of_all_versions_filtered(db: Registry) -> None:
    from report_fleet import FleetSpec, fill_fleet

    fill_fleet(db, FleetSpec(devices=6, versions=3))
    every = db.latest_metrics_json()
    # A second report of one version at the same time as its newest: the one stored last wins, both ways.
    *_, at, report = every[0]
    db.add_metrics(MetricsReport.from_dict({**report, "command_id": "1" * 32}), at)
    every = db.latest_metrics_json()
    only = {(d, b, v) for d, b, v, _, _ in every[::2]}
    assert db.latest_metrics_json(only) == [m for m in every if (m[0], m[1], m[2]) in only]
    assert db.latest_metrics_json(set()) == []


def test_reports_decoded_by_an_earlier_read_are_used_and_pruned(db: Registry) -> None:
    from report_fleet import FleetSpec, fill_fleet

    fill_fleet(db, FleetSpec(devices=3, versions=2))
    every = db.latest_metrics_json()
    only = {(d, b, v) for d, b, v, _, _ in every}
    decoded: dict[Any, dict[str, Any]] = {}
    assert db.latest_metrics_json(only, decoded) == every and len(decoded) == len(every)
    row_id = next(iter(decoded))
    decoded[row_id] = {"kept": "from the earlier read"}  # a stored row never changes: it is not read again
    assert {"kept": "from the earlier read"} in [m[4] for m in db.latest_metrics_json(only, decoded)]
    *_, at, report = every[0]
    newer = MetricsReport.from_dict({**report, "ts": report["ts"] + 10})
    assert db.add_metrics(newer, at + 10) is not None
    again = db.latest_metrics_json(only, decoded)
    assert again[0][3] == at + 10 and again == [m for m in db.latest_metrics_json() if (m[0], m[1], m[2]) in only]
    assert len(decoded) == len(every)  # the report it replaced is dropped
