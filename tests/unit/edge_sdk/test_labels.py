"""edge_sdk.protocol.labels: what a label may be, checked on the device's config and on the host."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.protocol import DeviceStatus, Heartbeat, check_labels, decode, encode, parse_label, parse_labels
from edge_sdk.protocol.labels import MAX_KEY_LEN, MAX_LABELS, MAX_VALUE_LEN


@pytest.mark.parametrize(
    "text, pair",
    [
        ("site=depot-3", ("site", "depot-3")),
        ("hw=pi5", ("hw", "pi5")),
        ("rack=", ("rack", "")),
        ("example.com/zone=eu-west:2", ("example.com/zone", "eu-west:2")),
        ("k" * MAX_KEY_LEN + "=" + "V" * MAX_VALUE_LEN, ("k" * MAX_KEY_LEN, "V" * MAX_VALUE_LEN)),
    ],
)
def test_good_labels_parse(text: str, pair: tuple[str, str]) -> None:
    assert parse_label(text) == pair


@pytest.mark.parametrize(
    "text",
    [
        "site",  # no '='
        "=x",  # empty key
        "Site=x",  # uppercase key
        "-site=x",  # starts with a symbol
        "id=dev-1",  # reserved
        "k" * (MAX_KEY_LEN + 1) + "=x",
        "site=" + "v" * (MAX_VALUE_LEN + 1),
        "site=a,b",  # a selector's separator
        "site=a=b",
        "site=a!b",
        "site=a b",
        "si te=x",
        "site=dépôt",
        "site=x\n",
    ],
    ids=repr,
)
def test_bad_labels_are_refused_with_the_label_named(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_label(text)
    assert "label" in caught.value.message


def test_the_count_is_bounded() -> None:
    many = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert check_labels(many) == many
    with pytest.raises(ConfigError, match=f"at most {MAX_LABELS}"):
        check_labels({**many, "one-more": "v"})
    with pytest.raises(ConfigError, match="table"):
        check_labels(["site=x"])
    with pytest.raises(ConfigError, match="bad value"):
        check_labels({"site": 3})


def test_a_key_given_twice_keeps_the_last_value_and_labels_come_sorted() -> None:
    assert list(parse_labels(["z=1", "a=2", "z=3"]).items()) == [("a", "2"), ("z", "3")]


@pytest.mark.parametrize("labels", [{"Site": "x"}, {"id": "x"}, {"site": "a,b"}, {f"k{i}": "" for i in range(40)}])
def test_a_status_with_bad_labels_is_refused(labels: dict[str, Any]) -> None:
    body = DeviceStatus("pi-1", "online", 1.0).to_wire() | {"labels": labels}
    with pytest.raises(MessageError, match="status labels"):
        decode(json.dumps(body).encode())


def test_a_status_without_labels_or_heartbeat_is_unchanged_on_the_wire() -> None:
    body = DeviceStatus("pi-1", "offline", 1.0).to_dict()
    assert "labels" not in body and "heartbeat_s" not in body
    status = decode(encode(DeviceStatus("pi-1", "online", 1.0, labels={}, heartbeat_s=30)))
    assert isinstance(status, DeviceStatus) and status.labels == {} and status.heartbeat_s == 30.0


@pytest.mark.parametrize("interval", [0, 0.5, -1, 86400.5])
def test_heartbeat_intervals_are_bounded(interval: float) -> None:
    with pytest.raises(MessageError, match="heartbeat_s"):
        Heartbeat("pi-1", 1.0, interval)
    if interval:
        with pytest.raises(MessageError, match="heartbeat_s"):
            DeviceStatus("pi-1", "online", 1.0, heartbeat_s=interval)
