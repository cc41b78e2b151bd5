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
"""

from .accuracy_guard import AccuracyGuard, node_sensitivity, quantized_nodes
from .data import Dataset, DigitsSplit, load_arrays, load_digits_split
from .decompose import DecomposeGemm
from .digits import mlp_to_onnx, train_digits_mlp
from .digits_cnn import train_digits_cnn
from .distill import Distillation, MlpStudent, parse_student, teacher_logits
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
from .finetune import FineTune, TrainingOptions, finetune_module, train_module
from .layers import WeightLayer, find_layers
from .lowrank import LowRankFactorization
from .model_file import load_model, model_from_bytes, save_model_atomic
from .passes import (
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
from .pipeline import compress
from .prune import MagnitudePruning, SensitivityPruning, weight_sparsity
from .quantize import (
    QUANTIZE_OPTIONS,
    DynamicInt8Quantization,
    Float16Conversion,
    Int4WeightOnlyQuantization,
    StaticInt8Quantization,
    parse_quantize_option,
)
from .recipe import PASS_REGISTRY, build_pass, load_recipe, parse_recipe, quantize_modes, register_pass
from .structured import ChannelPruning
from .torch_bridge import graph_module, module_to_onnx
from .weight_sharing import PackedModel, WeightSharing, pack_model

__all__ = [
    # recipes and the pass registry
    "PASS_REGISTRY",
    "QUALITY_METRICS",
    "QUANTIZE_OPTIONS",
    "AccuracyGuard",
    "ChannelPruning",
    # pass framework
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
    "predict_classes",
    "quantize_modes",
    "quantized_nodes",
    "register_pass",
    "save_model_atomic",
    "teacher_logits",
    "top1_agreement",
    "train_digits_cnn",
    # model zoo
    "train_digits_mlp",
    "train_module",
    "weight_sparsity",
]
