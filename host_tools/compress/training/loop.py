"""The training loop shared by fine-tuning and distillation, and fine-tuning of torch modules.

:func:`train_module` trains a torch module in place (AdamW, cosine schedule), optionally
holding pruned weights at zero (:func:`zero_masks`) and training shared weights as one
value per cluster (:func:`codebook_ties`). :func:`finetune_module` fine-tunes a torch
module the user already has. torch is optional (``pip install 'edge-sdk[train]'``) and
imported only when training runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.errors import CompressionError, ConfigError

from ..data import Dataset
from .torch_bridge import require_torch

__all__ = ["LossFn", "TrainingOptions", "codebook_ties", "finetune_module", "train_module", "zero_masks"]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Any]
"""``loss(logits, batch_rows) -> scalar tensor``: how one batch is scored."""


@dataclass(frozen=True)
class TrainingOptions:
    """How a model is trained (fine-tuning and distillation).

    Attributes:
        epochs: passes over the training data.
        learning_rate: Adam's initial step size; it follows a cosine schedule to 0.
        batch_size: samples per step.
        weight_decay: decoupled weight decay (AdamW).
        threads: torch intra-op threads; ``None`` leaves torch's default.

    Raises:
        ConfigError: a value out of range.
    """

    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.learning_rate > 0 or self.weight_decay < 0:
            raise ConfigError(
                "training needs epochs >= 0, batch_size >= 1, learning_rate > 0 and weight_decay >= 0",
                epochs=self.epochs,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1", key="threads")


def finetune_module(
    module: Any, data: Dataset, options: TrainingOptions = TrainingOptions(), *, seed: int = 0
) -> dict[str, Any]:
    """Fine-tune a torch classifier in place, keeping its zero weights at zero.

    Args:
        module: a ``torch.nn.Module`` returning class scores.
        data: labelled training data.
        options: how to train.
        seed: seed for shuffling.

    Returns:
        Training statistics (loss before and after, epochs).

    Raises:
        CompressionError: ``data`` has no labels.
        RuntimeUnavailableError: torch is not installed.
    """
    if data.y is None:
        raise CompressionError("fine-tuning needs labelled training data (x and y)")
    return train_module(module, data, options, seed=seed, masks=zero_masks(module))


def zero_masks(module: Any) -> dict[str, Any]:
    """Masks (1 = trainable) for every weight of rank >= 2 that has zeros.

    Args:
        module: a torch module.

    Returns:
        Parameter name -> float mask tensor of its shape.
    """
    return {
        name: (param.detach() != 0).to(param.dtype)
        for name, param in module.named_parameters()
        if param.dim() >= 2 and bool((param.detach() == 0).any())
    }


def codebook_ties(module: Any, max_codebook: int = 256) -> dict[str, Any]:
    """Cluster assignments of the parameters that hold few distinct values (shared weights).

    Args:
        module: a torch module.
        max_codebook: most distinct nonzero values a tied parameter has.

    Returns:
        Parameter name -> int64 tensor of its shape: each element's cluster (the index
        of its value among the parameter's distinct nonzero values), -1 where it is zero.
        Only parameters whose values repeat (fewer clusters than nonzeros) are included.
    """
    torch = require_torch("codebook fine-tuning")
    ties = {}
    for name, param in module.named_parameters():
        values = param.detach()
        nonzero = values != 0
        count = int(nonzero.sum())
        if not count:
            continue
        centres, inverse = torch.unique(values[nonzero], return_inverse=True)
        if len(centres) <= max_codebook and len(centres) < count:
            assignment = torch.full(values.shape, -1, dtype=torch.int64)
            assignment[nonzero] = inverse
            ties[name] = assignment
    return ties


class _Tied:
    """One shared tensor during training: gradients summed per cluster, members kept equal."""

    def __init__(self, torch: Any, param: Any, assignment: Any) -> None:
        self.param = param
        self.flat = assignment.reshape(-1)
        self.valid = self.flat >= 0
        self.index = self.flat.clamp(min=0)
        self.members = self.index[self.valid]  # cluster of each nonzero element
        self.k = int(self.flat.max()) + 1
        first = torch.full((self.k,), len(self.flat), dtype=torch.int64)
        positions = torch.arange(len(self.flat))
        self.first = first.scatter_reduce(0, self.members, positions[self.valid], reduce="amin")
        centres = param.detach().reshape(-1)[self.first].numpy()
        self.float16 = bool(np.array_equal(centres.astype(np.float16).astype(centres.dtype), centres))
        self.torch = torch

    def tie_gradient(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        flat = grad.reshape(-1)
        sums = self.torch.zeros(self.k, dtype=flat.dtype).index_add_(0, self.members, flat[self.valid])
        self.param.grad = (sums[self.index] * self.valid).reshape(grad.shape)

    def snap(self, *, float16: bool = False) -> None:
        with self.torch.no_grad():
            centres = self.param.reshape(-1)[self.first]
            if float16:
                centres = centres.half().to(self.param.dtype)
            self.param.copy_((centres[self.index] * self.valid).reshape(self.param.shape))


def train_module(
    module: Any,
    data: Dataset,
    options: TrainingOptions,
    *,
    seed: int = 0,
    masks: dict[str, Any] | None = None,
    ties: dict[str, Any] | None = None,
    loss: LossFn | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``module`` in place with AdamW and a cosine learning-rate schedule.

    Args:
        module: the torch module.
        data: training inputs (and labels, which the default loss needs).
        options: epochs, learning rate, batch size.
        seed: seeds torch and the shuffling.
        masks: parameter name -> mask; masked entries are held at zero after each step.
        ties: parameter name -> cluster assignment (from :func:`codebook_ties`); each
            cluster is trained as one value, by the sum of its members' gradients.
        loss: ``loss(logits, rows)`` with ``rows`` the batch's indices into ``data``;
            cross-entropy on ``data.y`` when omitted.
        progress: called with ``(epoch done, epochs)``.

    Returns:
        ``{"epochs", "loss_before", "loss_after", "train_accuracy"}`` (accuracy when
        ``data`` has labels).

    Raises:
        CompressionError: no labels for the default loss, or the model fails on the data.
        RuntimeUnavailableError: torch is not installed.
    """
    torch = require_torch("training")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(data.array("training"), dtype=np.float32))
    y = None if data.y is None else torch.from_numpy(np.asarray(data.y, dtype=np.int64))
    if loss is None:
        if y is None:
            raise CompressionError("training with cross-entropy needs labels")
        labels = y

        def loss(logits: Any, rows: Any) -> Any:
            return torch.nn.functional.cross_entropy(logits, labels[rows])

    masks = dict(masks or {})
    params = dict(module.named_parameters())
    unknown = sorted((set(masks) | set(ties or {})) - set(params))
    if unknown:
        raise ConfigError(f"masks name parameters the module does not have: {unknown}")
    tied = [_Tied(torch, params[name], assignment) for name, assignment in (ties or {}).items()]
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=options.learning_rate, weight_decay=options.weight_decay
    )
    steps_per_epoch = max(1, math.ceil(len(x) / options.batch_size))
    total_steps = max(1, options.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    generator = torch.Generator().manual_seed(seed)
    everything = torch.arange(len(x))

    def evaluate() -> tuple[float, float | None]:
        module.eval()
        with torch.no_grad():
            logits = _forward(module, x)
            value = float(loss(logits, everything))
            accuracy = None if y is None else float((logits.argmax(dim=1) == y).float().mean())
        return value, accuracy

    before, _ = evaluate()
    for epoch in range(options.epochs):
        module.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), options.batch_size):
            rows = order[start : start + options.batch_size]
            optimizer.zero_grad()
            value = loss(_forward(module, x[rows]), rows)
            value.backward()
            for tie in tied:
                tie.tie_gradient()
            optimizer.step()
            for tie in tied:
                tie.snap()
            scheduler.step()
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        params[name].mul_(mask)
        if progress is not None:
            progress(epoch + 1, options.epochs)
    for tie in tied:
        tie.snap(float16=tie.float16)
    after, accuracy = evaluate()
    module.eval()
    logger.info("trained %d epochs: loss %.4f -> %.4f, train accuracy %s", options.epochs, before, after, accuracy)
    stats: dict[str, Any] = {"epochs": options.epochs, "loss_before": round(before, 6), "loss_after": round(after, 6)}
    if accuracy is not None:
        stats["train_accuracy"] = round(accuracy, 6)
    return stats


def _forward(module: Any, x: Any) -> Any:
    try:
        return module(x)
    except CompressionError:
        raise
    except Exception as exc:  # shape mismatches surface as RuntimeError from torch
        raise CompressionError(f"the model failed on the training data (input shape {list(x.shape)}): {exc}") from exc
