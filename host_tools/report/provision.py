"""What ``edgectl ca init`` and ``edgectl devices provision`` print: what was made and where it goes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from host_tools.provision import CaSummary, Provisioned

__all__ = ["ca_text", "provisioned_text"]


def ca_text(summary: CaSummary, operator: str) -> str:
    """The CA's fingerprint, expiry and files, and how edgectl and the broker use them.

    Args:
        summary: what ``init_ca`` made or found.
        operator: the operator identity's name (its files are ``NAME.pem``/``NAME.key``).

    Returns:
        Lines without a trailing newline.
    """
    d = summary.directory
    expires = time.strftime("%Y-%m-%d", time.gmtime(summary.expires_at))
    lines = [
        f"{'created' if summary.created else 'exists:'} fleet CA {summary.subject}, expires {expires}",
        f"  sha256 {summary.fingerprint}",
        *(f"  {p}" for p in summary.files),
        f"keep {d / 'ca.key'} private: whoever holds it can mint device and operator identities",
        f"broker: cafile {d / 'ca.pem'} (deploy/mosquitto/mosquitto.conf.example)"
        + (f", certfile {d / 'server.pem'}, keyfile {d / 'server.key'}" if (d / "server.pem") in summary.files else ""),
        f"edgectl: put in {d.parent / 'broker.toml'} (or pass --ca-file/--cert-file/--key-file):",
        f'  [tls]\n  ca_file = "{d / "ca.pem"}"\n  cert_file = "{d / f"{operator}.pem"}"\n'
        f'  key_file = "{d / f"{operator}.key"}"',
    ]
    return "\n".join(lines)


def provisioned_text(provisioned: Provisioned) -> str:
    """The files written for a device, and what to copy where on the device.

    Args:
        provisioned: what ``provision_device`` wrote.

    Returns:
        Lines without a trailing newline.
    """
    out, dest = provisioned.out_dir, provisioned.device_dir.rstrip("/") or "/"
    names = "  ".join(p.name + (" (0600)" if p.suffix == ".key" else "") for p in provisioned.files)
    lines = [
        f"provisioned {provisioned.device_id} in {out}:",
        f"  {names}",
        f"copy them to {dest}/ on the device, readable only by the agent's user (keys stay 0600), e.g.",
        f"  scp -p {out}/* {provisioned.device_id}:{dest}/",
        f"then start the agent there: edge-agent run --config {dest}/agent.toml",
    ]
    if not provisioned.certificate:
        lines.append(
            "no fleet CA (edgectl ca init): no client certificate was written; the shipped Mosquitto config "
            "(deploy/mosquitto) requires one"
        )
    else:
        lines.append(f"its certificate's CN is {provisioned.device_id}: the broker's ACL confines it to its own topics")
    return "\n".join(lines)
