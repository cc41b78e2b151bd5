"""The shipped Mosquitto config carries the largest message edge-sdk sends.

The largest packet is a chunk frame of the biggest size the codec accepts, published at
QoS 1 on the longest data topic a device id allows. Computed from the codec and the topic
tree, never hard-coded, so a larger chunk limit or a longer topic fails here first.
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_sdk.protocol import DeviceTopics
from edge_sdk.protocol.codec import CHUNK_HEADER_SIZE, CodecLimits, encode_chunk

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf.example"


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
    topic = DeviceTopics("d" * 64).data.encode()  # device ids are at most 64 characters
    remaining = 2 + len(topic) + 2 + len(frame)  # topic length, topic, packet id (QoS 1), payload
    return 1 + _remaining_length_bytes(remaining) + remaining


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
