"""Segmentation losses: (weighted) cross-entropy or BCE plus soft Dice, for rare small classes.

Pores and inclusions cover ~1.5% and ~0.04% of training voxels, so plain cross-entropy is
dominated by background and material. Class weights raise the rare classes in the
cross-entropy; the Dice term scores each class by overlap, independent of its size.

Dice conventions (both losses):
- Dice is computed per class over the whole batch (all tiles pooled), not per tile: a tile
  with no pore says nothing about pores, while the pooled score stays defined whenever the
  batch holds the class somewhere.
- A class takes part in the Dice mean when the batch's labels contain it, or when the model
  *predicts* it (hard prediction: argmax for multi-class, probability > 0.5 for binary) on at
  least one pixel. A false-positive class therefore scores ~0 and is pushed down, while a class
  absent from both truth and prediction is left out: it would otherwise add a fake perfect
  score (1, with smoothing) or a fake zero (0, without), depending only on the smoothing
  constant. If no class takes part (binary channels all empty and predicted empty), the Dice
  term is 0 (not 1) and the BCE alone trains.
- The mean over taking-part classes is weighted by the class weights.

Both losses run in float32 even under autocast: a pooled sum over a batch of 128x128 tiles in
bf16 loses the rare classes' counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-6  # guards division only: every class in the Dice mean has a non-empty union


def _as_weights(weights: Sequence[float] | torch.Tensor, count: int, like: torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(weights, dtype=torch.float32, device=like.device).flatten()
    if tensor.numel() != count:
        raise ValueError(f"{name}: {tensor.numel()} values for {count} classes")
    return tensor


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, H, W) index of the largest score along dim 1 (the first on ties).

    `max(dim=1).indices` rather than `argmax(dim=1)`: on CPU, argmax over a non-innermost dim
    of a contiguous (N, C, H, W) tensor takes a slow strided path (12 ms against 0.5 ms for
    (4, 4, 128, 128)), which was 8% of a small SAM's training step.
    """
    return scores.max(dim=1).indices



PAINT_THRESHOLD = 0.5


def paint_labels(probabilities: torch.Tensor, threshold: float = PAINT_THRESHOLD) -> torch.Tensor:
    """(B, 4, H, W) per-class probabilities -> (B, H, W) labels: background, then each class
    painted over the previous where its probability exceeds `threshold` (the study's binary models)."""
    labels = torch.zeros(probabilities.shape[:1] + probabilities.shape[2:], dtype=torch.long, device=probabilities.device)
    for label in range(1, probabilities.shape[1]):  # channels follow the label values 1..3
        labels[probabilities[:, label] > threshold] = label
    return labels


LABELLINGS = {"argmax": class_argmax, "paint": paint_labels}

def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1 - weighted mean pooled soft Dice over the classes present in targets or hard predictions.

    probabilities, targets: (B, K, H, W) float; predicted: (B, K, H, W) bool hard prediction;
    weights: (K,). Returns a scalar in [0, 1]; 0 when no class takes part (nothing to score).
    """
    dims = (0, 2, 3)
    intersection = (probabilities * targets).sum(dims)
    union = probabilities.sum(dims) + targets.sum(dims)
    dice = (2 * intersection + _EPS) / (union + _EPS)
    taking_part = (targets.sum(dims) > 0) | predicted.any(dim=3).any(dim=2).any(dim=0)
    if not bool(taking_part.any()):
        return probabilities.new_zeros(())
    weights = weights * taking_part
    return 1 - (weights * dice).sum() / weights.sum()


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Sequence[float] | torch.Tensor,
    dice_weight: float,
) -> torch.Tensor:
    """Class-weighted cross-entropy + dice_weight * (1 - weighted pooled soft Dice).

    logits (B, C, H, W); labels (B, H, W) integer class indices. The cross-entropy is torch's
    weighted mean (sum of w[y] * nll over pixels / sum of w[y]), so uniform logits give log(C)
    whatever the weights.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        labels = labels.long()
        classes = logits.shape[1]
        weights = _as_weights(class_weights, classes, logits, "class_weights")
        cross_entropy = F.cross_entropy(logits, labels, weight=weights)
        if dice_weight == 0:
            return cross_entropy
        probabilities = logits.softmax(dim=1)
        targets = F.one_hot(labels, classes).permute(0, 3, 1, 2).float()
        predicted = F.one_hot(class_argmax(logits), classes).permute(0, 3, 1, 2).bool()
        return cross_entropy + dice_weight * soft_dice_loss(probabilities, targets, predicted, weights)


def binary_segmentation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dice_weight: float,
    pos_weight: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-channel BCE-with-logits + dice_weight * (1 - mean pooled soft Dice over channels).

    logits, targets (B, K, H, W): one independent binary mask per channel (the per-class SAM
    layout). pos_weight (K,) multiplies the positive term of each channel's BCE.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        targets = targets.float()
        channels = logits.shape[1]
        positive = None if pos_weight is None else _as_weights(pos_weight, channels, logits, "pos_weight").view(channels, 1, 1)
        bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=positive)
        if dice_weight == 0:
            return bce
        equal = torch.ones(channels, device=logits.device)
        return bce + dice_weight * soft_dice_loss(logits.sigmoid(), targets, logits > 0, equal)
