"""What ``edgectl sim`` prints: the simulated fleet that runs, and which devices each fault hits."""

from __future__ import annotations

from typing import Any

__all__ = ["sim_text"]

_SHOWN = 8


def sim_text(data: dict[str, Any]) -> str:
    """The fleet's size, processes, runtime and faults, from :meth:`SimFleet.to_dict`.

    Returns:
        Lines without a trailing newline.
    """
    runtime = data["runtime"]
    lines = [
        f"{data['devices']} simulated devices in {len(data['processes'])} processes on {data['broker']}, "
        f"started in {data['started_in_s']:.1f} s (under {data['root']})",
        f"runtime: {runtime}"
        + (" (stand-in: latency is drawn from a distribution, not measured)" if data["simulated_latency"] else ""),
    ]
    every = data.get("metrics_every_s")
    lines.append(f"periodic metrics: every {every:g} s" if every else "periodic metrics: off (reports after installs)")
    if not data["faults"]:
        lines.append("faults: none")
    for kind, devices in data["faults"].items():
        shown = ", ".join(devices[:_SHOWN]) + (f" and {len(devices) - _SHOWN} more" if len(devices) > _SHOWN else "")
        lines.append(f"fault {kind}: {len(devices)} device(s): {shown}")
    lines.append("stop with Ctrl-C (every device says goodbye)")
    return "\n".join(lines)
