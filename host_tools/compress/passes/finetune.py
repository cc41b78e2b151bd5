"""Fine-tuning after pruning or low-rank factorization: train the weights to win accuracy back.

:class:`FineTune` is a pass: it runs the ONNX model as a torch module
(:func:`~host_tools.compress.training.torch_bridge.graph_module`), trains it on
``ctx.training`` with cross-entropy (:func:`~host_tools.compress.training.loop.train_module`),
and writes the weights back into the same graph. Weights that are exactly zero stay zero
(the pruning mask is read from the weights), so the sparsity a pruning pass bought
survives. After :class:`~host_tools.compress.passes.lowrank.LowRankFactorization` each
factor is its own parameter, so both are trained and the rank (the factor shapes) stays.
torch is optional (``pip install 'edge-sdk[train]'``) and only imported when training runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from edge_sdk.errors import CompressionError

from ..pass_manager import PassContext, PassResult
from ..training.loop import TrainingOptions, codebook_ties, train_module, zero_masks
from ..training.torch_bridge import graph_module

__all__ = ["FineTune"]


@dataclass(frozen=True)
class FineTune:
    """Train the model's weights on labelled data, keeping zero weights at zero.

    Args:
        options: epochs, learning rate, batch size.
        keep_zeros: keep every weight (rank >= 2) that is exactly zero at zero, so pruned
            connections stay pruned. Turn off only to fine-tune a dense model.
        share_codebooks: after :class:`~host_tools.compress.passes.weight_sharing.WeightSharing`,
            train the shared values instead of the weights (Deep Compression's centroid
            fine-tuning): every tensor with at most 256 distinct nonzero values keeps its
            clusters, and each cluster's value moves by the sum of its members' gradients.
            Values that were float16 before stay float16 (rounded once, at the end).

    Raises:
        ConfigError: from :class:`TrainingOptions`.
    """

    options: TrainingOptions = field(default_factory=TrainingOptions)
    keep_zeros: bool = True
    share_codebooks: bool = False

    @property
    def name(self) -> str:
        """The pass name."""
        return "finetune"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Fine-tune.

        Args:
            model: a float model of the ops the torch bridge supports.
            ctx: ``training`` must hold labelled data shaped like the model input.

        Returns:
            The model with trained weights (same graph), with notes on epochs, the loss
            before and after, and the sparsity kept.

        Raises:
            CompressionError: no labelled training data, or an op the torch bridge cannot
                run (names the node).
            RuntimeUnavailableError: torch is not installed.
        """
        data = ctx.training
        if data is None or data.y is None:
            raise CompressionError("fine-tuning needs labelled training data (x and y); none was given")
        module = graph_module(model)
        ties = codebook_ties(module) if self.share_codebooks else {}
        masks = {k: v for k, v in zero_masks(module).items() if k not in ties} if self.keep_zeros else {}
        stats = train_module(
            module,
            data,
            self.options,
            seed=ctx.seed,
            masks=masks,
            ties=ties,
            progress=lambda done, total: ctx.report(self.name, "train", done, total),
        )
        tuned = module.to_onnx()
        notes = {**stats, "masked_weights": len(masks), "tied_parameters": sorted(ties)}
        return PassResult(tuned, changed=self.options.epochs > 0, notes=notes)
