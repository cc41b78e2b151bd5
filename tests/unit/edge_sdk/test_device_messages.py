"""edge_sdk.trust.device and edge_sdk.protocol.reports: a device signs what it says; the host verifies it."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from edge_sdk.errors import (
    ExpiredError,
    MessageError,
    ReplayError,
    SignatureError,
    TargetMismatchError,
    UntrustedInputError,
)
from edge_sdk.protocol import (
    Channel,
    DeviceStatus,
    Event,
    EventKind,
    MetricsReport,
    SignedReport,
    decode,
    encode,
    open_enrolment_request,
    open_report,
    seal,
    seal_bytes,
    signed_report_of,
)
from edge_sdk.trust import DROP_REASONS, SigningKey, fingerprint, sign_device_message, verify_device_message

NOW = 1_800_000_000.0
KEY = SigningKey.generate()
OTHER = SigningKey.generate()


def _reason(exc: pytest.ExceptionInfo[UntrustedInputError]) -> str:
    reason = exc.value.details["reason"]
    assert reason in DROP_REASONS
    return str(reason)


def test_a_signed_message_verifies_and_returns_its_bytes() -> None:
    env = sign_device_message(KEY, "pi-1", 7, NOW, b'{"x":1}')
    assert verify_device_message(KEY.public_key, "pi-1", env, 6, NOW) == b'{"x":1}'
    assert verify_device_message(KEY.public_key, "pi-1", env, None, NOW) == b'{"x":1}'


@pytest.mark.parametrize(
    ("change", "error", "reason"),
    [
        ({"payload": b'{"x":2}'}, SignatureError, "bad_signature"),
        ({"seq": 8}, SignatureError, "bad_signature"),
        ({"ts": NOW + 1}, SignatureError, "bad_signature"),
        ({"device_id": "pi-2"}, TargetMismatchError, "device_mismatch"),
    ],
)
def test_every_signed_field_is_bound(change: dict, error: type, reason: str) -> None:
    env = dataclasses.replace(sign_device_message(KEY, "pi-1", 7, NOW, b'{"x":1}'), **change)
    topic = change.get("device_id", "pi-1") if reason != "device_mismatch" else "pi-1"
    with pytest.raises(error) as exc:
        verify_device_message(KEY.public_key, topic, env, None, NOW)
    assert _reason(exc) == reason


def test_another_key_the_topic_of_another_device_a_replay_and_the_future_are_refused() -> None:
    env = sign_device_message(OTHER, "pi-1", 7, NOW, b"{}")
    with pytest.raises(SignatureError) as exc:
        verify_device_message(KEY.public_key, "pi-1", env, None, NOW)
    assert _reason(exc) == "bad_signature"
    env = sign_device_message(KEY, "pi-1", 7, NOW, b"{}")
    with pytest.raises(TargetMismatchError):
        verify_device_message(KEY.public_key, "pi-2", env, None, NOW)
    for last in (7, 8):
        with pytest.raises(ReplayError) as exc_r:
            verify_device_message(KEY.public_key, "pi-1", env, last, NOW)
        assert _reason(exc_r) == "replayed"
    for ts in (NOW + 3601, -1.0, 1e300):  # NaN and infinity cannot even be signed (canonical JSON refuses them)
        late = sign_device_message(KEY, "pi-1", 9, ts, b"{}")
        with pytest.raises(ExpiredError) as exc_e:
            verify_device_message(KEY.public_key, "pi-1", late, None, NOW)
        assert _reason(exc_e) == "future_time"
    assert verify_device_message(KEY.public_key, "pi-1", sign_device_message(KEY, "pi-1", 9, NOW + 299, b"{}"), 8, NOW)


def test_fingerprint_groups_the_key_id() -> None:
    fp = fingerprint(KEY.public_key)
    assert fp.replace(":", "") == KEY.keyid and len(fp.split(":")) == 8


def _event(device: str = "pi-1", kind: str = EventKind.INSTALLED) -> Event:
    return Event(device, kind, NOW, command_id="a" * 32)


def test_seal_and_open_a_report() -> None:
    wire = seal(_event(), KEY, 3, NOW)
    signed = signed_report_of(wire)
    assert isinstance(signed, SignedReport) and signed.seq == 3 and signed.device_id == "pi-1"
    assert open_report(signed, KEY.public_key, "pi-1", Channel.EVENTS, 2, NOW) == _event()
    status = DeviceStatus("pi-1", "online", NOW, public_key=KEY.public_key.raw.hex(), will_seq=1)
    assert decode(encode(status)) == status
    assert open_report(signed_report_of(seal(status, KEY, 4, NOW)), KEY.public_key, "pi-1", Channel.STATUS, 3, NOW)


def test_unsigned_and_malformed_payloads_say_so() -> None:
    with pytest.raises(MessageError) as exc:
        signed_report_of(encode(_event()))
    assert _reason(exc) == "unsigned"
    with pytest.raises(MessageError) as exc:
        signed_report_of(b"{not json")
    assert _reason(exc) == "malformed"
    body = json.loads(seal(_event(), KEY, 3, NOW))
    body["sig"] = "!!"
    with pytest.raises(SignatureError):
        open_report(signed_report_of(json.dumps(body).encode()), KEY.public_key, "pi-1", Channel.EVENTS, None, NOW)


def test_a_message_is_bound_to_its_channel_and_names_the_topics_device() -> None:
    signed = signed_report_of(seal(_event(), KEY, 3, NOW))
    with pytest.raises(MessageError) as exc:
        open_report(signed, KEY.public_key, "pi-1", Channel.METRICS, None, NOW)
    assert _reason(exc) == "malformed"
    naming_other = signed_report_of(seal_bytes(encode(_event("pi-2")), "pi-1", KEY, 4, NOW))
    with pytest.raises(TargetMismatchError) as exc_t:
        open_report(naming_other, KEY.public_key, "pi-1", Channel.EVENTS, None, NOW)
    assert _reason(exc_t) == "device_mismatch"


def test_the_will_is_accepted_once_behind_later_numbers_and_only_as_offline() -> None:
    will = signed_report_of(seal(DeviceStatus("pi-1", "offline", NOW), KEY, 1, NOW))
    msg = open_report(will, KEY.public_key, "pi-1", Channel.STATUS, 40, NOW, will_seq=1)
    assert isinstance(msg, DeviceStatus) and msg.state == "offline"
    with pytest.raises(ReplayError):  # an older number that is not the will
        open_report(will, KEY.public_key, "pi-1", Channel.STATUS, 40, NOW, will_seq=2)
    online = signed_report_of(seal(DeviceStatus("pi-1", "online", NOW), KEY, 1, NOW))
    with pytest.raises(ReplayError):  # the will's number on anything but an offline status
        open_report(online, KEY.public_key, "pi-1", Channel.STATUS, 40, NOW, will_seq=1)


def test_an_enrolment_request_is_signed_by_the_key_it_carries() -> None:
    status = DeviceStatus("pi-9", "online", NOW, public_key=KEY.public_key.raw.hex())
    assert open_enrolment_request(signed_report_of(seal(status, KEY, 2, NOW)), "pi-9", NOW) == status
    with pytest.raises(SignatureError):  # someone else's key in the status
        open_enrolment_request(signed_report_of(seal(status, OTHER, 2, NOW)), "pi-9", NOW)
    with pytest.raises(UntrustedInputError) as exc:  # no key: nothing to enrol
        open_enrolment_request(signed_report_of(seal(DeviceStatus("pi-9", "online", NOW), KEY, 2, NOW)), "pi-9", NOW)
    assert _reason(exc) == "unenrolled"
    with pytest.raises(TargetMismatchError):
        open_enrolment_request(signed_report_of(seal(status, KEY, 2, NOW)), "pi-8", NOW)


def test_signed_report_fields_are_checked() -> None:
    good = json.loads(seal(MetricsReport("pi-1", "b", 1, "onnxruntime", "fp32", NOW), KEY, 3, NOW))
    for field, value in (("seq", -1), ("seq", 1 << 60), ("keyid", "xyz"), ("sig", "A" * 200), ("device_id", "../x")):
        with pytest.raises(MessageError):
            decode(json.dumps({**good, field: value}).encode())
    assert len(base64.b64decode(good["sig"])) == 64
