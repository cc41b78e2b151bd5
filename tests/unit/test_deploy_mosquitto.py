"""The shipped Mosquitto config carries the largest message edge-sdk sends, and a paced transfer of any size.

The largest packet is a chunk frame of the biggest size the codec accepts, published at
QoS 1 on the longest topic a chunk travels on (a device's data topic, or a transfer's).
Computed from the codec and the topic tree, never hard-coded, so a larger chunk limit or a
longer topic fails here first.

A transfer is paced: the host keeps at most a window of chunks beyond the slowest device in
flight, so a device's queue at the broker holds at most a window plus what is in flight,
whatever the bundle's size. The shipped queue bounds must hold that with room to spare
(Mosquitto drops QoS 1 messages beyond them).
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_sdk.mqtt import DEFAULT_MAX_INFLIGHT, publish_packet_size
from edge_sdk.protocol import DeviceTopics
from edge_sdk.protocol.codec import CHUNK_HEADER_SIZE, CodecLimits, encode_chunk
from host_tools.fleet.deployer import DeployOptions

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf.example"
ACL = SHIPPED.with_name("acl.example")
#: The host's default window: chunks in flight beyond the slowest device (host_tools/fleet delivery).
WINDOW = DeployOptions().window
#: Longest transfer id the topic is tested with (a content hash in hex is 64 characters).
TRANSFER_ID_CHARS = 128


def _shipped_setting(name: str) -> str:
    values = [
        m.group(1) for line in SHIPPED.read_text().splitlines() if (m := re.fullmatch(rf"{name}\s+(\S+)\s*", line))
    ]
    assert len(values) == 1, f"{SHIPPED} sets {name} {len(values)} times"
    return values[0]


def _remaining_length_bytes(n: int) -> int:
    """Bytes of MQTT's variable-length 'remaining length' field for ``n``."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def _largest_chunk_publish() -> int:
    """Bytes of the largest PUBLISH edge-sdk sends: the biggest chunk frame, QoS 1, longest data topic."""
    largest_data = CodecLimits().max_chunk_bytes - CHUNK_HEADER_SIZE
    frame = encode_chunk("f" * 32, 2**32 - 1, bytes(largest_data))
    assert len(frame) == CodecLimits().max_chunk_bytes
    assert largest_data >= 1 << 20  # a 1 MiB chunk plus its header is what the agent accepts
    device_topic = DeviceTopics("d" * 64).data  # device ids are at most 64 characters
    transfer_topic = "edge/v1/transfers/" + "t" * TRANSFER_ID_CHARS
    topic = max(device_topic, transfer_topic, key=len).encode()
    remaining = 2 + len(topic) + 2 + 1 + len(frame)  # topic length, topic, packet id (QoS 1), MQTT 5 properties
    return 1 + _remaining_length_bytes(remaining) + remaining


def test_the_packet_size_here_is_the_one_the_client_checks() -> None:
    topic = "edge/v1/transfers/" + "t" * TRANSFER_ID_CHARS
    largest = CodecLimits().max_chunk_bytes
    assert _largest_chunk_publish() == publish_packet_size(topic, largest, 1, "5")


def test_the_shipped_max_packet_size_carries_the_largest_chunk() -> None:
    shipped = int(_shipped_setting("max_packet_size"))
    assert shipped >= _largest_chunk_publish()


def test_the_shipped_max_packet_size_still_refuses_much_larger_packets() -> None:
    assert int(_shipped_setting("max_packet_size")) <= 2 * _largest_chunk_publish()


def test_the_shipped_config_keeps_tls_client_certificates_and_the_acl() -> None:
    assert _shipped_setting("require_certificate") == "true"
    assert _shipped_setting("use_identity_as_username") == "true"
    assert _shipped_setting("allow_anonymous") == "false"
    assert _shipped_setting("acl_file")


def test_a_device_queue_holds_a_window_and_what_is_in_flight_many_times_over() -> None:
    queued, inflight = int(_shipped_setting("max_queued_messages")), int(_shipped_setting("max_inflight_messages"))
    assert inflight >= 1  # 0 would mean "no limit" and tell MQTT 5 clients nothing
    assert queued >= 10 * (WINDOW + inflight)  # commands, repairs and the host's events of many devices too
    assert inflight <= DEFAULT_MAX_INFLIGHT  # the client's own cap never sits below the broker's


def test_a_device_queue_holds_a_window_of_the_largest_chunks_in_bytes() -> None:
    queued_bytes, inflight = int(_shipped_setting("max_queued_bytes")), int(_shipped_setting("max_inflight_messages"))
    assert queued_bytes >= (WINDOW + inflight) * _largest_chunk_publish()


def test_sessions_and_queued_messages_survive_a_broker_restart() -> None:
    assert _shipped_setting("persistence") == "true"
    assert _shipped_setting("persistent_client_expiration")


def test_the_deprecated_payload_only_message_size_limit_is_left_unset() -> None:
    assert not re.search(r"^message_size_limit\b", SHIPPED.read_text(), flags=re.M)


def _acl_rules(user: str) -> list[tuple[str, str]]:
    """(access, topic) rules that apply to ``user``: its own block and every pattern (%u filled in)."""
    rules, current = [], None
    for line in ACL.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            current = words[1]
        elif words[0] == "topic" and current == user:
            rules.append((words[1], words[2]))
        elif words[0] == "pattern":
            rules.append((words[1], words[2].replace("%u", user)))
    return rules


def test_the_acl_lets_devices_read_transfers_and_only_the_host_write_them() -> None:
    device, host = _acl_rules("pi-01"), _acl_rules("edge-host")
    assert ("read", "edge/v1/transfers/#") in device
    assert not [rule for rule in device if rule[1].startswith("edge/v1/transfers") and rule[0] != "read"]
    assert not [rule for rule in device if rule[1] in ("#", "edge/#", "edge/v1/#")]
    assert ("readwrite", "edge/v1/#") in host
