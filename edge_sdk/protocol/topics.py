"""The MQTT topic tree. Pure: strings in, strings or values out.

::

    edge/v1/devices/<device_id>/status    retained birth / will (online, offline)     device -> host
    edge/v1/devices/<device_id>/cmd       commands (deploy, transfer_end, ...)         host -> device
    edge/v1/devices/<device_id>/data      binary bundle chunks                         host -> device
    edge/v1/devices/<device_id>/events    progress, refusals, results                  device -> host
    edge/v1/devices/<device_id>/metrics   metrics reports (retained: the latest)       device -> host
    edge/v1/devices/<device_id>/heartbeat "still here" every heartbeat_s (not retained) device -> host
    edge/v1/transfers/<transfer_id>       chunk frames sent once to every device       host -> devices
                                          receiving that transfer (the broker fans out)

Every topic of one device sits under its own prefix, so a broker ACL of
``pattern readwrite edge/v1/devices/%u/#`` confines a device to itself; devices may
read ``edge/v1/transfers/#`` and only the host writes there (what arrives there is checked
chunk by chunk against the signed offer anyway). The version segment lets a later tree
live beside this one during a fleet migration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.untrusted_json import is_text

__all__ = [
    "TOPIC_ROOT",
    "TRANSFER_ROOT",
    "Channel",
    "DeviceTopics",
    "ParsedTopic",
    "check_device_id",
    "fleet_filter",
    "parse_topic",
    "shared",
    "transfer_topic",
]

TOPIC_ROOT = "edge/v1/devices"
TRANSFER_ROOT = "edge/v1/transfers"
_TRANSFER_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Channel(str, Enum):
    STATUS = "status"
    CMD = "cmd"
    DATA = "data"
    EVENTS = "events"
    METRICS = "metrics"
    HEARTBEAT = "heartbeat"


def check_device_id(device_id: object) -> str:
    """Device ids are topic segments: letters, digits, ``_ . -``; at most 64 characters.

    Args:
        device_id: the id to check (any value: config files and messages are checked here).

    Returns:
        ``device_id``, once it is known to be a safe topic segment.

    Raises:
        ConfigError: the id would break or widen a topic (``+``, ``#``, ``/``, empty...).
    """
    if not is_text(device_id, pattern=_DEVICE_ID_RE):
        raise ConfigError(
            f"bad device id {device_id!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class DeviceTopics:
    """All topics of one device."""

    device_id: str

    def __post_init__(self) -> None:
        check_device_id(self.device_id)

    def topic(self, channel: Channel) -> str:
        return f"{TOPIC_ROOT}/{self.device_id}/{channel.value}"

    @property
    def status(self) -> str:
        return self.topic(Channel.STATUS)

    @property
    def cmd(self) -> str:
        return self.topic(Channel.CMD)

    @property
    def data(self) -> str:
        return self.topic(Channel.DATA)

    @property
    def events(self) -> str:
        return self.topic(Channel.EVENTS)

    @property
    def metrics(self) -> str:
        return self.topic(Channel.METRICS)

    @property
    def heartbeat(self) -> str:
        return self.topic(Channel.HEARTBEAT)


@dataclass(frozen=True)
class ParsedTopic:
    device_id: str
    channel: Channel


def parse_topic(topic: str) -> ParsedTopic:
    """Split a concrete topic of the tree into device id and channel.

    Raises:
        MessageError: the topic is not in this tree.
    """
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise MessageError(f"topic {topic!r} is not under {TOPIC_ROOT}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2:
        raise MessageError(f"topic {topic!r} is not <device>/<channel>")
    device_id, channel = parts
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise MessageError(f"topic {topic!r} has a bad device id")
    try:
        return ParsedTopic(device_id, Channel(channel))
    except ValueError as exc:
        raise MessageError(f"topic {topic!r} has unknown channel {channel!r}") from exc


def fleet_filter(channel: Channel) -> str:
    """Subscription filter for one channel of every device, e.g. all status messages."""
    return f"{TOPIC_ROOT}/+/{channel.value}"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 / Mosquitto shared subscription, so several collectors split the load."""
    if not group or any(c in group for c in "/+#"):
        raise ConfigError(f"bad shared-subscription group {group!r}")
    return f"$share/{group}/{topic_filter}"


def transfer_topic(transfer_id: str) -> str:
    """The topic a transfer's chunks go out on once, for every device receiving it.

    Raises:
        ConfigError: not a transfer id (32 lowercase hex digits).
    """
    if not _TRANSFER_ID_RE.fullmatch(transfer_id):
        raise ConfigError(f"bad transfer id {transfer_id!r}")
    return f"{TRANSFER_ROOT}/{transfer_id}"
