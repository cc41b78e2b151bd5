"""Whether a device is alive, judged at read time from what the registry stored. Pure.

A device says ``online`` in its birth message and ``offline`` in its goodbye or last will;
between the two it sends a heartbeat every ``heartbeat_s`` seconds (announced in its status
and in each heartbeat). A device whose last word was ``online`` but that has not been heard
from (status or heartbeat) within ``heartbeat_s x factor`` is ``stale``: it stopped without
its will reaching the broker, its link is down, or the broker that would publish its will is
gone. The registry stores times only; the state is computed here, with the caller's clock,
so it is never out of date.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_STALE_FACTOR", "LIVENESS_STATES", "LivenessState", "liveness"]

LivenessState = Literal["online", "stale", "offline"]
#: Every state :func:`liveness` returns.
LIVENESS_STATES: tuple[LivenessState, ...] = ("online", "stale", "offline")
#: How many heartbeat intervals may pass unheard before a device is stale.
DEFAULT_STALE_FACTOR = 3.0


def liveness(
    status: str,
    last_seen: float,
    last_heard: float | None,
    heartbeat_s: float | None,
    now: float,
    factor: float = DEFAULT_STALE_FACTOR,
) -> LivenessState:
    """A device's state now.

    Args:
        status: the last status recorded (``online`` or ``offline``).
        last_seen: unix seconds of that status.
        last_heard: unix seconds of its last heartbeat, if any.
        heartbeat_s: the heartbeat interval it announced; None or 0 for an agent that sends
            none (it is then ``online`` while its status says so, as before heartbeats).
        now: unix seconds now (the caller's clock).
        factor: intervals that may pass unheard.

    Returns:
        ``offline`` when its last word was offline (and no heartbeat came after it);
        ``stale`` when it was online but has not been heard from in time; else ``online``.

    Raises:
        ValueError: a factor that is not positive.
    """
    if not factor > 0:
        raise ValueError(f"stale factor must be positive, got {factor!r}")
    heard_after = last_heard is not None and last_heard > last_seen
    if status != "online" and not heard_after:
        return "offline"
    if not heartbeat_s:
        return "online"
    latest = max(last_seen, last_heard or last_seen)
    return "stale" if now - latest > heartbeat_s * factor else "online"
