"""How sure a segmentation is: per-voxel uncertainty and per-class calibration.

- `normalised_entropy`: -sum_c p_c log p_c / log C of the blended class probabilities, 0 where
  one class has all the mass and 1 where all C classes are equally likely; the map
  `xctsam predict --uncertainty` writes beside the labels.
- `calibration_error`: the expected calibration error (ECE) of one class treated one-vs-rest,
  the probability range cut into equal-width bins: sum over bins of (voxels in the bin / all
  voxels) x |mean predicted probability - observed frequency|. 0 for a calibrated model; a
  model that says 0.9 where the class is present half the time scores about 0.4 there.
  Accumulated bin by bin (`CalibrationCounts`), so whole test splits stream through it.
"""

from __future__ import annotations

import math

import numpy as np

CALIBRATION_BINS = 15  # as Guo et al. 2017, "On calibration of modern neural networks"


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """(C, ...) probabilities summing to 1 over axis 0 -> (...) float32 entropy in [0, 1]."""
    p = np.clip(np.asarray(probabilities, dtype=np.float32), 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0) / math.log(p.shape[0])
    return np.clip(entropy, 0.0, 1.0).astype(np.float32)


class CalibrationCounts:
    """Per class and probability bin: voxels, summed probability, voxels of that class."""

    def __init__(self, classes: int, bins: int = CALIBRATION_BINS) -> None:
        self.bins = bins
        self.count = np.zeros((classes, bins), dtype=np.int64)
        self.confidence = np.zeros((classes, bins), dtype=np.float64)
        self.hits = np.zeros((classes, bins), dtype=np.int64)

    def add(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """(C, ...) probabilities and (...) integer truth of the same voxels."""
        for cls, p in enumerate(np.asarray(probabilities, dtype=np.float32)):
            p = p.ravel()
            index = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
            self.count[cls] += np.bincount(index, minlength=self.bins)
            self.confidence[cls] += np.bincount(index, weights=p, minlength=self.bins)
            self.hits[cls] += np.bincount(index, weights=(labels.ravel() == cls), minlength=self.bins).astype(np.int64)

    def error(self, cls: int) -> float:
        """ECE of class `cls` (NaN with no voxels)."""
        total = self.count[cls].sum()
        if total == 0:
            return math.nan
        filled = self.count[cls] > 0
        gap = np.abs(self.confidence[cls][filled] - self.hits[cls][filled]) / self.count[cls][filled]
        return float((self.count[cls][filled] / total * gap).sum())


def calibration_error(probabilities: np.ndarray, labels: np.ndarray, cls: int, bins: int = CALIBRATION_BINS) -> float:
    """ECE of class `cls` over the given voxels (see the module docstring)."""
    counts = CalibrationCounts(np.asarray(probabilities).shape[0], bins)
    counts.add(probabilities, labels)
    return counts.error(cls)
