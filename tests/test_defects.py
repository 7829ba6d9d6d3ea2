"""Per-defect detection scores: hand-built volumes with known answers, and a slow reference."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from pydantic import ValidationError
from skimage.measure import label as skimage_label

from xctsam.config.defects import DefectsConfig
from xctsam.eval.defects import DEFECT_CLASSES, LOCATIONS, defect_scores, equivalent_diameter
from xctsam.util.jsonfile import json_text

NAN = math.nan


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


# ---------------------------------------------------------------- a hand-built scan
def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A box of material with known defects; the prediction finds some, misses some, invents two.

    Part: [2:18, 2:38, 2:38]; eroded by 3 it is [5:15, 5:35, 5:35] (a box shrinks by 3 per face).
    """
    truth = np.zeros((20, 40, 40), np.uint8)
    truth[2:18, 2:38, 2:38] = 1
    truth[8:10, 3:5, 10:12] = 2  # A: surface pore, 8 voxels (d 2.48)
    truth[9:11, 19:21, 19:21] = 2  # B: internal pore, 8 voxels
    truth[6:11, 25:30, 6:11] = 2  # C: internal pore, 125 voxels (d 6.20)
    truth[12, 30, 30] = 2  # D: internal pore, 1 voxel (d 1.24), missed
    truth[6:9, 10:13, 28:31] = 3  # E: internal inclusion, 27 voxels (d 3.72)
    truth[14:16, 30:32, 36:38] = 3  # F: surface inclusion, 8 voxels, missed
    prediction = truth.copy()
    prediction[12, 30, 30] = 1  # D missed
    prediction[14:16, 30:32, 36:38] = 1  # F missed
    prediction[9:11, 19:21, 19:21] = 1
    prediction[9, 19, 19] = 2  # B found by a single voxel (a 1-voxel predicted component)
    prediction[12:14, 12:14, 20:23] = 2  # false pore, internal, 12 voxels (d 2.84)
    prediction[0:2, 0:2, 0:2] = 3  # false inclusion in the air: outside the eroded part, surface
    return prediction, truth


def _counts(score) -> tuple[int, int, int, int]:
    return score.n_true, score.n_detected, score.n_pred, score.n_pred_matched


def test_hand_built_counts_and_scores() -> None:
    report = defect_scores(*_scene())
    pore, inclusion = report.classes["pore"], report.classes["inclusion"]
    assert _counts(pore["all"]) == (4, 3, 4, 3)
    assert (pore["all"].recall, pore["all"].precision, pore["all"].f1) == (0.75, 0.75, 0.75)
    assert _counts(pore["surface"]) == (1, 1, 1, 1)
    assert pore["surface"].f1 == 1.0
    assert _counts(pore["internal"]) == (3, 2, 3, 2)
    assert pore["internal"].recall == pytest.approx(2 / 3)
    assert _counts(inclusion["all"]) == (2, 1, 2, 1)
    # defects on both sides, none matched: 0, not NaN
    assert _counts(inclusion["surface"]) == (1, 0, 1, 0)
    assert (inclusion["surface"].recall, inclusion["surface"].precision, inclusion["surface"].f1) == (0, 0, 0)
    assert _counts(inclusion["internal"]) == (1, 1, 1, 1)


def test_hand_built_bins() -> None:
    bins = defect_scores(*_scene()).classes["pore"]["all"].bins
    assert [(b.low, b.high) for b in bins] == [(0, 2), (2, 4), (4, 8), (8, 16), (16, None)]
    # truth: D | A, B | C ; prediction: B's voxel | A, false pore | C
    assert [(b.n_true, b.n_detected) for b in bins] == [(1, 0), (2, 2), (1, 1), (0, 0), (0, 0)]
    assert [(b.n_pred, b.n_pred_matched) for b in bins] == [(1, 1), (2, 1), (1, 1), (0, 0), (0, 0)]
    assert [b.recall for b in bins][:3] == [0, 1, 1]
    assert [b.precision for b in bins][:3] == [1, 0.5, 1]
    assert all(math.isnan(b.recall) and math.isnan(b.precision) for b in bins[3:])


def test_diameter_bins_in_mm() -> None:
    config = DefectsConfig(diameter_bins=[0, 1, 2], diameter_unit="mm")
    bins = defect_scores(*_scene(), config, voxel_size_mm=0.5).classes["pore"]["all"].bins
    assert [b.n_true for b in bins] == [1, 2, 1]  # 0.62 mm | 1.24, 1.24 | 3.10
    with pytest.raises(ValueError, match="voxel_size_mm"):
        defect_scores(*_scene(), config)


def test_porosity_is_pore_voxels_over_part_voxels() -> None:
    report = defect_scores(*_scene())
    assert report.porosity_true == (8 + 8 + 125 + 1) / (16 * 36 * 36)
    # the false inclusion in the air adds 8 part voxels to the prediction
    assert report.porosity_pred == (8 + 1 + 125 + 12) / (16 * 36 * 36 + 8)
    assert math.isnan(defect_scores(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 3), np.uint8)).porosity_true)


def test_min_voxels_drops_specks_on_both_sides() -> None:
    pore = defect_scores(*_scene(), DefectsConfig(min_voxels=2)).classes["pore"]["all"]
    # D is gone from the truth; B's lone predicted voxel is gone, so B is now missed
    assert _counts(pore) == (3, 2, 3, 2)


# ---------------------------------------------------------------- NaN, margin, rim, connectivity
def _block(shape: tuple[int, int, int] = (20, 40, 40)) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    volume[2:18, 2:38, 2:38] = 1
    return volume


def test_absent_class_is_nan_not_zero_or_one() -> None:
    report = defect_scores(_block(), _block())
    for name, location in itertools.product(DEFECT_CLASSES, LOCATIONS):
        score = report.classes[name][location]
        assert _counts(score) == (0, 0, 0, 0)
        assert math.isnan(score.recall) and math.isnan(score.precision) and math.isnan(score.f1)
    assert report.porosity_true == 0.0


def test_predicted_pores_where_there_are_none() -> None:
    prediction = _block()
    prediction[10, 10, 10] = 2
    pore = defect_scores(prediction, _block()).classes["pore"]["all"]
    assert math.isnan(pore.recall) and pore.precision == 0 and math.isnan(pore.f1)
    missed = defect_scores(_block(), prediction).classes["pore"]["all"]
    assert missed.recall == 0 and math.isnan(missed.precision) and math.isnan(missed.f1)


@pytest.mark.parametrize(("margin", "found"), [(0, 0), (1, 0), (2, 1), (5, 1)])
def test_margin_decides_a_borderline_detection(margin: int, found: int) -> None:
    truth, prediction = _block(), _block()
    truth[10, 10, 10] = 2
    prediction[10, 10, 12] = 2  # two voxels along x: the box must grow by 2 to reach it
    pore = defect_scores(prediction, truth, DefectsConfig(margin=margin)).classes["pore"]["all"]
    assert (pore.n_detected, pore.n_pred_matched) == (found, found)


@pytest.mark.parametrize(("depth", "surface"), [(3, 1), (2, 0), (0, 0)])
def test_surface_depth(depth: int, surface: int) -> None:
    truth = _block()
    truth[10, 4, 20] = 2  # city-block distance 3 from the air at y = 1
    pore = defect_scores(truth, truth, DefectsConfig(surface_depth=depth)).classes["pore"]
    assert (pore["surface"].n_true, pore["internal"].n_true) == (surface, 1 - surface)


def test_the_volume_edge_counts_as_outside() -> None:
    truth = np.ones((12, 12, 12), np.uint8)  # the part fills the field of view
    truth[1, 6, 6] = 2
    truth[6, 6, 6] = 2
    truth[11, 6, 6] = 2  # in the last slice: its box must reach the volume's far edge to find it
    pore = defect_scores(truth, truth).classes["pore"]
    assert (pore["surface"].n_true, pore["internal"].n_true) == (2, 1)
    assert pore["all"].recall == 1.0 and pore["all"].precision == 1.0


def test_corner_neighbours_are_one_defect() -> None:
    truth = _block()
    truth[10, 10, 10] = truth[11, 11, 11] = 2
    assert defect_scores(truth, truth).classes["pore"]["all"].n_true == 1


def test_report_is_json_with_null_for_nan() -> None:
    data = json.loads(json_text(defect_scores(_block(), _block()).as_dict()))
    assert data["classes"]["pore"]["all"]["recall"] is None
    assert data["classes"]["pore"]["surface"]["bins"][-1]["high"] is None
    assert data["unit"] == "voxel" and data["porosity_true"] == 0.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        defect_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="integers"):
        defect_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        defect_scores(np.full((4, 4, 4), 4, np.uint8), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="volume"):
        defect_scores(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))


# ---------------------------------------------------------------- config
def test_config_defaults_and_refusals() -> None:
    config = DefectsConfig()
    assert (config.margin, config.surface_depth, config.diameter_bins) == (0, 3, [0, 2, 4, 8, 16])
    for bad in ({"margin": -1}, {"margin": True}, {"surface_depth": 1.5}, {"diameter_bins": [0, 4, 2]},
                {"diameter_bins": [0, 2, 2]}, {"diameter_bins": []}, {"diameter_bins": [0, math.inf]},
                {"diameter_bins": [-1, 2]}, {"min_voxels": 0}, {"diameter_unit": "um"}, {"connectivity": 6}):
        with pytest.raises(ValidationError):
            DefectsConfig(**bad)


# ---------------------------------------------------------------- cross-check with a slow reference
def _reference(prediction: np.ndarray, truth: np.ndarray, margin: int, depth: int, edges: list[float],
               min_voxels: int, scale: float) -> dict:
    """The rules written out plainly: skimage labels, one boolean mask per component, argwhere boxes."""
    shape = np.array(truth.shape)
    part = truth >= 1
    # eroded part: every voxel within city-block distance `depth` is part, outside the volume is not
    padded = np.pad(part, depth, constant_values=False)
    eroded = part.copy()
    for dz, dy, dx in itertools.product(range(-depth, depth + 1), repeat=3):
        if abs(dz) + abs(dy) + abs(dx) <= depth:
            eroded &= padded[depth + dz:depth + dz + shape[0], depth + dy:depth + dy + shape[1],
                             depth + dx:depth + dx + shape[2]]
    out = {}
    for name, value in DEFECT_CLASSES.items():
        sides = []
        for volume in (truth, prediction):
            labels = skimage_label(volume == value, connectivity=3)
            kept = [labels == i for i in range(1, labels.max() + 1)]
            sides.append([c for c in kept if c.sum() >= min_voxels])
        masks = [np.any(side, axis=0) if side else np.zeros(truth.shape, bool) for side in sides]
        rows = []  # per side: (hit, surface, bin) per component
        for side, other in ((sides[0], masks[1]), (sides[1], masks[0])):
            described = []
            for comp in side:
                where = np.argwhere(comp)
                lo = np.maximum(where.min(axis=0) - margin, 0)
                hi = np.minimum(where.max(axis=0) + 1 + margin, shape)
                hit = other[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()
                diameter = (6 * comp.sum() / math.pi) ** (1 / 3) * scale
                b = max((i for i, e in enumerate(edges) if e <= diameter), default=-1)
                described.append((bool(hit), bool((comp & ~eroded).any()), b))
            rows.append(described)
        for location in LOCATIONS:
            keep = {"all": lambda s: True, "surface": lambda s: s, "internal": lambda s: not s}[location]
            t = [(h, b) for h, s, b in rows[0] if keep(s)]
            p = [(h, b) for h, s, b in rows[1] if keep(s)]
            out[name, location] = {
                "counts": (len(t), sum(h for h, _ in t), len(p), sum(h for h, _ in p)),
                "bins": [(sum(b == i for _, b in t), sum(h for h, b in t if b == i),
                          sum(b == i for _, b in p), sum(h for h, b in p if b == i)) for i in range(len(edges))],
            }
    return out


def _random_scene(seed: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A cylinder of material with random blobs; the prediction keeps, shifts, drops and adds blobs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((n, n, n))
    truth = (((y - n / 2) ** 2 + (x - n / 2) ** 2 < (0.4 * n) ** 2) & (z >= 2)).astype(np.uint8)
    prediction = truth.copy()

    def blob(volume: np.ndarray, value: int, corner: np.ndarray, size: np.ndarray, inside_only: bool) -> None:
        box = tuple(slice(c, c + s) for c, s in zip(corner, size))
        volume[box] = np.where(truth[box] >= 1, value, volume[box]) if inside_only else value

    for _ in range(int(rng.integers(8, 16))):
        value, corner, size = int(rng.integers(2, 4)), rng.integers(0, n - 3, 3), rng.integers(1, 4, 3)
        blob(truth, value, corner, size, inside_only=True)
        if rng.random() < 0.7:  # found, perhaps a voxel off and of another size
            shifted = np.clip(corner + rng.integers(-1, 2, 3), 0, n - 4)
            blob(prediction, value, shifted, rng.integers(1, 4, 3), inside_only=False)
    for _ in range(int(rng.integers(2, 6))):  # false defects, some in the air
        blob(prediction, int(rng.integers(2, 4)), rng.integers(0, n - 3, 3), rng.integers(1, 4, 3), inside_only=False)
    return prediction, truth


@pytest.mark.parametrize(("seed", "margin", "depth", "min_voxels", "unit"),
                         [(0, 0, 3, 1, "voxel"), (1, 1, 2, 1, "voxel"), (2, 2, 0, 2, "voxel"), (3, 0, 4, 1, "mm"),
                          (4, 0, 3, 3, "voxel")])
def test_matches_a_slow_reference(seed: int, margin: int, depth: int, min_voxels: int, unit: str) -> None:
    prediction, truth = _random_scene(seed)
    edges, scale = ([0.0, 1.5, 2.5, 4.0], 1.0) if unit == "voxel" else ([0.0, 0.05, 0.1], 0.04)
    config = DefectsConfig(margin=margin, surface_depth=depth, diameter_bins=edges, diameter_unit=unit,
                           min_voxels=min_voxels)
    report = defect_scores(prediction, truth, config, voxel_size_mm=0.04)
    expected = _reference(prediction, truth, margin, depth, edges, min_voxels, scale)
    assert expected["pore", "all"]["counts"][0] >= 3 and expected["inclusion", "all"]["counts"][0] >= 3
    for (name, location), want in expected.items():
        score = report.classes[name][location]
        assert _counts(score) == want["counts"], (name, location)
        assert [(b.n_true, b.n_detected, b.n_pred, b.n_pred_matched) for b in score.bins] == want["bins"]
        n_true, n_detected, n_pred, n_matched = want["counts"]
        assert _same(score.recall, n_detected / n_true if n_true else NAN)
        assert _same(score.precision, n_matched / n_pred if n_pred else NAN)
    assert report.porosity_true == np.count_nonzero(truth == 2) / np.count_nonzero(truth >= 1)
    assert report.porosity_pred == np.count_nonzero(prediction == 2) / np.count_nonzero(prediction >= 1)


def test_equivalent_diameter() -> None:
    assert equivalent_diameter(np.array([1, 8]), 0.5) == pytest.approx([0.5 * (6 / math.pi) ** (1 / 3), 0.5 * (48 / math.pi) ** (1 / 3)])
