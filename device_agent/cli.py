"""`edge-agent`: the device's command line. argparse only, so the agent installs without click.

Exit codes come from the one table both programs share (:class:`edge_sdk.errors.ExitCode`):
0 clean stop, 2 usage or configuration, 3 untrusted input, 4 transport, 5 local state
(keys, storage), 6 model.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from device_agent.config import CRASH_POINTS, load_config
from device_agent.sdnotify import Notifier
from edge_sdk import __version__
from edge_sdk.bundle.manifest import EXECUTIONS
from edge_sdk.errors import ConfigError, EdgeError, ExitCode, exit_code_of
from edge_sdk.mqtt import PROTOCOLS

__all__ = ["main"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    run.add_argument(
        "--broker", help="broker URL, mqtt://host:port or mqtts://host:port (default port 1883, 8883 for mqtts)"
    )
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
    run.add_argument(
        "--label",
        action="append",
        default=[],
        help="a label of this device, key=value, e.g. site=depot-3 (repeatable; replaces the config file's labels)",
    )
    run.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default 60)")
    run.add_argument(
        "--metrics-every",
        type=float,
        help="seconds between periodic metrics reports of each active bundle, measured again (default: off)",
    )
    run.add_argument("--metrics-runs", type=int, help="timed runs of each periodic measurement (default 10)")
    tls = run.add_argument_group(
        "broker connection",
        "TLS client certificate and MQTT username/password. Each may also come from the environment "
        "(EDGE_SDK_BROKER_CA_FILE, _CERT_FILE, _KEY_FILE, _USERNAME, _PASSWORD or _PASSWORD_FILE) or the "
        "config file ([tls] ca_file, cert_file, key_file; username, password_file): flag > environment > file.",
    )
    tls.add_argument("--ca-file", help="CA certificate that signed the broker's (PEM)")
    tls.add_argument("--cert-file", help="this device's client certificate (PEM; CN = device id)")
    tls.add_argument("--key-file", help="the client certificate's private key (PEM)")
    tls.add_argument("--username", help="MQTT username")
    tls.add_argument(
        "--password-file", help="file whose first line is the MQTT password (never given on the command line)"
    )
    run.add_argument("--sysfs-root", type=Path, help="root for hardware probes (default /)")
    run.add_argument("--transfer-idle-timeout", type=float, help="seconds without a chunk before a transfer is dropped")
    run.add_argument("--reconnect-max", type=float, help="upper bound of the reconnect backoff in seconds")
    run.add_argument(
        "--mqtt-protocol",
        choices=PROTOCOLS,
        help="MQTT version: auto (5, or 3.1.1 where the broker does not speak 5; the default), 5 or 3.1.1",
    )
    run.add_argument(
        "--session-expiry",
        type=int,
        help="seconds the broker keeps this device's session and queued messages while it is away "
        "(default 3600; 0: a clean session on every connect)",
    )
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
    # A test hook (SIGKILL at a named step of an install, for crash-safety tests): accepted, never shown.
    run.add_argument("--debug-crash-at", choices=CRASH_POINTS, help=argparse.SUPPRESS)
    run.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS)
    keys = sub.add_parser(
        "show-keys",
        help="print this device's recipient key (for edgectl pack --encrypt-to), making it if absent",
        description="Print the public half of this device's X25519 decryption key as PEM, the recipient key "
        "file edgectl pack --encrypt-to takes. The key lives in the data directory (decryption_key.pem, "
        "0600) and is made there if it does not exist yet, as the agent does at first start.",
    )
    keys.add_argument("--config", type=Path, help="TOML config file (for its data_dir)")
    keys.add_argument("--data-dir", type=Path, help="the agent's data directory")
    keys.add_argument("--json", action="store_true", help="print key id, algorithm and key as JSON")
    simulate = sub.add_parser(
        "simulate",
        help="run the simulated devices a spec file names, several in this process (edgectl sim starts it)",
        description="Run real agents for the simulated devices SPEC names (written by `edgectl sim`), each with "
        "its own data directory, key and connection, with the faults SPEC gives them, until SIGTERM or SIGINT.",
    )
    simulate.add_argument("spec", type=Path, help="the spec file (JSON) edgectl sim wrote")
    simulate.add_argument("--log-level", default="WARNING", choices=_LOG_LEVELS)
    return p


def _show_keys(args: argparse.Namespace) -> int:
    """``edge-agent show-keys``: print the device's recipient key."""
    import json

    from device_agent.decryption_key import load_or_create_decryption_key

    data_dir = args.data_dir
    try:
        if data_dir is None:
            if args.config is None:
                raise ConfigError("show-keys needs --data-dir or --config", key="data_dir")
            data_dir = load_config(args.config, {}).data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        key = load_or_create_decryption_key(data_dir)
    except EdgeError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return int(exit_code_of(exc))
    except OSError as exc:
        print(f"edge-agent: cannot use {data_dir}: {exc.strerror}", file=sys.stderr)
        return int(ExitCode.LOCAL_STATE)
    if args.json:
        print(
            json.dumps(
                {
                    "decryption": {
                        "algorithm": "x25519",
                        "keyid": key.keyid,
                        "key": key.public.to_text(),
                        "public_pem": key.public.to_pem().decode(),
                    }
                }
            )
        )
    else:
        print(f"# decryption (recipient) key {key.keyid}", file=sys.stderr)
        sys.stdout.write(key.public.to_pem().decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "show-keys":
        return _show_keys(args)
    if args.command == "simulate":
        return _simulate(args)
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
                "labels": tuple(args.label),
                "heartbeat_s": args.heartbeat,
                "metrics_every_s": args.metrics_every,
                "metrics_runs": args.metrics_runs,
                "sysfs_root": args.sysfs_root,
                "transfer_idle_timeout_s": args.transfer_idle_timeout,
                "reconnect_max_s": args.reconnect_max,
                "mqtt_protocol": args.mqtt_protocol,
                "session_expiry_s": args.session_expiry,
                "update_gate_file": args.update_gate_file,
                "update_gate_command": args.update_gate_command,
                "update_gate_retry_s": args.update_gate_retry,
                "outbox_max_bytes": args.outbox_max_bytes,
                "inbound_queue_max": args.inbound_queue_max,
                "execution": args.execution,
                "debug_crash_at": args.debug_crash_at,
                "ca_file": args.ca_file,
                "cert_file": args.cert_file,
                "key_file": args.key_file,
                "username": args.username,
                "password_file": args.password_file,
            },
            os.environ,
        )
        # heavy imports only once the config is valid
        from device_agent.agent import Agent, mqtt_transport, open_identity

        identity = open_identity(config)
        agent = Agent(config, mqtt_transport(config, identity), identity=identity)
    except EdgeError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return int(exit_code_of(exc))
    notifier = Notifier.from_environ(os.environ)
    return _serve(lambda stop: agent.run(stop, notifier))


def _serve(run: Callable[[threading.Event], None]) -> int:
    """Run until SIGTERM or SIGINT; an EdgeError that ends it becomes its message and exit code.

    An agent ends by itself only when it can no longer work (its network thread died): its
    supervisor (systemd) restarts it.
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run(stop)
    except EdgeError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return int(exit_code_of(exc))
    return int(ExitCode.OK)


def _simulate(args: argparse.Namespace) -> int:
    """``edge-agent simulate SPEC``: the simulated devices of one process (see device_agent/simulated.py)."""
    import json

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        from device_agent.simulated import SimProcess, SimSpec

        process = SimProcess(SimSpec.from_dict(json.loads(args.spec.read_text())))
    except (OSError, ValueError) as exc:
        print(f"edge-agent: cannot read simulation spec {args.spec}: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except EdgeError as exc:
        print(f"edge-agent: {exc.message}", file=sys.stderr)
        return int(exit_code_of(exc))
    return _serve(process.run)


if __name__ == "__main__":
    sys.exit(main())
