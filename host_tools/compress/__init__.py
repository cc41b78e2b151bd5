"""Model compression on the host: passes, a pass manager, evaluation, and model files.

Typical use, as ``edgectl compress`` does it::

    from host_tools import compress as hc

    model = hc.load_model("model.onnx")
    result = hc.compress(
        model,
        [hc.parse_quantize_option("int8-static")],
        calibration=hc.load_arrays("calib.npz"),
        evaluation=hc.load_arrays("test.npz"),
    )
    hc.save_model_atomic(result.model_bytes, "model.int8.onnx")
    report = result.report.to_dict()

Passes take and return ``onnx.ModelProto`` and never touch the disk; reading and writing
files happens only in :mod:`host_tools.compress.model_file` and :mod:`host_tools.compress.data`.

The parts:

- ``pass_manager``: the pass protocol, the pass manager, the report; ``pipeline``: the one-call
  entry points (:func:`compress`, and :func:`run_compress_job` for ``edgectl compress``)
- ``recipe``: pass names, TOML recipes, and the grammar of ``edgectl compress``'s step options
- ``passes/``: one module per pass (quantize, prune, low-rank, weight sharing, ...)
- ``training/``: torch training for fine-tuning and distillation (torch imported lazily)
- ``tflite/``: ``.tflite`` quantization with ai-edge-quantizer
- ``reference/``: the reference models (digits MLP and CNN, MiniLM)
- ``data``, ``evaluate``, ``model_file``, ``layers``: datasets, measuring, model files, a graph's weight layers
- ``sparse_pack``: splitting a pruned model into a sparse bundle's files

Everything listed in ``__all__`` is imported from here; the module paths are internal.
"""

from .data import Dataset, DigitsSplit, load_arrays, load_digits_split
from .evaluate import (
    QUALITY_METRICS,
    Quality,
    check_metric,
    cosine_similarities,
    count_parameters,
    evaluate_accuracy,
    host_latency_ms,
    measure_sparsity,
    model_size_bytes,
    predict_classes,
    top1_agreement,
)
from .layers import WeightLayer, find_layers
from .model_file import load_model, model_from_bytes, save_model_atomic
from .pass_manager import (
    CompressionPass,
    CompressionReport,
    CompressionResult,
    MeasureOptions,
    ModelMetrics,
    PassContext,
    PassManager,
    PassResult,
    ProgressCallback,
    ProgressEvent,
    StepReport,
)
from .passes.accuracy_guard import AccuracyGuard, node_sensitivity, quantized_nodes
from .passes.decompose import DecomposeGemm
from .passes.distill import Distillation, MlpStudent, parse_student
from .passes.finetune import FineTune
from .passes.lowrank import LowRankFactorization
from .passes.prune import MagnitudePruning, SensitivityPruning, weight_sparsity
from .passes.quantize import (
    QUANTIZE_OPTIONS,
    DynamicInt8Quantization,
    Float16Conversion,
    Int4WeightOnlyQuantization,
    StaticInt8Quantization,
    parse_quantize_option,
)
from .passes.structured import ChannelPruning
from .passes.weight_sharing import PackedModel, WeightSharing, pack_model
from .pipeline import CompressJob, CompressJobResult, PackedFile, compress, run_compress_job
from .recipe import (
    PASS_REGISTRY,
    StepOptions,
    build_pass,
    load_recipe,
    parse_recipe,
    passes_from_options,
    quantize_modes,
    register_pass,
)
from .reference.digits import mlp_to_onnx, train_digits_mlp
from .reference.digits_cnn import train_digits_cnn
from .training.distill import teacher_logits
from .training.loop import TrainingOptions, finetune_module, train_module
from .training.torch_bridge import graph_module, module_to_onnx

__all__ = [
    # recipes and the pass registry
    "PASS_REGISTRY",
    "QUALITY_METRICS",
    "QUANTIZE_OPTIONS",
    "AccuracyGuard",
    "ChannelPruning",
    # pass framework
    "CompressJob",
    "CompressJobResult",
    "CompressionPass",
    "CompressionReport",
    # reports
    "CompressionResult",
    # data
    "Dataset",
    "DecomposeGemm",
    "DigitsSplit",
    "Distillation",
    "DynamicInt8Quantization",
    "FineTune",
    "Float16Conversion",
    "Int4WeightOnlyQuantization",
    "LowRankFactorization",
    "MagnitudePruning",
    "MeasureOptions",
    "MlpStudent",
    "ModelMetrics",
    # transport form
    "PackedFile",
    "PackedModel",
    "PassContext",
    "PassManager",
    "PassResult",
    "ProgressCallback",
    "ProgressEvent",
    "Quality",
    "SensitivityPruning",
    # passes
    "StaticInt8Quantization",
    "StepOptions",
    "StepReport",
    "TrainingOptions",
    # pruning and training helpers
    "WeightLayer",
    "WeightSharing",
    "build_pass",
    "check_metric",
    # entry points
    "compress",
    "cosine_similarities",
    "count_parameters",
    # evaluation
    "evaluate_accuracy",
    "find_layers",
    "finetune_module",
    "graph_module",
    "host_latency_ms",
    "load_arrays",
    "load_digits_split",
    "load_model",
    "load_recipe",
    "measure_sparsity",
    "mlp_to_onnx",
    "model_from_bytes",
    "model_size_bytes",
    "module_to_onnx",
    "node_sensitivity",
    "pack_model",
    "parse_quantize_option",
    "parse_recipe",
    "parse_student",
    "passes_from_options",
    "predict_classes",
    "quantize_modes",
    "quantized_nodes",
    "register_pass",
    "run_compress_job",
    "save_model_atomic",
    "teacher_logits",
    "top1_agreement",
    "train_digits_cnn",
    # model zoo
    "train_digits_mlp",
    "train_module",
    "weight_sparsity",
]
