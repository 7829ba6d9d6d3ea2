"""Per-volume intensity matching (`train.<model>.intensity: peaks`): each volume's background and
material grey levels mapped onto the training data's before the model's window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_predict import QuantiseModel
from xctsam.config.eval import PredictConfig
from xctsam.data.datasets import IntensityWindow, grey_peaks, split_slices, volume_peaks
from xctsam.data.tiles import SegmentationTiles
from xctsam.data.volumes import write_volume
from xctsam.eval.predict import predict_volume


def part(depth: int = 6, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy disc of material (grey ~40) in background (~20) with a few pores (~33)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    labels = np.repeat(disc[None].astype(np.uint8), depth, axis=0)
    labels[:, size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2] = 2
    grey = np.choose(labels, [20.0, 40.0, 33.0]).astype(np.float32)
    return grey + rng.normal(0, 1.5, grey.shape).astype(np.float32), labels


def test_two_levels_are_found_and_a_flat_image_has_none() -> None:
    grey, _ = part()
    low, high = grey_peaks(grey)
    assert abs(low - 20) < 1 and abs(high - 40) < 1.5
    assert grey_peaks(np.full((8, 8), 7.0)) is None
    assert grey_peaks(np.array([], dtype=np.float32)) is None


def test_a_rescaled_scan_is_normalised_as_the_original(tmp_path: Path) -> None:
    """Another scanner's grey units (here 3x + 50, as Te-5 sits far above training) reach the
    model at the training data's levels with peaks, and saturate without."""
    grey, labels = part()
    write_volume(tmp_path / "train" / "a.h5", grey, labels)
    write_volume(tmp_path / "other.h5", 3 * grey + 50, labels)
    window = IntensityWindow.measure(split_slices([tmp_path / "train"]), match_peaks=True)
    assert window.peaks is not None and abs(window.peaks[0] - 20) < 1

    own = window.for_volume(tmp_path / "train" / "a.h5").normalise(grey)
    matched = window.for_volume(tmp_path / "other.h5").normalise(3 * grey + 50)
    np.testing.assert_allclose(matched, own, atol=0.02)
    plain = IntensityWindow(window.low, window.high).normalise(3 * grey + 50)
    assert (plain == 1).mean() > 0.99  # what a fixed window makes of it: everything saturated


def test_without_peaks_every_volume_gets_the_same_window(tmp_path: Path) -> None:
    grey, labels = part()
    write_volume(tmp_path / "other.h5", 3 * grey + 50, labels)
    window = IntensityWindow(10.0, 50.0)
    assert window.for_volume(tmp_path / "other.h5") is window
    assert window.to_dict() == {"low": 10.0, "high": 50.0}  # the meta every earlier model has


def test_peaks_survive_the_models_meta(tmp_path: Path) -> None:
    window = IntensityWindow(10.0, 50.0, (20.0, 40.0))
    again = IntensityWindow(**json.loads(json.dumps(window.to_dict())))
    assert again == window and again.peaks == (20.0, 40.0)


def test_a_volume_without_two_levels_keeps_the_training_window(tmp_path: Path) -> None:
    write_volume(tmp_path / "flat.h5", np.full((3, 16, 16), 5.0, np.float32))
    assert volume_peaks(tmp_path / "flat.h5") is None
    assert IntensityWindow(10.0, 50.0, (20.0, 40.0)).for_volume(tmp_path / "flat.h5") == IntensityWindow(10.0, 50.0)


def test_a_rewritten_volume_is_measured_again(tmp_path: Path) -> None:
    grey, labels = part()
    path = tmp_path / "v.h5"
    write_volume(path, grey, labels)
    first = volume_peaks(path)
    path.unlink()
    write_volume(path, grey + 100, labels)
    assert first is not None and volume_peaks(path) == pytest.approx((first[0] + 100, first[1] + 100), abs=0.5)


def test_training_tiles_and_prediction_see_matched_values(tmp_path: Path) -> None:
    grey, labels = part()
    write_volume(tmp_path / "a.h5", grey, labels)
    write_volume(tmp_path / "bright.h5", 3 * grey + 50, labels)
    window = IntensityWindow(15.0, 45.0, (20.0, 40.0))

    tiles = SegmentationTiles(split_slices([tmp_path]), window, tile=48, context=1, oversample=0.0, seed=0)
    images, tile_labels = tiles.batch(8)
    material = images[:, 0][tile_labels == 1]
    assert abs(np.median(material) - (40 - 15) / 30) < 0.03  # both volumes at the training level, none clipped at 1

    def predicted(name: str) -> np.ndarray:
        results = predict_volume(QuantiseModel(), tmp_path / name, window, PredictConfig(tile=32), "cpu", progress=False)
        return np.stack([result.labels for result in results])

    original, bright = predicted("a.h5"), predicted("bright.h5")
    assert (original == 3).mean() > 0.3  # QuantiseModel labels floor(4 * unit): material (0.83) lands in 3
    assert (bright == original).mean() > 0.97
