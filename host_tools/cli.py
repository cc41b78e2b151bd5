"""`edgectl`: the operator's command line.

This module parses arguments, builds the configuration once, calls the services in
``host_tools`` and turns every :class:`~edge_sdk.errors.EdgeError` into one line on
stderr and an exit code chosen by blame:

    0 ok | 1 other failure | 2 usage or configuration | 3 untrusted input (bad bundle,
    refused by the device) | 4 transport (broker unreachable, device timeout)
    | 5 local state (keys, storage) | 6 model (does not load, compression failed)

Every command that prints a table also prints JSON with ``--json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edge_sdk import __version__
from edge_sdk.errors import (
    ConfigError,
    EdgeError,
    LocalStateError,
    ModelError,
    TransportError,
    UntrustedInputError,
)

__all__ = ["main", "cli"]

log = logging.getLogger("edgectl")


# --- configuration and output ---------------------------------------------------------


@dataclass(frozen=True)
class HostConfig:
    """Built once from flags (and ``EDGE_SDK_HOME``) and passed down."""

    home: Path
    registry_url: str
    json_output: bool = False

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"


def _exit_code(exc: EdgeError) -> int:
    for cls, code in (
        (ConfigError, 2),
        (UntrustedInputError, 3),
        (TransportError, 4),
        (LocalStateError, 5),
        (ModelError, 6),
    ):
        if isinstance(exc, cls):
            return code
    return 1


class _EdgeGroup(click.Group):
    """Runs subcommands and maps EdgeError to a message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeError as exc:
            click.echo(f"edgectl: error [{exc.code}]: {exc.message}", err=True)
            log.debug("details", exc_info=exc)
            ctx.exit(_exit_code(exc))


def _emit(cfg: HostConfig, data: Any, text: str | Callable[[], str]) -> None:
    if cfg.json_output:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text() if callable(text) else text)


def _say(cfg: HostConfig) -> Callable[[str], None]:
    """Progress lines go to stderr, so ``--json`` output on stdout stays parseable."""
    return lambda line: click.echo(line, err=True)


def _byte_progress(label: str, total: int) -> Callable[[int, int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


json_option = click.option("--json", "json_output", is_flag=True, help="print JSON instead of a table")
broker_option = click.option(
    "--broker", required=True, envvar="EDGE_SDK_BROKER", help="broker URL, mqtt://host:port (env EDGE_SDK_BROKER)"
)
connect_timeout_option = click.option(
    "--connect-timeout", default=10.0, show_default=True, type=float, help="seconds to wait for the broker"
)


def _cfg(ctx: click.Context, json_output: bool) -> HostConfig:
    base: HostConfig = ctx.obj
    return HostConfig(base.home, base.registry_url, json_output)


@contextmanager
def _client(broker: str, timeout_s: float, name: str) -> Iterator[Any]:
    from edge_sdk.mqtt import MqttClient, MqttOptions

    client = MqttClient(broker, MqttOptions(client_id=f"edgectl-{name}-{os.getpid()}", connect_timeout_s=timeout_s))
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


# --- the group --------------------------------------------------------------------------


@click.group(cls=_EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgectl")
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="EDGE_SDK_HOME",
    default=lambda: str(Path.home() / ".edge-sdk"),
    show_default="~/.edge-sdk",
    help="where keys and the registry live (env EDGE_SDK_HOME)",
)
@click.option("--registry", "registry_url", help="registry: a SQLite path or postgresql:// URL (default HOME/registry.db)")
@click.option("-v", "--verbose", count=True, help="more logging (-vv for debug)")
@click.pass_context
def cli(ctx: click.Context, home: Path, registry_url: str | None, verbose: int) -> None:
    """edge-sdk: compress models, sign bundles, deploy them to devices over MQTT."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    home = Path(home).expanduser()
    ctx.obj = HostConfig(home, registry_url or str(home / "registry.db"))


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
    """Manage the bundle-signing key pair."""


@keys.command("init")
@passphrase_option
@click.option("--force", is_flag=True, help="replace an existing key pair")
@json_option
@click.pass_context
def keys_init(ctx: click.Context, passphrase_env: str | None, force: bool, json_output: bool) -> None:
    """Create a signing key pair (private key 0600) unless one exists."""
    from host_tools.keys import init_keys

    cfg = _cfg(ctx, json_output)
    paths, key, created = init_keys(cfg.keys_dir, _passphrase(passphrase_env), force)
    data = {"created": created, "keyid": key.keyid, "private_key": str(paths.private), "public_key": str(paths.public)}
    verb = "created" if created else "exists"
    _emit(cfg, data, f"key pair {verb}: keyid {key.keyid}\n  private {paths.private}\n  public  {paths.public} (give this to devices)")


@keys.command("show")
@json_option
@click.pass_context
def keys_show(ctx: click.Context, json_output: bool) -> None:
    """Show the public key id and where the key pair is."""
    from host_tools.keys import KeyPaths, load_public_key

    cfg = _cfg(ctx, json_output)
    paths = KeyPaths.in_dir(cfg.keys_dir)
    pub = load_public_key(paths.public)
    data = {"keyid": pub.keyid, "private_key": str(paths.private), "public_key": str(paths.public)}
    _emit(cfg, data, f"keyid {pub.keyid}\n  private {paths.private}\n  public  {paths.public}")


# --- compress ---------------------------------------------------------------------------


@cli.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True, help="compressed model")
@click.option(
    "--quantize",
    default="int8-static",
    show_default=True,
    help="int8-static, int8-static-entropy, int8-static-percentile, int8-static-per-tensor, int8-dynamic",
)
@click.option("--calib", help="calibration data: .npz, .npy or module:function")
@click.option("--eval", "eval_data", help="evaluation data (x and labels y): .npz or module:function")
@click.option("--max-accuracy-drop", type=float, help="fail if accuracy drops by more than this (fraction, e.g. 0.005)")
@json_option
@click.pass_context
def compress(
    ctx: click.Context,
    model: Path,
    output: Path,
    quantize: str,
    calib: str | None,
    eval_data: str | None,
    max_accuracy_drop: float | None,
    json_output: bool,
) -> None:
    """Compress MODEL and report size, accuracy and host latency per step."""
    from tqdm import tqdm

    from host_tools import compress as hc

    cfg = _cfg(ctx, json_output)
    steps = [hc.parse_quantize_option(quantize)]
    calibration = hc.load_arrays(calib) if calib else None
    evaluation = hc.load_arrays(eval_data) if eval_data else None
    source = hc.load_model(model)
    with tqdm(total=len(steps), desc="compress", unit="step", file=sys.stderr, leave=False) as bar:
        result = hc.compress(
            source, steps, calibration, evaluation,
            progress=lambda ev: bar.set_postfix_str(f"{ev.step} {ev.phase}"),
        )
        bar.update(len(steps))
    report = result.report
    drop = report.quality_drop
    if max_accuracy_drop is not None and drop is not None and drop > max_accuracy_drop:
        raise hc.CompressionError(
            f"accuracy dropped by {drop:.4f}, more than --max-accuracy-drop {max_accuracy_drop}; nothing written",
            drop=drop,
        )
    hc.save_model_atomic(result.model_bytes, output)
    _emit(cfg, {"output": str(output), "report": report.to_dict()}, lambda: _compress_table(report, output))


def _compress_table(report: Any, output: Path) -> str:
    from host_tools.report import Column, format_bytes, render_table

    rows = [("original", report.original)] + [(s.name, s.metrics) for s in report.steps]
    table = render_table(
        [
            Column("step", lambda r: r[0]),
            Column("size", lambda r: format_bytes(r[1].size_bytes), ">"),
            Column("params", lambda r: r[1].parameters, ">"),
            Column("sparsity", lambda r: f"{r[1].sparsity:.1%}", ">"),
            Column("quality", lambda r: None if r[1].quality is None else f"{r[1].quality:.2%} {r[1].quality_metric}", ">"),
            Column("host p50", lambda r: None if r[1].latency_p50_ms is None else f"{r[1].latency_p50_ms:.3f} ms", ">"),
        ],
        rows,
    )
    return f"{table}\n\n{report.size_ratio:.2f}x smaller; wrote {output}"


# --- pack and verify --------------------------------------------------------------------


@cli.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True, help="bundle file to write")
@click.option("--name", required=True, help="bundle name, stable across versions")
@click.option("--version", "version", type=int, required=True, help="bundle version (positive, increasing)")
@click.option("--runtime", type=click.Choice(["onnxruntime", "litert"]), help="default: from the file suffix")
@click.option("--precision", help="what the model computes in (default: detected)")
@click.option("--sample", type=click.Path(path_type=Path, dir_okay=False), help=".npz with one sample batch for the device's health check")
@click.option("--ttl-days", type=float, default=30.0, show_default=True, help="days until the manifest expires")
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
    passphrase_env: str | None,
    json_output: bool,
) -> None:
    """Pack MODEL into a signed bundle."""
    from edge_sdk.bundle import BundleSpec, TensorInfo, pack_bundle
    from edge_sdk.runtime import open_session
    from host_tools.keys import KeyPaths, load_signing_key

    cfg = _cfg(ctx, json_output)
    runtime = runtime or ("litert" if model.suffix == ".tflite" else "onnxruntime")
    # Loading the model here catches a broken file on the host, not on a thousand devices.
    with open_session(model, runtime) as session:
        inputs = tuple(TensorInfo(s.name, tuple(s.shape), s.dtype) for s in session.inputs())
        precision = precision or session.precision
    key = load_signing_key(KeyPaths.in_dir(cfg.keys_dir).private, _passphrase(passphrase_env))
    spec = BundleSpec(name, version, runtime, model, precision, inputs, sample, ttl_days * 86400.0)
    manifest = pack_bundle(spec, [key], output, time.time())
    data = {"bundle": str(output), "signed_by": key.keyid, "manifest": manifest.to_dict()}
    _emit(
        cfg,
        data,
        f"packed {manifest.name} v{manifest.version} ({manifest.runtime}, {manifest.precision}, "
        f"{len(manifest.files)} file(s)) -> {output}\nsigned by {key.keyid}",
    )


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--key", "key_files", type=click.Path(path_type=Path, dir_okay=False), multiple=True, help="trusted public key (default: HOME/keys)")
@click.option("--installed-version", type=int, help="check rollback protection against this installed version")
@json_option
@click.pass_context
def verify(ctx: click.Context, bundle: Path, key_files: tuple[Path, ...], installed_version: int | None, json_output: bool) -> None:
    """Run every check a device runs on BUNDLE and explain each one."""
    from edge_sdk.bundle import verify_bundle
    from edge_sdk.trust import TrustedKeys
    from host_tools.keys import KeyPaths, load_public_key

    cfg = _cfg(ctx, json_output)
    paths = key_files or (KeyPaths.in_dir(cfg.keys_dir).public,)
    trusted = TrustedKeys(tuple(load_public_key(p) for p in paths))
    result = verify_bundle(bundle, trusted, time.time(), installed_version=installed_version)
    m = result.manifest
    data = {"ok": True, "checks": list(result.checks), "manifest": m.to_dict()}
    _emit(cfg, data, "\n".join(f"ok  {c}" for c in result.checks) + f"\n{bundle}: {m.name} v{m.version} verified")


# --- fleet ------------------------------------------------------------------------------


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--device", "device_id", required=True, help="target device id")
@broker_option
@connect_timeout_option
@click.option("--runs", default=200, show_default=True, help="timed inferences on the device")
@click.option("--warmup", default=20, show_default=True, help="untimed warm-up inferences")
@click.option("--threads", default=1, show_default=True, help="inference threads on the device")
@click.option("--chunk-size", default=64 * 1024, show_default=True, help="bytes per MQTT chunk")
@click.option("--accept-timeout", default=15.0, show_default=True, help="seconds the device has to accept the offer")
@click.option("--timeout", "timeout_s", default=180.0, show_default=True, help="seconds to wait for the device to finish")
@json_option
@click.pass_context
def deploy(
    ctx: click.Context,
    bundle: Path,
    device_id: str,
    broker: str,
    connect_timeout: float,
    runs: int,
    warmup: int,
    threads: int,
    chunk_size: int,
    accept_timeout: float,
    timeout_s: float,
    json_output: bool,
) -> None:
    """Send BUNDLE to a device, wait until it is installed, print its metrics."""
    from edge_sdk.protocol import BenchmarkSpec
    from host_tools.fleet.deployer import DeployOptions, deploy_and_record

    cfg = _cfg(ctx, json_output)
    try:
        options = DeployOptions(
            chunk_size=chunk_size,
            accept_timeout_s=accept_timeout,
            finish_timeout_s=timeout_s,
            benchmark=BenchmarkSpec(runs=runs, warmup=warmup, threads=threads),
        )
    except EdgeError as exc:
        raise ConfigError(exc.message) from exc
    with _registry(cfg) as reg, _client(broker, connect_timeout, "deploy") as client:
        outcome = deploy_and_record(
            client, reg, device_id, bundle, options, _byte_progress(bundle.name, bundle.stat().st_size)
        )
    data = {
        "device_id": outcome.device_id,
        "bundle": outcome.bundle_name,
        "version": outcome.bundle_version,
        "state": outcome.state,
        "seconds": outcome.seconds,
        "error": outcome.error.to_dict() if outcome.error else None,
        "checks": list(outcome.checks),
        "metrics": outcome.metrics.to_dict() if outcome.metrics else None,
    }
    if outcome.error is not None:
        _emit(cfg, data, f"{device_id} {outcome.state} {outcome.bundle_name} v{outcome.bundle_version}")
        raise outcome.error
    assert outcome.metrics is not None
    _emit(
        cfg,
        data,
        lambda: f"{device_id}: installed {outcome.bundle_name} v{outcome.bundle_version} in {outcome.seconds:.1f} s\n"
        + _metrics_table([outcome.metrics.to_dict()]),
    )


@cli.command()
@broker_option
@connect_timeout_option
@click.option("--wait", "wait_s", default=1.0, show_default=True, help="seconds to listen for device status")
@json_option
@click.pass_context
def devices(ctx: click.Context, broker: str, connect_timeout: float, wait_s: float, json_output: bool) -> None:
    """List devices: their retained status from the broker, recorded in the registry."""
    from edge_sdk.protocol import Channel, fleet_filter
    from host_tools.fleet.collector import collect_retained, record_message
    from host_tools.report import Column, format_bytes, render_table

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        with _client(broker, connect_timeout, "devices") as client:
            for msg in collect_retained(client, [fleet_filter(Channel.STATUS)], quiet_s=wait_s):
                record_message(reg, msg, time.time())
        records = reg.list_devices()
    data = [r.to_dict() for r in records]
    _emit(
        cfg,
        data,
        lambda: render_table(
            [
                Column("device", lambda r: r.device_id),
                Column("status", lambda r: r.status),
                Column("platform", lambda r: (r.platform or {}).get("kind")),
                Column("arch", lambda r: (r.platform or {}).get("arch")),
                Column("memory", lambda r: format_bytes((r.platform or {}).get("memory_bytes")), ">"),
                Column("runtimes", lambda r: ", ".join(r.runtimes or {})),
                Column("active", lambda r: r.active_bundle and f"{r.active_bundle.name} v{r.active_bundle.version}"),
                Column("last seen", lambda r: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.last_seen))),
            ],
            records,
        )
        if records
        else "no devices known",
    )


@cli.command()
@click.option("--device", "device_id", help="only this device")
@click.option("--broker", envvar="EDGE_SDK_BROKER", help="also fetch the latest reports from this broker")
@connect_timeout_option
@json_option
@click.pass_context
def metrics(ctx: click.Context, device_id: str | None, broker: str | None, connect_timeout: float, json_output: bool) -> None:
    """Latest metrics report per device and bundle version."""
    from edge_sdk.protocol import Channel, DeviceTopics, fleet_filter
    from host_tools.fleet.collector import collect_retained, record_message

    cfg = _cfg(ctx, json_output)
    with _registry(cfg) as reg:
        if broker:
            topic = DeviceTopics(device_id).metrics if device_id else fleet_filter(Channel.METRICS)
            with _client(broker, connect_timeout, "metrics") as client:
                for msg in collect_retained(client, [topic]):
                    record_message(reg, msg, time.time())
        records = reg.latest_metrics(device_id=device_id)
    reports = [r.report for r in records]
    _emit(cfg, reports, lambda: _metrics_table(reports) if reports else "no metrics recorded")


def _power_cell(power: dict[str, Any]) -> str | None:
    if not power:
        return None
    label = " (estimated)" if power.get("estimated", True) else ""
    return f"{power.get('watts', 0):.2f} W{label}"


def _metrics_table(reports: list[dict[str, Any]]) -> str:
    from host_tools.report import Column, format_bytes, render_table

    return render_table(
        [
            Column("device", lambda r: r["device_id"]),
            Column("bundle", lambda r: f"{r['bundle_name']} v{r['bundle_version']}"),
            Column("runtime", lambda r: f"{r['runtime']} {r['precision']} x{r['threads']}"),
            Column("p50 ms", lambda r: f"{r['latency']['p50_ms']:.3f}", ">"),
            Column("p90 ms", lambda r: f"{r['latency']['p90_ms']:.3f}", ">"),
            Column("p99 ms", lambda r: f"{r['latency']['p99_ms']:.3f}", ">"),
            Column("inf/s", lambda r: f"{r['latency']['throughput_per_s']:.0f}", ">"),
            Column("peak RSS", lambda r: format_bytes(r["memory"].get("peak_bytes")), ">"),
            Column("power", lambda r: _power_cell(r["power"]), ">"),
        ],
        reports,
    )


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
    with EmbeddedBroker(host, port) as b:
        click.echo(f"MQTT broker listening on {b.url}; Ctrl-C to stop", err=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    click.echo("broker stopped", err=True)


@cli.command()
@click.option("--broker", help="use this broker instead of an embedded one (mqtt://host:port)")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), help="default: a fresh temporary directory")
@click.option("--runs", default=300, show_default=True, help="timed inferences per model on the device")
@json_option
@click.pass_context
def demo(ctx: click.Context, broker: str | None, workdir: Path | None, runs: int, json_output: bool) -> None:
    """Train, quantize, sign, deploy to a local agent over MQTT, and compare fp32 with int8."""
    import tempfile

    from host_tools.demo import DemoOptions, run_demo
    from host_tools.keys import init_keys

    cfg = _cfg(ctx, json_output)
    say = _say(cfg)
    started = time.monotonic()
    paths, key, created = init_keys(cfg.keys_dir)
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp, _registry(cfg) as reg:
        work = workdir or Path(tmp)
        say(f"signing key {key.keyid} ({'created' if created else 'existing'}, {paths.private})")
        rows = run_demo(
            DemoOptions(work, broker_url=broker, runs=runs, warmup=max(1, runs // 10)),
            key,
            paths.public,
            reg,
            say,
            _byte_progress,
        )
    elapsed = time.monotonic() - started
    data = {"rows": [r.to_dict() for r in rows], "seconds": elapsed}
    _emit(cfg, data, lambda: _demo_table(rows) + f"\n\nwhole path in {elapsed:.1f} s")


def _demo_table(rows: list[Any]) -> str:
    from host_tools.report import Column, format_bytes, render_table

    table = render_table(
        [
            Column("model", lambda r: r.precision),
            Column("size", lambda r: format_bytes(r.size_bytes), ">"),
            Column("accuracy", lambda r: f"{r.accuracy:.2%}", ">"),
            Column("p50 ms", lambda r: f"{r.metrics.latency['p50_ms']:.3f}", ">"),
            Column("p90 ms", lambda r: f"{r.metrics.latency['p90_ms']:.3f}", ">"),
            Column("p99 ms", lambda r: f"{r.metrics.latency['p99_ms']:.3f}", ">"),
            Column("peak RSS", lambda r: format_bytes(r.metrics.memory.get("peak_bytes")), ">"),
            Column("model RSS", lambda r: format_bytes(r.metrics.memory.get("model_bytes")), ">"),
            Column("power", lambda r: _power_cell(r.metrics.power), ">"),
            Column("mJ/inf", lambda r: f"{1000 * r.metrics.power.get('joules_per_inference', 0):.3f}", ">"),
        ],
        rows,
    )
    notes = []
    if rows and len(rows) == 2:
        notes.append(f"int8 is {rows[0].size_bytes / rows[1].size_bytes:.2f}x smaller than fp32")
    if any(r.metrics.power.get("estimated", True) for r in rows):
        src = rows[0].metrics.power.get("source", "a power model")
        notes.append(f"power is ESTIMATED from CPU use ({src}); no power sensor on this machine")
    notes.append("latency, memory and power were measured by the device agent in its own process")
    return table + "\n" + "\n".join(f"* {n}" for n in notes)


def main() -> None:
    cli(prog_name="edgectl")


if __name__ == "__main__":
    main()
