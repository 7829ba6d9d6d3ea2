"""Bootstrap intervals of pooled IoU: weights, pairing, NaN classes and coverage on simulated scores."""

from __future__ import annotations

import numpy as np
import pytest

from xctsam.eval.bootstrap import (
    bootstrap_weights,
    difference_intervals,
    iou_intervals,
    percentile_interval,
    resampled_iou,
    resampled_unit,
)
from xctsam.eval.metrics import iou_dice


def _slices(rng: np.random.Generator, hit_rates: np.ndarray, voxels: int = 200, false_rate: float = 40.0) -> np.ndarray:
    """(n, 2, 2) confusion counts of a binary class: truth ~ Poisson(voxels), hits ~ Binomial."""
    truth = rng.poisson(voxels, hit_rates.size)
    hits = rng.binomial(truth, hit_rates)
    false = rng.poisson(false_rate, hit_rates.size)
    background = np.full(hit_rates.size, 5000)
    return np.stack([np.stack([background - false, false], -1), np.stack([truth - hits, hits], -1)], -2)


def test_weights_keep_each_volume_s_slice_count_or_its_draw() -> None:
    volumes = np.repeat([3, 1, 2], [4, 2, 6])
    by_slice = bootstrap_weights(volumes, "slice", 50, seed=0)
    assert by_slice.shape == (50, 12)
    for volume in (1, 2, 3):
        assert (by_slice[:, volumes == volume].sum(axis=1) == (volumes == volume).sum()).all()
    by_volume = bootstrap_weights(volumes, "volume", 50, seed=0)
    for volume in (1, 2, 3):
        members = by_volume[:, volumes == volume]
        assert (members == members[:, :1]).all()  # a volume is taken whole
    assert (by_volume[:, [0, 4, 6]].sum(axis=1) == 3).all()  # three volumes drawn per resample
    assert (bootstrap_weights(volumes, "slice", 5, seed=1) == bootstrap_weights(volumes, "slice", 5, seed=1)).all()
    assert (bootstrap_weights(volumes, "slice", 5, seed=1) != bootstrap_weights(volumes, "slice", 5, seed=2)).any()


def test_auto_takes_volumes_only_when_there_are_enough() -> None:
    assert resampled_unit([0, 0, 1, 1], "auto", min_volumes=3) == "slice"
    assert resampled_unit([0, 1, 2, 2], "auto", min_volumes=3) == "volume"
    assert resampled_unit([0, 1, 2], "slice", min_volumes=3) == "slice"


def test_unit_weights_reproduce_the_pooled_iou() -> None:
    counts = _slices(np.random.default_rng(0), np.full(10, 0.7))
    ones = np.ones((1, 10), dtype=np.int64)
    np.testing.assert_allclose(resampled_iou(counts, ones)[0], iou_dice(counts.sum(axis=0))[0])


def test_the_interval_holds_the_point_and_narrows_with_more_slices() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (10, 40, 160):
        counts = _slices(rng, np.full(n, 0.6))
        interval = iou_intervals(counts, bootstrap_weights(np.zeros(n, int), "slice", 400, seed=n))[1]
        assert interval.low <= interval.value <= interval.high
        widths.append(interval.high - interval.low)
    assert widths[0] > 1.5 * widths[1] > 1.5 * 1.5 * widths[2]  # ~ 1/sqrt(n): halves per 4x slices


def test_slice_bootstrap_covers_the_true_iou_about_95_percent() -> None:
    rng = np.random.default_rng(2)
    truth_iou = 200 * 0.6 / (200 + 40)  # expected hits / (expected truth + expected false)
    covered = 0
    for trial in range(200):
        counts = _slices(rng, np.full(40, 0.6))
        interval = iou_intervals(counts, bootstrap_weights(np.zeros(40, int), "slice", 300, seed=trial))[1]
        covered += interval.low <= truth_iou <= interval.high
    assert 0.88 <= covered / 200 <= 0.99


def test_volumes_that_differ_need_the_volume_bootstrap() -> None:
    """Slices of one volume share its hit rate: resampling slices ignores that and under-covers."""
    rng = np.random.default_rng(3)
    volumes = np.repeat(np.arange(8), 10)
    truth_iou = 200 * 0.6 / (200 + 40)
    covered = {"volume": 0, "slice": 0}
    for trial in range(150):
        rates = np.repeat(np.clip(rng.normal(0.6, 0.12, 8), 0.05, 0.95), 10)
        counts = _slices(rng, rates)
        for unit in covered:
            interval = iou_intervals(counts, bootstrap_weights(volumes, unit, 300, seed=trial))[1]
            covered[unit] += interval.low <= truth_iou <= interval.high
    assert covered["volume"] / 150 >= 0.82
    assert covered["slice"] / 150 < covered["volume"] / 150 - 0.2


def test_a_paired_difference_of_a_model_with_itself_is_zero_and_not_significant() -> None:
    counts = _slices(np.random.default_rng(4), np.full(30, 0.6))
    weights = bootstrap_weights(np.zeros(30, int), "slice", 200, seed=0)
    same = difference_intervals(counts, counts, weights)[1]
    assert same.value == same.low == same.high == 0 and not same.significant


def test_a_clearly_better_model_is_significant_and_pairing_narrows_the_interval() -> None:
    rng = np.random.default_rng(5)
    rates = np.clip(rng.normal(0.6, 0.15, 40), 0.05, 0.95)  # hard and easy slices, shared by both models
    worse = _slices(np.random.default_rng(6), rates)
    better = worse.copy()
    extra = np.minimum(worse[:, 1, 0], 15)  # 15 more hits per slice, from the misses
    better[:, 1, 1] += extra
    better[:, 1, 0] -= extra
    weights = bootstrap_weights(np.zeros(40, int), "slice", 400, seed=0)
    paired = difference_intervals(better, worse, weights)[1]
    assert paired.value > 0 and paired.significant
    unpaired = iou_intervals(better, weights)[1]
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)


def test_an_absent_class_has_no_interval() -> None:
    counts = _slices(np.random.default_rng(7), np.full(10, 0.6))
    three = np.zeros((10, 3, 3), dtype=np.int64)
    three[:, :2, :2] = counts  # class 2: never in truth nor prediction
    interval = iou_intervals(three, bootstrap_weights(np.zeros(10, int), "slice", 50, seed=0))[2]
    assert np.isnan(interval.value) and np.isnan(interval.low) and np.isnan(interval.high)
    assert not percentile_interval(0.5, np.full(10, np.nan)).significant


def test_refusals() -> None:
    with pytest.raises(ValueError, match="at least one slice"):
        bootstrap_weights([], "slice", 10, seed=0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_weights([0], "slice", 0, seed=0)
    with pytest.raises(ValueError, match="unknown bootstrap unit"):
        bootstrap_weights([0], "voxel", 10, seed=0)  # type: ignore[arg-type]
    counts = np.zeros((3, 2, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="same slices"):
        difference_intervals(counts, counts[:2], np.ones((1, 3), dtype=np.int64))
