"""Distillation's training side: the teacher's soft targets, the student as a torch module, the loss.

The loss is Hinton et al.'s (2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, labels)

The pass that uses these is :class:`~host_tools.compress.passes.distill.Distillation`.
torch is imported only when a student trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from edge_sdk.errors import CompressionError, ConfigError

from ..evaluate import open_host_session, run_batched
from .loop import LossFn
from .torch_bridge import graph_module, module_to_onnx, require_torch

__all__ = ["distillation_loss", "single_input", "student_module", "teacher_logits"]


def student_module(
    student: Any, teacher: onnx.ModelProto, inputs: np.ndarray
) -> tuple[Any, Callable[[Any], onnx.ModelProto]]:
    """The student as a trainable torch module, and how to export it back to ONNX.

    Args:
        student: an ONNX model (run through the torch bridge) or a torch ``nn.Module``.
        teacher: the teacher, whose input and output names the exported student takes.
        inputs: training inputs (their shape fixes the exported input shape).

    Returns:
        ``(module, export)``: ``export(module)`` gives the trained student as ONNX.

    Raises:
        ConfigError: ``student`` is neither an ONNX model nor a torch module.
        CompressionError: an ONNX student has an op the torch bridge cannot run, or the
            teacher has more than one input.
        RuntimeUnavailableError: torch is not installed.
    """
    if isinstance(student, onnx.ModelProto):
        module = graph_module(student)
        return module, lambda m: m.to_onnx()
    torch = require_torch("distillation")
    if not isinstance(student, torch.nn.Module):
        raise ConfigError(f"a student is an MlpStudent, an ONNX model or a torch module, not {type(student).__name__}")
    input_name = single_input(teacher).name
    output_name = teacher.graph.output[0].name
    shape = tuple(int(d) for d in inputs.shape[1:])
    return student, lambda m: module_to_onnx(m, shape, input_name=input_name, output_name=output_name)


def distillation_loss(soft: np.ndarray, labels: np.ndarray | None, temperature: float, alpha: float) -> LossFn:
    """The distillation loss for :func:`~host_tools.compress.training.loop.train_module`.

    Args:
        soft: the teacher's logits, ``[N, classes]``.
        labels: class labels ``[N]``; needed when ``alpha < 1``.
        temperature: softens both distributions.
        alpha: weight of the soft (teacher) term; ``1 - alpha`` goes to the labels.

    Returns:
        ``loss(logits, rows)``, with ``rows`` the batch's indices into the training data.

    Raises:
        RuntimeUnavailableError: torch is not installed.
    """
    torch = require_torch("distillation")
    functional = torch.nn.functional
    teacher = torch.from_numpy(soft.astype(np.float32))
    hard = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def loss(logits: Any, rows: Any) -> Any:
        total = 0.0
        if alpha > 0:
            target = functional.softmax(teacher[rows] / temperature, dim=1)
            log_student = functional.log_softmax(logits / temperature, dim=1)
            total = total + alpha * temperature**2 * functional.kl_div(log_student, target, reduction="batchmean")
        if alpha < 1:
            if hard is None:
                raise CompressionError("distillation with alpha < 1 needs labels")
            total = total + (1 - alpha) * functional.cross_entropy(logits, hard[rows])
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


def single_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {init.name for init in model.graph.initializer}
    inputs: list[onnx.ValueInfoProto] = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CompressionError(f"distillation needs a teacher with one input, not {[i.name for i in inputs]}")
    return inputs[0]
