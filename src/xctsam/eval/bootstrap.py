"""Bootstrap confidence intervals for IoU computed from per-slice confusion counts.

A split's IoU is computed from confusion counts pooled over its slices (eval.metrics), so a
resample is a reweighting of those slices: `bootstrap_weights` draws, per resample, how many
times each slice is taken, and `resampled_iou` turns the weighted pooled counts into IoU per
class. Two models scored on the same slices share the weights, so a difference (SAM-GAN minus
U-Net, after minus before re-fine-tuning) is bootstrapped paired, as it must be.

The unit resampled:
- "volume": whole volumes drawn with replacement (slices of one volume are not independent:
  the same part, scan and defect population); used when a split has enough volumes.
- "slice": slices drawn with replacement within each volume, every volume keeping its slice
  count (stratified); the only choice with one or two volumes, and narrower than the truth
  when slices of a volume are correlated, which the report says.
- "auto": "volume" from `min_volumes` volumes on, else "slice".

Intervals are percentile intervals (Efron), NaN-aware: a class undefined in a resample
(no voxel of it in truth or prediction) is left out of that class's percentiles, and a class
defined in fewer than half of the resamples has no interval (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from xctsam.eval.metrics import iou_dice

Unit = Literal["auto", "volume", "slice"]
MIN_DEFINED_SHARE = 0.5  # of resamples in which a class is defined, for it to get an interval


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval; NaN bounds where none is defined."""

    value: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """For a difference: its interval excludes 0 (False when undefined)."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > 0 or self.high < 0))

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def resampled_unit(volume_of_slice: Sequence[int] | np.ndarray, unit: Unit, min_volumes: int) -> Literal["volume", "slice"]:
    """The unit `auto` resolves to for these slices."""
    if unit != "auto":
        return unit
    return "volume" if len(np.unique(np.asarray(volume_of_slice))) >= min_volumes else "slice"


def bootstrap_weights(
    volume_of_slice: Sequence[int] | np.ndarray, unit: Literal["volume", "slice"], resamples: int, seed: int
) -> np.ndarray:
    """(resamples, n_slices) int64: how often each slice is taken in each resample.

    `volume_of_slice[i]`: an id of the volume slice i comes from. Every row sums to n_slices for
    "slice" (per volume: its own count); for "volume", a volume's slices share its draw count.
    """
    volumes = np.asarray(volume_of_slice)
    if volumes.ndim != 1 or volumes.size == 0:
        raise ValueError("bootstrap needs at least one slice, given as a 1-D array of volume ids")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    ids, index = np.unique(volumes, return_inverse=True)
    if unit == "volume":
        per_volume = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=resamples)
        return per_volume[:, index]
    if unit != "slice":
        raise ValueError(f"unknown bootstrap unit {unit!r} (volume or slice)")
    weights = np.zeros((resamples, volumes.size), dtype=np.int64)
    for volume in range(len(ids)):
        members = np.flatnonzero(index == volume)
        weights[:, members] = rng.multinomial(members.size, np.full(members.size, 1.0 / members.size), size=resamples)
    return weights


def resampled_iou(per_slice: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(resamples, K) IoU of the pooled counts of each resample; per_slice: (n_slices, K, K)."""
    counts = np.asarray(per_slice, dtype=np.int64)
    n, k, _ = counts.shape
    if weights.shape[1] != n:
        raise ValueError(f"{weights.shape[1]} weights per resample for {n} slices")
    pooled = (weights @ counts.reshape(n, k * k)).reshape(-1, k, k)
    return iou_dice(pooled)[0]


def percentile_interval(value: float, samples: np.ndarray, level: float = 0.95) -> Interval:
    """`value` with the central `level` percentile interval of its bootstrap `samples` (1-D)."""
    samples = np.asarray(samples, dtype=np.float64)
    defined = samples[np.isfinite(samples)]
    if not np.isfinite(value) or defined.size < MIN_DEFINED_SHARE * samples.size or defined.size == 0:
        return Interval(float(value), np.nan, np.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def iou_intervals(per_slice: np.ndarray, weights: np.ndarray, level: float = 0.95) -> list[Interval]:
    """Per class: the pooled IoU of all slices and its bootstrap interval."""
    point = iou_dice(np.asarray(per_slice, dtype=np.int64).sum(axis=0))[0]
    samples = resampled_iou(per_slice, weights)
    return [percentile_interval(point[c], samples[:, c], level) for c in range(point.size)]


def difference_intervals(per_slice_a: np.ndarray, per_slice_b: np.ndarray, weights: np.ndarray, level: float = 0.95) -> list[Interval]:
    """Per class: IoU(a) - IoU(b) on the same slices, bootstrapped paired (the same weights)."""
    if np.shape(per_slice_a) != np.shape(per_slice_b):
        raise ValueError(f"paired scores need the same slices: {np.shape(per_slice_a)} vs {np.shape(per_slice_b)}")
    point = iou_dice(np.asarray(per_slice_a).sum(axis=0))[0] - iou_dice(np.asarray(per_slice_b).sum(axis=0))[0]
    samples = resampled_iou(per_slice_a, weights) - resampled_iou(per_slice_b, weights)
    return [percentile_interval(point[c], samples[:, c], level) for c in range(point.size)]
