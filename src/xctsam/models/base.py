"""What every segmentation model offers the training loop, prediction and evaluation.

Inputs are normalised grey tiles in [0, 1], shaped (B, context, H, W): `context` adjacent
slices centred on the one to segment (1 for SAM, k for the 2.5D U-Net). Each model owns its
loss (multi-class or per-class binary) and how its outputs become labels, so one loop trains
them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from xctsam.models.losses import class_argmax, segmentation_loss


class Segmenter(nn.Module, ABC):
    context: int = 1  # input slices per sample
    # how `to_labels` reads probabilities (losses.LABELLINGS): argmax, or "paint" for one binary
    # model per class; an exported model records it so its users label as the model does
    labelling: str = "argmax"
    fixed_tile: int | None = None  # the one tile size the model takes (an exported graph), else any

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, context, H, W) in [0, 1] -> raw outputs (B, C_out, H, W) at the input size."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Task loss of `forward`'s outputs against labels (B, H, W) with values 0..3."""

    @abstractmethod
    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B, 4, H, W) per-class scores in [0, 1], blendable across overlapping tiles."""

    @abstractmethod
    def to_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, 4, H, W) scores -> (B, H, W) labels 0..3 (argmax, or painting for per-class models)."""

    def auxiliary_loss(self) -> torch.Tensor:
        """Extra loss from the last forward (Conv-LoRA's load balancing); 0 by default."""
        return torch.zeros((), device=next(self.parameters()).device)


class MulticlassSegmenter(Segmenter):
    """Outputs are class logits: weighted cross-entropy + Dice, softmax, argmax.

    Subclasses set `class_weights` (a tensor buffer) and `dice_weight`.
    """

    class_weights: torch.Tensor
    dice_weight: float

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(outputs, labels, self.class_weights, self.dice_weight)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=1)

    def to_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        return class_argmax(probabilities)


def trainable_parameters(model: nn.Module) -> dict[str, int | float]:
    """{trainable, total, share}: parameter counts and the trainable share of the whole model."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}
