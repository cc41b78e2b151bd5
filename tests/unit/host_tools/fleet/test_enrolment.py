"""host_tools.fleet.enrolment and the registry's enrolment: only enrolled devices' signed messages count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from device_keys import TestDevice

from edge_sdk.errors import ConfigError
from edge_sdk.protocol import DeviceStatus, DeviceTopics, Event, EventKind, MetricsReport, encode
from host_tools.fleet.collector import record_message
from host_tools.fleet.enrolment import Dropped, ReportGate, Verified
from host_tools.fleet.registry import DeviceRecord, Registry, check_time, open_registry

NOW = 1_800_000_000.0


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = open_registry(tmp_path / "registry.db")
    reg.ensure_schema()
    return reg


def _check(gate: ReportGate, topic: str, payload: bytes) -> Verified | Dropped:
    return gate.check(topic, payload, NOW)


def test_an_enrolled_devices_messages_pass_in_sequence(registry: Registry) -> None:
    dev = TestDevice("pi-1")
    registry.enroll("pi-1", dev.public_hex, NOW)
    gate = ReportGate.from_registry(registry)
    t = DeviceTopics("pi-1")
    first = dev.sign(Event("pi-1", EventKind.ACCEPTED, NOW), ts=NOW)
    got = _check(gate, t.events, first)
    assert isinstance(got, Verified) and got.fresh
    again = _check(gate, t.events, first)  # heard again (retained): verified, not fresh, not counted
    assert isinstance(again, Verified) and not again.fresh and not gate.drops
    older = dev.sign(Event("pi-1", EventKind.INSTALLED, NOW), ts=NOW, seq=0)
    assert _check(gate, t.events, older) == Dropped("replayed")
    # Channels keep their own sequences: a retained status older than the events still counts.
    status = dev.sign(DeviceStatus("pi-1", "online", NOW, will_seq=5), ts=NOW, seq=0)
    assert isinstance(_check(gate, t.status, status), Verified)
    gate.flush(registry, NOW)
    stored = registry.get_enrolment("pi-1")
    assert stored is not None and stored.sequences == {"events": 1, "status": 0} and stored.will_seq == 5
    assert registry.drop_counts() == {"pi-1": {"replayed": 1}}
    # A new gate (a later command) remembers the sequences.
    assert ReportGate.from_registry(registry).check(t.events, first, NOW) == Verified(
        Event("pi-1", EventKind.ACCEPTED, NOW), False, 1
    )


def test_unsigned_unenrolled_and_forged_messages_are_dropped_and_counted(registry: Registry) -> None:
    dev, stranger = TestDevice("pi-1"), TestDevice("pi-1")  # the stranger made its own key for the same id
    registry.enroll("pi-1", dev.public_hex, NOW)
    gate = ReportGate.from_registry(registry)
    t = DeviceTopics("pi-1")
    fake = Event("pi-1", EventKind.INSTALLED, NOW, command_id="a" * 32)
    assert _check(gate, t.events, encode(fake)) == Dropped("unsigned")
    assert _check(gate, t.events, stranger.sign(fake, ts=NOW)) == Dropped("bad_signature")
    assert _check(gate, DeviceTopics("ghost").events, stranger.sign(fake, ts=NOW)) == Dropped("unenrolled")
    ghost = TestDevice("ghost")
    assert _check(gate, DeviceTopics("ghost").metrics, ghost.sign(_report("ghost"), ts=NOW)) == Dropped("unenrolled")
    assert _check(gate, t.events, dev.sign(fake, ts=NOW + 7200)) == Dropped("future_time")
    assert _check(gate, "not/a/device/topic", b"{}") == Dropped("malformed")
    gate.flush(registry, NOW)
    assert registry.drop_counts() == {
        "pi-1": {"unsigned": 1, "bad_signature": 1, "future_time": 1},
        "*": {"unenrolled": 2, "malformed": 1},
    }
    assert registry.list_devices() == []


def test_unsigned_messages_pass_only_when_the_migration_flag_is_set(registry: Registry) -> None:
    t = DeviceTopics("old-agent")
    status = encode(DeviceStatus("old-agent", "online", NOW))
    assert _check(ReportGate(), t.status, status) == Dropped("unsigned")
    gate = ReportGate(allow_unsigned=True)
    assert isinstance(_check(gate, t.status, status), Verified)
    assert _check(gate, t.status, encode(DeviceStatus("other", "offline", NOW))) == Dropped("device_mismatch")


def test_an_unenrolled_status_with_its_key_becomes_a_bounded_pending_request(registry: Registry) -> None:
    gate = ReportGate(max_pending=2)
    for i in range(4):
        dev = TestDevice(f"new-{i}")
        status = DeviceStatus(dev.device_id, "online", NOW, public_key=dev.public_hex)
        assert _check(gate, DeviceTopics(dev.device_id).status, dev.sign(status, ts=NOW)) == Dropped(
            "pending" if i < 2 else "pending_full"
        )
    gate.flush(registry, NOW)
    assert [e.device_id for e in registry.list_enrolments("pending")] == ["new-0", "new-1"]
    assert registry.list_devices() == []  # pending is not a device
    assert not registry.request_enrolment("new-9", TestDevice("new-9").public_hex, NOW, max_pending=2)


def test_approve_revoke_and_reenroll(registry: Registry) -> None:
    dev = TestDevice("pi-2")
    with pytest.raises(ConfigError):
        registry.decide_enrolment("pi-2", "approved", NOW)
    assert registry.request_enrolment("pi-2", dev.public_hex, NOW, max_pending=10)
    approved = registry.decide_enrolment("pi-2", "approved", NOW + 1)
    assert approved.state == "approved" and approved.decided_at == NOW + 1
    with pytest.raises(ConfigError):  # only a pending device is approved
        registry.decide_enrolment("pi-2", "approved", NOW)
    assert not registry.request_enrolment("pi-2", TestDevice("pi-2").public_hex, NOW, 10)  # no key swap
    registry.advance_sequence("pi-2", "events", 9)
    assert registry.decide_enrolment("pi-2", "revoked", NOW).state == "revoked"
    t = DeviceTopics("pi-2")
    gate = ReportGate.from_registry(registry)
    assert _check(gate, t.events, dev.sign(Event("pi-2", EventKind.DONE, NOW), ts=NOW, seq=10)) == Dropped("unenrolled")
    new_key = TestDevice("pi-2")
    again = registry.enroll("pi-2", new_key.public_hex, NOW)
    assert again.state == "approved" and again.sequences == {}  # a new key starts new sequences


def test_registry_values_are_checked_so_no_row_can_crash_a_command(registry: Registry) -> None:
    for bad in (math.inf, math.nan, -1.0, 1e300, 4_102_444_801.0, "1"):
        with pytest.raises(ValueError):
            check_time(bad, "t")
        with pytest.raises(ValueError):
            DeviceRecord("pi-1", "online", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        registry.add_metrics(_report("pi-1", ts=1e300), NOW)
    record_message(registry, _report("pi-1", ts=1e300), NOW)  # logged and skipped, not raised
    assert registry.latest_metrics() == []
    # A status dated 2100 by the device is recorded as seen when the host received it.
    record_message(registry, DeviceStatus("pi-1", "online", 4_200_000_000.0), NOW)
    record_message(registry, DeviceStatus("pi-1", "offline", NOW + 10), NOW + 10)
    row = registry.get_device("pi-1")
    assert row is not None and row.status == "offline" and row.last_seen == NOW + 10


def test_old_rows_with_implausible_times_are_repaired_by_the_migration(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with open_registry(path) as reg:
        reg.ensure_schema()
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM schema_version WHERE version >= 4")  # back to before the step that adds enrolments
    for table in ("enrolments", "operator_labels", "installed_versions", "device_groups"):
        conn.execute(f"DROP TABLE {table}")
    for column in ("labels", "heartbeat_s", "last_heard"):
        conn.execute(f"ALTER TABLE devices DROP COLUMN {column}")
    conn.execute("DROP TABLE events")  # and before schema 6's keyed reports
    conn.execute("DROP INDEX metrics_report")
    conn.execute("ALTER TABLE metrics DROP COLUMN report_ts")
    conn.execute("ALTER TABLE metrics DROP COLUMN periodic")  # and schema 9's
    conn.execute(
        "INSERT INTO devices (device_id, status, first_seen, last_seen) VALUES ('pi-x', 'online', 1e300, 4200000000)"
    )
    conn.commit()
    conn.close()
    with open_registry(path) as reg:
        reg.ensure_schema()
        row = reg.get_device("pi-x")
    assert row is not None and row.last_seen == 0.0 and row.first_seen == 0.0


def _report(device: str, ts: float = NOW) -> MetricsReport:
    return MetricsReport(device, "tiny", 1, "onnxruntime", "fp32", ts)


def test_enroll_device_by_key_file_or_by_the_pending_keys_fingerprint(tmp_path: Path) -> None:
    from edge_sdk.errors import ConfigError
    from edge_sdk.trust import SigningKey
    from host_tools.fleet.enrolment import enroll_device, key_fingerprint, pending_enrolment

    key = SigningKey.generate().public_key
    with open_registry(tmp_path / "r.db") as reg:
        with pytest.raises(ConfigError, match="exactly one of --key"):
            enroll_device(reg, "pi-1", NOW)
        hex_file = tmp_path / "pi-1.hex"
        hex_file.write_text(key.raw.hex() + "\n")
        assert enroll_device(reg, "pi-1", NOW, key_file=hex_file).state == "approved"
        junk = tmp_path / "junk.pub"
        junk.write_text("not a key")
        with pytest.raises(ConfigError, match="is not an Ed25519 public key"):
            enroll_device(reg, "pi-2", NOW, key_file=junk)
        with pytest.raises(ConfigError, match="has no pending key"):
            enroll_device(reg, "pi-2", NOW, fingerprint="00")
        with pytest.raises(ConfigError, match="not waiting for approval"):
            pending_enrolment(reg, "pi-1")  # already approved
        assert key_fingerprint(reg.get_enrolment("pi-1")) == key_fingerprint(  # type: ignore[arg-type]
            reg.list_enrolments("approved")[0]
        )


def _mixed_batch(registry: Registry) -> list[tuple[str, bytes]]:
    """Good, forged, replayed, repeated, unenrolled, unsigned and malformed messages, in one order."""
    dev, stranger, ghost = TestDevice("pi-1"), TestDevice("pi-1"), TestDevice("ghost")
    registry.enroll("pi-1", dev.public_hex, NOW)
    t = DeviceTopics("pi-1")
    status = dev.sign(DeviceStatus("pi-1", "online", NOW, will_seq=50), ts=NOW, seq=10)
    return [
        (t.metrics, dev.sign(_report("pi-1", NOW - 2), ts=NOW)),
        (t.status, status),
        (t.metrics, stranger.sign(_report("pi-1", NOW - 1), ts=NOW)),  # forged: another key
        (t.status, status),  # heard again: verified, not fresh
        (t.status, dev.sign(DeviceStatus("pi-1", "online", NOW), ts=NOW, seq=9)),  # older: replayed
        (t.metrics, dev.sign(_report("pi-1", NOW), ts=NOW + 7200)),  # future
        (DeviceTopics("ghost").metrics, ghost.sign(_report("ghost"), ts=NOW)),
        (t.events, encode(Event("pi-1", EventKind.INSTALLED, NOW))),
        ("not/a/device/topic", b"{}"),
        (t.metrics, dev.sign(_report("pi-1", NOW - 3), ts=NOW)),
    ]


def test_checking_signatures_all_at_once_judges_as_one_by_one(registry: Registry, tmp_path: Path) -> None:
    from edge_sdk.trust import check_device_signatures

    batch = _mixed_batch(registry)
    one_by_one = ReportGate.from_registry(registry)
    expected = [one_by_one.check(topic, payload, NOW) for topic, payload in batch]
    asked: list[int] = []

    def checker(checks: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
        asked.append(len(checks))
        return check_device_signatures(checks)

    at_once = ReportGate.from_registry(registry)
    got = at_once.check_many(batch, NOW, checker)
    assert got == expected
    assert [type(g).__name__ for g in got].count("Verified") == 4 and Dropped("bad_signature") in got
    assert asked == [7]  # every signed message of an enrolled device, in one call
    assert at_once.drops == one_by_one.drops


def test_an_answer_checked_elsewhere_counts_for_those_bytes_only(registry: Registry) -> None:
    """The gate takes the checker's answer for the very signature and bytes it asked about,
    and for nothing else: another signature or text under the same key is verified again."""
    from host_tools.fleet.enrolment import _CheckedKey

    dev = TestDevice("pi-1")
    registry.enroll("pi-1", dev.public_hex, NOW)
    t = DeviceTopics("pi-1")
    good = dev.sign(_report("pi-1", NOW - 1), ts=NOW)
    gate = ReportGate.from_registry(registry)
    assert gate.check_many([(t.metrics, good)], NOW, lambda checks: [False] * len(checks)) == [Dropped("bad_signature")]
    real = bytes.fromhex(dev.public_hex)
    key = _CheckedKey(real, (b"sig", b"data"), True)
    assert key.verifies(b"sig", b"data")
    assert not key.verifies(b"sig", b"other data") and not key.verifies(b"other sig", b"data")
