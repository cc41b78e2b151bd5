"""`edgectl`: the operator's command line.

This module parses arguments, builds the configuration once, calls the services in
``host_tools`` and turns every failure into one line on stderr and an exit code chosen
by blame, from the one table both programs share (:class:`edge_sdk.errors.ExitCode`,
printed by ``edgectl --help``): an :class:`~edge_sdk.errors.EdgeError` by its branch, a
usage mistake (a bad option, a missing input file) as 2.

Every command that prints a table also prints JSON with ``--json``; with ``--json`` a
failure prints ``{"error": {"code", "kind", "message", "exit_code", "details"}}`` on
stdout as well (beside what the command knows, e.g. ``verify``'s checklist). Each
command's JSON has a versioned JSON Schema in the repository (``schemas/edgectl/``,
``docs/json-schemas.md``); every JSON object printed names it in ``"$schema"``.

Progress goes to stderr: a bar on a terminal, plain lines at a modest rate elsewhere
(a log file, a pipe), and every bar is closed before an error is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edge_sdk import __version__
from edge_sdk.errors import (
    EXIT_CODES,
    ConfigError,
    EdgeError,
    ExitCode,
    NotInstalledError,
    StorageError,
    exit_code_of,
)

__all__ = ["cli", "main"]

log = logging.getLogger("edgectl")


# --- configuration and output ---------------------------------------------------------


@dataclass(frozen=True)
class HostConfig:
    """Built once from flags, the environment and the config file (:mod:`host_tools.config`) and passed down."""

    home: Path
    registry_url: str
    json_output: bool = False
    allow_unsigned_reports: bool = False
    keys_path: Path | None = None

    @property
    def keys_dir(self) -> Path:
        """The ``keys_dir`` setting, HOME/keys unless set."""
        return self.keys_path if self.keys_path is not None else self.home / "keys"


class CommandFailed(Exception):
    """A command failed after learning something worth printing: ``data`` for ``--json``, ``text`` for people.

    The group prints them (the JSON with the error object under ``error``) and ends
    with the exit code of ``error``.
    """

    def __init__(self, error: EdgeError, data: dict[str, Any], text: str | Callable[[], str]) -> None:
        super().__init__(error.message)
        self.error = error
        self.data = data
        self.text = text


def _error_object(
    code: str, exit_code: ExitCode, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``{"error": ...}`` member every failure prints with ``--json``."""
    return {
        "code": code,
        "kind": exit_code.kind,
        "message": message,
        "exit_code": int(exit_code),
        "details": details or {},
    }


#: The version of each command's JSON (``schemas/edgectl/<command>.v<N>.json``); 1 unless listed.
JSON_SCHEMA_VERSIONS: dict[str, int] = {}
#: The schema of an error object printed when no command was recognised (``edgectl --json nosuch``).
ERROR_SCHEMA = "error"


def json_schema_name(names: list[str]) -> str:
    """The schema name of a command: its names joined with ``-`` (``keys show`` -> ``keys-show``)."""
    return "-".join(names) if names else ERROR_SCHEMA


def json_schema_id(name: str) -> str:
    """The ``$id`` of a command's current schema, which its JSON names in ``"$schema"``."""
    return f"urn:edge-sdk:edgectl:{name}:v{JSON_SCHEMA_VERSIONS.get(name, 1)}"


def _with_schema(data: Any, name: str) -> Any:
    """``data`` naming its schema: an object gains ``"$schema"`` (first when sorted); a list stays as
    it is (v1 of those commands prints a bare list, and wrapping it would break its readers)."""
    return {"$schema": json_schema_id(name), **data} if isinstance(data, dict) else data


def command_names(group: click.Group, args: list[str]) -> list[str]:
    """The (sub)command names ``args`` invoke, read without running anything (``["keys", "show"]``).

    Options are skipped with their values; the walk stops at the first command that is not a
    group, or at a word that names no command.
    """
    names: list[str] = []
    command: click.Command = group
    words = iter(args[: args.index("--")] if "--" in args else args)
    for word in words:
        if word.startswith("-"):
            option = next((p for p in command.params if isinstance(p, click.Option) and word in p.opts), None)
            if option is not None and not option.is_flag and not option.count and "=" not in word:
                next(words, None)
            continue
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        names.append(word)
        command = command.commands[word]
    return names


def json_schema_of(group: click.Group, args: list[str]) -> str:
    """The schema name of what ``edgectl *args`` prints with ``--json``: its command's, or
    :data:`ERROR_SCHEMA` where no command with a ``--json`` option was named."""
    names = command_names(group, args)
    command: click.Command = group
    for name in names:
        command = command.commands[name]  # type: ignore[attr-defined]
    has_json = any(p.name == "json_output" for p in command.params)
    return json_schema_name(names) if names and has_json else ERROR_SCHEMA


def _wants_json(args: list[str]) -> bool:
    """Whether the command line asks for ``--json`` (known before, or without, parsing it)."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _print_json(data: Any) -> None:
    # ensure_ascii: control characters and bidi overrides become \uXXXX escapes; the JSON stays exact.
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=True))


class _EdgeGroup(click.Group):
    """The ``edgectl`` group: every failure ends here as a message, ``--json`` output and an exit code.

    Click's own handling (standalone mode) would print usage errors without JSON and let
    an ``EdgeError`` become a traceback; this runs the command in non-standalone mode and
    handles each kind of failure once.
    """

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        code = self._run(argv, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, argv: list[str], prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        json_output = _wants_json(argv)
        schema = json_schema_of(self, argv)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except CommandFailed as failed:
            if json_output:
                _print_json(_with_schema({**failed.data, "error": _edge_error_object(failed.error)}, schema))
            else:
                click.echo(failed.text() if callable(failed.text) else failed.text)
            return _report(failed.error)
        except EdgeError as exc:
            if json_output:
                _print_json(_with_schema({"error": _edge_error_object(exc)}, schema))
            return _report(exc)
        except click.ClickException as exc:  # a usage mistake: bad option, missing input file
            if json_output:
                _print_json(
                    _with_schema({"error": _error_object("usage", ExitCode.USAGE, exc.format_message())}, schema)
                )
            exc.show()
            return int(ExitCode.USAGE)
        except click.Abort:
            if json_output:
                _print_json(_with_schema({"error": _error_object("aborted", ExitCode.FAILURE, "aborted")}, schema))
            click.echo("Aborted!", err=True)
            return int(ExitCode.FAILURE)
        except Exception as exc:  # a bug: the traceback follows, and JSON readers still get an object
            if json_output:
                internal = _error_object("internal", ExitCode.FAILURE, f"{type(exc).__name__}: {exc}")
                _print_json(_with_schema({"error": internal}, schema))
            raise
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else int(ExitCode.OK)


def _edge_error_object(exc: EdgeError) -> dict[str, Any]:
    return _error_object(exc.code, exit_code_of(exc), exc.message, exc.details)


def _report(exc: EdgeError) -> int:
    """Print ``exc`` as one line on stderr; return its exit code."""
    _echo_for_terminal(f"edgectl: error [{exc.code}]: {exc.message}", err=True)
    log.debug("details", exc_info=exc)
    return int(exit_code_of(exc))


def _echo_for_terminal(text: str, err: bool = False) -> None:
    """Print text for people, every character a terminal would interpret escaped.

    Device- and bundle-supplied strings (platform, runtime and bundle names, event details,
    error messages) end up in what ``edgectl`` prints; escaped here, an escape sequence in
    one shows as ``\\x1b[2J`` instead of clearing the screen. The text path of every
    command, progress lines and error lines go through this one function.
    """
    from host_tools.report.safe_text import escape_for_terminal

    click.echo(escape_for_terminal(text, multiline=True), err=err)


def _emit(cfg: HostConfig, data: Any, text: str | Callable[[], str]) -> None:
    if cfg.json_output:
        ctx = click.get_current_context(silent=True)
        _print_json(data if ctx is None else _with_schema(data, json_schema_name(_context_names(ctx))))
    else:
        _echo_for_terminal(text() if callable(text) else text)


def _context_names(ctx: click.Context) -> list[str]:
    """The names of the running (sub)command, root excluded (``["devices", "enroll"]``)."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return names[::-1]


def _say(cfg: HostConfig) -> Callable[[str], None]:
    """Progress lines go to stderr, so ``--json`` output on stdout stays parseable."""
    return lambda line: _echo_for_terminal(line, err=True)


def _on_terminal() -> bool:
    """Whether stderr, where progress goes, is a terminal (bars) or a log or pipe (plain lines)."""
    return sys.stderr.isatty()


def _close_with_command(closer: Callable[[], Any]) -> None:
    """Run ``closer`` when the command ends, before any error is printed (click closes the context first)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(closer)


def _byte_progress(label: str, total: int | None = None) -> Callable[[int, int], None]:
    """Byte progress on stderr: a bar on a terminal, else a plain line every 10 % or 5 s.

    Without ``total``, the first update's total is the bar's. A bar still open when the
    command ends (it failed mid-transfer) is closed before the error is printed.
    """
    if not _on_terminal():
        from host_tools.report.progress import ProgressLines

        lines = ProgressLines(label)

        def print_line(done: int, of: int) -> None:
            line = lines.update(done, of, time.monotonic())
            if line is not None:
                click.echo(line, err=True)

        return print_line

    from tqdm import tqdm

    bars: list[Any] = []

    def start(size: int) -> None:
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False)
        bars.append(bar)
        _close_with_command(bar.close)

    if total is not None:
        start(total)

    def update(done: int, of: int) -> None:
        if not bars:
            start(of)
        bar = bars[0]
        bar.update(done - bar.n)
        if done >= bar.total:
            bar.close()

    return update


@contextmanager
def _step_progress(label: str, enabled: bool = True) -> Iterator[Callable[[Any], None]]:
    """Progress of a pass manager's steps: a bar on a terminal, else one line per step started.

    Yields:
        The callback for :class:`host_tools.compress.pass_manager.ProgressEvent` values.
    """
    if not enabled:
        yield lambda ev: None
        return
    if not _on_terminal():
        said: set[tuple[int, int]] = set()

        def line(ev: Any) -> None:
            if ev.phase == "run" and (ev.done, ev.total) not in said and ev.done < ev.total:
                said.add((ev.done, ev.total))
                click.echo(f"{label}: step {ev.done + 1}/{ev.total}: {ev.step}", err=True)

        yield line
        return

    from tqdm import tqdm

    with tqdm(desc=label, unit="step", file=sys.stderr, leave=False) as bar:

        def progress(ev: Any) -> None:
            if ev.phase == "run":  # the pass manager counting passes; other phases count inside one
                bar.total = ev.total
                if ev.done != bar.n:
                    bar.update(ev.done - bar.n)
            counted = f" {ev.done}/{ev.total}" if ev.phase != "run" and ev.total > 1 else ""
            bar.set_postfix_str(f"{ev.step} {ev.phase}{counted}")

        yield progress
        bar.update((bar.total or 0) - bar.n)


class InputFile(click.Path):
    """A file the command reads: it must exist, or the command stops as a usage error (exit 2) naming it."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, path_type=Path)


class OutputFile(click.Path):
    """A file the command writes."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)


class DataSource(click.types.StringParamType):
    """Data for compression: a ``.npz``/``.npy`` file, which must exist, or a ``module:function``."""

    name = "data"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if text.lower().endswith((".npz", ".npy")) and not Path(text).exists():
            self.fail(f"data file {text!r} does not exist.", param, ctx)
        return text


def _stacked(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying ``decorators`` as if written one per line, top first."""

    def apply(f: Any) -> Any:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


json_option = click.option(
    "--json", "json_output", is_flag=True, help='print JSON instead of a table (a failure as {"error": {...}})'
)
#: Every --broker help says what a URL without a port means.
BROKER_URL_HELP = "mqtt://host[:port] or mqtts://host[:port]; without a port, 1883 (8883 for mqtts)"


def _configured_broker() -> str | None:
    """``--broker``'s default: the config file's ``[broker] url`` (a flag and EDGE_SDK_BROKER come first).

    Reads the settings when nothing has yet (:func:`_cfg`); click asks only when neither a
    flag nor the environment gave the URL, and never for ``--help``.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    _cfg(ctx, False)
    url = ctx.meta[_SETTINGS]["broker"].value
    return None if url is None else str(url)


def _broker_url_option(what: str) -> Callable[[Any], Any]:
    """``--broker``: a flag, else EDGE_SDK_BROKER, else the config file's ``[broker] url``."""
    return click.option(
        "--broker",
        required=True,
        envvar="EDGE_SDK_BROKER",
        default=_configured_broker,
        help=f"{what}, {BROKER_URL_HELP} (env EDGE_SDK_BROKER, or [broker] url in the config file)",
    )


broker_option = _broker_url_option("broker URL")
#: The broker devices connect to (``devices provision``, ``sim``): not one edgectl talks to.
device_broker_option = _broker_url_option("the broker URL the devices connect to")
connect_timeout_option = click.option(
    "--connect-timeout", default=10.0, show_default=True, type=float, help="seconds to wait for the broker"
)


def _remember_connection_flag(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Keep a broker connection flag for :func:`_broker_connection` (the commands' signatures stay as they are)."""
    if value is not None and param.name is not None:
        ctx.meta.setdefault(_CONNECTION_FLAGS, {})[param.name] = value


_CONNECTION_FLAGS = "edgectl.broker_connection_flags"
#: Where the global ``--mqtt-protocol`` is kept for :func:`_client` (``ctx.meta`` is shared by subcommands).
_MQTT_PROTOCOL = "edgectl.mqtt_protocol"
_connection_flag: dict[str, Any] = dict(expose_value=False, callback=_remember_connection_flag)
#: TLS client certificate and MQTT credentials, on every command that talks to a broker. Each may
#: also come from the environment or the broker config file (flag > environment > file).
broker_auth_options = _stacked(
    click.option(
        "--broker-config",
        "broker_config",
        type=InputFile(),
        help="TOML file of the settings below ([tls] ca_file, cert_file, key_file; username, password_file); "
        "default HOME/broker.toml if it exists (env EDGE_SDK_BROKER_CONFIG)",
        **_connection_flag,
    ),
    click.option(
        "--ca-file", help="CA certificate that signed the broker's (env EDGE_SDK_BROKER_CA_FILE)", **_connection_flag
    ),
    click.option(
        "--cert-file",
        help="edgectl's client certificate, e.g. HOME/ca/edge-host.pem (env EDGE_SDK_BROKER_CERT_FILE)",
        **_connection_flag,
    ),
    click.option("--key-file", help="its private key (env EDGE_SDK_BROKER_KEY_FILE)", **_connection_flag),
    click.option("--username", help="MQTT username (env EDGE_SDK_BROKER_USERNAME)", **_connection_flag),
    click.option(
        "--password-file",
        help="file whose first line is the MQTT password (env EDGE_SDK_BROKER_PASSWORD_FILE, "
        "or the password itself in EDGE_SDK_BROKER_PASSWORD)",
        **_connection_flag,
    ),
)
broker_options = _stacked(broker_option, connect_timeout_option, broker_auth_options)


def _one_device(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> str:
    """Refuse a repeated ``--device`` rather than silently keep only the last one."""
    if len(set(values)) > 1:
        raise click.BadParameter(
            f"one device per {ctx.info_name} for now; got {len(values)} ({', '.join(values)}): "
            "run the command once per device",
            ctx,
            param,
        )
    return values[0]


device_option = click.option(
    "--device", "device_id", required=True, multiple=True, callback=_one_device, help="target device id (one)"
)
bundle_argument = click.argument("bundle", type=InputFile())


def _cfg(ctx: click.Context, json_output: bool, read_file: bool = True) -> HostConfig:
    """The settings of a command that needs them, read on first use.

    The root command reads no config file itself: ``--help`` of any command, and commands
    that never ask for their settings, work whatever the file holds. A command that needs
    them fails here, with the file, line, key and problem named (exit 2).

    Args:
        ctx: the command's context.
        json_output: whether the command prints JSON.
        read_file: read the config file (``init``, which writes it, does not).

    Raises:
        ConfigError: the config file is missing (when named) or not valid.
    """
    meta = ctx.meta
    base: HostConfig | None = meta.get(_HOST_CONFIG)
    if base is None:
        root = ctx.find_root()
        _load_settings(ctx, root.params.get("config_path"), read_file=read_file)
        settings = meta[_SETTINGS]
        meta[_MQTT_PROTOCOL] = settings["mqtt_protocol"].value
        base = HostConfig(
            Path(str(settings["home"].value)),
            str(settings["registry"].value),
            False,
            bool(settings["allow_unsigned_reports"].value),
            keys_path=Path(str(settings["keys_dir"].value)),
        )
        meta[_HOST_CONFIG] = base
    return dataclasses.replace(base, json_output=json_output)


def _broker_connection() -> Any:
    """The broker connection (:class:`edge_sdk.broker_connection.BrokerConnection`), built once per command.

    Each setting comes from its flag, else the environment, else the connection file
    (:func:`_connection_file`).

    Raises:
        ConfigError: a config file or a file it names is missing or unreadable (named with
            where it was set), or the file is not valid.
    """
    from edge_sdk.broker_connection import resolve_connection
    from host_tools.config import connection_file

    ctx = click.get_current_context()
    flags: dict[str, Any] = dict(ctx.meta.get(_CONNECTION_FLAGS, {}))
    flags.pop("broker_config", None)
    file = _connection_file(ctx)
    file_values = connection_file(file) if file is not None else {}
    return resolve_connection(flags, os.environ, file_values, str(file.path) if file is not None else "None")


def _connection_file(ctx: click.Context) -> Any:
    """Where the broker connection's file settings come from: one file, the first of
    ``--broker-config``, ``EDGE_SDK_BROKER_CONFIG``, ``HOME/broker.toml`` if it exists, and the
    edgectl config file's ``[broker]`` table (a :class:`host_tools.config.ConfigFile`, or ``None``).
    """
    from edge_sdk.broker_connection import connection_file_settings
    from host_tools.config import ConfigFile, read_toml

    config_file: Path | None = ctx.meta.get(_CONNECTION_FLAGS, {}).get("broker_config")
    source = "--broker-config"
    if config_file is None and os.environ.get("EDGE_SDK_BROKER_CONFIG"):
        config_file, source = Path(os.environ["EDGE_SDK_BROKER_CONFIG"]), "EDGE_SDK_BROKER_CONFIG"
    if config_file is None:
        default = _cfg(ctx, False)
        if (default.home / "broker.toml").is_file():
            config_file = default.home / "broker.toml"
    if config_file is not None:
        _, raw = read_toml(config_file, "broker config file", source)
        return ConfigFile(config_file, connection_file_settings(raw, str(config_file)))
    return ctx.meta.get(_CONFIG_FILE)


@contextmanager
def _client(broker: str, timeout_s: float, name: str) -> Iterator[Any]:
    from edge_sdk.mqtt import MqttClient, MqttOptions, parse_broker_url
    from host_tools.fleet.router import FLEET_INBOX_MAX

    connection = _broker_connection()
    click.echo(f"edgectl: broker {parse_broker_url(broker)}", err=True)  # the address used, port included
    protocol = click.get_current_context().meta.get(_MQTT_PROTOCOL, "auto")
    # The host keeps clean sessions (session_expiry_s 0): its client ids are per process.
    options = MqttOptions(
        client_id=f"edgectl-{name}-{os.getpid()}",
        connect_timeout_s=timeout_s,
        protocol=protocol,
        inbox_max=FLEET_INBOX_MAX,
    )
    client = MqttClient(broker, connection.mqtt_options(options))
    client.connect()
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _registry(cfg: HostConfig) -> Iterator[Any]:
    from host_tools.fleet.registry import open_registry

    with open_registry(cfg.registry_url) as reg:
        yield reg


def _keep_run(reg: Any, kind: str, parameters: dict[str, Any], results: dict[str, Any], done: str = "") -> None:
    """Keep a run in the registry (``edgectl runs`` lists it) and say its id on stderr.

    The record is secondary to what the command made or did (a model written, a bundle
    installed): a registry that cannot keep it (:class:`StorageError`) is a warning on stderr,
    naming the registry and the cause, not a failure.

    Args:
        done: what is whole nonetheless, for the warning (``the model m.onnx is written``).
    """
    from host_tools.fleet.runs import record_run

    try:
        run_id = record_run(reg, kind, parameters, results, time.time())
    except StorageError as exc:
        _run_not_kept(kind, exc, done)
        return
    click.echo(f"edgectl: kept as run {run_id} (edgectl runs, edgectl compare)", err=True)


def _run_not_kept(kind: str, exc: StorageError, done: str) -> None:
    whole = f"{done}; " if done else ""
    _echo_for_terminal(f"edgectl: warning: {whole}the {kind} run was not kept: {exc.message}", err=True)


def _log_handler() -> logging.Handler:
    """Log lines on stderr, escaped for the terminal like every other line (they quote device strings)."""
    from host_tools.report.safe_text import TerminalSafeFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalSafeFormatter("%(levelname)s %(name)s: %(message)s"))
    return handler


@contextmanager
def _gated(cfg: HostConfig, reg: Any, client: Any) -> Iterator[Any]:
    """A running router that believes only enrolled devices' signed messages (see fleet/router.py)."""
    from host_tools.fleet.router import gated

    with gated(client, reg, allow_unsigned=cfg.allow_unsigned_reports) as router:
        yield router


# --- the group --------------------------------------------------------------------------


def _exit_code_epilog() -> str:
    rows = "\n".join(f"  {int(code)}  {meaning}" for code, meaning in EXIT_CODES.items())
    return f"\b\nExit codes (the same for edge-agent):\n{rows}"


#: The resolved settings (:func:`host_tools.config.resolve_settings`) and the config file, in ``ctx.meta``.
_SETTINGS = "edgectl.settings"
_CONFIG_FILE = "edgectl.config_file"
#: Root parameters that are settings of :mod:`host_tools.config` (parameter name -> setting name).
_ROOT_SETTINGS = {
    "home": "home",
    "registry_url": "registry",
    "keys_dir": "keys_dir",
    "mqtt_protocol": "mqtt_protocol",
    "allow_unsigned_reports": "allow_unsigned_reports",
}


def _load_settings(ctx: click.Context, config_path: Path | None, read_file: bool = True) -> None:
    """Resolve every setting (flag > environment > config file > default) into ``ctx.meta``.

    The config file is ``config_path`` (``--config``), else EDGE_SDK_CONFIG, else
    HOME/config.toml, read when it was named or exists.

    Raises:
        ConfigError: the config file named by ``--config`` or EDGE_SDK_CONFIG is missing,
            or a config file is not valid (with its path, line and key).
    """
    from host_tools.config import CONFIG_ENV, CONFIG_FILE_NAME, parse_config_file, read_toml, resolve_settings

    flags = _setting_flags(ctx)
    user = Path.home()
    source = "--config"
    if config_path is None and os.environ.get(CONFIG_ENV):
        config_path, source = Path(os.environ[CONFIG_ENV]), CONFIG_ENV
    named = config_path is not None
    if config_path is None:
        config_path = (
            Path(str(resolve_settings(flags, os.environ, [], user, Path.cwd())["home"].value)) / CONFIG_FILE_NAME
        )
    config_path = config_path.expanduser().absolute()
    file = None
    if read_file and (named or config_path.is_file()):
        text, raw = read_toml(config_path, "config file", source)
        file = parse_config_file(text, raw, config_path, user)
    ctx.meta[_CONFIG_PATH] = config_path
    ctx.meta[_CONFIG_FILE] = file
    ctx.meta[_SETTINGS] = resolve_settings(flags, os.environ, [file] if file is not None else [], user, Path.cwd())


def _setting_flags(ctx: click.Context) -> dict[str, object]:
    """The settings given as flags: the root's, the broker connection's and a subcommand's own (``--broker``)."""
    root = ctx.find_root()
    flags: dict[str, object] = {}
    for param, name in _ROOT_SETTINGS.items():
        if root.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE:
            flags[name] = root.params[param]
    flags.update(ctx.meta.get(_CONNECTION_FLAGS, {}))
    flags.update(ctx.meta.get(_SETTING_FLAGS, {}))
    return flags


#: Where the config file is (or would be), and flags of settings given to a subcommand (``init --broker``).
_CONFIG_PATH = "edgectl.config_path"
#: The :class:`HostConfig` built by the first :func:`_cfg` of a command.
_HOST_CONFIG = "edgectl.host_config"
_SETTING_FLAGS = "edgectl.setting_flags"


@click.group(cls=_EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_exit_code_epilog())
@click.version_option(__version__, prog_name="edgectl")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="the config file (env EDGE_SDK_CONFIG; default HOME/config.toml if it exists; see `edgectl config show`)",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    help="where keys and the registry live (env EDGE_SDK_HOME; default ~/.edge-sdk)",
)
@click.option(
    "--registry",
    "registry_url",
    help="registry: a SQLite path or postgresql:// URL (env EDGE_SDK_REGISTRY; default HOME/registry.db)",
)
@click.option(
    "--keys-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="signing keys and root.json (env EDGE_SDK_KEYS_DIR; default HOME/keys)",
)
@click.option(
    "--allow-unsigned-reports",
    is_flag=True,
    help="also believe unsigned device messages (only while migrating older agents; off by default) "
    "(env EDGE_SDK_ALLOW_UNSIGNED_REPORTS)",
)
@click.option(
    "--mqtt-protocol",
    type=click.Choice(["auto", "5", "3.1.1"]),
    help="MQTT version to the broker: auto (5, or 3.1.1 where the broker does not speak 5; the default), 5 or 3.1.1 "
    "(env EDGE_SDK_MQTT_PROTOCOL)",
)
@click.option("-v", "--verbose", count=True, help="more logging (-vv for debug)")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    home: Path | None,
    registry_url: str | None,
    keys_dir: Path | None,
    allow_unsigned_reports: bool,
    mqtt_protocol: str | None,
    verbose: int,
) -> None:
    """edge-sdk: compress models, sign bundles, deploy them to devices over MQTT.

    Settings come from flags, else the environment, else the config file
    (`edgectl init` writes one), else defaults: `edgectl config show` says which.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, handlers=[_log_handler()])
    # The settings (and the config file) are read by the first command that asks for them
    # (_cfg), not here: `--help` must work whatever the file holds, and `init` replaces a
    # file that does not parse.


# --- configuration ----------------------------------------------------------------------


def _remember_setting_flag(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Keep a setting given to a subcommand (``init --broker``) for :func:`_setting_flags`.

    Only a value given on the command line is a flag; one click took from the environment is
    left to :func:`host_tools.config.resolve_settings`, which says so.
    """
    if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
        return
    if value is not None:
        ctx.meta.setdefault(_SETTING_FLAGS, {})[param.name] = value


@cli.command("init")
@click.option(
    "--path",
    "path",
    type=OutputFile(),
    help="where to write it (default: --config, EDGE_SDK_CONFIG, else HOME/config.toml)",
)
@click.option("--force", is_flag=True, help="replace an existing file")
@click.option(
    "--broker",
    envvar="EDGE_SDK_BROKER",
    help=f"the broker URL to write, {BROKER_URL_HELP}",
    expose_value=False,
    callback=_remember_setting_flag,
)
@click.option("--ca-file", help="CA certificate file to write", expose_value=False, callback=_remember_setting_flag)
@click.option(
    "--cert-file", help="client certificate file to write", expose_value=False, callback=_remember_setting_flag
)
@click.option("--key-file", help="its private key file to write", expose_value=False, callback=_remember_setting_flag)
@click.option("--username", help="MQTT username to write", expose_value=False, callback=_remember_setting_flag)
@click.option(
    "--password-file", help="MQTT password file to write", expose_value=False, callback=_remember_setting_flag
)
@json_option
@click.pass_context
def init(ctx: click.Context, path: Path | None, force: bool, json_output: bool) -> None:
    """Write a commented config file: settings given as flags or in the environment as values,
    the others as commented-out defaults. An existing file is kept unless --force.
    """
    from edge_sdk.durable import atomic_write_bytes
    from host_tools.config import render_config_file
    from host_tools.report.config import init_data, init_text

    cfg = _cfg(ctx, json_output, read_file=False)
    _load_settings(ctx, ctx.find_root().params["config_path"], read_file=False)
    target: Path = (path or ctx.meta[_CONFIG_PATH]).expanduser().absolute()
    replaced = target.exists()
    if replaced and not force:
        raise ConfigError(f"config file {target} exists; --force replaces it", path=str(target))
    settings = ctx.meta[_SETTINGS]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make {target.parent} for the config file: {exc.strerror}") from exc
    atomic_write_bytes(target, render_config_file(settings).encode())
    written = [r for r in settings.values() if r.layer in ("flag", "env") and not r.secret]
    _emit(cfg, init_data(target, written, replaced), lambda: init_text(target, written, replaced))


@cli.group("config")
def config_group() -> None:
    """The settings in effect: flag > environment > config file > default."""


@config_group.command("show")
@click.option(
    "--broker",
    envvar="EDGE_SDK_BROKER",
    help=f"a broker URL, {BROKER_URL_HELP}, to show as the command would take it",
    expose_value=False,
    callback=_remember_setting_flag,
)
@broker_auth_options
@json_option
@click.pass_context
def config_show(ctx: click.Context, json_output: bool) -> None:
    """Print each setting, its value and where it came from (flag, env, file, default); secrets masked."""
    from host_tools.config import file_layers, resolve_settings
    from host_tools.report.config import settings_data, settings_text

    cfg = _cfg(ctx, json_output)
    config_file = ctx.meta.get(_CONFIG_FILE)
    files = file_layers(config_file, _connection_file(ctx))
    settings = resolve_settings(_setting_flags(ctx), os.environ, files, Path.home(), Path.cwd())
    path: Path = ctx.meta[_CONFIG_PATH]
    exists = path.is_file()
    _emit(cfg, settings_data(settings, path, exists), lambda: settings_text(settings, path, exists))


# --- keys -------------------------------------------------------------------------------


def _passphrase(env_name: str | None) -> bytes | None:
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if value is None:
        raise ConfigError(f"environment variable {env_name} (the key passphrase) is not set")
    return value.encode()


passphrase_option = click.option(
    "--passphrase-env", metavar="VAR", help="read the private key's passphrase from this environment variable"
)


@cli.group()
def keys() -> None:
    """Manage signing keys and the root of trust devices ship with (HOME/keys/root.json)."""


def _authority(cfg: HostConfig, passphrase_env: str | None) -> Any:
    """The command keys and the root chain, for every command sent to a device."""
    from host_tools.keys import KeyRing, command_authority

    return command_authority(KeyRing(cfg.keys_dir), _passphrase(passphrase_env))


@keys.command("init")
@passphrase_option
@click.option("--force", is_flag=True, help="start over: new keys and root v1 (devices must be re-provisioned)")
@click.option("--root-keys", default=1, show_default=True, help="how many root keys")
@click.option("--root-threshold", default=1, show_default=True, help="how many root keys must sign a new root")
@click.option("--ttl-days", default=365.0, show_default=True, help="days until the root expires")
@json_option
@click.pass_context
def keys_init(
    ctx: click.Context,
    passphrase_env: str | None,
    force: bool,
    root_keys: int,
    root_threshold: int,
    ttl_days: float,
    json_output: bool,
) -> None:
    """Create root, bundle and command keys (private keys 0600) and root v1, unless they exist."""
    from host_tools.keys import init_keys
    from host_tools.report.keys import root_text

    cfg = _cfg(ctx, json_output)
    ring, created = init_keys(
        cfg.keys_dir, time.time(), _passphrase(passphrase_env), force, root_keys, root_threshold, ttl_days * 86400.0
    )
    summary = ring.summary()
    data = {"created": created, **summary.to_dict()}
    _emit(cfg, data, lambda: ("created " if created else "exists: ") + root_text(summary))


@keys.command("show")
@json_option
@click.pass_context
def keys_show(ctx: click.Context, json_output: bool) -> None:
    """Show the root of trust: its version, expiry, and which keys act in each role."""
    from host_tools.keys import KeyRing
    from host_tools.report.keys import root_text

    cfg = _cfg(ctx, json_output)
    summary = KeyRing(cfg.keys_dir).summary()
    _emit(cfg, summary.to_dict(), lambda: root_text(summary))


@keys.command("rotate")
@click.argument("role", type=click.Choice(["root", "bundles", "commands"]))
@click.option("--keyid", help="which key of the role to replace (default: its only key)")
@click.option("--ttl-days", default=365.0, show_default=True, help="days until the new root expires")
@passphrase_option
@json_option
@click.pass_context
def keys_rotate(
    ctx: click.Context, role: str, keyid: str | None, ttl_days: float, passphrase_env: str | None, json_output: bool
) -> None:
    """Replace a key of ROLE and publish the next root (devices get it with the next command).

    Rotating the bundles key makes devices refuse every bundle packed before: re-sign
    those with `edgectl resign BUNDLE`.
    """
    from host_tools.keys import KeyRing, rotate_key, rotation_warning
    from host_tools.report.keys import root_text

    cfg = _cfg(ctx, json_output)
    old, key, _ = rotate_key(cfg.keys_dir, role, time.time(), _passphrase(passphrase_env), keyid, ttl_days * 86400.0)
    summary = KeyRing(cfg.keys_dir).summary()
    warning = rotation_warning(role, old, summary.version)
    data = {"replaced": old, "new_keyid": key.keyid, "warnings": [warning] if warning else [], **summary.to_dict()}
    if warning:
        _echo_for_terminal(f"edgectl: warning: {warning}", err=True)
    _emit(cfg, data, lambda: f"{role}: {old} replaced by {key.keyid}\n" + root_text(summary))


@keys.command("revoke")
@click.argument("keyid")
@click.option("--ttl-days", default=365.0, show_default=True, help="days until the new root expires")
@passphrase_option
@json_option
@click.pass_context
def keys_revoke(ctx: click.Context, keyid: str, ttl_days: float, passphrase_env: str | None, json_output: bool) -> None:
    """Publish the next root without KEYID; a device stops trusting it as soon as it sees that root."""
    from host_tools.keys import KeyRing, revoke_key
    from host_tools.report.keys import root_text

    cfg = _cfg(ctx, json_output)
    revoke_key(cfg.keys_dir, keyid, time.time(), _passphrase(passphrase_env), ttl_days * 86400.0)
    summary = KeyRing(cfg.keys_dir).summary()
    data = {"revoked": keyid, **summary.to_dict()}
    _emit(cfg, data, lambda: f"revoked {keyid}\n" + root_text(summary))


# --- fleet CA ---------------------------------------------------------------------------


@cli.group()
def ca() -> None:
    """The fleet CA: TLS client certificates for edgectl and devices (HOME/ca), for the shipped Mosquitto config."""


@ca.command("init")
@click.option("--force", is_flag=True, help="start over: a new CA (every certificate issued before stops working)")
@click.option("--ttl-days", default=3650.0, show_default=True, help="days until the CA expires")
@click.option(
    "--operator",
    default="edge-host",
    show_default=True,
    help="CN of edgectl's own client certificate: a host user of the broker's ACL",
)
@click.option(
    "--broker-host",
    "broker_hosts",
    multiple=True,
    help="also issue the broker's server certificate for this DNS name or IP address (repeatable)",
)
@json_option
@click.pass_context
def ca_init(
    ctx: click.Context, force: bool, ttl_days: float, operator: str, broker_hosts: tuple[str, ...], json_output: bool
) -> None:
    """Make the fleet CA (ECDSA P-256; key 0600) and edgectl's client certificate, unless a CA exists."""
    from host_tools.provision import init_ca
    from host_tools.report.provision import ca_text

    cfg = _cfg(ctx, json_output)
    summary = init_ca(
        cfg.home / "ca", time.time(), ttl_days=ttl_days, operator=operator, broker_hosts=broker_hosts, force=force
    )
    _emit(cfg, summary.to_dict(), lambda: ca_text(summary, operator))


# --- compress ---------------------------------------------------------------------------


@cli.command()
@click.argument("model", type=InputFile())
@click.option(
    "-o",
    "--output",
    type=OutputFile(),
    required=True,
    help="compressed model; its directory (and --packed's) must exist and be writable, checked before any work",
)
@click.option(
    "--quantize",
    help="int8-static (needs --calib), int8-static-entropy, int8-static-percentile, "
    "int8-static-per-tensor, int8-dynamic, int8-dynamic-per-channel, fp16, int4-weight. When no step is given: "
    "int8-static with --calib, int8-dynamic (needs no data) without. For a .tflite MODEL "
    "(ai-edge-quantizer): "
    "int8-static, int8-dynamic, int8-weight-only, int4-weight-only, int16-static",
)
@click.option(
    "--lowrank",
    help="SVD-factorize large Gemm/MatMul/1x1 Conv layers: retained energy (e.g. 0.9), a parameter "
    "reduction (e.g. 2x), or 'auto' to pick ranks within --max-accuracy-drop",
)
@click.option(
    "--weight-share", type=click.IntRange(1, 8), help="cluster each large float weight into 2**BITS shared values"
)
@click.option(
    "--distill",
    help="replace the model by a student trained on its soft targets: mlp:WIDTH[,WIDTH...] or a student.onnx "
    "to train (needs --train, torch)",
)
@click.option("--distill-temperature", type=float, default=4.0, show_default=True, help="distillation temperature T")
@click.option("--distill-alpha", type=float, default=0.7, show_default=True, help="weight of the soft (teacher) loss")
@click.option(
    "--prune",
    help="magnitude:S (global), layer:S (per layer), sensitivity:S (target sparsity S), or channels:R "
    "(remove share R of channels/neurons; the dense model shrinks)",
)
@click.option(
    "--finetune",
    "finetune_epochs",
    type=click.IntRange(1),
    help="fine-tune this many epochs after pruning and low-rank, before weight sharing and quantization "
    "(needs --train, torch)",
)
@click.option(
    "--train",
    "train_data",
    type=DataSource(),
    help="training data for --distill (labels unless --distill-alpha 1), --finetune, sensitivity: "
    ".npz or module:function",
)
@click.option("--epochs", "train_epochs", type=click.IntRange(1), help="training epochs for --distill (default 60)")
@click.option(
    "--recipe",
    type=InputFile(),
    help="TOML recipe of [[step]] tables (instead of step options)",
)
@click.option(
    "--packed",
    type=OutputFile(),
    help="also write the packed transport form (codebooks + entropy-coded indices) of the output here",
)
@click.option(
    "--calib", type=DataSource(), help="calibration data: .npz (x, or x.NAME per input), .npy or module:function"
)
@click.option(
    "--eval",
    "eval_data",
    type=DataSource(),
    help="evaluation data: .npz (x, or x.NAME per input; labels y if any), .npy or module:function",
)
@click.option(
    "--quality",
    "quality_metric",
    type=click.Choice(["accuracy", "agreement", "cosine"]),
    help="how --eval scores each step: accuracy (needs labels; the default with them), agreement (top-1 class "
    "of the original; the default without), cosine (lowest per-sample cosine of the output to the original's, "
    "for embedding models)",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    help="quality budget (fraction, e.g. 0.005): quantization keeps its most sensitive nodes in float to meet it, "
    "and nothing is written if the final model still misses it",
)
@click.option(
    "--guard-ranking",
    type=click.Choice(["error", "measured"]),
    help="how --max-accuracy-drop picks nodes to keep in float: error (default; local error, one run) or measured "
    "(one quantization per node, ranked by the quality metric itself; slower, better for transformers)",
)
@json_option
@click.pass_context
def compress(
    ctx: click.Context,
    model: Path,
    output: Path,
    quantize: str | None,
    lowrank: str | None,
    weight_share: int | None,
    distill: str | None,
    distill_temperature: float,
    distill_alpha: float,
    prune: str | None,
    finetune_epochs: int | None,
    train_data: str | None,
    train_epochs: int | None,
    recipe: Path | None,
    packed: Path | None,
    calib: str | None,
    eval_data: str | None,
    quality_metric: str | None,
    max_accuracy_drop: float | None,
    guard_ranking: str | None,
    json_output: bool,
) -> None:
    """Compress MODEL and report size, accuracy and host latency per step.

    The run is kept in the registry (`edgectl runs`, `edgectl compare`). When the registry
    cannot be written (unwritable, locked past its timeout), the compressed model is still
    written and whole and the command succeeds (exit 0): it says on stderr that the run was
    not kept, naming the registry and the cause.
    """
    from host_tools import compress as hc
    from host_tools.report.compress import compress_text

    cfg = _cfg(ctx, json_output)
    steps = hc.StepOptions(
        quantize=quantize, lowrank=lowrank, weight_share=weight_share, distill=distill,
        distill_temperature=distill_temperature, distill_alpha=distill_alpha, prune=prune,
        finetune_epochs=finetune_epochs, train_epochs=train_epochs, max_accuracy_drop=max_accuracy_drop,
        guard_ranking=guard_ranking,
    )  # fmt: skip
    job = hc.CompressJob(
        model, output, steps, recipe=recipe, packed=packed, calibration=calib, evaluation=eval_data,
        training=train_data, quality_metric=quality_metric,
    )  # fmt: skip
    with _step_progress("compress", enabled=not job.is_tflite) as progress:
        result = hc.run_compress_job(job, progress)
    from host_tools.fleet.runs import compress_parameters

    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items() if k != "json_output"}
    done = f"the model {output} is written and whole"
    try:
        with _registry(cfg) as reg:
            _keep_run(reg, "compress", compress_parameters(model, output, given), result.to_dict(), done)
    except StorageError as exc:  # the registry cannot even be opened: the model is still good
        _run_not_kept("compress", exc, done)
    _emit(cfg, result.to_dict(), lambda: compress_text(result))


# --- pack and verify --------------------------------------------------------------------


@cli.command()
@click.argument("model", type=InputFile())
@click.option("-o", "--output", type=OutputFile(), required=True, help="bundle file to write")
@click.option("--name", required=True, help="bundle name, stable across versions")
@click.option("--version", "version", type=int, required=True, help="bundle version (positive, increasing)")
@click.option("--runtime", type=click.Choice(["onnxruntime", "litert"]), help="default: from the file suffix")
@click.option("--precision", help="what the model computes in (default: detected)")
@click.option(
    "--sample",
    type=InputFile(),
    help=".npz with one sample batch for the device's health check, keyed like --eval data: by the model's input "
    "names, x for a single-input model, or x.NAME per input; checked against the model's inputs (names, dtypes, "
    "shapes; axis 0 is the batch) and stored keyed by input name",
)
@click.option("--ttl-days", type=float, default=30.0, show_default=True, help="days until the manifest expires")
@click.option(
    "--max-latency-ms",
    type=float,
    help="health check: the device rolls back if the sample's median latency exceeds this",
)
@click.option(
    "--arch", "archs", multiple=True, help="target: an architecture the model runs on, e.g. aarch64 (repeatable)"
)
@click.option("--min-memory-mb", type=int, help="target: memory the device must have, in MiB")
@click.option(
    "--accelerator", "accelerators", multiple=True, help="target: an accelerator the device must have (repeatable)"
)
@click.option(
    "--sparse",
    is_flag=True,
    help="ship pruned MatMul/Gemm weights as CSR; the device measures sparse against dense execution "
    "(and dense int8 with --sparse-int8)",
)
@click.option(
    "--sparse-min-sparsity",
    type=float,
    default=0.5,
    show_default=True,
    help="with --sparse: a layer goes sparse from this fraction of zeros",
)
@click.option(
    "--sparse-int8",
    is_flag=True,
    help="with --sparse: store the sparse values as int8 with a scale per row "
    "(devices may then also run them dense int8)",
)
@click.option(
    "--execution",
    type=click.Choice(["auto", "dense", "dense_int8", "sparse"]),
    help="pin how devices run a --sparse bundle (default: they measure; dense_int8 needs --sparse-int8)",
)
@click.option(
    "--encrypt-to",
    "encrypt_to",
    multiple=True,
    metavar="DEVICE|KEYFILE",
    help="encrypt the payload for this recipient (repeatable): a recipient key file (edge-agent show-keys), "
    "or a device id whose key the registry learnt from its status. Device groups are not supported yet",
)
@passphrase_option
@json_option
@click.pass_context
def pack(
    ctx: click.Context,
    model: Path,
    output: Path,
    name: str,
    version: int,
    runtime: str | None,
    precision: str | None,
    sample: Path | None,
    ttl_days: float,
    max_latency_ms: float | None,
    archs: tuple[str, ...],
    min_memory_mb: int | None,
    accelerators: tuple[str, ...],
    sparse: bool,
    sparse_min_sparsity: float,
    sparse_int8: bool,
    execution: str | None,
    encrypt_to: tuple[str, ...],
    passphrase_env: str | None,
    json_output: bool,
) -> None:
    """Pack MODEL into a bundle signed by the root's bundle key(s)."""
    if not sparse and (sparse_int8 or execution):
        raise ConfigError("--sparse-int8 and --execution apply to --sparse bundles", key="sparse")
    if execution == "dense_int8" and not sparse_int8:
        raise ConfigError("--execution dense_int8 needs --sparse-int8 (int8 values to run)", key="execution")

    from edge_sdk.bundle import Target
    from host_tools.keys import KeyRing
    from host_tools.packing import PackOptions, SparseOptions, pack_model, resolve_recipients
    from host_tools.report.bundle import packed_text

    cfg = _cfg(ctx, json_output)
    recipients: tuple[Any, ...] = ()
    if encrypt_to:
        if all(Path(v).is_file() for v in encrypt_to):
            recipients = resolve_recipients(encrypt_to)
        else:
            with _registry(cfg) as reg:

                def device_key(device_id: str) -> str | None:
                    record = reg.get_device(device_id)
                    key = (record.platform or {}).get("decryption_key") if record is not None else None
                    return key if isinstance(key, str) else None

                recipients = resolve_recipients(encrypt_to, device_key)
    target = None
    if archs or min_memory_mb or accelerators:
        target = Target(tuple(archs), (min_memory_mb or 0) << 20, tuple(accelerators))
    options = PackOptions(
        model,
        output,
        name,
        version,
        runtime=runtime,
        precision=precision,
        sample=sample,
        ttl_s=ttl_days * 86400.0,
        max_latency_ms=max_latency_ms,
        target=target,
        sparse=SparseOptions(sparse_min_sparsity, sparse_int8, execution) if sparse else None,
        encrypt_to=recipients,
    )
    packed = pack_model(options, KeyRing(cfg.keys_dir), time.time(), _passphrase(passphrase_env))
    _emit(cfg, packed.to_dict(), packed_text(packed))


@cli.command()
@bundle_argument
@click.option(
    "--root",
    "root_file",
    type=InputFile(),
    help="root of trust to check against (default: HOME/keys/root.json)",
)
@click.option("--installed-version", type=int, help="check rollback protection against this installed version")
@click.option("--arch", help="check target constraints against this architecture")
@click.option("--memory-mb", type=int, help="... and this much memory (MiB)")
@click.option("--accelerator", "accelerators", multiple=True, help="... and these accelerators (repeatable)")
@json_option
@click.pass_context
def verify(
    ctx: click.Context,
    bundle: Path,
    root_file: Path | None,
    installed_version: int | None,
    arch: str | None,
    memory_mb: int | None,
    accelerators: tuple[str, ...],
    json_output: bool,
) -> None:
    """Run every check a device runs on BUNDLE and explain each one (a failing one marked FAIL)."""
    from edge_sdk.bundle import DeviceFacts
    from host_tools.keys import KeyRing
    from host_tools.packing import CheckOptions, checklist_bundle
    from host_tools.report.bundle import checklist_text

    cfg = _cfg(ctx, json_output)
    device = DeviceFacts(arch, (memory_mb or 0) << 20, frozenset(accelerators)) if arch else None
    options = CheckOptions(root_file, installed_version, device)
    checklist = checklist_bundle(bundle, KeyRing(cfg.keys_dir), time.time(), options)
    if checklist.error is not None:
        raise CommandFailed(checklist.error, checklist.to_dict(), checklist_text(checklist))
    _emit(cfg, checklist.to_dict(), checklist_text(checklist))


@cli.command()
@bundle_argument
@click.option("-o", "--output", type=OutputFile(), help="bundle file to write (default: BUNDLE)")
@passphrase_option
@json_option
@click.pass_context
def resign(
    ctx: click.Context, bundle: Path, output: Path | None, passphrase_env: str | None, json_output: bool
) -> None:
    """Sign BUNDLE again with the current bundle keys: same payload, manifest and version.

    After `edgectl keys rotate bundles` devices refuse bundles packed before; a re-signed
    one deploys again. Only a bundle signed by a bundle key of one of HOME/keys' roots (rotated
    out, not revoked) is re-signed, and only if every file matches its manifest. The output is
    written atomically; without -o it replaces BUNDLE.
    """
    from host_tools.keys import KeyRing
    from host_tools.packing import resign_bundle
    from host_tools.report.bundle import resigned_text

    cfg = _cfg(ctx, json_output)
    resigned = resign_bundle(bundle, KeyRing(cfg.keys_dir), time.time(), output, _passphrase(passphrase_env))
    _emit(cfg, resigned.to_dict(), resigned_text(resigned))


# --- fleet ------------------------------------------------------------------------------


benchmark_options = _stacked(
    click.option(
        "--runs", default=200, show_default=True, type=click.IntRange(1, 100_000), help="timed inferences on the device"
    ),
    click.option(
        "--warmup", default=20, show_default=True, type=click.IntRange(0, 10_000), help="untimed warm-up inferences"
    ),
    click.option(
        "--threads", default=1, show_default=True, type=click.IntRange(1, 256), help="inference threads on the device"
    ),
)
chunk_size_option = click.option(
    "--chunk-size",
    default=64 * 1024,
    show_default=True,
    type=click.IntRange(1024, 1 << 20),
    help="bytes per MQTT chunk (1 KiB to 1 MiB)",
)
# The last options of every command that signs a command for a device.
signed_command_options = _stacked(passphrase_option, json_option)


def _transfer_options(cfg: HostConfig, passphrase_env: str | None, benchmark: dict[str, Any], **options: Any) -> Any:
    """``DeployOptions`` for ``deploy`` and ``profile``, with the command keys as authority.

    Options the transfer refuses are a usage error (exit 2); command keys that cannot be
    loaded keep their own blame (no keys yet: local state, 5; a passphrase missing: 2),
    as in every other command.
    """
    from edge_sdk.protocol import BenchmarkSpec
    from host_tools.fleet.deployer import DeployOptions

    authority = _authority(cfg, passphrase_env)
    try:
        return DeployOptions(benchmark=BenchmarkSpec(**benchmark), authority=authority, **options)
    except EdgeError as exc:
        raise ConfigError(exc.message) from exc


def _raise_refusal(cfg: HostConfig, outcome: Any, data: dict[str, Any]) -> None:
    """Raise a refused or failed transfer as the device's error (exit code by its blame), with what to print."""
    from host_tools.report.fleet import refusal_text

    if outcome.error is not None:
        raise CommandFailed(outcome.error, data, refusal_text(outcome))


def _rate(text: str | None) -> float | None:
    """``--rate`` in bytes per second (a rate it cannot read is a usage error, exit 2)."""
    from host_tools.fleet.pacing import parse_rate

    return None if text is None else parse_rate(text)


@cli.command()
@bundle_argument
@click.option(
    "--device",
    "device_ids",
    required=True,
    multiple=True,
    help="target device id; repeat for several (the bundle is sent once, every device gets its own signed command)",
)
@broker_options
@benchmark_options
@chunk_size_option
@click.option(
    "--rate",
    default=None,
    metavar="RATE",
    help="cap on the bytes per second of this transfer, for metered links (200KB/s, 1.5MiB/s; K=1000, Ki=1024)",
)
@click.option(
    "--window",
    default=64,
    show_default=True,
    type=click.IntRange(16, 4096),
    help="chunks in flight beyond what each device has acknowledged; keep it below the broker's per-client "
    "queue (Mosquitto max_queued_messages: 1000 by default and in deploy/mosquitto)",
)
@click.option("--accept-timeout", default=15.0, show_default=True, help="seconds the device has to accept the offer")
@click.option(
    "--timeout", "timeout_s", default=180.0, show_default=True, help="seconds to wait for the device to finish"
)
@click.option(
    "--rollback", is_flag=True, help="allow this version even if the device accepted a newer one (signed downgrade)"
)
@click.option(
    "--no-delta",
    is_flag=True,
    help="send the whole bundle to every device, even to those that run a version the host has a delta base for",
)
@click.option(
    "--delta-from",
    type=InputFile(),
    default=None,
    metavar="OLD.edge",
    help="the bundle of the version the devices run, for deltas when the host's bundle store lacks it",
)
@click.option(
    "--min-duration",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 600),
    help="benchmark for at least this many seconds as well as --runs (whichever is longer), so CPU and power "
    "of a fast model are measured over a window long enough to mean something",
)
@signed_command_options
@click.pass_context
def deploy(
    ctx: click.Context,
    bundle: Path,
    device_ids: tuple[str, ...],
    broker: str,
    connect_timeout: float,
    runs: int,
    warmup: int,
    threads: int,
    chunk_size: int,
    rate: str | None,
    window: int,
    accept_timeout: float,
    timeout_s: float,
    rollback: bool,
    no_delta: bool,
    delta_from: Path | None,
    min_duration: float,
    passphrase_env: str | None,
    json_output: bool,
) -> None:
    """Send BUNDLE to devices with signed commands, wait until each installed it, print the metrics.

    With several --device, the bundle travels once on a transfer topic every device
    subscribes to, and each device gets one row; devices that already run this version
    (as the registry knows them) are refused before any byte moves. Exit code 0 when every
    device installed or deferred it, else the exit code of the first device that did not.

    Every bundle deployed is kept in the home's bundle store (the last 4 per name). A device
    that runs an older version whose bundle the host has (from the store, or --delta-from)
    is sent only what changed, a delta it rebuilds the bundle from; a device whose installed
    version turns out not to match takes the whole bundle by itself. --no-delta sends the
    whole bundle to every device. The JSON's "delivery" says, per device, which it got.

    Each device benchmarks the installed model for --runs timed inferences and at least
    --min-duration seconds (default 1 s; at most 100,000 runs): 200 runs of a 20 us model take 4 ms, too short
    for CPU time (counted in 10 ms ticks) or a power estimate to mean anything.
    """
    from host_tools.fleet.bundle_store import BundleStore
    from host_tools.fleet.delta_offers import DeltaSettings
    from host_tools.fleet.deployer import already_runs, deploy_and_record, deploy_many
    from host_tools.report.fleet import deploy_data, deploy_many_data, deploy_many_text, deploy_text

    cfg = _cfg(ctx, json_output)
    if no_delta and delta_from is not None:
        raise click.BadParameter(
            "--delta-from gives a base for deltas, which --no-delta turns off", param_hint="--delta-from"
        )
    deltas = DeltaSettings(store=BundleStore(cfg.home / "bundles"), offer=not no_delta, base=delta_from)
    options = _transfer_options(
        cfg, passphrase_env, {"runs": runs, "warmup": warmup, "threads": threads, "min_duration_s": min_duration},
        chunk_size=chunk_size, accept_timeout_s=accept_timeout, finish_timeout_s=timeout_s, rollback=rollback,
        rate_bytes_per_s=_rate(rate), window=window, deltas=deltas,
    )  # fmt: skip
    if len(set(device_ids)) != len(device_ids):
        raise click.BadParameter("a device is named more than once", param_hint="--device")
    progress = _byte_progress(bundle.name)
    with _registry(cfg) as reg, _client(broker, connect_timeout, "deploy") as client, _gated(cfg, reg, client) as r:
        if len(device_ids) == 1:
            outcome = deploy_and_record(client, reg, device_ids[0], bundle, options, progress, router=r)
        else:
            outcomes = deploy_many(client, reg, list(device_ids), bundle, options, progress, router=r)
        from host_tools.fleet.runs import bundle_parameters

        kept = [outcome] if len(device_ids) == 1 else outcomes
        asked = bundle_parameters(bundle, device_ids, options.benchmark.to_dict())
        _keep_run(reg, "deploy", asked, deploy_many_data(kept))
    if len(device_ids) == 1:
        data = deploy_data(outcome)
        _raise_refusal(cfg, outcome, data)
        _emit(cfg, data, lambda: deploy_text(outcome))
        return
    many = deploy_many_data(outcomes)
    failed = next((o for o in outcomes if o.error is not None and not already_runs(o)), None)
    if failed is not None:
        raise CommandFailed(failed.error, many, lambda: deploy_many_text(outcomes))  # type: ignore[arg-type]
    _emit(cfg, many, lambda: deploy_many_text(outcomes))


@cli.command()
@click.argument("device_id", metavar="DEVICE")
@bundle_argument
@broker_options
@benchmark_options
@click.option(
    "--min-duration",
    default=1.0,
    show_default=True,
    help="keep running for at least this many seconds (as deploy: a short window measures nothing)",
)
@chunk_size_option
@click.option(
    "--timeout", "timeout_s", default=180.0, show_default=True, help="seconds to wait for the device's report"
)
@signed_command_options
@click.pass_context
def profile(
    ctx: click.Context,
    device_id: str,
    bundle: Path,
    broker: str,
    connect_timeout: float,
    runs: int,
    warmup: int,
    threads: int,
    min_duration: float,
    chunk_size: int,
    timeout_s: float,
    passphrase_env: str | None,
    json_output: bool,
) -> None:
    """Benchmark BUNDLE on DEVICE without installing it; print and store the device's metrics.

    The device verifies the bundle as for a deploy, runs it from a scratch directory and
    removes it afterwards; what it has installed does not change.
    """
    from host_tools.fleet.profiler import profile_and_record
    from host_tools.report.fleet import outcome_data, profile_text

    cfg = _cfg(ctx, json_output)
    options = _transfer_options(
        cfg, passphrase_env, {"runs": runs, "warmup": warmup, "threads": threads, "min_duration_s": min_duration},
        chunk_size=chunk_size, finish_timeout_s=timeout_s,
    )  # fmt: skip
    with _registry(cfg) as reg, _client(broker, connect_timeout, "profile") as client, _gated(cfg, reg, client) as r:
        outcome = profile_and_record(client, reg, device_id, bundle, options, _byte_progress(bundle.name), router=r)
        from host_tools.fleet.runs import bundle_parameters

        _keep_run(reg, "profile", bundle_parameters(bundle, [device_id], options.benchmark.to_dict()), {
            "outcomes": [outcome_data(outcome)]
        })  # fmt: skip
    data = outcome_data(outcome)
    _raise_refusal(cfg, outcome, data)
    _emit(cfg, data, lambda: profile_text(outcome))


def _command_result(cfg: HostConfig, device_id: str, event: Any, what: str) -> None:
    """Print the device's answer to a command; raise its error unless it is done.

    A ``remove`` the device answered with "nothing of that name was installed" is a
    failure too (:class:`~edge_sdk.errors.NotInstalledError`, exit 3): the command did nothing.
    """
    from edge_sdk.protocol import EventKind
    from host_tools.fleet.conversation import error_of
    from host_tools.report.fleet import command_data, command_text

    data, text = command_data(device_id, event), command_text(device_id, event, what)
    if event.kind != EventKind.DONE:
        raise CommandFailed(error_of(event), data, text)
    if event.detail.get("action") == "remove" and event.detail.get("removed", 0) is None:
        name = event.detail.get("name")
        error = NotInstalledError(
            f"{device_id} does not have {name} installed; nothing was removed", device_id=device_id, name=name
        )
        raise CommandFailed(error, data, text)
    _emit(cfg, data, text)


bundle_name_option = click.option("--name", required=True, help="bundle name")
# What follows the command's own options in ``rollback`` and ``remove``.
device_answer_options = _stacked(
    broker_options,
    click.option("--timeout", "timeout_s", default=30.0, show_default=True, help="seconds to wait for the device"),
    signed_command_options,
)


@cli.command()
@device_option
@bundle_name_option
@click.option("--version", "version", type=int, required=True, help="the version the device kept as previous")
@device_answer_options
@click.pass_context
def rollback(
    ctx: click.Context,
    device_id: str,
    name: str,
    version: int,
    broker: str,
    connect_timeout: float,
    timeout_s: float,
    passphrase_env: str | None,
    json_output: bool,
) -> None:
    """Make a device re-activate the version of NAME it kept (a signed command naming VERSION).

    To go back to a version the device no longer keeps, `edgectl deploy --rollback` its bundle.
    """
    from edge_sdk.protocol import RollbackCommand
    from host_tools.fleet.deployer import run_command

    cfg = _cfg(ctx, json_output)
    authority = _authority(cfg, passphrase_env)
    with _registry(cfg) as reg, _client(broker, connect_timeout, "rollback") as client, _gated(cfg, reg, client) as r:
        event = run_command(
            client,
            device_id,
            # run_command types the signed fields as object; they are the fields RollbackCommand takes.
            lambda cid, f: RollbackCommand(cid, name, version, **f),  # type: ignore[arg-type]
            authority,
            timeout_s,
            router=r,
        )
    _command_result(cfg, device_id, event, f"roll {name} back to v{version}")


@cli.command()
@device_option
@bundle_name_option
@device_answer_options
@click.pass_context
def remove(
    ctx: click.Context,
    device_id: str,
    name: str,
    broker: str,
    connect_timeout: float,
    timeout_s: float,
    passphrase_env: str | None,
    json_output: bool,
) -> None:
    """Make a device stop running NAME and delete it (a signed command); older versions stay refused."""
    from edge_sdk.protocol import RemoveCommand
    from host_tools.fleet.deployer import run_command

    cfg = _cfg(ctx, json_output)
    authority = _authority(cfg, passphrase_env)
    with _registry(cfg) as reg, _client(broker, connect_timeout, "remove") as client, _gated(cfg, reg, client) as r:
        event = run_command(
            client,
            device_id,
            # run_command types the signed fields as object; they are the fields RemoveCommand takes.
            lambda cid, f: RemoveCommand(cid, name, **f),  # type: ignore[arg-type]
            authority,
            timeout_s,
            router=r,
        )
    _command_result(cfg, device_id, event, f"remove {name}")


def _json_text(item: Any) -> str:
    """One item of a streamed JSON list (unsorted: a quarter faster)."""
    return json.dumps(item, default=str, ensure_ascii=True)


def _print_json_texts(texts: Iterable[str]) -> int:
    """A JSON list of items already encoded, one per line, written in blocks of 1,000.

    The cyclic garbage collector is paused meanwhile: what a listing makes per item (rows,
    tuples, texts) is freed by reference counting alone, and the collector's passes over it
    cost a few per cent of a long listing.

    Returns:
        How many items were written.
    """
    out, items = sys.stdout, iter(texts)
    out.write("[")
    n = 0
    collecting = gc.isenabled()
    gc.disable()
    try:
        while block := list(itertools.islice(items, 1000)):
            out.write(",\n" if n else "\n")  # apart from the block: no copy of it to put this in front
            out.write(",\n".join(block))
            n += len(block)
    finally:
        if collecting:
            gc.enable()
    out.write("\n]\n" if n else "]\n")
    out.flush()
    return n


def _selector(reg: Any, text: str | None) -> Any:
    """``--select``/``--to`` as a selector: ``@group`` for a saved one (see host_tools/fleet/selectors.py)."""
    from host_tools.fleet.selectors import Selector, resolve_selector

    if text is None:
        return Selector()

    def saved(name: str) -> str | None:
        group = reg.get_group(name)
        return None if group is None else str(group.selector)

    return resolve_selector(text, saved)


# --- rollouts ---------------------------------------------------------------------------------


def _share(text: str, what: str) -> float:
    """``3%`` or ``0.03`` as a fraction (a usage error, exit 2, when it is neither)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a share such as 3% or 0.03", param_hint=what) from None
    if not 0 <= value <= 1:
        raise click.BadParameter(f"{text!r} is not between 0% and 100%", param_hint=what)
    return value


def _rollout_policy(flags: dict[str, Any]) -> Any:
    """The ``RolloutPolicy`` of ``rollout start``'s flags (out of range: a usage error, exit 2)."""
    from host_tools.fleet.rollout_plan import MaintenanceWindow, RolloutPolicy

    canary, wave_size, wave_factor, window = flags["canary"], flags["wave_size"], flags["wave_factor"], flags["window"]

    if wave_size is not None and wave_factor is not None:
        raise click.BadParameter("give --wave-size or --wave-factor, not both", param_hint="--wave-size")
    count = int(canary) if canary.isdigit() else None
    try:
        return RolloutPolicy(
            canary_count=count,
            canary_share=None if count is not None else _share(canary, "--canary"),
            wave_size=wave_size,
            wave_factor=None if wave_size is not None else (wave_factor or 2.0),
            success_threshold=_share(flags["success_threshold"], "--success-threshold"),
            abort_threshold=_share(flags["abort_threshold"], "--abort-threshold"),
            device_timeout_s=flags["device_timeout"],
            window=None if window is None else MaintenanceWindow.parse(window),
            max_p99_ratio=flags["max_p99_ratio"] or None,
            max_rss_ratio=flags["max_rss_ratio"] or None,
            retries=flags["retries"],
        )
    except EdgeError as exc:
        raise ConfigError(exc.message) from exc


def _rollout_progress(cfg: HostConfig) -> Callable[[Any], None]:
    """Per-wave progress on stderr as it changes: bars on a terminal, plain lines in a log."""
    from host_tools.report.rollouts import wave_line

    last: dict[int, str] = {}

    def show(report: Any) -> None:
        bars = _on_terminal()
        for wave, counts in enumerate(report.waves):
            line = wave_line(wave, counts, bars)
            if counts and last.get(wave) != line:
                last[wave] = line
                _echo_for_terminal(f"rollout {report.record.id}: {line.strip()}", err=True)

    return show


def _run_rollout(cfg: HostConfig, rollout_id: str, broker: str, connect_timeout: float, options: Any) -> None:
    """Run a stored rollout to its end (or pause, or only offline devices left) and print the report."""
    from host_tools.fleet.rollouts import RolloutAbortedError, RolloutRunner
    from host_tools.fleet.runs import rollout_run
    from host_tools.report.rollouts import rollout_text

    with _registry(cfg) as reg, _client(broker, connect_timeout, "rollout") as client, _gated(cfg, reg, client) as r:
        report = RolloutRunner(client, reg, r, rollout_id, options, progress=_rollout_progress(cfg)).run()
        _keep_run(reg, "rollout", *rollout_run(report))  # each start and resume is a run of its own
    record = report.record
    if record.status == "aborted" and not record.reason.startswith("aborted by the operator"):
        error = RolloutAbortedError(f"rollout {rollout_id} aborted: {record.reason}", rollout_id=rollout_id)
        raise CommandFailed(error, report.to_dict(), lambda: rollout_text(report, _on_terminal()))
    _emit(cfg, report.to_dict(), lambda: rollout_text(report, _on_terminal()))


def _rollout_deploy_options(cfg: HostConfig, passphrase_env: str | None, runs: int, warmup: int, threads: int,
                            device_timeout: float, chunk_size: int) -> Any:  # fmt: skip
    return _transfer_options(
        cfg, passphrase_env, {"runs": runs, "warmup": warmup, "threads": threads},
        chunk_size=chunk_size, finish_timeout_s=device_timeout,
    )  # fmt: skip


@cli.group()
def rollout() -> None:
    """Roll a bundle out to many devices in waves that stop themselves when devices fail.

    A canary first, then waves (fixed size, or growing by a factor). A wave advances once enough
    of its devices activated the bundle, passed their health check and confirmed with metrics
    within the health gate (p99 latency and RSS against the version each ran before); failures
    beyond the abort threshold stop the rollout and roll the devices that installed back.
    The state lives in the registry: `rollout resume ID` carries on after edgectl was stopped.
    """


@rollout.command("start")
@bundle_argument
@click.option("--to", "selector", required=True, help="device ids (a,b,c) or key=value terms (status=online,...)")
@click.option("--canary", default="1%", show_default=True, help="the canary wave: a share (1%) or a count (3)")
@click.option("--wave-size", type=click.IntRange(1), help="devices per wave after the canary")
@click.option("--wave-factor", type=click.FloatRange(1), help="each wave is the canary's size times this to the k (2)")
@click.option("--success-threshold", default="95%", show_default=True, help="share of a wave that must succeed")
@click.option("--abort-threshold", default="5%", show_default=True, help="share of a wave whose failure aborts")
@click.option("--device-timeout", default=900.0, show_default=True, help="seconds a device has to install and report")
@click.option("--window", metavar="HH:MM-HH:MM", help="start devices only in this window (UTC)")
@click.option("--max-p99-ratio", default=1.5, show_default=True, help="health gate: p99 latency vs before (0: off)")
@click.option("--max-rss-ratio", default=1.5, show_default=True, help="health gate: peak RSS vs before (0: off)")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(0, 20), help="retries of a timeout")
@broker_options
@benchmark_options
@chunk_size_option
@signed_command_options
@click.pass_context
def rollout_start(
    ctx: click.Context,
    /,
    bundle: Path,
    selector: str,
    broker: str,
    connect_timeout: float,
    runs: int,
    warmup: int,
    threads: int,
    chunk_size: int,
    passphrase_env: str | None,
    json_output: bool,
    **policy_flags: Any,
) -> None:
    """Plan a rollout of BUNDLE to the devices --to selects, store it, and run it.

    Exit code 0 when it completed (or only offline devices are left: `rollout resume` goes on
    when they are back), 1 when it aborted; the report says where every device ended, as the
    devices' own statuses say.
    """
    import time as _time

    from host_tools.fleet.rollouts import create_rollout

    cfg = _cfg(ctx, json_output)
    policy = _rollout_policy(policy_flags)
    options = _rollout_deploy_options(cfg, passphrase_env, runs, warmup, threads, policy.device_timeout_s, chunk_size)
    with _registry(cfg) as reg:
        record = create_rollout(reg, bundle, selector, policy, _time.time())
    click.echo(f"edgectl: rollout {record.id}: {record.waves} wave(s)", err=True)
    _run_rollout(cfg, record.id, broker, connect_timeout, options)


@rollout.command("status")
@click.argument("rollout_id", metavar="[ID]", required=False)
@json_option
@click.pass_context
def rollout_status(ctx: click.Context, rollout_id: str | None, json_output: bool) -> None:
    """Show a rollout per wave and per device (from the registry), or list the latest rollouts."""
    from host_tools.fleet.rollouts import rollout_ids, rollout_report
    from host_tools.report.rollouts import rollout_list_text, rollout_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        if rollout_id is None:
            records = rollout_ids(reg)
            _emit(cfg, [r.to_dict() for r in records], lambda: rollout_list_text(records))
            return
        report = rollout_report(reg, rollout_id)
    _emit(cfg, report.to_dict(), lambda: rollout_text(report, sys.stdout.isatty()))


@rollout.command("pause")
@click.argument("rollout_id", metavar="ID")
@json_option
@click.pass_context
def rollout_pause(ctx: click.Context, rollout_id: str, json_output: bool) -> None:
    """Start no more devices (those under way finish and count); `rollout resume ID` goes on."""
    _rollout_request(_cfg(ctx, json_output), rollout_id, "pause")


def _rollout_request(cfg: HostConfig, rollout_id: str, what: str) -> Any:
    """Leave the request for the runner; with none running, apply a pause at once. Returns whether a runner is live."""
    import time as _time

    from host_tools.fleet.rollout_plan import Pause
    from host_tools.fleet.rollout_store import RolloutStore
    from host_tools.fleet.rollouts import operator_request, runner_is_live

    with _registry(cfg) as reg:
        record = operator_request(reg, rollout_id, what, _time.time())
        live = runner_is_live(record, _time.time())
        if what == "pause" and not live:
            store = RolloutStore(reg)
            store.take_request(rollout_id)
            _, planner = store.load(rollout_id)
            planner.accept(Pause(), _time.time())
            store.save(rollout_id, planner, _time.time())
        record = RolloutStore(reg).get(rollout_id)
    said = f"rollout {rollout_id}: {what} " + ("sent to its runner " + str(record.runner) if live else "recorded")
    if not (live or what == "pause"):
        return False
    _emit(cfg, {**record.to_dict(), "runner_live": live}, said)
    return live


def _rollout_carry_on(what: str, doc: str) -> None:
    """Define ``rollout WHAT ID``: leave the request for a live runner, or run the rollout with it here."""

    @rollout.command(what, help=doc)
    @click.argument("rollout_id", metavar="ID")
    @broker_options
    @benchmark_options
    @chunk_size_option
    @signed_command_options
    @click.pass_context
    def command(ctx: click.Context, rollout_id: str, broker: str, connect_timeout: float, runs: int, warmup: int,
                threads: int, chunk_size: int, passphrase_env: str | None, json_output: bool) -> None:  # fmt: skip
        cfg = _cfg(ctx, json_output)
        if _rollout_request(cfg, rollout_id, what):
            return
        options = _resume_options(cfg, rollout_id, passphrase_env, runs, warmup, threads, chunk_size)
        _run_rollout(cfg, rollout_id, broker, connect_timeout, options)


_rollout_carry_on("resume", "Carry on with a paused or interrupted rollout from where the registry says it stood.")
_rollout_carry_on(
    "abort",
    "Stop a rollout: no queued device starts; devices that installed are rolled back to what they ran before.",
)


def _resume_options(cfg: HostConfig, rollout_id: str, passphrase_env: str | None, runs: int, warmup: int, threads: int,
                    chunk_size: int) -> Any:  # fmt: skip
    from host_tools.fleet.rollout_store import RolloutStore

    with _registry(cfg) as reg:
        timeout = RolloutStore(reg).get(rollout_id).policy.device_timeout_s
    return _rollout_deploy_options(cfg, passphrase_env, runs, warmup, threads, timeout, chunk_size)


@cli.group(invoke_without_command=True)
@click.option(
    "--broker",
    envvar="EDGE_SDK_BROKER",
    help=f"broker URL, {BROKER_URL_HELP} (env EDGE_SDK_BROKER): first record its retained statuses "
    "(the listing itself reads the registry)",
)
@connect_timeout_option
@broker_auth_options
@click.option("--wait", "wait_s", default=1.0, show_default=True, help="seconds to listen for status with --broker")
@click.option(
    "--select", "select", metavar="SELECTOR", help="only devices it selects: site=depot-3,hw!=pi4,gpu,id=D or @GROUP"
)
@click.option("--state", type=click.Choice(["online", "stale", "offline"]), help="only devices in this state")
@click.option("--limit", type=click.IntRange(1), help="at most this many devices (the next page: --after)")
@click.option("--after", metavar="CURSOR", help="start after this device (DEVICE/BROKER, as the last page said)")
@click.option(
    "--stale-factor",
    type=click.FloatRange(min=1.0),
    default=3.0,
    show_default=True,
    help="heartbeat intervals a device may go unheard before it is stale",
)
@json_option
@click.pass_context
def devices(
    ctx: click.Context,
    broker: str | None,
    connect_timeout: float,
    wait_s: float,
    select: str | None,
    state: str | None,
    limit: int | None,
    after: str | None,
    stale_factor: float,
    json_output: bool,
) -> None:
    """List devices from the registry: state, labels, platform, active bundles, last seen.

    The registry is kept current by `edgectl collect`; the listing reads it and nothing
    else, complete however many devices there are (--json streams the list). A device is
    `online`, `stale` (not heard from within its heartbeat interval x --stale-factor) or
    `offline` (its goodbye or last will). Labels are the device's own (its config) and the
    operator's (`edgectl devices label`), which win on a shared key. Pages: --limit N, then
    --after CURSOR as printed on stderr.

    With --broker, the broker's retained statuses are recorded first, and a device is shown
    `online` only when this broker says so now: one seen on another broker, or whose status
    this broker no longer holds, shows its last known state "as of" when it was seen
    (`unknown` in --json, with `last_status`). `last seen` is in UTC.

    Only enrolled devices' signed messages are believed; what was dropped is counted per
    device and reason. `edgectl devices enroll|approve|revoke` manage enrolment.
    """
    if ctx.invoked_subcommand is not None:
        return
    from host_tools.fleet.inventory import (
        ListingQuery,
        current_devices,
        cursor_of,
        list_device_rows,
        list_devices,
        parse_cursor,
    )
    from host_tools.report.fleet import device_data, device_rows_json, devices_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        query = ListingQuery(
            selector=_selector(reg, select),
            state=state,  # type: ignore[arg-type]  # click.Choice gives one of the states
            limit=limit,
            after=None if after is None else parse_cursor(after),
            stale_factor=stale_factor,
        )
        now = time.time()
        if broker:
            with _client(broker, connect_timeout, "devices") as client:
                views: Any = current_devices(
                    reg, client, wait_s, allow_unsigned=cfg.allow_unsigned_reports, query=query
                )
        else:
            views = list_devices(reg, now, query)
        drops = reg.drop_counts()  # after the broker's read: it counts what its gate dropped
        pending = reg.list_enrolments("pending")
        last: list[Any] = []

        def tracked(items: Iterable[Any]) -> Iterator[Any]:
            for item in items:
                last[:] = [item]
                yield item

        def tracked_rows() -> Iterator[Any]:
            for item in list_device_rows(reg, now, query):
                last[:] = [item[0]]
                yield item

        if cfg.json_output and not broker:  # straight from the stored rows: no record, view or dict per device
            rows = list_device_rows(reg, now, query) if limit is None else tracked_rows()
            shown = _print_json_texts(device_rows_json(rows, now, drops))
        elif cfg.json_output:
            shown = _print_json_texts(_json_text(device_data(v, now, drops)) for v in tracked(views))
        else:
            listed = list(tracked(views))
            shown = len(listed)
            _echo_for_terminal(devices_text(listed, now, drops, len(pending)))
    if limit is not None and shown == limit and last:
        _echo_for_terminal(f"edgectl: next page: --after {cursor_of(last[0])}", err=True)


@devices.command("label")
@click.argument("device_id", metavar="DEVICE")
@click.argument("labels", metavar="KEY=VALUE...", nargs=-1)
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="remove this operator label (repeatable)")
@json_option
@click.pass_context
def devices_label(
    ctx: click.Context, device_id: str, labels: tuple[str, ...], remove: tuple[str, ...], json_output: bool
) -> None:
    """Set operator labels on DEVICE (they override the device's own on the same key), or --remove them."""
    from edge_sdk.protocol.labels import check_label_key, parse_labels
    from host_tools.fleet.inventory import label_device
    from host_tools.report.fleet import labels_text

    if not labels and not remove:
        raise click.UsageError("give KEY=VALUE labels to set, or --remove KEY")
    wanted = parse_labels(labels)
    gone = tuple(check_label_key(k) for k in remove)
    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        view = label_device(reg, device_id, wanted, gone, time.time())
    data = {
        "device_id": device_id,
        "labels": view.labels,
        "label_sources": view.label_sources(),
        "operator_labels": dict(view.operator_labels),
    }
    _emit(cfg, data, lambda: labels_text(view))


@cli.group()
def groups() -> None:
    """Groups: selectors saved by name, used as @NAME wherever a selector is taken."""


@groups.command("add")
@click.argument("name")
@click.argument("selector")
@json_option
@click.pass_context
def groups_add(ctx: click.Context, name: str, selector: str, json_output: bool) -> None:
    """Save SELECTOR (e.g. 'site=depot-3,hw=pi5') as group NAME, replacing what NAME held."""
    from host_tools.fleet.selectors import check_group_name, parse_selector
    from host_tools.report.fleet import groups_text

    check_group_name(name)
    canonical = str(parse_selector(selector))
    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        group = reg.save_group(name, canonical, time.time())
    _emit(cfg, group.to_dict(), lambda: groups_text([group]))


@groups.command("list")
@json_option
@click.pass_context
def groups_list(ctx: click.Context, json_output: bool) -> None:
    """List the saved groups."""
    from host_tools.report.fleet import groups_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        saved = reg.list_groups()
    _emit(cfg, [g.to_dict() for g in saved], lambda: groups_text(saved))


@groups.command("rm")
@click.argument("name")
@json_option
@click.pass_context
def groups_rm(ctx: click.Context, name: str, json_output: bool) -> None:
    """Delete group NAME (deleting one that is not there is not an error)."""
    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        removed = reg.remove_group(name)
    _emit(
        cfg,
        {"name": name, "removed": removed},
        f"removed group {name}" if removed else f"no group {name}; nothing removed",
    )


@devices.command("forget")
@click.argument("device_id", metavar="ID")
@broker_options
@json_option
@click.pass_context
def devices_forget(ctx: click.Context, device_id: str, broker: str, connect_timeout: float, json_output: bool) -> None:
    """Forget a decommissioned device: delete its registry rows (every broker, its deployments
    and metrics) and clear its retained status and metrics on BROKER.

    Stop its agent first: a running agent announces itself again when it reconnects.
    """
    from host_tools.fleet.inventory import forget_device, require_known
    from host_tools.report.fleet import forget_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        require_known(reg, device_id)
        with _client(broker, connect_timeout, "forget") as client:
            result = forget_device(reg, client, device_id)
            address = str(client.address)
    _emit(cfg, {**result.to_dict(), "cleared_on": address}, lambda: forget_text(result, address))


@devices.command("enroll")
@click.argument("device_id", metavar="[ID]", required=False)
@click.option("--key", "key_file", type=InputFile(), help="the device's public key file")
@click.option("--fingerprint", help="approve the pending key only if its fingerprint is this one")
@json_option
@click.pass_context
def devices_enroll(
    ctx: click.Context, device_id: str | None, key_file: Path | None, fingerprint: str | None, json_output: bool
) -> None:
    """List devices waiting for enrolment, or enroll ID with its key file (--key) or the pending key's --fingerprint."""
    from host_tools.fleet.enrolment import enroll_device
    from host_tools.report.fleet import enrolments_data, enrolments_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        if device_id is None:
            if key_file or fingerprint:
                raise click.UsageError("--key and --fingerprint need a device ID")
            pending = reg.list_enrolments("pending")
            _emit(cfg, enrolments_data(pending), lambda: enrolments_text(pending, "no device waits for enrolment"))
            return
        record = enroll_device(reg, device_id, time.time(), key_file=key_file, fingerprint=fingerprint)
    _emit(cfg, enrolments_data([record]), lambda: enrolments_text([record], ""))


@devices.command("approve")
@click.argument("device_id", metavar="ID")
@click.option("--yes", is_flag=True, help="do not ask; approve the key shown")
@json_option
@click.pass_context
def devices_approve(ctx: click.Context, device_id: str, yes: bool, json_output: bool) -> None:
    """Approve the key device ID announced, after showing its fingerprint."""
    from host_tools.fleet.enrolment import key_fingerprint, pending_enrolment
    from host_tools.report.fleet import enrolments_data, enrolments_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        shown = key_fingerprint(pending_enrolment(reg, device_id))
        if not yes:
            click.confirm(f"approve {device_id} with key fingerprint {shown}?", abort=True, err=True)
        record = reg.decide_enrolment(device_id, "approved", time.time())
    _emit(cfg, enrolments_data([record]), lambda: enrolments_text([record], ""))


@devices.command("revoke")
@click.argument("device_id", metavar="ID")
@json_option
@click.pass_context
def devices_revoke(ctx: click.Context, device_id: str, json_output: bool) -> None:
    """Stop believing device ID: its messages are dropped from now on."""
    from host_tools.report.fleet import enrolments_data, enrolments_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        record = reg.decide_enrolment(device_id, "revoked", time.time())
    _emit(cfg, enrolments_data([record]), lambda: enrolments_text([record], ""))


@devices.command("provision")
@click.argument("device_id", metavar="ID")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="directory to write (default HOME/devices/ID)",
)
@device_broker_option
@click.option(
    "--device-dir",
    default="/etc/edge-agent",
    show_default=True,
    help="where these files will be on the device (agent.toml names them there)",
)
@click.option(
    "--data-dir", default="/var/lib/edge-agent", show_default=True, help="the agent's data directory on the device"
)
@click.option("--ttl-days", default=825.0, show_default=True, help="days until the client certificate expires")
@click.option("--force", is_flag=True, help="replace an earlier provisioning of ID in that directory")
@json_option
@click.pass_context
def devices_provision(
    ctx: click.Context,
    device_id: str,
    out_dir: Path | None,
    broker: str,
    device_dir: str,
    data_dir: str,
    ttl_days: float,
    force: bool,
    json_output: bool,
) -> None:
    """Write what device ID needs: agent.toml, root.json and, with a fleet CA (`edgectl ca init`),
    a client certificate whose CN is ID and its key (0600).

    Copy the directory's files to --device-dir on the device. The device's Ed25519 identity
    key is made on the device at its first start.
    """
    from edge_sdk.mqtt import parse_broker_url
    from host_tools.keys import KeyRing
    from host_tools.provision import CA_CERT, ProvisionRequest, load_ca, provision_device
    from host_tools.report.provision import provisioned_text

    cfg = _cfg(ctx, json_output)
    parse_broker_url(broker)
    ring = KeyRing(cfg.keys_dir)
    ring.signed_root()  # a root that devices can load, or a KeyStoreError saying to run `edgectl keys init`
    request = ProvisionRequest(
        device_id, out_dir or cfg.home / "devices" / device_id, broker, ring.root_path, device_dir=device_dir,
        data_dir=data_dir, ttl_days=ttl_days, force=force,
    )  # fmt: skip
    fleet_ca = load_ca(cfg.home / "ca") if (cfg.home / "ca" / CA_CERT).exists() else None
    provisioned = provision_device(request, ring.root_path.read_bytes(), fleet_ca, time.time())
    _emit(cfg, provisioned.to_dict(), lambda: provisioned_text(provisioned))


@cli.command()
@broker_option
@click.option(
    "--group",
    help="shared-subscription group: collectors with the same group split the traffic ($share/GROUP/...)",
)
@click.option(
    "--client-id",
    help="MQTT client id, fixed per collector so its session survives restarts [default: edgectl-collect-HOSTNAME]",
)
@click.option(
    "--session-expiry",
    "session_expiry_s",
    default=86_400,
    show_default=True,
    type=click.IntRange(1, 2**32 - 1),
    help="seconds the broker keeps this collector's session and queues for it while it is away",
)
@click.option(
    "--batch", "batch_max", default=500, show_default=True, type=click.IntRange(1), help="most messages per commit"
)
@click.option(
    "--every",
    "every_s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="seconds per progress line",
)
@click.option(
    "--verify-workers",
    type=click.IntRange(0),
    help="worker processes that check a backlog's signatures beside the collector (0: none) "
    "[default: CPUs - 1, at most 4]",
)
@connect_timeout_option
@broker_auth_options
@json_option
@click.pass_context
def collect(
    ctx: click.Context,
    broker: str,
    group: str | None,
    client_id: str | None,
    session_expiry_s: int,
    batch_max: int,
    every_s: float,
    verify_workers: int | None,
    connect_timeout: float,
    json_output: bool,
) -> None:
    """Keep the registry current: store every device's status, events and metrics until SIGTERM or Ctrl-C.

    Only enrolled devices' signed messages are stored; each is acknowledged to the broker
    after its row is committed, and the session outlives the process, so a restart loses
    nothing the broker queued. Run one per host with the same --group to split the load.
    """
    import signal
    import socket
    import threading

    from edge_sdk.mqtt import MqttClient, MqttOptions
    from host_tools.fleet.collect_service import CollectCounts, CollectOptions, Collector, default_verify_workers
    from host_tools.report.fleet import collect_line, collect_text

    cfg = _cfg(ctx, json_output)
    options = CollectOptions(
        client_id=client_id or f"edgectl-collect-{socket.gethostname()}"[:64],
        group=group,
        session_expiry_s=session_expiry_s,
        batch_max=batch_max,
        progress_every_s=every_s,
        allow_unsigned=cfg.allow_unsigned_reports,
        verify_workers=default_verify_workers() if verify_workers is None else verify_workers,
    )
    base = MqttOptions(client_id=options.client_id, connect_timeout_s=connect_timeout)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    terminal = _on_terminal()

    def progress(counts: CollectCounts) -> None:
        line = collect_line(counts.to_dict(), time.monotonic() - started)
        if terminal:
            click.echo(f"\r{line}\x1b[K", nl=False, err=True)
        else:
            _echo_for_terminal(line, err=True)

    with _registry(cfg) as reg:
        client = MqttClient(broker, _broker_connection().mqtt_options(options.mqtt_options(base)))
        click.echo(
            f"edgectl: collecting from {client.address} as {options.client_id}"
            + (f" in group {group}" if group else "")
            + f" into {reg.name}",
            err=True,
        )
        client.connect()
        try:
            counts = Collector(client, reg, options).run(stop, progress)
        finally:
            client.close()
    if terminal:
        click.echo("", err=True)
    elapsed = time.monotonic() - started
    _emit(cfg, counts.to_dict(), lambda: collect_text(counts.to_dict(), elapsed))


@cli.command()
@click.option("--device", "device_id", help="only this device")
@click.option(
    "--broker",
    envvar="EDGE_SDK_BROKER",
    default=_configured_broker,
    help=f"also fetch the latest reports from this broker ({BROKER_URL_HELP}; env EDGE_SDK_BROKER, or the config file)",
)
@connect_timeout_option
@broker_auth_options
@json_option
@click.pass_context
def metrics(
    ctx: click.Context, device_id: str | None, broker: str | None, connect_timeout: float, json_output: bool
) -> None:
    """Latest metrics report per device and bundle version."""
    from host_tools.fleet.inventory import latest_metrics
    from host_tools.report.fleet import metrics_text

    cfg = _cfg(ctx, json_output)
    connection = _client(broker, connect_timeout, "metrics") if broker else contextlib.nullcontext()
    with _registry(cfg) as reg, connection as client:
        records = latest_metrics(reg, client, device_id, allow_unsigned=cfg.allow_unsigned_reports)
    reports = [r.report for r in records]
    _emit(cfg, [r.to_dict() for r in reports], lambda: metrics_text(reports))


# --- kept runs, report and exporter ---------------------------------------------------


def _since(text: str | None) -> float | None:
    """``--since``: unix seconds, an ISO date or time (UTC unless it names a zone), or an age (90m, 12h, 7d)."""
    if text is None:
        return None
    from host_tools.report.data import parse_since

    try:
        return parse_since(text, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc


@cli.command()
@click.option("--kind", type=click.Choice(["compress", "profile", "deploy", "rollout"]), help="only runs of this kind")
@click.option("--since", help="only runs since: unix seconds, an ISO date/time, or an age (90m, 12h, 7d)")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000), help="newest runs shown")
@json_option
@click.pass_context
def runs(ctx: click.Context, kind: str | None, since: str | None, limit: int, json_output: bool) -> None:
    """Kept runs (compress, profile, deploy, rollout), newest first; compare two with `edgectl compare A B`."""
    from host_tools.report.runs import runs_data, runs_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        kept = reg.list_runs(kind, _since(since), limit)
    _emit(cfg, runs_data(kept), lambda: runs_text(kept))


@cli.command()
@click.argument("run_a", metavar="A", type=click.IntRange(1))
@click.argument("run_b", metavar="B", type=click.IntRange(1))
@json_option
@click.pass_context
def compare(ctx: click.Context, run_a: int, run_b: int, json_output: bool) -> None:
    """Two kept runs side by side: size, quality, latency percentiles per device, and the change from A to B."""
    from host_tools.report.runs import compare_runs, compare_text

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        found = {n: reg.get_run(n) for n in (run_a, run_b)}
    missing = [str(n) for n, r in found.items() if r is None]
    if missing:
        raise ConfigError(f"no kept run with id {', '.join(missing)}; `edgectl runs` lists them", runs=missing)
    a, b = found[run_a], found[run_b]
    assert a is not None and b is not None
    comparison = compare_runs(a, b)
    _emit(cfg, comparison, lambda: compare_text(comparison))


@cli.command()
@click.option("--html", "html_path", type=OutputFile(), help="write the report as one self-contained HTML file")
@click.option(
    "--png", "png_dir", type=click.Path(path_type=Path, file_okay=False), help="write each plot as DIR/<name>.png"
)
@click.option("--since", help="only data since: unix seconds, an ISO date/time, or an age (90m, 12h, 7d)")
@click.option("--devices", "selector", help="only these devices: ids or globs (pi-*), or label=value, comma-separated")
@json_option
@click.pass_context
def report(
    ctx: click.Context,
    html_path: Path | None,
    png_dir: Path | None,
    since: str | None,
    selector: str | None,
    json_output: bool,
) -> None:
    """Plots of the fleet from the registry: latency distributions, compression variants (Pareto front),
    energy per inference (measured vs estimated), the rollout timeline, and the fleet table.

    The HTML file needs no network: styles inline, every plot a PNG inside it.
    """
    from host_tools.report.data import parse_devices
    from host_tools.report.html import build_report, write_report

    cfg = _cfg(ctx, json_output)
    if html_path is None and png_dir is None:
        raise click.UsageError("give --html FILE, --png DIR, or both")
    chosen = parse_devices(selector) if selector is not None else None
    with _registry(cfg) as reg:
        built = build_report(reg, time.time(), _since(since), chosen)
    written = write_report(built, html_path, png_dir)
    data = {**built.to_dict(), "written": [str(p) for p in written]}
    _emit(
        cfg, data, lambda: "\n".join(f"wrote {p}" for p in written) + "".join(f"\nnote: {n}" for n in built.fleet.notes)
    )


@cli.command()
@click.option(
    "--port", default=9464, show_default=True, type=click.IntRange(0, 65535), help="port (0 picks a free one)"
)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--registry", "registry_url", help="registry to read (default: edgectl's --registry / HOME/registry.db)")
@click.option(
    "--cache", "cache_s", default=5.0, show_default=True, type=click.FloatRange(0, 3600),
    help="seconds one rendered scrape (one registry read) serves scrapes before the next read",
)  # fmt: skip
@click.pass_context
def exporter(ctx: click.Context, port: int, host: str, registry_url: str | None, cache_s: float) -> None:
    """Serve the fleet as Prometheus metrics on http://HOST:PORT/metrics until Ctrl-C.

    Devices by state, latency quantiles and histograms, memory, power and energy (with an
    `estimated` label), installed versions (`edge_device_bundle_info`), rollout progress where
    rollouts are kept, and the collector's dropped and refused messages.
    """
    import signal
    import threading

    from host_tools.report.exporter import serve_exporter

    cfg = _cfg(ctx, False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        serve_exporter(
            registry_url or cfg.registry_url, host, port, stop, cache_s,
            lambda url: click.echo(f"exporter serving {url}; Ctrl-C to stop", err=True),
        )  # fmt: skip
    click.echo("exporter stopped", err=True)


# --- broker and demo --------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=1883, show_default=True, help="port (0 picks a free one)")
def broker(host: str, port: int) -> None:
    """Run an embedded MQTT broker (amqtt) until Ctrl-C; for a single machine."""
    import signal
    import threading

    from host_tools.broker import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    EmbeddedBroker(host, port).serve(
        stop, lambda url: click.echo(f"MQTT broker listening on {url}; Ctrl-C to stop", err=True)
    )
    click.echo("broker stopped", err=True)


@cli.command()
@click.option("--broker", help=f"use this broker instead of an embedded one ({BROKER_URL_HELP})")
@click.option(
    "--workdir", type=click.Path(path_type=Path, file_okay=False), help="default: a fresh temporary directory"
)
@click.option("--runs", default=300, show_default=True, help="timed inferences per model on the device")
@click.option(
    "--use-home",
    is_flag=True,
    help="keep keys and registry in the edge-sdk home (--home, EDGE_SDK_HOME, ~/.edge-sdk) instead of WORKDIR/home; "
    "an explicit edgectl --home DIR does the same",
)
@json_option
@click.pass_context
def demo(
    ctx: click.Context, broker: str | None, workdir: Path | None, runs: int, use_home: bool, json_output: bool
) -> None:
    """Train, quantize, sign, deploy to a local agent over MQTT, and compare fp32 with int8.

    Everything goes under WORKDIR (keys and registry in WORKDIR/home, reused by the next run); the demo
    device is new every run (WORKDIR/agent-data is recreated), so the demo can run again and again.
    """
    from host_tools.demo import DemoOptions, run_demo_session
    from host_tools.report.demo import demo_text

    cfg = _cfg(ctx, json_output)
    given = {name: ctx.find_root().get_parameter_source(name) for name in ("home", "registry_url")}
    in_home = use_home or given["home"] == click.core.ParameterSource.COMMANDLINE
    registry_given = given["registry_url"] == click.core.ParameterSource.COMMANDLINE
    options = DemoOptions(
        workdir, broker_url=broker, runs=runs, warmup=max(1, runs // 10), home=cfg.home if in_home else None,
        registry_url=cfg.registry_url if in_home or registry_given else None,
    )  # fmt: skip
    result = run_demo_session(options, _say(cfg), _byte_progress)
    _emit(cfg, result.to_dict(), lambda: demo_text(result))


@cli.command()
@click.option("--devices", "count", type=int, required=True, help="how many simulated devices")
@device_broker_option
@click.option(
    "--root",
    "root_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="directory for the devices' data, keys, spec files and logs (kept: the same devices next time)",
)
@click.option("--per-process", default=50, show_default=True, help="devices per OS process")
@click.option(
    "--runtime",
    type=click.Choice(["standin", "real"]),
    default="standin",
    show_default=True,
    help="standin: latency drawn from a distribution (not a measurement), for large fleets; real: onnxruntime/LiteRT",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND:key=value,...",
    help="inject a fault (repeatable): install-fail, slow-link, drop-link, offline, gate-closed, latency, rss; "
    "e.g. install-fail:share=0.05,after=120 or latency:share=0.1,factor=2,version=2 (see edge_sdk/simulation.py)",
)
@click.option("--seed", default=0, show_default=True, help="picks the devices of each fault's share")
@click.option("--latency-ms", default=5.0, show_default=True, help="stand-in runtime: median latency")
@click.option("--latency-sigma", default=0.25, show_default=True, help="stand-in runtime: log-normal spread")
@click.option("--id-prefix", default="sim", show_default=True, help="device ids are PREFIX-00000, PREFIX-00001...")
@click.option(
    "--metrics-every",
    "metrics_every_s",
    type=float,
    help="each device reports metrics of each active bundle this often, measured again (seconds; default: off)",
)
@click.option("--for", "run_for_s", type=float, help="stop after this many seconds (default: until Ctrl-C)")
@json_option
@click.pass_context
def sim(
    ctx: click.Context,
    count: int,
    broker: str,
    root_dir: Path,
    per_process: int,
    runtime: str,
    faults: tuple[str, ...],
    seed: int,
    latency_ms: float,
    latency_sigma: float,
    id_prefix: str,
    metrics_every_s: float | None,
    run_for_s: float | None,
    json_output: bool,
) -> None:
    """Run a fleet of simulated devices on this machine: real agents, several per process, until Ctrl-C.

    Each device has its own data directory, identity key (enrolled in the registry) and
    connection; faults act in the agents' real code paths. The stand-in runtime's latency
    and memory figures are simulated, and every report says so (runtime "simulated").
    """
    import signal
    import threading

    from edge_sdk.simulation import FaultPlan, LatencyModel
    from host_tools.fleet.simulator import SimOptions, start_sim_fleet
    from host_tools.keys import KeyRing
    from host_tools.report.simulation import sim_text

    cfg = _cfg(ctx, json_output)
    options = SimOptions(
        count, broker, root_dir, per_process=per_process, runtime=runtime, faults=FaultPlan.of(faults, seed),
        latency=LatencyModel(latency_ms, latency_sigma), id_prefix=id_prefix, metrics_every_s=metrics_every_s,
    )  # fmt: skip
    ring = KeyRing(cfg.keys_dir)
    ring.signed_root()  # a root devices can load, or a KeyStoreError saying to run `edgectl keys init`
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with _registry(cfg) as reg:
        fleet = start_sim_fleet(options, reg, ring.root_path)
    with fleet:
        data = fleet.to_dict()
        _emit(cfg, data, lambda: sim_text(data))
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait(run_for_s)
    click.echo("simulated devices stopped", err=True)


def main() -> None:
    cli(prog_name="edgectl")


if __name__ == "__main__":
    main()
