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
    # entry points
    "compress",
    "load_model",
    "model_from_bytes",
    "save_model_atomic",
    # pass framework
    "CompressionPass",
    "PassContext",
    "PassResult",
    "PassManager",
    "ProgressEvent",
    "ProgressCallback",
    "MeasureOptions",
    # reports
    "CompressionResult",
    "CompressionReport",
    "StepReport",
    "ModelMetrics",
    # passes
    "StaticInt8Quantization",
    "DynamicInt8Quantization",
    "DecomposeGemm",
    "parse_quantize_option",
    "QUANTIZE_OPTIONS",
    "Float16Conversion",
    "Int4WeightOnlyQuantization",
    "AccuracyGuard",
    "node_sensitivity",
    "quantized_nodes",
    "LowRankFactorization",
    "WeightSharing",
    "MagnitudePruning",
    "SensitivityPruning",
    "ChannelPruning",
    "FineTune",
    "Distillation",
    "MlpStudent",
    "parse_student",
    "TrainingOptions",
    # pruning and training helpers
    "WeightLayer",
    "find_layers",
    "weight_sparsity",
    "teacher_logits",
    "train_module",
    "finetune_module",
    "graph_module",
    "module_to_onnx",
    # transport form
    "PackedModel",
    "pack_model",
    # recipes and the pass registry
    "PASS_REGISTRY",
    "register_pass",
    "build_pass",
    "parse_recipe",
    "load_recipe",
    "quantize_modes",
    # data
    "Dataset",
    "DigitsSplit",
    "load_digits_split",
    "load_arrays",
    # evaluation
    "evaluate_accuracy",
    "Quality",
    "QUALITY_METRICS",
    "check_metric",
    "cosine_similarities",
    "predict_classes",
    "top1_agreement",
    "model_size_bytes",
    "count_parameters",
    "measure_sparsity",
    "host_latency_ms",
    # model zoo
    "train_digits_mlp",
    "mlp_to_onnx",
    "train_digits_cnn",
]
