"""Pacing primitives for transfers: a rate read from the operator's words, and a token bucket.

Both are pure. :func:`parse_rate` turns ``"200KB/s"`` into bytes per second;
:class:`TokenBucket` says how long to wait before sending so many bytes, given the time
now, and never sleeps or reads a clock itself: the delivery loop passes ``now`` (a
monotonic clock in production, a fake one in tests) and does the waiting.

A bucket holds up to ``burst_bytes`` tokens and fills at ``rate_bytes_per_s``. A send of
more bytes than the burst is allowed once the bucket is full and leaves it in debt, which
later refills repay first: the long-run rate holds whatever the chunk size, and a chunk
is never refused for being larger than the burst.
"""

from __future__ import annotations

import math
import re

from edge_sdk.errors import ConfigError

__all__ = ["RATE_UNITS", "TokenBucket", "parse_rate"]

#: Units :func:`parse_rate` accepts, in bytes: decimal K and M (1000), binary Ki and Mi (1024).
RATE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "kB": 1000,
    "MB": 1000**2,
    "KiB": 1024,
    "MiB": 1024**2,
}

_RATE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]+)/s")
#: Longest rate text read (a rate, not a document).
_MAX_RATE_TEXT = 64


def parse_rate(text: str) -> float:
    """Read a transfer rate such as ``200KB/s``, ``1.5MiB/s`` or ``50000B/s``.

    Args:
        text: a positive number, an optional space, a unit of :data:`RATE_UNITS`, and ``/s``.
            ``KB`` and ``MB`` are decimal (1000), ``KiB`` and ``MiB`` binary (1024); bits
            (``Kb``, ``kbit``) are refused rather than guessed at.

    Returns:
        Bytes per second.

    Raises:
        ConfigError: anything else (no unit, an unknown unit, zero, a negative number),
            naming the text.
    """
    shown = text if len(text) <= _MAX_RATE_TEXT else text[:_MAX_RATE_TEXT] + "..."
    wanted = "a rate such as 200KB/s, 1.5MiB/s or 50000B/s (units B, KB, MB, KiB, MiB per second)"
    match = _RATE.fullmatch(text.strip()) if len(text) <= _MAX_RATE_TEXT else None
    if match is None:
        hint = " (a rate cannot be negative)" if text.strip().startswith("-") else ""
        raise ConfigError(f"rate {shown!r} is not {wanted}{hint}", rate=shown)
    unit = match["unit"]
    if unit not in RATE_UNITS:
        bits = " (bits are not accepted: give bytes, e.g. KB/s)" if unit.endswith(("b", "bit")) else ""
        raise ConfigError(f"rate {shown!r} has an unknown unit {unit!r}: it must be {wanted}{bits}", rate=shown)
    rate = float(match["number"]) * RATE_UNITS[unit]
    if not rate > 0 or not math.isfinite(rate):
        raise ConfigError(f"rate {shown!r} must be more than zero bytes per second", rate=shown)
    return rate


class TokenBucket:
    """A rate cap: at most ``burst_bytes`` at once, ``rate_bytes_per_s`` on average.

    The bucket starts full. Ask :meth:`delay` how long to wait before sending, wait that
    long, then :meth:`spend` what was sent. Times are seconds on one monotonic clock; a
    time earlier than the last one seen counts as no time passed.

    Args:
        rate_bytes_per_s: the average rate, bytes per second (e.g. from :func:`parse_rate`).
        burst_bytes: the most bytes sent back to back after an idle spell.

    Raises:
        ConfigError: a rate or burst that is not a positive, finite number.
    """

    __slots__ = ("_last", "_tokens", "burst_bytes", "rate_bytes_per_s")

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float) -> None:
        for name, value in (("rate_bytes_per_s", rate_bytes_per_s), ("burst_bytes", burst_bytes)):
            if not _positive_finite(value):
                raise ConfigError(f"token bucket {name} must be a positive finite number, not {value!r}", key=name)
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes = float(burst_bytes)
        self._tokens = self.burst_bytes
        self._last: float | None = None

    def tokens(self, now: float) -> float:
        """Bytes that may go now without waiting (negative while in debt).

        Args:
            now: the time now, in seconds.
        """
        self._refill(now)
        return self._tokens

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds to wait before sending ``nbytes``; 0 when they may go now.

        More than the burst waits for a full bucket (see the module's docstring).

        Args:
            nbytes: the size of the next send.
            now: the time now, in seconds.

        Returns:
            The wait, in seconds (never negative).

        Raises:
            ConfigError: a negative size.
        """
        if nbytes < 0:
            raise ConfigError(f"cannot send a negative number of bytes ({nbytes})")
        self._refill(now)
        needed = min(float(nbytes), self.burst_bytes)
        return max(0.0, (needed - self._tokens) / self.rate_bytes_per_s)

    def spend(self, nbytes: int, now: float) -> None:
        """Count ``nbytes`` as sent at ``now`` (whether or not :meth:`delay` said to wait).

        Args:
            nbytes: the size sent.
            now: the time now, in seconds.

        Raises:
            ConfigError: a negative size.
        """
        if nbytes < 0:
            raise ConfigError(f"cannot send a negative number of bytes ({nbytes})")
        self._refill(now)
        self._tokens -= nbytes

    def _refill(self, now: float) -> None:
        if not math.isfinite(now):
            raise ConfigError(f"a token bucket's time must be a finite number of seconds, not {now!r}")
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._last) * self.rate_bytes_per_s)
        if self._last is None or now > self._last:
            self._last = now

    def __repr__(self) -> str:
        return f"TokenBucket({self.rate_bytes_per_s:g} B/s, burst {self.burst_bytes:g} B)"


def _positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
