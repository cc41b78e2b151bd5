"""What ``edgectl keys`` prints: the root of trust and the keys acting in each role."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from host_tools.keys import RootSummary

__all__ = ["root_text"]


def root_text(summary: RootSummary) -> str:
    """The root's version, expiry (UTC date) and file, then one line per role.

    Args:
        summary: the root as :meth:`host_tools.keys.KeyRing.summary` describes it.

    Returns:
        Lines without a trailing newline.
    """
    lines = [
        f"root v{summary.version}, expires {time.strftime('%Y-%m-%d', time.gmtime(summary.expires_at))} "
        f"-> {summary.root_path} (give this file to devices)"
    ]
    for role in summary.roles:
        keys_text = ", ".join(keyid + ("" if here else " (no private key here)") for keyid, here in role.keys)
        lines.append(f"  {role.name:<9} threshold {role.threshold}: {keys_text}")
    return "\n".join(lines)
