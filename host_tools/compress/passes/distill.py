"""Knowledge distillation: train a smaller student on the teacher's soft targets.

The teacher is the model the pass receives, an ONNX model run with onnxruntime (once,
over the training inputs; its logits are kept). The student trains in torch with the
loss of Hinton et al. (2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, labels)

The ``T^2`` factor keeps the soft term's gradients on the same scale as the hard term's
whatever the temperature. The pass returns the student as ONNX, under the teacher's
input and output names, so the steps after it (pruning, quantization, packing) treat it
like any model. The training itself (teacher logits, the loss, the student as a torch
module) is in :mod:`host_tools.compress.training.distill`.

The student is one of: :class:`MlpStudent` (hidden widths; built here), an ONNX model
(its architecture and initial weights), or a torch ``nn.Sequential`` of common layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from ..evaluate import count_parameters
from ..model_file import build_model, load_model
from ..pass_manager import PassContext, PassResult
from ..training.distill import distillation_loss, single_input, student_module, teacher_logits
from ..training.loop import TrainingOptions, train_module
from ..training.torch_bridge import require_torch

__all__ = ["Distillation", "MlpStudent", "StudentSpec", "parse_student"]

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
        model_input = single_input(teacher)
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


StudentSpec = MlpStudent | onnx.ModelProto | Any
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
    options: TrainingOptions = field(default_factory=lambda: TrainingOptions(epochs=60))

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
        spec = self.student.build(model, classes, ctx.seed) if isinstance(self.student, MlpStudent) else self.student
        module, exporter = student_module(spec, model, inputs)
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
            loss=distillation_loss(soft, data.y, self.temperature, self.alpha),
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
