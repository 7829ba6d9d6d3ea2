"""Confusion counts, IoU/Dice with the NaN rule, and the means, checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, jaccard_score

from xctsam import CLASS_NAMES
from xctsam.eval.metrics import (
    ConfusionCounter,
    confusion_matrix,
    iou_dice,
    mean_defined,
    per_slice_mean_iou,
    summarise,
)

CLASSES = list(range(4))


def _random_pair(seed: int, shape: tuple[int, ...] = (6, 17, 23), classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Truth, and a prediction that agrees with it about 70 % of the time."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, shape, dtype=np.uint8)
    wrong = rng.random(shape) < 0.3
    prediction = np.where(wrong, rng.integers(0, classes, shape), truth).astype(np.uint8)
    return prediction, truth


def _sklearn_scores(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and Dice (F1) per class from scikit-learn, NaN where the class is in neither."""
    t, p = truth.ravel(), prediction.ravel()
    iou = jaccard_score(t, p, labels=CLASSES, average=None, zero_division=0)
    dice = f1_score(t, p, labels=CLASSES, average=None, zero_division=0)
    absent = [c not in t and c not in p for c in CLASSES]
    return np.where(absent, np.nan, iou), np.where(absent, np.nan, dice)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_equals_sklearn(seed: int) -> None:
    prediction, truth = _random_pair(seed)
    expected = sk_confusion_matrix(truth.ravel(), prediction.ravel(), labels=CLASSES)
    np.testing.assert_array_equal(confusion_matrix(prediction, truth), expected)
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(truth)), expected)


def test_counter_accumulates_slices_to_the_whole_volume_matrix() -> None:
    prediction, truth = _random_pair(3)
    counter = ConfusionCounter()
    per_slice = [counter.update(p, t) for p, t in zip(prediction, truth, strict=True)]
    np.testing.assert_array_equal(counter.matrix, confusion_matrix(prediction, truth))
    np.testing.assert_array_equal(per_slice[2], sk_confusion_matrix(truth[2].ravel(), prediction[2].ravel(), labels=CLASSES))


@pytest.mark.parametrize("seed", [4, 5])
def test_iou_and_dice_equal_sklearn(seed: int) -> None:
    prediction, truth = _random_pair(seed)
    iou, dice = iou_dice(confusion_matrix(prediction, truth))
    expected_iou, expected_dice = _sklearn_scores(prediction, truth)
    np.testing.assert_allclose(iou, expected_iou, rtol=1e-12)
    np.testing.assert_allclose(dice, expected_dice, rtol=1e-12)


def test_class_in_neither_is_nan_but_predicted_only_is_zero() -> None:
    truth = np.array([[0, 0, 1, 1]])
    prediction = np.array([[0, 2, 1, 1]])  # class 2 predicted but absent: 0; class 3 nowhere: NaN
    iou, dice = iou_dice(confusion_matrix(prediction, truth))
    np.testing.assert_allclose(iou[:3], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(dice[:3], [2 / 3, 1.0, 0.0])
    assert np.isnan(iou[3]) and np.isnan(dice[3])
    expected_iou, _ = _sklearn_scores(prediction, truth)
    np.testing.assert_allclose(iou, expected_iou)


def test_means_skip_undefined_classes_and_foreground_leaves_background_out() -> None:
    truth = np.array([[0, 0, 0, 1, 1, 2]])
    prediction = np.array([[0, 0, 1, 1, 1, 0]])
    summary = summarise(confusion_matrix(prediction, truth), [confusion_matrix(prediction, truth)])
    iou = [summary["iou"][name] for name in CLASS_NAMES]
    assert np.isnan(iou[3])
    assert summary["miou"] == pytest.approx(np.mean(iou[:3]))  # three defined classes, not four
    assert summary["fg_miou"] == pytest.approx(np.mean(iou[1:3]))
    assert summary["mdice"] == pytest.approx(np.mean([summary["dice"][name] for name in CLASS_NAMES[:3]]))
    assert summary["slices"] == 1 and summary["voxels"] == truth.size


def test_mean_of_nothing_defined_is_nan_without_warning() -> None:
    with np.testing.assert_no_warnings():
        assert np.isnan(mean_defined([np.nan, np.nan]))
    assert mean_defined([np.nan, 0.5, 1.0]) == pytest.approx(0.75)


def test_per_slice_mean_differs_from_the_accumulated_score() -> None:
    # Slice 0: a one-voxel pore found (IoU 1). Slice 1: a 99-voxel pore missed (IoU 0).
    truth = np.zeros((2, 10, 10), dtype=np.uint8)
    truth[0, 0, 0] = 2
    truth[1].flat[:99] = 2
    prediction = np.where(np.arange(2)[:, None, None] == 0, truth, 0).astype(np.uint8)
    per_slice = [confusion_matrix(p, t) for p, t in zip(prediction, truth, strict=True)]
    summary = summarise(sum(per_slice), per_slice)
    assert summary["iou"]["pore"] == pytest.approx(1 / 100)
    assert summary["iou_slice_mean"]["pore"] == pytest.approx(0.5)
    # inclusion is nowhere: undefined on every slice, so undefined on average too
    assert np.isnan(summary["iou_slice_mean"]["inclusion"])


def test_per_slice_mean_averages_only_slices_where_the_class_is_defined() -> None:
    prediction, truth = _random_pair(6, shape=(5, 12, 12), classes=3)  # no inclusions at all
    truth[1][truth[1] == 2] = 1  # no pore on slice 1
    prediction[1][prediction[1] == 2] = 0
    per_slice = [confusion_matrix(p, t) for p, t in zip(prediction, truth, strict=True)]
    by_slice = np.array([_sklearn_scores(p, t)[0] for p, t in zip(prediction, truth, strict=True)])
    expected = np.nanmean(by_slice[:, :3], axis=0)
    result = per_slice_mean_iou(per_slice)
    np.testing.assert_allclose(result[:3], expected)
    assert np.isnan(result[3])
    assert expected[2] == pytest.approx(np.mean(by_slice[[0, 2, 3, 4], 2]))  # slice 1 left out


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.full((2, 2), 4), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integers"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int))
