"""Sparse and dense int8 executions against onnxruntime dense, in the same run, on an FC-heavy model.

Run:  .venv/bin/python benchmarks/sparse.py [--quick]

Model: x[batch, N] -> MatMul N x N + bias -> Relu -> MatMul N x N + bias (N = 4096; 1024
with --quick), unstructured magnitude-style pruning (random positions) to 50/80/90/95%.
Every model goes through the real host split (``host_tools.compress.sparse_pack``, int8
values as ``edgectl pack --sparse --sparse-int8`` writes them, so that every candidate
applies) and the device's decoder and openers (``device_agent.selection``), one
intra-op thread.

Three tables:

1. latency, dense (the original pruned fp32 model in onnxruntime) against dense int8
   (the agent's ``DynamicQuantizeMatMul`` graph on the int8 values) and sparse (the
   sparse graph: onnxruntime ``SparseToDenseMatMul`` with bound CSR weights), batch 1
   and 8, with the int8 graph's largest error against the fp32 one; scipy CSR on the
   same two layers is shown as a reference (candidate (c) of the evaluation in
   ``docs/benchmarks.md``), not as an execution the agent uses;
2. the agent's automatic choice against the best single option: the choice is made
   with the agent's own measurement (``select_execution`` at batch 1, its ``measure``
   at batch 8), then every execution is timed again, interleaved, and the chosen one's
   median is divided by the best median;
3. structured pruning (hidden width cut to keep the same parameter count, run dense)
   beside unstructured pruning (run the best fp32 way) at 90% and 95%.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from benchmarks._report import add_common_args, print_table, write_results
from device_agent.selection import CANDIDATES, choose, execution_opener, measure, select_execution
from edge_sdk.bundle import FileEntry, Manifest, file_sha256
from edge_sdk.bundle.sparse import decode_sparse_weights, encode_sparse_weights
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.runtime import SessionOptions, open_session
from host_tools.compress.sparse_pack import sparsify, write_sparse_files

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BATCHES = (1, 8)
ONE_THREAD = SessionOptions(threads=1)


def fc_model(rng: np.random.Generator, dims: list[int], sparsity: float) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        if sparsity:
            w[rng.random((a, b)) < sparsity] = 0.0
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"B{i}")]
        last = i == len(dims) - 2
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"m{i}", f"B{i}"], ["y" if last else f"z{i}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"]))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bundle_dir(model: onnx.ModelProto, d: Path) -> tuple[Manifest, int]:
    """A sparse bundle with int8 values unpacked in ``d``, and the size its CSR file would have with fp32 values."""
    pack = sparsify(model, min_sparsity=0.3)
    model_path, files, spec = write_sparse_files(pack, d, "m", int8_values=True)
    np.savez(
        d / "sample.npz",
        x=np.random.default_rng(1)
        .standard_normal((1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
        .astype(np.float32),
    )
    entries = [FileEntry(p.name, *reversed(file_sha256(p))) for p in (model_path, *files.values(), d / "sample.npz")]
    manifest = Manifest(
        "fc", 1, 0.0, 1e12, "onnxruntime", model_path.name, tuple(entries), sample_input="sample.npz", sparse=spec
    )
    return manifest, len(encode_sparse_weights(pack.matrices))


def interleaved(fns: dict[str, Callable[[], object]], runs: int, rounds: int = 5) -> dict[str, float]:
    """Median ms of each function, timed in alternating rounds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, runs // rounds)):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in samples.items()}


def scipy_chain(weights: dict, manifest: Manifest) -> Callable[[np.ndarray], np.ndarray]:
    import scipy.sparse as sp

    mats = [
        sp.csr_matrix(
            (weights[layer.tensor].values, weights[layer.tensor].indices, weights[layer.tensor].indptr),
            shape=weights[layer.tensor].shape,
        )
        for layer in manifest.sparse.layers
    ]

    def run(x: np.ndarray) -> np.ndarray:
        h = np.ascontiguousarray(x.T)
        for i, m in enumerate(mats):
            h = m @ h
            if i < len(mats) - 1:
                np.maximum(h, 0, out=h)
        return h.T

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()
    n = 1024 if args.quick else 4096
    runs = 20 if args.quick else 60
    spec = BenchmarkSpec(runs=30 if not args.quick else 12, warmup=3)
    rng = np.random.default_rng(0)
    latency_rows, choice_rows, results = [], [], {"n": n, "layers": 2, "latency": [], "choice": [], "structured": []}
    best_fp32: dict[tuple[float, int], float] = {}
    t_start = time.perf_counter()
    for sparsity in SPARSITIES:
        model = fc_model(rng, [n, n, n], sparsity)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            manifest, fp32_csr_bytes = bundle_dir(model, d)
            csr = (d / manifest.sparse.weights).read_bytes()
            weights = decode_sparse_weights(csr)
            original = open_session(model.SerializeToString(), "onnxruntime", ONE_THREAD)
            runs_of = {name: execution_opener(d, manifest, name)(ONE_THREAD) for name in CANDIDATES}
            ref = scipy_chain(weights, manifest)
            csr_bytes = len(csr)
            dense_bytes = 2 * n * n * 4
            for batch in BATCHES:
                x = np.random.default_rng(batch).standard_normal((batch, n)).astype(np.float32)
                want = runs_of["dense"].run({"x": x})[0]  # fp32 on the int8 file's values
                np.testing.assert_allclose(original.run({"x": x})[0], want, rtol=0.05, atol=0.05)
                np.testing.assert_allclose(runs_of["sparse"].run({"x": x})[0], want, rtol=1e-3, atol=1e-3)
                np.testing.assert_allclose(ref(x), want, rtol=1e-3, atol=1e-3)
                int8_err = float(np.abs(runs_of["dense_int8"].run({"x": x})[0] - want).max() / np.abs(want).max())
                # The agent's choice, with its own measurement.
                if batch == 1:
                    choice, _ = select_execution(d, manifest, spec, "auto", d / "sample.npz")
                    chosen, reason = choice.chosen, choice.reason
                else:
                    timings = measure(runs_of, {name: {"x": x} for name in runs_of}, spec)
                    chosen, reason = choose(timings)
                t = interleaved(
                    {
                        "original": functools.partial(original.run, {"x": x}),
                        **{name: functools.partial(s.run, {"x": x}) for name, s in runs_of.items()},
                        "scipy": functools.partial(ref, x),
                    },
                    runs,
                )
                best = min(t[name] for name in CANDIDATES)
                best_fp32[(sparsity, batch)] = min(t["dense"], t["sparse"])
                row = {
                    "sparsity": sparsity,
                    "batch": batch,
                    "dense_ms": t["original"],
                    "dense_int8_ms": t["dense_int8"],
                    "sparse_ms": t["sparse"],
                    "int8_ratio": t["original"] / t["dense_int8"],
                    "ratio": t["original"] / t["sparse"],
                    "int8_max_error": int8_err,
                    "scipy_ms": t["scipy"],
                    "scipy_ratio": t["original"] / t["scipy"],
                    "rebuilt_dense_ms": t["dense"],
                    "csr_bytes_fp32": fp32_csr_bytes,
                    "csr_bytes_int8": csr_bytes,
                    "dense_bytes": dense_bytes,
                }
                results["latency"].append(row)
                latency_rows.append(
                    [
                        f"{sparsity:.0%}",
                        batch,
                        f"{t['original']:.3f}",
                        f"{t['dense_int8']:.3f}",
                        f"{t['sparse']:.3f}",
                        f"{row['int8_ratio']:.2f}x",
                        f"{row['ratio']:.2f}x",
                        f"{int8_err:.2%}",
                        f"{t['scipy']:.3f}",
                        f"{row['scipy_ratio']:.2f}x",
                        f"{fp32_csr_bytes / dense_bytes:.3f}",
                        f"{csr_bytes / dense_bytes:.3f}",
                    ]
                )
                crow = {
                    "sparsity": sparsity,
                    "batch": batch,
                    "chosen": chosen,
                    "reason": reason,
                    "chosen_ms": t[chosen],
                    "best_ms": best,
                    "ratio": t[chosen] / best,
                    **{f"{name}_ms": t[name] for name in CANDIDATES},
                }
                results["choice"].append(crow)
                choice_rows.append(
                    [
                        f"{sparsity:.0%}",
                        batch,
                        *(f"{t[name]:.3f}" for name in CANDIDATES),
                        chosen,
                        f"{crow['ratio']:.3f}",
                        "yes" if crow["ratio"] <= 1.05 else "NO",
                    ]
                )
            for s in (original, *runs_of.values()):
                s.close()
        print(f"# {sparsity:.0%} done after {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    print(f"\nFC model x -> {n}x{n} -> relu -> {n}x{n}, unstructured sparsity; onnxruntime 1 thread; median ms")
    print_table(
        [
            "sparsity",
            "batch",
            "ORT dense",
            "ORT dense int8",
            "ORT sparse",
            "dense/int8",
            "dense/sparse",
            "int8 max err",
            "scipy CSR",
            "dense/scipy",
            "CSR fp32/dense bytes",
            "CSR int8/dense bytes",
        ],
        latency_rows,
    )
    print("\nAutomatic choice (agent's measurement) against the best single option (re-measured)")
    print_table(["sparsity", "batch", *CANDIDATES, "chosen", "chosen/best", "<= 1.05"], choice_rows)

    structured_rows = []
    for sparsity in (0.9, 0.95):
        h = round(n * (1 - sparsity))
        model = fc_model(rng, [n, h, n], 0.0)
        session = open_session(model.SerializeToString(), "onnxruntime", ONE_THREAD)
        for batch in BATCHES:
            x = np.random.default_rng(batch).standard_normal((batch, n)).astype(np.float32)
            t = interleaved({"structured": functools.partial(session.run, {"x": x})}, runs)["structured"]
            u = best_fp32[(sparsity, batch)]
            results["structured"].append(
                {"sparsity": sparsity, "hidden": h, "batch": batch, "structured_ms": t, "unstructured_best_ms": u}
            )
            structured_rows.append(
                [f"{1 - sparsity:.0%}", f"{n}->{h}->{n}", batch, f"{t:.3f}", f"{u:.3f}", f"{u / t:.2f}x"]
            )
        session.close()
    print("\nStructured (channels removed, dense) vs unstructured (best fp32 execution) at equal parameter count")
    print_table(
        ["params kept", "structured shape", "batch", "structured ms", "unstructured ms", "structured speed-up"],
        structured_rows,
    )
    path = write_results("sparse", results, args.json_out)
    print(f"\nwrote {path} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
