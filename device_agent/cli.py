"""`edge-agent`: the device's command line. argparse only, so the agent installs without click.

Exit codes: 0 clean stop, 2 usage or configuration error, 3 bad local state (keys, storage).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from device_agent.config import CRASH_POINTS, load_config
from device_agent.sdnotify import Notifier
from edge_sdk import __version__
from edge_sdk.bundle.manifest import EXECUTIONS
from edge_sdk.errors import ConfigError, EdgeError, LocalStateError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="edge-sdk device agent")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="connect to the broker and serve deploy commands until stopped",
        description="Connect to the MQTT broker, announce this device, and receive, verify, install "
        "and benchmark signed bundles until SIGTERM or SIGINT. Flags override the config file.",
    )
    run.add_argument("--config", type=Path, help="TOML config file (see device_agent/config.py)")
    run.add_argument("--broker", help="broker URL, mqtt://host:port or mqtts://host:port")
    run.add_argument("--device-id", help="this device's id (letters, digits, _ . -)")
    run.add_argument("--data-dir", type=Path, help="directory for slots, staging and state")
    run.add_argument(
        "--root",
        "--trusted-key",
        dest="root",
        type=Path,
        help="the signed root of trust (root.json from `edgectl keys init`); --trusted-key is its old name",
    )
    run.add_argument(
        "--accelerator", action="append", default=[], help="an accelerator this device has, e.g. cuda (repeatable)"
    )
    run.add_argument("--sysfs-root", type=Path, help="root for hardware probes (default /)")
    run.add_argument("--transfer-idle-timeout", type=float, help="seconds without a chunk before a transfer is dropped")
    run.add_argument("--reconnect-max", type=float, help="upper bound of the reconnect backoff in seconds")
    run.add_argument(
        "--update-gate-file", type=Path, help="defer installs while this file exists (its first line is the reason)"
    )
    run.add_argument("--update-gate-command", help="command run before each install; a non-zero exit defers it")
    run.add_argument("--update-gate-retry", type=float, help="seconds between asks of the gate while an install waits")
    run.add_argument(
        "--outbox-max-bytes", type=int, help="bound of the on-disk buffer of events and metrics kept while offline"
    )
    run.add_argument(
        "--inbound-queue-max",
        type=int,
        help="most inbound messages waiting for the agent; more are dropped, counted and logged (default 1024)",
    )
    run.add_argument(
        "--execution",
        choices=EXECUTIONS,
        help="bundles with sparse layers: measure and pick the fastest (auto, the default) or pin one",
    )
    run.add_argument(
        "--debug-crash-at", choices=CRASH_POINTS, help="testing only: SIGKILL the agent at this step of an install"
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = load_config(
            args.config,
            {
                "broker": args.broker,
                "device_id": args.device_id,
                "data_dir": args.data_dir,
                "root": args.root,
                "accelerators": tuple(args.accelerator),
                "sysfs_root": args.sysfs_root,
                "transfer_idle_timeout_s": args.transfer_idle_timeout,
                "reconnect_max_s": args.reconnect_max,
                "update_gate_file": args.update_gate_file,
                "update_gate_command": args.update_gate_command,
                "update_gate_retry_s": args.update_gate_retry,
                "outbox_max_bytes": args.outbox_max_bytes,
                "inbound_queue_max": args.inbound_queue_max,
                "execution": args.execution,
                "debug_crash_at": args.debug_crash_at,
            },
        )
        # heavy imports only once the config is valid
        from device_agent.agent import Agent, mqtt_transport, open_identity

        identity = open_identity(config)
        agent = Agent(config, mqtt_transport(config, identity), identity=identity)
    except ConfigError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return 2
    except LocalStateError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return 3
    except EdgeError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.run(stop, Notifier.from_environ(os.environ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
