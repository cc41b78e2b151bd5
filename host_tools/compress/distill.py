"""Knowledge distillation: train a smaller student on the teacher's soft targets.

The teacher is the model the pass receives, an ONNX model run with onnxruntime (once,
over the training inputs; its logits are kept). The student trains in torch with the
loss of Hinton et al. (2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, labels)

The ``T^2`` factor keeps the soft term's gradients on the same scale as the hard term's
whatever the temperature. The pass returns the student as ONNX, under the teacher's
input and output names, so the steps after it (pruning, quantization, packing) treat it
like any model.

The student is one of: :class:`MlpStudent` (hidden widths; built here), an ONNX model
(its architecture and initial weights), or a torch ``nn.Sequential`` of common layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from .data import Dataset
from .evaluate import count_parameters, open_host_session, run_batched
from .finetune import TrainingOptions, train_module
from .model_file import build_model, load_model
from .passes import PassContext, PassResult
from .torch_bridge import graph_module, module_to_onnx, require_torch

__all__ = ["Distillation", "MlpStudent", "StudentSpec", "parse_student", "teacher_logits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlpStudent:
    """A ReLU MLP student: ``Flatten`` (for image inputs), ``Gemm`` + ``Relu`` per hidden layer, ``Gemm``.

    Args:
        hidden: widths of the hidden layers, e.g. ``(32,)``.

    Raises:
        ConfigError: an empty or non-positive width.
    """

    hidden: tuple[int, ...] = (32,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"student hidden widths must be positive, got {self.hidden}", key="hidden")

    def build(self, teacher: onnx.ModelProto, classes: int, seed: int) -> onnx.ModelProto:
        """The untrained student for ``teacher``'s input, with ``classes`` outputs.

        Weights start as torch's ``nn.Linear`` does: uniform in ``+-1/sqrt(fan_in)``.

        Raises:
            CompressionError: the teacher's input has a dynamic non-batch dimension.
        """
        model_input = _single_input(teacher)
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in model_input.type.tensor_type.shape.dim][1:]
        if not dims or any(d < 1 for d in dims):
            raise CompressionError(
                f"an MLP student needs a fixed input size; teacher input {model_input.name!r} has shape {dims}",
                input=model_input.name,
            )
        rng = np.random.default_rng(seed)
        nodes: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        current = model_input.name
        if len(dims) > 1:
            nodes.append(helper.make_node("Flatten", [current], ["flat"], name="flatten", axis=1))
            current = "flat"
        width = int(np.prod(dims))
        output_name = teacher.graph.output[0].name
        widths = [*self.hidden, classes]
        for i, out in enumerate(widths):
            bound = 1.0 / np.sqrt(width)
            inits.append(
                numpy_helper.from_array(rng.uniform(-bound, bound, (out, width)).astype(np.float32), f"fc{i}.weight")
            )
            inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, out).astype(np.float32), f"fc{i}.bias"))
            last = i == len(widths) - 1
            result = output_name if last else f"fc{i}"
            nodes.append(
                helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [result], name=f"fc{i}", transB=1)
            )
            if not last:
                nodes.append(helper.make_node("Relu", [result], [f"relu{i}"], name=f"relu{i}"))
                current = f"relu{i}"
            width = out
        graph = helper.make_graph(
            nodes,
            "student",
            [helper.make_tensor_value_info(model_input.name, TensorProto.FLOAT, ["N", *dims])],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", classes])],
            initializer=inits,
        )
        opset = next((o.version for o in teacher.opset_import if o.domain in ("", "ai.onnx")), 17)
        return build_model(graph, max(13, min(opset, 21)))


StudentSpec = Union[MlpStudent, onnx.ModelProto, Any]
"""An :class:`MlpStudent`, an ONNX model, or a torch ``nn.Module``."""


@dataclass(frozen=True)
class Distillation:
    """Replace the model (the teacher) with a smaller student trained on its soft targets.

    Args:
        student: the student (see :data:`StudentSpec`).
        temperature: softens both distributions; 1 is plain softmax. Hinton used 2-20.
        alpha: weight of the soft (teacher) term; ``1 - alpha`` goes to the labels.
            ``alpha=0`` trains the student on labels alone (the baseline to beat).
        options: epochs, learning rate, batch size.

    Raises:
        ConfigError: ``temperature <= 0`` or ``alpha`` outside ``[0, 1]``.
    """

    student: StudentSpec = MlpStudent()
    temperature: float = 4.0
    alpha: float = 0.9
    options: TrainingOptions = TrainingOptions(epochs=60)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}", key="temperature")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}", key="alpha")

    @property
    def name(self) -> str:
        """The pass name."""
        return "distill"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Train the student and return it.

        Args:
            model: the teacher (not modified).
            ctx: ``training`` holds the transfer set: inputs, and labels unless
                ``alpha == 1``.

        Returns:
            The student as ONNX, with notes on its size against the teacher's.

        Raises:
            CompressionError: no training data, no labels when ``alpha < 1``, a student
                whose outputs do not match the teacher's classes, or a student op the
                torch bridge does not support (names the node).
            RuntimeUnavailableError: torch is not installed.
        """
        torch = require_torch("distillation")
        data = ctx.training
        if data is None:
            raise CompressionError("distillation needs training data (the transfer set); none was given")
        if self.alpha < 1.0 and data.y is None:
            raise CompressionError(
                f"distillation with alpha={self.alpha} < 1 needs labels in the training data; give labels, "
                "or alpha=1 (--distill-alpha 1) to learn from the teacher alone"
            )
        inputs = data.array("distillation")
        soft, from_probabilities = teacher_logits(model, inputs)
        classes = soft.shape[1]
        module, exporter = self._student_module(model, classes, ctx.seed, inputs)
        with torch.no_grad():
            probe = module(torch.from_numpy(np.ascontiguousarray(inputs[:2], dtype=np.float32)))
        if tuple(probe.shape[1:]) != (classes,):
            raise CompressionError(
                f"the student outputs shape {list(probe.shape[1:])}, the teacher {classes} classes",
                student=list(probe.shape[1:]),
                classes=classes,
            )
        stats = train_module(
            module,
            data,
            self.options,
            seed=ctx.seed,
            loss=self._loss(torch, soft, data),
            progress=lambda done, total: ctx.report(self.name, "train", done, total),
        )
        student = exporter(module)
        teacher_params, student_params = count_parameters(model), count_parameters(student)
        return PassResult(
            student,
            changed=True,
            notes={
                **stats,
                "temperature": self.temperature,
                "alpha": self.alpha,
                "teacher_parameters": teacher_params,
                "student_parameters": student_params,
                "parameter_ratio": round(student_params / max(1, teacher_params), 6),
                "teacher_outputs": "probabilities" if from_probabilities else "logits",
            },
        )

    def _student_module(self, teacher: onnx.ModelProto, classes: int, seed: int, inputs: np.ndarray) -> tuple[Any, Any]:
        spec = self.student
        if isinstance(spec, MlpStudent):
            spec = spec.build(teacher, classes, seed)
        if isinstance(spec, onnx.ModelProto):
            module = graph_module(spec)
            return module, lambda m: m.to_onnx()
        torch = require_torch("distillation")
        if not isinstance(spec, torch.nn.Module):
            raise ConfigError(f"a student is an MlpStudent, an ONNX model or a torch module, not {type(spec).__name__}")
        input_name = _single_input(teacher).name
        output_name = teacher.graph.output[0].name
        shape = tuple(int(d) for d in inputs.shape[1:])
        return spec, lambda m: module_to_onnx(m, shape, input_name=input_name, output_name=output_name)

    def _loss(self, torch: Any, soft: np.ndarray, data: Dataset) -> Any:
        functional = torch.nn.functional
        teacher = torch.from_numpy(soft.astype(np.float32))
        labels = None if data.y is None else torch.from_numpy(np.asarray(data.y, dtype=np.int64))
        temperature, alpha = self.temperature, self.alpha

        def loss(logits: Any, rows: Any) -> Any:
            total = 0.0
            if alpha > 0:
                target = functional.softmax(teacher[rows] / temperature, dim=1)
                log_student = functional.log_softmax(logits / temperature, dim=1)
                total = total + alpha * temperature**2 * functional.kl_div(log_student, target, reduction="batchmean")
            if alpha < 1:
                total = total + (1 - alpha) * functional.cross_entropy(logits, labels[rows])
            return total

        return loss


def teacher_logits(teacher: onnx.ModelProto, x: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, bool]:
    """Run the teacher with onnxruntime over ``x``.

    A teacher that ends in a softmax gives probabilities; their logarithm is used as
    logits (equal up to a per-sample constant, which the softmax ignores).

    Args:
        teacher: the ONNX teacher.
        x: inputs.
        batch_size: samples per run.

    Returns:
        ``[N, classes]`` float32 logits, and whether they came from probabilities.

    Raises:
        CompressionError: the teacher's first output is not ``[N, classes]``.
    """
    with open_host_session(teacher) as session:
        out = np.asarray(run_batched(session, x, batch_size), dtype=np.float64)
    if out.ndim != 2:
        raise CompressionError(f"the teacher's first output has shape {list(out.shape)}, not [N, classes]")
    probabilities = bool(np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    if probabilities:
        out = np.log(np.clip(out, 1e-12, None))
    return out.astype(np.float32), probabilities


def parse_student(text: str, key: str = "distill") -> MlpStudent | onnx.ModelProto:
    """Parse a CLI ``--distill`` or recipe ``student`` value.

    ``mlp:32`` or ``mlp:64,32`` builds an :class:`MlpStudent` with those hidden widths;
    a path ending in ``.onnx`` (relative to the current directory) loads that model as the
    student: its architecture and initial weights; the torch bridge must support its ops.

    Raises:
        ConfigError: anything else; the message shows the forms.
        ModelLoadError: the ``.onnx`` file is missing or not a valid model (names the file).
    """
    text = text.strip()
    if text.lower().endswith(".onnx"):
        return load_model(text)
    kind, _, widths = text.partition(":")
    try:
        hidden = tuple(int(w) for w in widths.split(",") if w.strip())
    except ValueError:
        hidden = ()
    if kind.strip().lower() != "mlp" or not hidden:
        raise ConfigError(
            f"a student is mlp:WIDTH[,WIDTH...] (e.g. mlp:32) or a student.onnx file, not {text!r}",
            key=key, value=text,
        )  # fmt: skip
    return MlpStudent(hidden)


def _single_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CompressionError(f"distillation needs a teacher with one input, not {[i.name for i in inputs]}")
    return inputs[0]
