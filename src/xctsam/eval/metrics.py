"""Segmentation scores from confusion counts, the nnU-Net way.

A (K, K) confusion matrix (rows: truth, columns: prediction, as scikit-learn) is accumulated
voxel by voxel over whole volumes, and IoU / Dice per class are computed once from the summed
counts, so a large volume is never held in memory and tiny classes (pores, inclusions a few
voxels wide) are not drowned by averaging per-slice ratios.

A class that is in neither the prediction nor the truth has no defined score: it is NaN, and
every mean skips it (a perfect "nothing predicted, nothing there" is not counted as 1, nor as 0).
Besides the volume-accumulated scores, the study's per-slice mean IoU is reported: the IoU of
each class on each slice where it is defined, averaged over those slices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from xctsam import CLASS_NAMES, NUM_CLASSES

FOREGROUND = (1, 2, 3)  # material, pore, inclusion: the classes the study's foreground mean covers


def confusion_matrix(prediction: Any, truth: Any, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(K, K) int64 counts, [t, p] = voxels of truth t predicted as p; numpy or torch arrays."""
    prediction, truth = _as_numpy(prediction), _as_numpy(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    _check_range(prediction, num_classes, "prediction")
    _check_range(truth, num_classes, "truth")
    # One bincount over the pair code t*K + p counts every cell of the matrix at once.
    codes = truth.astype(np.int64).ravel() * num_classes + prediction.astype(np.int64).ravel()
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, on any device
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_range(labels: np.ndarray, num_classes: int, what: str) -> None:
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"{what} labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} labels outside 0..{num_classes - 1}: {int(labels.min())}..{int(labels.max())}")


class ConfusionCounter:
    """Running confusion matrix over any number of `update` calls (slices, slabs, volumes)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: Any, truth: Any) -> np.ndarray:
        """Add one prediction/truth pair; returns that pair's own matrix (for per-slice scores)."""
        counts = confusion_matrix(prediction, truth, self.num_classes)
        self.matrix += counts
        return counts


def iou_dice(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice of a (..., K, K) confusion matrix; NaN where tp + fp + fn == 0.

    Leading dimensions are kept, so a stack of per-slice matrices gives (N, K) scores.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diagonal(matrix, axis1=-2, axis2=-1)
    fp = matrix.sum(axis=-2) - tp  # predicted as the class, truly another
    fn = matrix.sum(axis=-1) - tp  # truly the class, predicted as another
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (union + tp), np.nan)
    return iou, dice


def mean_defined(values: Sequence[float] | np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Mean over the non-NaN values; NaN (without a warning) where none is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": NaN is the answer
        result = np.nanmean(np.asarray(values, dtype=np.float64), axis=axis)
    return float(result) if np.ndim(result) == 0 else result


def per_slice_mean_iou(per_slice: Sequence[np.ndarray] | np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The study's score: each class's IoU averaged over the slices where it is defined."""
    stack = np.asarray(per_slice, dtype=np.int64).reshape(-1, num_classes, num_classes)
    iou, _ = iou_dice(stack)
    return np.asarray(mean_defined(iou, axis=0), dtype=np.float64).reshape(num_classes)


def _by_class(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {name: float(value) for name, value in zip(names, values, strict=True)}


def summarise(
    matrix: np.ndarray,
    per_slice: Sequence[np.ndarray] | np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
    foreground: Sequence[int] = FOREGROUND,
) -> dict[str, Any]:
    """Every score of one model on one split, from its accumulated and per-slice matrices.

    {iou: {class: v}, dice: {class: v}, iou_slice_mean: {class: v}, miou, fg_miou, mdice,
    fg_mdice, slices, voxels}; per-class values are volume-accumulated except iou_slice_mean;
    the means skip NaN classes; NaN stays NaN (JSON writers turn it into null).
    """
    iou, dice = iou_dice(matrix)
    foreground = list(foreground)
    return {
        "iou": _by_class(iou, class_names),
        "dice": _by_class(dice, class_names),
        "iou_slice_mean": _by_class(per_slice_mean_iou(per_slice, len(class_names)), class_names),
        "miou": mean_defined(iou),
        "fg_miou": mean_defined(iou[foreground]),
        "mdice": mean_defined(dice),
        "fg_mdice": mean_defined(dice[foreground]),
        "slices": len(per_slice),
        "voxels": int(np.asarray(matrix).sum()),
    }
