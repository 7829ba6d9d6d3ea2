"""Per-defect detection scores of a labelled prediction against the truth, the study's way.

After Tabassum & Ziabari 2024 (anikat1/SAM-Material-GAN, preprocess-scripts/quantify_prediction.py):
pores (2) and inclusions (3) are counted as 3-D connected components, found or missed by looking
into each one's bounding box in the other volume, and split into surface and internal defects by
a rim eroded into the part.

Contract (`defect_scores`):
- `prediction`, `truth`: (z, y, x) integer labels in 0..3 of the same shape.
- Components: each defect class on its own, 26-connected (`CONNECTIVITY`); components under
  `min_voxels` are dropped on both sides (they neither count nor match).
- Location: the truth's part (labels >= 1) is eroded by `surface_depth` face-connected steps,
  voxels beyond the volume's edge counting as outside. A component with any voxel outside the
  eroded part is "surface", else "internal". The truth's rim decides for predicted components
  too, so both sides are split by the same line.
- Matching: a truth component is detected when the prediction has a voxel of its class in its
  bounding box grown by `margin` voxels (clipped to the volume); a predicted component is a true
  positive when the truth has one in its box. The other side is looked at whole, not only at the
  same location, so a defect predicted just across the rim is still found.
- recall = detected / truth components, precision = true positives / predicted components,
  F1 = 2PR / (P + R) (0 when both are 0). A ratio with nothing to count is NaN, never 0 or 1.
- Bins: equivalent diameter (6 V / pi)^(1/3) of the voxel count V, times the voxel size when the
  unit is mm. Bin i holds [edge_i, edge_i+1), the last is open; truth components are binned for
  recall, predicted ones for precision.
- Porosity: pore voxels / part voxels of each volume (NaN for an empty part).

Where this differs from the script: it split the defect voxels at the rim (a pore crossing it
became two), here whole components are placed; its precision was min(highest predicted label
touched, detections) / predicted components, here every predicted component is checked; it
wrote 0 for no detections and clipped boxes one slice short of the volume's far edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from xctsam.config.defects import DefectsConfig

# 26-connectivity (faces, edges and corners): the study labelled with skimage.measure.label,
# whose default is full connectivity; a pore drawn as a diagonal chain stays one defect.
CONNECTIVITY = 26
_STRUCTURE = ndimage.generate_binary_structure(3, 3)
DEFECT_CLASSES: dict[str, int] = {"pore": 2, "inclusion": 3}
LOCATIONS = ("all", "surface", "internal")
PORE = DEFECT_CLASSES["pore"]
Box = tuple[slice, ...]


@dataclass(frozen=True)
class BinScore:
    """Scores of one equivalent-diameter bin [low, high); high None: open-ended."""

    low: float
    high: float | None
    n_true: int
    n_detected: int
    recall: float
    n_pred: int
    n_pred_matched: int
    precision: float


@dataclass(frozen=True)
class LocationScore:
    n_true: int  # truth components
    n_detected: int  # of them, with the class predicted in their box
    recall: float
    n_pred: int  # predicted components
    n_pred_matched: int  # of them, with the class in the truth in their box
    precision: float
    f1: float
    bins: list[BinScore]


@dataclass(frozen=True)
class DefectReport:
    unit: str  # of the bin edges: "voxel" or "mm"
    classes: dict[str, dict[str, LocationScore]]  # "pore"/"inclusion" -> "all"/"surface"/"internal"
    porosity_true: float
    porosity_pred: float

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dicts, lists and Python numbers (NaN kept; util.jsonfile writes null)."""
        return asdict(self)


@dataclass(frozen=True)
class Components:
    """The kept components of one class in one volume, in label order."""

    boxes: list[Box]
    voxels: np.ndarray  # int64 voxel counts
    surface: np.ndarray  # bool: a voxel outside the eroded part


def eroded_part(truth: np.ndarray, depth: int) -> np.ndarray:
    """The part (labels >= 1) eroded by `depth` face-connected steps, outside the volume = empty.

    This is the study's binary_erosion(part, iterations=depth): the default cross structure
    repeated, i.e. everything within city-block distance `depth` of the outside is rim.
    """
    part = truth >= 1
    if depth == 0:
        return part  # iterations=0 would mean "erode until nothing changes"
    return ndimage.binary_erosion(part, iterations=depth, border_value=0)


def components(mask: np.ndarray, eroded: np.ndarray, min_voxels: int = 1) -> Components:
    """Label `mask` (26-connected) and describe each component; drops those under `min_voxels`.

    Dropped components are cleared from `mask` in place, so the other side matches against the
    defects that count. Per component the work is slicing its bounding box only.
    """
    labels, _ = ndimage.label(mask, structure=_STRUCTURE)
    boxes, voxels, surface = [], [], []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == index  # this component only; a neighbour may share its box
        count = int(np.count_nonzero(own))
        if count < min_voxels:
            mask[box][own] = False
            continue
        boxes.append(box)
        voxels.append(count)
        surface.append(not eroded[box][own].all())
    return Components(boxes, np.asarray(voxels, dtype=np.int64), np.asarray(surface, dtype=bool))


def grown(box: Box, margin: int, shape: Sequence[int]) -> Box:
    """`box` widened by `margin` voxels on every side, clipped to the volume."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def matched(found: Components, other: np.ndarray, margin: int = 0) -> np.ndarray:
    """Bool per component: `other` (the other volume's class mask) has a voxel in its grown box."""
    return np.array([bool(other[grown(box, margin, other.shape)].any()) for box in found.boxes], dtype=bool)


def equivalent_diameter(voxels: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Diameter of the sphere of the same volume, (6 V / pi)^(1/3), times `scale` (voxel size)."""
    return np.cbrt(6.0 * np.asarray(voxels, dtype=np.float64) / math.pi) * scale


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return math.nan
    if precision + recall == 0:
        return 0.0  # defects on both sides, none matched: a defined, worst score
    return 2 * precision * recall / (precision + recall)


def _score(true_hit: np.ndarray, true_bin: np.ndarray, pred_hit: np.ndarray, pred_bin: np.ndarray,
           edges: Sequence[float]) -> LocationScore:
    """Scores of one class at one location from per-component hits and bin indices."""
    bins = []
    for b, low in enumerate(edges):
        t, p = true_hit[true_bin == b], pred_hit[pred_bin == b]
        high = float(edges[b + 1]) if b + 1 < len(edges) else None
        bins.append(BinScore(float(low), high, len(t), int(t.sum()), _ratio(int(t.sum()), len(t)),
                             len(p), int(p.sum()), _ratio(int(p.sum()), len(p))))
    recall = _ratio(int(true_hit.sum()), len(true_hit))
    precision = _ratio(int(pred_hit.sum()), len(pred_hit))
    return LocationScore(len(true_hit), int(true_hit.sum()), recall, len(pred_hit), int(pred_hit.sum()),
                         precision, _f1(precision, recall), bins)


def porosity(labels: np.ndarray) -> float:
    """Pore voxels / part voxels (labels >= 1); NaN when there is no part."""
    part = int(np.count_nonzero(labels >= 1))
    return _ratio(int(np.count_nonzero(labels == PORE)), part)


def _check(labels: Any, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"{what} must be a (z, y, x) volume, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 3):
        raise ValueError(f"{what} labels outside 0..3: {int(labels.min())}..{int(labels.max())}")
    return labels


def defect_scores(prediction: Any, truth: Any, config: DefectsConfig | None = None,
                  voxel_size_mm: float | None = None) -> DefectReport:
    """Per-defect recall, precision and F1 by class, location and size (see the module's contract).

    `voxel_size_mm` scales diameters when `config.diameter_unit` is "mm" (then it is required);
    with "voxel" it is not used.
    """
    config = config or DefectsConfig()
    prediction, truth = _check(prediction, "prediction"), _check(truth, "truth")
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    scale = 1.0
    if config.diameter_unit == "mm":
        if voxel_size_mm is None or not voxel_size_mm > 0:
            raise ValueError("diameter_unit mm needs a positive voxel_size_mm")
        scale = float(voxel_size_mm)
    edges = list(config.diameter_bins)
    eroded = eroded_part(truth, config.surface_depth)

    classes: dict[str, dict[str, LocationScore]] = {}
    for name, value in DEFECT_CLASSES.items():
        true_mask, pred_mask = truth == value, prediction == value
        true_parts = components(true_mask, eroded, config.min_voxels)
        pred_parts = components(pred_mask, eroded, config.min_voxels)
        # Matching after both sides are filtered: a dropped speck neither counts nor matches.
        true_hit = matched(true_parts, pred_mask, config.margin)
        pred_hit = matched(pred_parts, true_mask, config.margin)
        true_bin = np.searchsorted(edges, equivalent_diameter(true_parts.voxels, scale), side="right") - 1
        pred_bin = np.searchsorted(edges, equivalent_diameter(pred_parts.voxels, scale), side="right") - 1
        where = {"all": (np.ones_like(true_hit), np.ones_like(pred_hit)),
                 "surface": (true_parts.surface, pred_parts.surface),
                 "internal": (~true_parts.surface, ~pred_parts.surface)}
        classes[name] = {
            location: _score(true_hit[t], true_bin[t], pred_hit[p], pred_bin[p], edges)
            for location, (t, p) in where.items()
        }
        del true_mask, pred_mask  # the next class's masks, not these, should hold the memory
    return DefectReport(config.diameter_unit, classes, porosity(truth), porosity(prediction))


def _summed(scores: Sequence[LocationScore]) -> LocationScore:
    """One class at one location over several volumes: component counts added, ratios recomputed."""
    bins = []
    for parts in zip(*(score.bins for score in scores), strict=True):
        n_true, n_detected = sum(b.n_true for b in parts), sum(b.n_detected for b in parts)
        n_pred, n_matched = sum(b.n_pred for b in parts), sum(b.n_pred_matched for b in parts)
        bins.append(BinScore(parts[0].low, parts[0].high, n_true, n_detected, _ratio(n_detected, n_true), n_pred, n_matched, _ratio(n_matched, n_pred)))
    n_true, n_detected = sum(s.n_true for s in scores), sum(s.n_detected for s in scores)
    n_pred, n_matched = sum(s.n_pred for s in scores), sum(s.n_pred_matched for s in scores)
    recall, precision = _ratio(n_detected, n_true), _ratio(n_matched, n_pred)
    return LocationScore(n_true, n_detected, recall, n_pred, n_matched, precision, _f1(precision, recall), bins)


def combined(reports: Sequence[DefectReport], porosity_true: float, porosity_pred: float) -> DefectReport:
    """The scores of a split from those of its volumes: every defect of every volume counts once.

    Porosity is a ratio of voxel counts over the whole split, which the per-volume ratios do
    not give: the caller passes it (eval.evaluate takes it from the split's confusion counts).
    """
    if not reports:
        raise ValueError("no volume reports to combine")
    classes = {
        name: {location: _summed([report.classes[name][location] for report in reports]) for location in LOCATIONS}
        for name in reports[0].classes
    }
    return DefectReport(reports[0].unit, classes, porosity_true, porosity_pred)
