"""Compression benchmarks: each case measures the compressed model beside its fp32 baseline.

Run:  .venv/bin/python benchmarks/compression.py [--quick] [--only NAME ...]

The file is a list of cases (:data:`CASES`). A case is a function taking the shared
:class:`Env` and returning one :class:`Row`; to add one, write the function and append it
to ``CASES`` (pruning, distillation and the LeNet-300-100 Deep Compression row belong here).
Every row states its target, whether it was met, and the published baseline it is
compared with.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import host_tools.compress as hc  # noqa: E402
from benchmarks._report import add_common_args, print_table, write_results  # noqa: E402

MEASURE = hc.MeasureOptions(latency=False)


@dataclass
class Row:
    """One benchmark result: ours beside the fp32 baseline of the same run."""

    case: str
    target: str
    measured: str
    met: bool
    reference: str
    details: dict[str, Any] = field(default_factory=dict)


class Env:
    """Data and models shared by the cases, built on first use."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick

    @cached_property
    def split(self) -> hc.DigitsSplit:
        return hc.load_digits_split(seed=0)

    @cached_property
    def big_mlp(self) -> bytes:
        """64 -> 2048 -> 2048 -> 10 (4.35M parameters) on the digits; smaller with --quick."""
        width = 512 if self.quick else 2048
        return hc.train_digits_mlp(self.split, hidden=(width, width), seed=0, max_iter=8 if self.quick else 20)

    def latency(self, model: bytes, runs: int) -> float:
        return hc.host_latency_ms(model, self.split.x_test[:1], runs=runs, warmup=max(5, runs // 10))


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer if len(i.dims) >= 2)


def digits_cnn_static_int8(env: Env) -> Row:
    cnn = hc.train_digits_cnn(env.split, epochs=8 if env.quick else 20)
    result = hc.compress(cnn, [hc.StaticInt8Quantization()], env.split.train, env.split.test, measure=MEASURE)
    rep = result.report
    weights = _weight_bytes(onnx.load_model_from_string(cnn)) / _weight_bytes(onnx.load_model_from_string(result.model_bytes))
    drop_pt = 100 * (rep.quality_drop or 0.0)
    return Row(
        "digits CNN, static int8",
        ">= 3.5x smaller file (weights 4x), <= 0.5 pt drop",
        f"{rep.size_ratio:.2f}x file, {weights:.2f}x weights, {rep.original.quality:.2%} -> {rep.final.quality:.2%} "
        f"({drop_pt:+.2f} pt drop)",
        rep.size_ratio >= 3.5 and drop_pt <= 0.5,
        "ORT/INC ResNet50: 3.98x, -0.2 pt",
        {"fp32_bytes": rep.original.size_bytes, "int8_bytes": rep.final.size_bytes, "weights_ratio": weights,
         "fp32_accuracy": rep.original.quality, "int8_accuracy": rep.final.quality},  # fmt: skip
    )


def mlp_static_int8_speed(env: Env) -> Row:
    fp32 = env.big_mlp
    params = hc.count_parameters(fp32)
    int8 = hc.compress(fp32, [hc.StaticInt8Quantization()], env.split.train, env.split.test, measure=MEASURE)
    runs = 50 if env.quick else 300
    t32, t8 = env.latency(fp32, runs), env.latency(int8.model_bytes, runs)
    return Row(
        f"MLP {params / 1e6:.2f}M params, static int8, batch 1, 1 thread",
        ">= 3x faster than fp32 (onnxruntime)",
        f"fp32 {t32:.3f} ms -> int8 {t8:.3f} ms = {t32 / t8:.2f}x; "
        f"accuracy {int8.report.original.quality:.2%} -> {int8.report.final.quality:.2%}",
        t32 / t8 >= 3.0,
        "TFLite docs claim 2-3x",
        {"parameters": params, "fp32_p50_ms": t32, "int8_p50_ms": t8, "speedup": t32 / t8},
    )


def mlp_lowrank(env: Env) -> Row:
    result = hc.compress(
        env.big_mlp, [hc.LowRankFactorization(max_drop=0.01)], evaluation=env.split.test, measure=MEASURE
    )
    notes = result.report.steps[0].notes
    before, after = notes["factorized_params_before"], max(1, notes["factorized_params_after"])
    drop_pt = 100 * (result.report.quality_drop or 0.0)
    ranks = ", ".join(f"{d['layer']} {d['rank']}/{d['full_rank']}" for d in notes["layers"])
    return Row(
        "low-rank (accuracy budget 1 pt) on the MLP's large layers",
        ">= 2x fewer parameters in factorized layers, <= 1 pt drop",
        f"{before / after:.2f}x fewer ({before} -> {after}; ranks {ranks}), {drop_pt:+.2f} pt drop, "
        f"whole model {result.report.original.parameters / result.report.final.parameters:.2f}x",
        before / after >= 2.0 and drop_pt <= 1.0,
        "Denton 2014: ~2x within 1%",
        {"energy": notes["energy"], "layers": notes["layers"], "drop": result.report.quality_drop},
    )


def _train(epochs: int, lr: float) -> hc.TrainingOptions:
    return hc.TrainingOptions(epochs=epochs, learning_rate=lr, threads=1)


def lenet_deep_compression(env: Env) -> Row:
    """LeNet-300-100 shape on the digits: prune + fine-tune (twice), 4-bit sharing, packed."""
    fp32 = hc.train_digits_mlp(env.split, hidden=(300, 100), seed=0)
    ft = 10 if env.quick else 30
    steps = [
        hc.MagnitudePruning(0.8), hc.FineTune(_train(ft, 3e-3)),
        hc.MagnitudePruning(0.95), hc.FineTune(_train(ft, 3e-3)),
        hc.WeightSharing(bits=4, min_params=1024),
    ]  # fmt: skip
    result = hc.compress(fp32, steps, evaluation=env.split.test, training=env.split.train, measure=MEASURE)
    packed = hc.pack_model(hc.model_from_bytes(result.model_bytes))
    rep = result.report
    ratio = len(fp32) / packed.size_bytes
    drop_pt = 100 * (rep.quality_drop or 0.0)
    return Row(
        "LeNet-300-100 MLP on digits: prune 95% + fine-tune + 4-bit sharing + entropy coding",
        "payload >= 40x smaller than fp32 ONNX, <= 0.5 pt drop",
        f"{len(fp32)} -> {packed.size_bytes} bytes = {ratio:.1f}x; {rep.original.quality:.2%} -> "
        f"{rep.final.quality:.2%} ({drop_pt:+.2f} pt drop), sparsity {rep.final.sparsity:.1%}",
        ratio >= 40 and drop_pt <= 0.5,
        "Deep Compression (Han 2016): 40x on MNIST LeNet-300-100, no loss",
        {"fp32_bytes": len(fp32), "payload_bytes": packed.size_bytes, "ratio": ratio, "drop": rep.quality_drop,
         "steps": [{"name": s.name, "quality": s.metrics.quality, "sparsity": s.metrics.sparsity} for s in rep.steps]},  # fmt: skip
    )


def structured_pruning_speed(env: Env) -> Row:
    """Remove 50% of the neurons of the wide MLP's hidden layers; fine-tune; time dense inference."""
    fp32 = env.big_mlp
    steps = [hc.ChannelPruning(0.5), hc.FineTune(_train(3 if env.quick else 8, 1e-3))]
    result = hc.compress(fp32, steps, evaluation=env.split.test, training=env.split.train, measure=MEASURE)
    runs = 50 if env.quick else 300
    t_before, t_after = env.latency(fp32, runs), env.latency(result.model_bytes, runs)
    rep = result.report
    pruned_only = rep.steps[0].metrics.quality or 0.0
    drop_pt = 100 * (rep.quality_drop or 0.0)
    return Row(
        f"MLP {rep.original.parameters / 1e6:.2f}M params, 50% neurons removed + fine-tune, batch 1, 1 thread",
        ">= 1.7x faster dense inference, <= 1 pt drop after fine-tuning",
        f"fp32 {t_before:.3f} ms -> {t_after:.3f} ms = {t_before / t_after:.2f}x; params "
        f"{rep.original.parameters} -> {rep.final.parameters}; {rep.original.quality:.2%} -> {pruned_only:.2%} pruned "
        f"-> {rep.final.quality:.2%} tuned ({drop_pt:+.2f} pt)",
        t_before / t_after >= 1.7 and drop_pt <= 1.0,
        "NNCF: 40% filter pruning, -0.5 pt",
        {"before_p50_ms": t_before, "after_p50_ms": t_after, "speedup": t_before / t_after,
         "channels": dict(rep.steps[0].notes["channels"]), "drop": rep.quality_drop},  # fmt: skip
    )


def distillation(env: Env) -> Row:
    """Digits CNN teacher -> MLP student (< 1/4 the parameters): soft targets vs labels alone."""
    teacher = onnx.load_model_from_string(hc.train_digits_cnn(env.split, epochs=8 if env.quick else 20))
    teacher_acc = hc.evaluate_accuracy(teacher, env.split.test)
    seeds = range(2 if env.quick else 5)
    options = _train(30 if env.quick else 60, 1e-2)

    def student(alpha: float, seed: int) -> tuple[float, int]:
        step = hc.Distillation(hc.MlpStudent((32,)), temperature=2.0, alpha=alpha, options=options)
        model = step.run(teacher, hc.PassContext(training=env.split.train, seed=seed)).model
        return hc.evaluate_accuracy(model, env.split.test), hc.count_parameters(model)

    distilled = [student(0.7, s) for s in seeds]
    labels = [student(0.0, s)[0] for s in seeds]
    kd, base = float(np.mean([a for a, _ in distilled])), float(np.mean(labels))
    params, t_params = distilled[0][1], hc.count_parameters(teacher)
    kept = kd / teacher_acc
    return Row(
        f"distillation: CNN teacher ({t_params} params) -> MLP 64-32-10 student ({params}), T=2, alpha=0.7",
        "student <= 1/4 params keeps >= 97% of teacher accuracy and beats labels-only training",
        f"teacher {teacher_acc:.2%}; student distilled {kd:.2%} ({kept:.1%} of teacher) vs labels alone {base:.2%} "
        f"(mean of {len(labels)} seeds); {params / t_params:.1%} of the parameters",
        params <= t_params / 4 and kept >= 0.97 and kd > base,
        "DistilBERT: 97% at 60% size; Hinton 2015",
        {"teacher_accuracy": teacher_acc, "distilled": [a for a, _ in distilled], "labels_only": labels,
         "student_parameters": params, "teacher_parameters": t_params},  # fmt: skip
    )


CASES: list[Callable[[Env], Row]] = [
    digits_cnn_static_int8, mlp_static_int8_speed, mlp_lowrank,
    lenet_deep_compression, structured_pruning_speed, distillation,
]  # fmt: skip
"""The benchmark cases, run in this order. Append new ones here."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--only", nargs="*", help="run only the cases with these function names")
    args = parser.parse_args(argv)
    env = Env(args.quick)
    rows: list[Row] = []
    for case in CASES:
        if args.only and case.__name__ not in args.only:
            continue
        started = time.perf_counter()
        row = case(env)
        row.details["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"{case.__name__}: {row.measured} [{'met' if row.met else 'MISSED'}]", file=sys.stderr)
    print_table(
        ["case", "target", "measured (ours beside fp32 baseline)", "met", "published reference"],
        [[r.case, r.target, r.measured, "yes" if r.met else "NO", r.reference] for r in rows],
    )
    path = write_results("compression", {"rows": [asdict(r) for r in rows]}, args.json_out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
