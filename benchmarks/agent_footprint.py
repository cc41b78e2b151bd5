"""The agent's footprint: idle RSS beside a bare paho-mqtt client, and the profiler's overhead.

1. Idle memory. A real Mosquitto is started on a free loopback port; then, one after the
   other, three processes connect to it and idle for a few seconds: a bare Python
   interpreter (no MQTT), a bare paho-mqtt client (connect, subscribe, network loop), and
   `edge-agent run` with a root of trust and no model installed. Their VmRSS is read
   from /proc. Target: the agent at or under 40 MB.

2. Profiler overhead. The same ONNX model (an MLP, ~0.1 ms a run) is timed by a bare
   onnxruntime loop (perf_counter around session.run) and by the agent's profiler
   (``device_agent.profiler.profile_model``: RSS sampler thread, CPU sampler, energy
   window, then ``edge_sdk.metrics.benchmark``), in alternating rounds. Overhead is the
   difference of the medians of the rounds' p50 latencies. Target: under 3 %.

    .venv/bin/python benchmarks/agent_footprint.py [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import add_common_args, print_table, write_results

BIN = Path(sys.executable).parent
RSS_TARGET_MB = 40.0
OVERHEAD_TARGET = 0.03

BARE_PAHO = """
import sys, time
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare-paho")
c.connect("127.0.0.1", int(sys.argv[1]))
c.subscribe("edge/v1/devices/bare/cmd", 1)
c.loop_start()
print("connected", flush=True)
time.sleep(120)
"""
BARE_PYTHON = "import time; print('connected', flush=True); time.sleep(120)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _idle_rss(argv: list[str], ready: str, log: Path, settle_s: float, env: dict[str, str] | None = None) -> float:
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not get ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(settle_s)
        return _rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def measure_idle(work: Path, settle_s: float) -> list[dict]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser {os.environ.get('USER') or 'root'}\n"
    )
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        env = dict(os.environ, EDGE_SDK_HOME=str(work / "home"))
        subprocess.run([str(BIN / "edgectl"), "keys", "init"], check=True, capture_output=True, env=env)
        rows = [
            {
                "process": "bare python (no MQTT)",
                "rss_mb": _idle_rss([sys.executable, "-c", BARE_PYTHON], "connected", work / "py.log", settle_s),
            },
            {
                "process": "bare paho-mqtt client",
                "rss_mb": _idle_rss(
                    [sys.executable, "-c", BARE_PAHO, str(port)], "connected", work / "paho.log", settle_s
                ),
            },
            {
                "process": "edge-agent run (idle, no model)",
                "rss_mb": _idle_rss(
                    [
                        str(BIN / "edge-agent"),
                        "run",
                        "--broker",
                        f"mqtt://127.0.0.1:{port}",
                        "--device-id",
                        "footprint",
                        "--data-dir",
                        str(work / "agent"),
                        "--root",
                        str(work / "home" / "keys" / "root.json"),
                    ],
                    "connected to",
                    work / "agent.log",
                    settle_s,
                ),
            },
        ]
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    return rows


def _mlp(path: Path, width: int = 256, layers: int = 3) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / width).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"]))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


def measure_overhead(work: Path, runs: int, rounds: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from device_agent.profiler import profile_model
    from edge_sdk.metrics import detect_power_source
    from edge_sdk.protocol import BenchmarkSpec

    model = work / "mlp.onnx"
    _mlp(model)
    x = {"x": np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)}
    np.savez(work / "sample.npz", **x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    power = detect_power_source(Path("/"), "generic")
    spec = BenchmarkSpec(runs=runs, warmup=50, threads=1)

    bare_p50, prof_p50 = [], []
    for _ in range(rounds):
        for _ in range(50):
            sess.run(None, x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, x)
            times.append(time.perf_counter() - t0)
        bare_p50.append(statistics.median(times) * 1000)
        profile = profile_model(model, "onnxruntime", "fp32", work / "sample.npz", spec, power)
        prof_p50.append(profile.latency.p50_ms)
    bare, prof = statistics.median(bare_p50), statistics.median(prof_p50)
    return {
        "runs_per_round": runs,
        "rounds": rounds,
        "bare_p50_ms_per_round": bare_p50,
        "profiler_p50_ms_per_round": prof_p50,
        "bare_p50_ms": bare,
        "profiler_p50_ms": prof,
        "overhead": (prof - bare) / bare,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()
    runs, rounds, settle = (500, 3, 1.0) if args.quick else (3000, 7, 3.0)
    with tempfile.TemporaryDirectory(prefix="edge-footprint-") as tmp:
        work = Path(tmp)
        idle = measure_idle(work, settle)
        overhead = measure_overhead(work, runs, rounds)
    agent_mb = idle[-1]["rss_mb"]
    print_table(["process", "idle RSS MB"], [[r["process"], f"{r['rss_mb']:.1f}"] for r in idle])
    verdict = "ok" if agent_mb <= RSS_TARGET_MB else "OVER"
    print(f"\nagent idle RSS {agent_mb:.1f} MB (target <= {RSS_TARGET_MB:.0f} MB): {verdict}\n")
    print_table(
        ["loop", "p50 ms (median of rounds)", "vs bare"],
        [
            ["bare onnxruntime loop", f"{overhead['bare_p50_ms']:.4f}", "1.000"],
            [
                "agent profiler",
                f"{overhead['profiler_p50_ms']:.4f}",
                f"{overhead['profiler_p50_ms'] / overhead['bare_p50_ms']:.3f}",
            ],
        ],
    )
    print(
        f"\nprofiler overhead {overhead['overhead'] * 100:+.2f} % (target < {OVERHEAD_TARGET * 100:.0f} %): "
        f"{'ok' if overhead['overhead'] < OVERHEAD_TARGET else 'OVER'}"
    )
    path = write_results(
        "agent_footprint",
        {
            "idle_rss": idle,
            "rss_target_mb": RSS_TARGET_MB,
            "profiler_overhead": overhead,
            "overhead_target": OVERHEAD_TARGET,
        },
        args.json_out,
    )
    print(f"wrote {path}")
    return 0 if agent_mb <= RSS_TARGET_MB and overhead["overhead"] < OVERHEAD_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
