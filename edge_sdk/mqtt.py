"""The only module that imports paho-mqtt: connect, TLS, reconnect, publish, subscribe.

One concurrency rule: paho's network thread never does work. It converts each foreign
event into an own value (:class:`Incoming` or :class:`ConnectionChange`) and puts it on
``client.inbox``; the owner of the client drains that queue on its own thread. An owner
with a bounded queue of its own hands it to :meth:`MqttClient.deliver_to` instead, and the
network thread puts each item there directly (one hand-off a message, no thread between).

The inbox is bounded (``MqttOptions.inbox_max`` messages), so an owner that falls behind
costs memory up to that bound and no more: a message that finds the inbox full is dropped,
counted in ``client.inbox_dropped`` and logged. The network thread never blocks on a full
inbox (that would stop keep-alives and starve every other message). Connection changes
have a small reserve of their own above the bound, so a full inbox of messages does not
hide a reconnect from the owner.

Subscriptions are remembered and renewed on every reconnect, and reconnects back off
exponentially between ``reconnect_min_s`` and ``reconnect_max_s``. Every connection
attempt is logged at DEBUG with its number; a failed one with its cause and the delay
before the next (:class:`ConnectAttempts`), at INFO for the first failure, whenever the
delay grows, and every tenth failure after that, so an unreachable broker is never silent.

TLS files (``ca_file``, ``cert_file``, ``key_file``) are checked when the client is built:
a missing or unreadable one is named with its key and path before any connection is tried.

No exception leaves a callback: an exception in paho's network thread would end it, and
the client would be deaf while its owner looks alive. A message whose topic is not valid
UTF-8 (some brokers pass them on) is counted in ``client.rejected`` and dropped; any other
failure in a callback, ``MemoryError`` included, is counted in ``client.callback_errors``,
logged, and the message dropped. :attr:`MqttClient.network_alive` says whether the network
thread still runs, so that an owner (the agent's watchdog) can stop vouching for it.

Protocol versions (``MqttOptions.protocol``): ``"5"`` or ``"3.1.1"`` pins one; ``"auto"``
(the default) asks for MQTT 5 and, when the broker refuses that protocol version or closes
the connection before its CONNACK, speaks MQTT 3.1.1 from then on (logged once, at INFO).
A client whose broker once accepted MQTT 5 never falls back. The embedded amqtt broker
speaks only 3.1.1; Mosquitto speaks both.

After each CONNACK, :attr:`MqttClient.link` says what the broker told this client
(:class:`LinkFacts`). Under MQTT 5 it bounds what the client does: no more QoS>0 publishes
in flight than the broker's Receive Maximum (and ``MqttOptions.max_inflight``), and no
publish larger than its Maximum Packet Size; such a publish is refused here, because the
broker would drop the whole connection for it.

Sessions (``MqttOptions.session_expiry_s``): 0 asks for a clean session on every connect.
Above 0 the broker keeps the session, its subscriptions and its queued QoS 1 messages,
for that many seconds after the client goes away (MQTT 5: clean start off, Session Expiry
Interval; MQTT 3.1.1: clean session off, kept until the broker's own expiry), so a short
outage costs a delay, not the messages. The client id must then be stable.

Acknowledgements (``MqttOptions.manual_ack``): by default paho acknowledges a QoS 1
message as soon as it arrived, so a crash before the owner stored it loses it. With
``manual_ack`` the owner calls :meth:`MqttClient.ack` once the message is safe; until
then the broker keeps it and sends it again on the next connection of the session. An
acknowledgement belongs to the connection the message came on (:attr:`Incoming.link_epoch`);
one from an earlier connection is not sent (the packet id may name another message by
now) and the broker's redelivery covers it. The client may ask the broker (MQTT 5
Receive Maximum, ``receive_maximum``) for no more unacknowledged messages than the inbox
holds; Mosquitto 2.0 honours it for live traffic but sends what it queued while the client
was away all at once, so size the inbox for that backlog. A message the inbox drops is
never acknowledged on this connection: the broker sends it again on the next one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_sdk.broker_connection import PROTOCOLS
from edge_sdk.errors import BrokerUnreachableError, ConfigError, TransportError

__all__ = [
    "DEFAULT_INBOX_MAX",
    "DEFAULT_INBOX_MAX_BYTES",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_PORTS",
    "MAX_SESSION_EXPIRY_S",
    "PROTOCOLS",
    "BrokerAddress",
    "ConnectAttempts",
    "ConnectionChange",
    "InboxSink",
    "Incoming",
    "LinkFacts",
    "MqttClient",
    "MqttOptions",
    "PublishHandle",
    "Will",
    "parse_broker_url",
    "publish_packet_size",
    "take_waiting",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Default bound of a client's inbox, in messages (see :attr:`MqttOptions.inbox_max`).
DEFAULT_INBOX_MAX = 1000
#: Default bound of a client's inbox, in payload bytes (see :attr:`MqttOptions.inbox_max_bytes`).
DEFAULT_INBOX_MAX_BYTES = 256 << 20

#: Default cap on QoS>0 publishes in flight (awaiting PUBACK), before the broker's Receive Maximum.
DEFAULT_MAX_INFLIGHT = 20
#: Largest MQTT 5 Session Expiry Interval (four bytes; the broker reads it as "never expires").
MAX_SESSION_EXPIRY_S = 2**32 - 1
#: Largest Receive Maximum MQTT 5 can say (two bytes), and the largest in-flight cap.
_MAX_RECEIVE_MAXIMUM = 65535
#: MQTT 5 reason code "Unsupported Protocol Version" (paho maps a 3.1.1 broker's return code 1 to it).
_UNSUPPORTED_PROTOCOL_VERSION = 132

#: Places in the inbox above ``inbox_max`` that only connection changes may take.
_CONNECTION_RESERVE = 16

#: After the first drop, one warning per this many drops (a flood must not flood the log).
_DROP_LOG_EVERY = 100

#: Once the reconnect delay has stopped growing, one INFO line per this many failed attempts.
_ATTEMPT_LOG_EVERY = 10

_TLS_FILES = ("ca_file", "cert_file", "key_file")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


#: The port a broker URL without one means: MQTT's registered ports, by whether it is TLS.
DEFAULT_PORTS = {False: 1883, True: 8883}


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:port]`` or ``mqtts://host[:port]``.

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} has a bad port") from exc
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or DEFAULT_PORTS[tls], tls)


def _remaining_length_bytes(n: int) -> int:
    """Bytes of MQTT's variable-length "remaining length" field for ``n``."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def _publish_header(topic: str, qos: int, protocol: str) -> int:
    """Bytes of a PUBLISH's variable header: topic, packet identifier (QoS>0), properties length (MQTT 5)."""
    if protocol not in ("5", "3.1.1"):
        raise ConfigError(f"MQTT protocol must be '5' or '3.1.1' here, not {protocol!r}")
    if qos not in (0, 1, 2):
        raise ConfigError(f"QoS must be 0, 1 or 2, not {qos!r}")
    return 2 + len(topic.encode()) + (2 if qos else 0) + (1 if protocol == "5" else 0)


def publish_packet_size(topic: str, payload_bytes: int, qos: int, protocol: str) -> int:
    """Bytes on the wire of a PUBLISH packet, as a broker's Maximum Packet Size counts them.

    Args:
        topic: the topic name (its UTF-8 bytes count).
        payload_bytes: the payload's length.
        qos: 0, 1 or 2 (QoS>0 adds a packet identifier).
        protocol: ``"5"`` (adds a properties length; this client sends no properties) or ``"3.1.1"``.

    Returns:
        Fixed header, variable header and payload together.

    Raises:
        ConfigError: a protocol other than ``"5"`` or ``"3.1.1"``, a QoS outside 0-2, or a
            negative payload length.
    """
    if payload_bytes < 0:
        raise ConfigError(f"a payload length cannot be negative ({payload_bytes})")
    remaining = _publish_header(topic, qos, protocol) + payload_bytes
    return 1 + _remaining_length_bytes(remaining) + remaining


@dataclass(frozen=True)
class LinkFacts:
    """What the broker said about this connection in its CONNACK.

    Attributes:
        protocol: the protocol the broker accepted, ``"5"`` or ``"3.1.1"``.
        receive_maximum: most QoS>0 publishes the broker takes in flight from this client
            (MQTT 5; None where it said nothing, which means 65,535, and always under 3.1.1).
        maximum_packet_size: largest packet the broker accepts, in bytes (MQTT 5; None: no
            limit said).
        session_present: the broker kept a session for this client id, with its
            subscriptions and the QoS 1 messages queued while the client was away.

    Raises:
        ConfigError: another protocol, or a bound that is not positive.
    """

    protocol: str
    receive_maximum: int | None
    maximum_packet_size: int | None
    session_present: bool

    def __post_init__(self) -> None:
        if self.protocol not in ("5", "3.1.1"):
            raise ConfigError(f"a link's protocol is '5' or '3.1.1', not {self.protocol!r}")
        for key in ("receive_maximum", "maximum_packet_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"a link's {key} must be a positive integer or None, not {value!r}", key=key)

    def largest_payload(self, topic: str, qos: int = 1) -> int | None:
        """The largest payload one PUBLISH on ``topic`` may carry on this link.

        Args:
            topic: the topic it goes to.
            qos: its QoS.

        Returns:
            Bytes, or None where the broker set no Maximum Packet Size (0 where even an
            empty payload does not fit).
        """
        if self.maximum_packet_size is None:
            return None
        header = _publish_header(topic, qos, self.protocol)
        best = 0
        for width in range(1, 5):  # the remaining length takes 1 to 4 bytes; a shorter one only helps
            remaining = min(self.maximum_packet_size - 1 - width, 128**width - 1)
            best = max(best, remaining - header)
        return best


def _link_facts(mqtt5: bool, flags: paho.ConnectFlags, properties: Properties | None) -> LinkFacts:
    """Convert a CONNACK's flags and properties; a bound the broker got wrong (0) counts as unsaid."""

    def positive(name: str) -> int | None:
        value = getattr(properties, name, None) if mqtt5 else None
        return value if isinstance(value, int) and value > 0 else None

    return LinkFacts(
        "5" if mqtt5 else "3.1.1",
        positive("ReceiveMaximum"),
        positive("MaximumPacketSize"),
        bool(flags.session_present),
    )


class ConnectAttempts:
    """Counts connection attempts and mirrors paho's backoff, so each failure can name the next delay.

    Pure bookkeeping, no clock: paho waits ``min_s`` after the first failure (or after a lost
    connection), doubles the wait after each further failure up to ``max_s``, and starts
    over once the broker accepts a connection.

    Args:
        min_s, max_s: the bounds of the reconnect delay, in whole seconds as paho uses them.
    """

    def __init__(self, min_s: int, max_s: int) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0  # attempts since the last accepted connection
        self._waits = 0  # waits paho has made or is about to make since then

    def next_attempt(self) -> int:
        """A connection attempt starts.

        Returns:
            Its number since the last accepted connection, from 1.
        """
        self.attempt += 1
        return self.attempt

    def failed(self) -> tuple[float, bool]:
        """The attempt failed; paho waits before the next one.

        Returns:
            The delay before the next attempt, in seconds, and whether this failure is
            worth an INFO line (the first, each time the delay grows, every tenth after).
        """
        before = self._delay(self._waits) if self._waits else 0
        self._waits += 1
        delay = self._delay(self._waits)
        loud = self._waits == 1 or delay > before or self._waits % _ATTEMPT_LOG_EVERY == 0
        return delay, loud

    def lost(self) -> float:
        """An accepted connection was lost.

        Returns:
            The delay before paho's first attempt to reconnect, in seconds.
        """
        self.attempt = 0
        self._waits = 1
        return self._delay(1)

    def connected(self) -> int:
        """The broker accepted a connection.

        Returns:
            How many attempts it took.
        """
        attempts, self.attempt, self._waits = self.attempt, 0, 0
        return attempts

    def _delay(self, waits: int) -> int:
        return min(self.min_s << min(waits - 1, 32), self.max_s)


def _check_tls_files(options: MqttOptions) -> None:
    """Name a TLS file that is missing or unreadable, with its key, before any connection.

    Raises:
        ConfigError: a TLS file given in ``options`` cannot be read.
    """
    for key in _TLS_FILES:
        path = getattr(options, key)
        if path is None:
            continue
        if not Path(path).is_file():
            what = "is not a file" if Path(path).exists() else "does not exist"
            raise ConfigError(f"TLS {key} {path} {what}", key=key, path=str(path))
        if not os.access(path, os.R_OK):
            raise ConfigError(f"TLS {key} {path} is not readable by this user", key=key, path=str(path))


class _Paho(paho.Client):
    """paho's client, keeping the cause of the last failed connection attempt (paho drops it).

    It also does what paho has no public way to do, reaching private attributes of paho 2:
    give up on a connection whose CONNACK does not come within ``connack_timeout_s`` (paho
    waits a whole keep-alive; a broker that cannot parse the CONNECT may say nothing at
    all), switch an unconnected client to MQTT 3.1.1, lower the cap on publishes in
    flight once the broker's CONNACK has named its Receive Maximum, and decode an incoming
    PUBLISH with one copy of its payload (:meth:`_handle_publish`).
    """

    connect_error: OSError | None = None
    connack_timeout_s: float = 10.0
    _connack_due: float | None = None  # monotonic time; set once a CONNECT went out, cleared by the CONNACK

    def reconnect(self) -> MQTTErrorCode:
        self._connack_due = None
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.connect_error = exc
            raise
        self._connack_due = time.monotonic() + self.connack_timeout_s
        return rc

    def connack_arrived(self) -> None:
        self._connack_due = None

    def loop_misc(self) -> MQTTErrorCode:
        due = self._connack_due
        if due is not None and self._sock is not None and time.monotonic() > due:
            # As paho's own keep-alive timeout does: close, tell on_disconnect, let the loop reconnect.
            self._connack_due = None
            self._sock_close()
            self._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_KEEPALIVE)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return super().loop_misc()

    @property
    def speaks_mqtt5(self) -> bool:
        return self.protocol == paho.MQTTv5

    def use_mqtt311(self, clean_session: bool) -> None:
        """Speak MQTT 3.1.1 from the next connection attempt on (called between attempts)."""
        self._protocol = paho.MQTTv311
        self._clean_session = clean_session
        self._clean_start = paho.MQTT_CLEAN_START_FIRST_ONLY
        self._connect_properties = None

    def cap_inflight(self, cap: int) -> None:
        """Set the in-flight cap on a live connection (paho's setter refuses; the cap only gates later sends)."""
        self._max_inflight_messages = cap

    def _handle_publish(self) -> MQTTErrorCode:
        """An incoming QoS 0 or 1 PUBLISH, as paho 2 handles it, decoded for less CPU; QoS 2 goes to paho's.

        paho's decoder copies the payload once for each field it splits off (four times
        for MQTT 5, as its property parser slices the rest of the packet too) and builds a
        :class:`Properties` (a table of every property name) for each message, even one
        that carries none. For a 64 KiB chunk that was most of the receiving thread's CPU
        beyond a raw MQTT 3.1.1 subscriber. Here the payload is copied once, straight into
        the ``bytes`` the callback gets, and properties are parsed only when the message
        has some (``message.properties`` is None otherwise, as for MQTT 3.1.1; this
        module reads no property of an incoming message). What paho does next is
        unchanged: the same log line, the callback, then PUBACK unless acks are manual.
        """
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if qos == 2:
            return super()._handle_publish()
        with memoryview(self._in_packet["packet"]) as view:
            topic, mid, properties, payload = _decode_publish(view, qos, self._protocol == paho.MQTTv5)
        message = paho.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = properties
        message.payload = payload
        self._easy_log(
            paho.MQTT_LOG_DEBUG,
            "Received PUBLISH (d%d, q%d, r%d, m%d), %r, properties=%s, ...  (%d bytes)",
            message.dup,
            qos,
            message.retain,
            mid,
            topic,
            properties,
            len(payload),
        )
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)


def _decode_publish(view: memoryview, qos: int, mqtt5: bool) -> tuple[bytes, int, Properties | None, bytes]:
    """(topic, packet id, properties or None, payload) of a PUBLISH's variable header and payload.

    Raises:
        MalformedPacket: the lengths inside overrun the packet, or an MQTT 3.1.1 topic is
            empty (paho turns it into a protocol error and drops the connection).
    """
    size = len(view)
    if size < 2:
        raise MalformedPacket("PUBLISH shorter than its topic length")
    at = 2 + int.from_bytes(view[0:2], "big")
    if at > size:
        raise MalformedPacket("PUBLISH topic overruns the packet")
    topic = view[2:at].tobytes()
    if not mqtt5 and not topic:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    mid = 0
    if qos:
        if at + 2 > size:
            raise MalformedPacket("PUBLISH packet identifier overruns the packet")
        mid = int.from_bytes(view[at : at + 2], "big")
        at += 2
    properties = None
    if mqtt5:
        length, shift, start = 0, 0, at
        while True:  # the properties' length: a variable byte integer of at most 4 bytes
            if at >= size or at - start == 4:
                raise MalformedPacket("PUBLISH properties length is malformed")
            byte = view[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if at + length > size:
            raise MalformedPacket("PUBLISH properties overrun the packet")
        if length:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.unpack(view[start : at + length].tobytes())  # type: ignore[no-untyped-call]
            at += length
    return topic, mid, properties, view[at:].tobytes()


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker when this client vanishes without a goodbye."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttOptions:
    """How to connect. Timeouts are on by default.

    Attributes:
        inbox_max: most received messages waiting in :attr:`MqttClient.inbox`; more are
            dropped (and counted) until the owner catches up.
        inbox_max_bytes: most payload bytes waiting in the inbox, whatever their count; with
            ``inbox_max`` it bounds the memory a flood can take.
        protocol: ``"5"``, ``"3.1.1"``, or ``"auto"``: MQTT 5, falling back to 3.1.1 for
            good when the broker does not speak it (see the module's docstring).
        session_expiry_s: 0 for a clean session on every connect; above 0 the broker
            keeps this client's session (subscriptions, queued QoS 1 messages) that many
            seconds after it goes away. Needs a stable ``client_id``.
        max_inflight: most QoS>0 publishes awaiting their acknowledgement; lowered to the
            broker's Receive Maximum where it names a smaller one.
        connack_timeout_s: how long after sending CONNECT to wait for the broker's CONNACK
            before the attempt counts as failed (and, under ``"auto"``, MQTT 5 as refused):
            a broker that cannot parse an MQTT 5 CONNECT may wait for bytes that never come.
        manual_ack: acknowledge QoS>0 messages only when the owner calls
            :meth:`MqttClient.ack` (see the module's docstring); needs ``receive_maximum``.
        receive_maximum: most unacknowledged QoS>0 messages the broker may send this client
            at once (MQTT 5 Receive Maximum); at most ``inbox_max``. None: not said (65,535).

    Raises:
        ConfigError: a bound that is not positive, an unknown protocol, a session
            expiry outside 0..2**32-1, or ``manual_ack`` without a ``receive_maximum``
            that the inbox can hold.
    """

    client_id: str
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    will: Will | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed
    inbox_max: int = DEFAULT_INBOX_MAX
    inbox_max_bytes: int = DEFAULT_INBOX_MAX_BYTES
    protocol: str = "auto"
    session_expiry_s: int = 0
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    connack_timeout_s: float = 10.0
    manual_ack: bool = False
    receive_maximum: int | None = None

    def __post_init__(self) -> None:
        if self.inbox_max < 1:
            raise ConfigError(f"the inbox bound must be at least 1 message, not {self.inbox_max}")
        if self.inbox_max_bytes < 1:
            raise ConfigError(f"the inbox byte bound must be at least 1 byte, not {self.inbox_max_bytes}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}", key="protocol"
            )
        if not _is_int_within(self.session_expiry_s, 0, MAX_SESSION_EXPIRY_S):
            raise ConfigError(
                f"session_expiry_s must be an integer of seconds in 0..{MAX_SESSION_EXPIRY_S}, "
                f"not {self.session_expiry_s!r}",
                key="session_expiry_s",
            )
        if self.session_expiry_s and not self.client_id:
            raise ConfigError("a session that outlives the connection (session_expiry_s > 0) needs a client_id")
        if not _is_int_within(self.max_inflight, 1, _MAX_RECEIVE_MAXIMUM):
            raise ConfigError(
                f"max_inflight must be an integer in 1..{_MAX_RECEIVE_MAXIMUM}, not {self.max_inflight!r}",
                key="max_inflight",
            )
        timeout: object = self.connack_timeout_s
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ConfigError(
                f"connack_timeout_s must be a positive number of seconds, not {self.connack_timeout_s!r}",
                key="connack_timeout_s",
            )
        if self.receive_maximum is not None and not _is_int_within(
            self.receive_maximum, 1, min(_MAX_RECEIVE_MAXIMUM, self.inbox_max)
        ):
            raise ConfigError(
                f"receive_maximum must be an integer in 1..{min(_MAX_RECEIVE_MAXIMUM, self.inbox_max)} "
                f"(at most inbox_max), not {self.receive_maximum!r}",
                key="receive_maximum",
            )
        if self.manual_ack and self.receive_maximum is None:
            raise ConfigError(
                "manual_ack needs a receive_maximum (at most inbox_max), so the inbox never drops "
                "a message it would then never acknowledge",
                key="receive_maximum",
            )


def _is_int_within(value: object, low: int, high: int) -> bool:
    """True for an integer (not a bool) in ``low..high``; options may come from config files."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class Incoming:
    """A message received from the broker, as an own type.

    Attributes:
        topic: where it was published.
        payload: its bytes.
        retain: whether the broker sent it as the topic's retained message.
        qos: the QoS it was delivered with.
        mid: its packet id on this connection (for :meth:`MqttClient.ack`; 0 at QoS 0).
        link_epoch: the number of the connection it came on, from 1.
    """

    topic: str
    payload: bytes
    retain: bool
    qos: int = 0
    mid: int = 0
    link_epoch: int = 0


@dataclass(frozen=True)
class ConnectionChange:
    """The connection came up or went down.

    Attributes:
        connected: whether the client is now connected.
        reason: why, in words.
        link: on connecting, what the broker said in its CONNACK; else None.
    """

    connected: bool
    reason: str
    link: LinkFacts | None = None


class InboxSink(Protocol):
    """Where the network thread hands what arrives instead of the inbox (see :meth:`MqttClient.deliver_to`)."""

    def put(self, item: Incoming | ConnectionChange) -> bool:
        """Take ``item`` without blocking; False when it was dropped (the sink bounds and counts its drops)."""
        ...


class _Inbox(queue.Queue[Incoming | ConnectionChange]):
    """A :class:`queue.Queue` that also knows how many payload bytes it holds."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.payload_bytes = 0

    def _put(self, item: Incoming | ConnectionChange) -> None:  # called under the queue's lock
        super()._put(item)
        if isinstance(item, Incoming):
            self.payload_bytes += len(item.payload)

    def _get(self) -> Incoming | ConnectionChange:  # called under the queue's lock
        item = super()._get()
        if isinstance(item, Incoming):
            self.payload_bytes -= len(item.payload)
        return item


def take_waiting(inbox: queue.Queue[_T], max_items: int, timeout: float) -> list[_T]:
    """Up to ``max_items`` items from ``inbox`` in one go, oldest first, under one lock.

    Waits up to ``timeout`` seconds for the first item (``0``: does not wait); then takes
    what is waiting, at most ``max_items``, without waiting for more. For a consumer that
    works in batches (a collector), where a ``get`` per message costs a lock and a wake-up
    each. Uses the queue's own condition variables and its ``_qsize``/``_get`` hooks, so a
    subclass's bookkeeping (:class:`_Inbox` counts payload bytes) stays right.

    Returns:
        The items; empty if none came within ``timeout``.
    """
    with inbox.not_empty:
        # _qsize and _get: the hooks queue.Queue gives subclasses
        if not inbox._qsize() and (timeout <= 0 or not inbox.not_empty.wait_for(inbox._qsize, timeout)):
            return []
        items = [inbox._get() for _ in range(min(max_items, inbox._qsize()))]
        inbox.not_full.notify(len(items))
        return items


class PublishHandle:
    """A QoS>0 publish in flight; :meth:`wait` blocks until the broker acknowledged it."""

    def __init__(self, info: paho.MQTTMessageInfo, topic: str, timeout_s: float) -> None:
        self._info = info
        self._topic = topic
        self._timeout_s = timeout_s

    def wait(self, timeout_s: float | None = None) -> None:
        """Raises TransportError if not acknowledged in time or the connection dropped."""
        try:
            self._info.wait_for_publish(self._timeout_s if timeout_s is None else timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {self._topic} failed: {exc}") from exc
        if not self._info.is_published():
            raise TransportError(f"publish to {self._topic} was not acknowledged in time")


class MqttClient:
    """A small, owned wrapper around a paho client.

    Attributes:
        inbox: what the network thread received, in order; bounded (see :class:`MqttOptions`).
        inbox_dropped: messages dropped because the inbox was full.
        rejected: messages dropped because they could not be converted (a topic that is
            not valid UTF-8).
        callback_errors: failures caught inside paho's callbacks (the message, if any, dropped).
        link: what the broker said in the CONNACK of the current or last connection
            (:class:`LinkFacts`); None before the first.

    Args:
        url: broker URL.
        options: identity, timeouts, will, TLS, inbox bound.
    """

    def __init__(self, url: str, options: MqttOptions) -> None:
        self.address = parse_broker_url(url)
        self.options = options
        self.inbox: _Inbox = _Inbox(options.inbox_max + _CONNECTION_RESERVE)
        self.inbox_dropped = 0
        self.rejected = 0
        self.callback_errors = 0
        self._connected = threading.Event()
        self._filters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last_error = "no answer"
        self._started = False
        self._link: LinkFacts | None = None
        self._awaiting_connack = False  # a connection attempt has begun and no CONNACK came yet
        self._mqtt5_accepted = False  # a broker once accepted MQTT 5 from this client: never fall back
        self._epoch = 0  # accepted connections so far; messages carry the one they came on
        self._forgotten: set[str] = set()  # unsubscribed while offline, still in the broker's session
        self._sink: InboxSink | None = None
        min_delay, max_delay = max(1, int(options.reconnect_min_s)), max(1, int(options.reconnect_max_s))
        self._attempts = ConnectAttempts(min_delay, max_delay)
        mqtt5 = options.protocol != "3.1.1"
        c = _Paho(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311,
            clean_session=None if mqtt5 else options.session_expiry_s == 0,
            manual_ack=options.manual_ack,
        )
        c.reconnect_delay_set(min_delay=min_delay, max_delay=max_delay)
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(options.max_inflight)
        c.connack_timeout_s = options.connack_timeout_s
        c.suppress_exceptions = True  # a second net under our own guards: paho logs and goes on
        if options.will is not None:
            c.will_set(options.will.topic, options.will.payload, options.will.qos, options.will.retain)
        if options.username is not None:
            c.username_pw_set(options.username, options.password)
        if self.address.tls:
            _check_tls_files(options)
            try:
                c.tls_set(
                    ca_certs=str(options.ca_file) if options.ca_file else None,
                    certfile=str(options.cert_file) if options.cert_file else None,
                    keyfile=str(options.key_file) if options.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"TLS setup for {self.address} failed: {exc}") from exc
        else:
            unused = [key for key in _TLS_FILES if getattr(options, key) is not None]
            if unused:
                log.warning("%s is not mqtts://: %s not used", self.address, ", ".join(unused))
        c.on_pre_connect = self._on_pre_connect
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c

    # --- network thread: convert and hand over, nothing else -------------------------

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self._awaiting_connack = True
        attempt = self._attempts.next_attempt()
        log.debug(
            "connecting to %s as %s with MQTT %s (attempt %d)",
            self.address,
            self.options.client_id,
            "5" if self._client.speaks_mqtt5 else "3.1.1",
            attempt,
        )

    def _attempt_failed(self, cause: str) -> None:
        delay, loud = self._attempts.failed()
        self._last_error = cause
        log.log(
            logging.INFO if loud else logging.DEBUG,
            "cannot connect to %s (attempt %d): %s; next attempt in %g s",
            self.address,
            self._attempts.attempt,
            cause,
            delay,
        )

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            self._awaiting_connack = False
            self._client.connack_arrived()
            if reason_code.is_failure:
                cause = f"broker refused the connection: {reason_code}"
                self._attempt_failed(cause)
                if reason_code.value == _UNSUPPORTED_PROTOCOL_VERSION:
                    self._fall_back(cause)
                return
            attempts = self._attempts.connected()
            self._epoch += 1
            mqtt5 = self._client.speaks_mqtt5
            link = _link_facts(mqtt5, flags, properties)
            self._mqtt5_accepted = self._mqtt5_accepted or mqtt5
            self._link = link
            if link.receive_maximum is not None:
                self._client.cap_inflight(min(self.options.max_inflight, link.receive_maximum))
            log.debug("connected to %s (attempt %d): %s", self.address, attempts, link)
            with self._lock:
                filters = list(self._filters.items())
                forgotten, self._forgotten = self._forgotten, set()
            if link.session_present:  # the broker still holds what was unsubscribed while away
                for topic_filter in sorted(forgotten):
                    client.unsubscribe(topic_filter)
            for topic_filter, qos in filters:
                client.subscribe(topic_filter, qos)
            self._connected.set()
            self._hand_over(ConnectionChange(True, "connected", link))
        except Exception as exc:  # nothing may end the network thread
            self._survive("on_connect", exc)

    def _fall_back(self, cause: str) -> None:
        """Under ``protocol="auto"``, speak MQTT 3.1.1 from the next attempt on; say so once."""
        if self.options.protocol != "auto" or self._mqtt5_accepted or not self._client.speaks_mqtt5:
            return
        self._client.use_mqtt311(clean_session=self.options.session_expiry_s == 0)
        log.info("%s does not speak MQTT 5 (%s): using MQTT 3.1.1 from now on", self.address, cause)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        try:
            self._awaiting_connack = False
            exc = self._client.connect_error
            self._attempt_failed(f"connection failed: {exc}" if exc is not None else "connection failed")
        except Exception as error:  # nothing may end the network thread
            self._survive("on_connect_fail", error)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            if was_connected:
                self._last_error = f"disconnected: {reason_code}"
                if self._started:  # not close(): paho will reconnect
                    log.debug("lost %s (%s); next attempt in %g s", self.address, reason_code, self._attempts.lost())
                self._hand_over(ConnectionChange(False, str(reason_code)))
            elif self._started and self._awaiting_connack:  # the socket opened, the CONNACK never came
                self._awaiting_connack = False
                cause = f"the connection ended before the broker's CONNACK ({reason_code})"
                self._attempt_failed(cause)
                self._fall_back(cause)
        except Exception as exc:  # nothing may end the network thread
            self._survive("on_disconnect", exc)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                self.rejected += 1  # only the network thread writes it
                if self.rejected % _DROP_LOG_EVERY == 1:
                    log.warning("dropped a message whose topic is not valid UTF-8; %d so far", self.rejected)
                return
            self._hand_over(Incoming(topic, bytes(msg.payload), bool(msg.retain), msg.qos, msg.mid, self._epoch))
        except Exception as exc:  # MemoryError included: nothing may end the network thread
            self._survive("on_message", exc)

    def _survive(self, where: str, exc: Exception) -> None:
        """Count and log a failure inside a callback; never raise (not even MemoryError)."""
        self.callback_errors += 1
        with contextlib.suppress(Exception):  # logging itself can fail under MemoryError
            log.error(
                "%s of %s failed (%d so far): %s: %s",
                where,
                self.options.client_id,
                self.callback_errors,
                type(exc).__name__,
                exc,
            )

    def _hand_over(self, item: Incoming | ConnectionChange) -> None:
        """Put ``item`` on the inbox (or the sink) without ever blocking; count and log it if there is no room."""
        if self._sink is not None:
            self._sink.put(item)  # the sink counts and logs what it drops
            return
        if isinstance(item, Incoming) and (
            self.inbox.qsize() >= self.options.inbox_max
            or self.inbox.payload_bytes + len(item.payload) > self.options.inbox_max_bytes
        ):
            self._drop(item)
            return
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self._drop(item)

    def _drop(self, item: Incoming | ConnectionChange) -> None:
        self.inbox_dropped += 1  # only the network thread writes it
        if self.inbox_dropped % _DROP_LOG_EVERY == 1:
            what = item.topic if isinstance(item, Incoming) else "a connection change"
            log.warning(
                "inbox of %s full (%d waiting): dropped %s; %d dropped so far",
                self.options.client_id,
                self.inbox.qsize(),
                what,
                self.inbox_dropped,
            )

    # --- owner's side ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def link(self) -> LinkFacts | None:
        """What the broker said in the CONNACK of the current or last connection; None before the first."""
        return self._link

    @property
    def network_alive(self) -> bool:
        """False once the network thread, started by :meth:`start`, has ended without :meth:`close`.

        Before :meth:`start` (nothing to watch yet) it is True.
        """
        if not self._started:
            return True
        thread = self._client._thread  # paho keeps its loop_start thread here; no public accessor
        return thread is not None and thread.is_alive()

    def deliver_to(self, sink: InboxSink) -> None:
        """Hand every message and connection change to ``sink`` instead of :attr:`inbox`.

        The network thread calls ``sink.put`` for each, so ``put`` must never block; the
        sink bounds what it holds and counts what it drops. Call it before :meth:`start`.

        Raises:
            ConfigError: the client has started already (items may be in the inbox).
        """
        if self._started:
            raise ConfigError("deliver_to() must be called before the client starts")
        self._sink = sink

    def start(self) -> None:
        """Connect in the background and keep reconnecting with backoff, forever."""
        if self._started:
            return
        self._started = True
        try:
            if self._client.speaks_mqtt5:
                expiry = self.options.session_expiry_s
                properties: Properties | None = None
                if expiry or self.options.receive_maximum is not None:
                    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    if expiry:
                        properties.SessionExpiryInterval = expiry
                    if self.options.receive_maximum is not None:
                        properties.ReceiveMaximum = self.options.receive_maximum
                self._client.connect_async(
                    self.address.host,
                    self.address.port,
                    self.options.keepalive_s,
                    clean_start=expiry == 0,
                    properties=properties,
                )
            else:
                self._client.connect_async(self.address.host, self.address.port, self.options.keepalive_s)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot connect to {self.address}: {exc}") from exc
        self._client.loop_start()

    def connect(self, timeout_s: float | None = None) -> None:
        """Connect and wait until the broker accepted us.

        Raises:
            BrokerUnreachableError: no accepted connection within the timeout.
        """
        timeout = self.options.connect_timeout_s if timeout_s is None else timeout_s
        self.start()
        if not self._connected.wait(timeout):
            self.close()
            raise BrokerUnreachableError(
                f"cannot reach MQTT broker at {self.address} within {timeout:g} s ({self._last_error})",
                broker=str(self.address),
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        with self._lock:
            self._filters[topic_filter] = qos
            self._forgotten.discard(topic_filter)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter``: now (if connected), and it is not renewed on reconnects.

        With a session that outlives the connection (``session_expiry_s`` > 0), a filter
        dropped while offline is unsubscribed on the next connection that finds the
        session still there. A filter never subscribed is harmless (the broker says so).

        Args:
            topic_filter: exactly as given to :meth:`subscribe`.
        """
        with self._lock:
            self._filters.pop(topic_filter, None)
        sent = False
        if self._connected.is_set():
            rc, _mid = self._client.unsubscribe(topic_filter)
            sent = rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        if not sent and self.options.session_expiry_s:
            with self._lock:
                if topic_filter not in self._filters:  # not subscribed again meanwhile
                    self._forgotten.add(topic_filter)

    def ack(self, message: Incoming) -> bool:
        """Acknowledge ``message`` now that its owner has it safe (``MqttOptions.manual_ack``).

        Acknowledge in the order messages arrived. Without ``manual_ack``, or at QoS 0,
        paho has already done it (or there is nothing to do).

        Args:
            message: a message from :attr:`inbox`.

        Returns:
            True if an acknowledgement went out (or none was needed); False if the message
            came on an earlier connection or the client is not connected now: the broker
            sends it again on the next connection of the session.
        """
        if not self.options.manual_ack or message.qos == 0:
            return True
        if message.link_epoch != self._epoch or not self._connected.is_set():
            return False
        rc = self._client.ack(message.mid, message.qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Queue a publish; call ``.wait()`` on the result to block until acknowledged.

        Raises:
            TransportError: the payload was refused locally: larger than the broker's
                Maximum Packet Size (both sizes named), or refused by paho.
        """
        link = self._link
        if link is not None and link.maximum_packet_size is not None:
            size = publish_packet_size(topic, len(payload), qos, link.protocol)
            if size > link.maximum_packet_size:
                raise TransportError(
                    f"cannot publish to {topic}: the packet would be {size} bytes ({len(payload)} of payload), "
                    f"larger than the broker's Maximum Packet Size of {link.maximum_packet_size} bytes",
                    topic=topic,
                    packet_bytes=size,
                    maximum_packet_size=link.maximum_packet_size,
                )
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, OSError) as exc:
            raise TransportError(f"cannot publish to {topic}: {exc}") from exc
        return PublishHandle(info, topic, self.options.publish_timeout_s)

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and block until the broker acknowledged it (QoS>0) or the timeout."""
        self.publish(topic, payload, qos, retain).wait()

    def close(self) -> None:
        """Disconnect cleanly (no will is sent) and stop the network thread."""
        if not self._started:
            return
        self._started = False
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._connected.clear()
