"""Per-part defect report for AM quality control, streamed slab by slab from a label volume.

The input is a predicted (z, y, x) label volume (0 background, 1 material, 2 pore, 3 inclusion;
`xctsam.CLASS_NAMES`) read through a callable `read(z0, z1) -> labels[z0:z1]`, so a scan far
larger than memory (thousands of 2000^2 slices) is never held whole.

Definitions (those of `xctsam.eval.defects`, reused, not restated in code):
- Part: labels >= 1. Part volume = part voxels x voxel_size^3.
- Porosity = pore voxels / part voxels; inclusion fraction = inclusion voxels / part voxels.
  Every voxel counts (specks under `min_voxels` too); NaN when the part is empty.
- Defects: 26-connected components of each defect class (`DEFECT_CLASSES`) on its own, exactly
  those of a whole-volume `scipy.ndimage.label` with a full 3x3x3 structure; components under
  `min_voxels` are dropped.
- Location: the part eroded by `surface_depth` face-connected steps, voxels beyond the volume's
  edge counting as outside (`eroded_part`); a defect with any voxel outside it is "surface",
  else "internal".
- Size: equivalent diameter (6 V / pi)^(1/3), times the voxel size when `diameter_unit` is "mm"
  (in voxels otherwise, and `voxel_size` is not used, as in `defect_scores`). Histogram bin i
  holds [edge_i, edge_i+1), the last is open; a diameter under the first edge is in no bin.
- Positions: centroid (z, y, x) and bounding box (z0, y0, x0, z1, y1, x1, half-open) in voxel
  indices of the whole volume.

Streaming: each slab of `slab` slices is read with `surface_depth` extra slices on each side
(clipped to the volume), enough for the erosion of its own slices to equal the whole volume's.
Its components are labelled on their own and reduced to per-component statistics; the labels of
its last slice are kept so the next slab's first slice can be matched against them (the 9
in-plane offsets cover face, edge and corner neighbours across the plane). Touching pairs are
merged at the end by a vectorised union-find. Memory: one slab plus halo, one slice of labels
per class, and a few numbers per component piece (a defect spanning k slabs has k pieces).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from xctsam.config.defects import DefectsConfig
from xctsam.eval.defects import (
    _STRUCTURE,
    DEFECT_CLASSES,
    LOCATIONS,
    _check,
    equivalent_diameter,
    eroded_part,
)
from xctsam.util.atomic import atomic_path
from xctsam.util.jsonfile import write_json

Reader = Callable[[int, int], np.ndarray]
CSV_COLUMNS = ("class", "location", "voxels", "equivalent_diameter", "centroid_z", "centroid_y",
               "centroid_x", "z0", "y0", "x0", "z1", "y1", "x1")


@dataclass(frozen=True)
class Defect:
    """One kept 26-connected component of a defect class."""

    cls: str  # "pore" or "inclusion"
    location: str  # "surface" or "internal"
    voxels: int
    diameter: float  # equivalent diameter, in the report's unit
    centroid: tuple[float, float, float]  # (z, y, x) voxel indices
    bbox: tuple[int, int, int, int, int, int]  # (z0, y0, x0, z1, y1, x1), half-open

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "location": self.location, "voxels": self.voxels,
                "equivalent_diameter": self.diameter, "centroid": list(self.centroid), "bbox": list(self.bbox)}


@dataclass(frozen=True)
class PartReport:
    """Part volume, defect fractions and the defects of one part (see the module's definitions)."""

    shape: tuple[int, int, int]
    unit: str  # of diameters and bin edges: "voxel" or "mm"
    voxel_size: float  # edge of a voxel in `unit` (1 for "voxel")
    surface_depth: int
    min_voxels: int
    part_voxels: int
    pore_voxels: int
    inclusion_voxels: int
    bins: list[float]  # lower edges; the last bin is open
    defects: list[Defect]  # largest first

    @property
    def part_volume(self) -> float:
        return self.part_voxels * self.voxel_size**3

    @property
    def volume_unit(self) -> str:
        return "mm^3" if self.unit == "mm" else "voxel"

    @property
    def porosity(self) -> float:
        return _ratio(self.pore_voxels, self.part_voxels)

    @property
    def inclusion_fraction(self) -> float:
        return _ratio(self.inclusion_voxels, self.part_voxels)

    def _where(self, cls: str, location: str) -> list[Defect]:
        return [d for d in self.defects if d.cls == cls and location in ("all", d.location)]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Defects per class ("pore"/"inclusion") and location ("all"/"surface"/"internal")."""
        return {cls: {loc: len(self._where(cls, loc)) for loc in LOCATIONS} for cls in DEFECT_CLASSES}

    @property
    def histograms(self) -> dict[str, dict[str, list[int]]]:
        """Equivalent-diameter counts per bin of `bins`, per class and location."""
        return {cls: {loc: _histogram([d.diameter for d in self._where(cls, loc)], self.bins) for loc in LOCATIONS}
                for cls in DEFECT_CLASSES}

    def summary(self, largest: int = 20) -> dict[str, Any]:
        """The JSON summary: volumes, fractions, counts, histograms and the `largest` defects."""
        return {"shape": list(self.shape), "unit": self.unit, "voxel_size": self.voxel_size,
                "surface_depth": self.surface_depth, "min_voxels": self.min_voxels,
                "part_voxels": self.part_voxels, "part_volume": self.part_volume, "volume_unit": self.volume_unit,
                "pore_voxels": self.pore_voxels, "inclusion_voxels": self.inclusion_voxels,
                "porosity": self.porosity, "inclusion_fraction": self.inclusion_fraction,
                "counts": self.counts, "bin_edges": list(self.bins), "histograms": self.histograms,
                "largest": [d.as_dict() for d in self.defects[:largest]]}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _histogram(diameters: list[float], edges: list[float]) -> list[int]:
    index = np.searchsorted(edges, np.asarray(diameters, dtype=np.float64), side="right") - 1
    return np.bincount(index[index >= 0], minlength=len(edges)).tolist()


# ---------------------------------------------------------------- per-component statistics
def _grouped(keys: np.ndarray, values: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """`reduce` of `values` (rows) over each key 0..n-1, every key present (labels are dense)."""
    if not len(keys):
        return values[:0]
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(keys[order]) != 0])
    return reduce.reduceat(values[order], starts, axis=0)


# how two pieces of one component combine: counts and coordinate sums add, boxes widen
_REDUCE = {"voxels": np.add, "sums": np.add, "low": np.minimum, "high": np.maximum, "surface": np.logical_or}


@dataclass(frozen=True)
class _Stats:
    """Per component (or piece of one): voxel count, coordinate sums, inclusive box corners, surface."""

    voxels: np.ndarray  # (n,) int64
    sums: np.ndarray  # (n, 3) int64: exact, where float sums of millions of voxels would drift
    low: np.ndarray  # (n, 3) int64
    high: np.ndarray  # (n, 3) int64
    surface: np.ndarray  # (n,) bool: a voxel outside the eroded part

    @classmethod
    def empty(cls) -> _Stats:
        return cls(np.zeros(0, np.int64), *(np.zeros((0, 3), np.int64),) * 3, np.zeros(0, bool))

    @classmethod
    def of_voxels(cls, ids: np.ndarray, coords: np.ndarray, rim: np.ndarray) -> _Stats:
        """Statistics of the components `ids` from one row per voxel."""
        return cls(np.ones(len(ids), np.int64), coords, coords, coords, rim).grouped(ids)

    @classmethod
    def concatenated(cls, parts: list[_Stats]) -> _Stats:
        return cls(**{field: np.concatenate([getattr(p, field) for p in parts]) for field in _REDUCE})

    def grouped(self, ids: np.ndarray) -> _Stats:
        """Rows with the same id (0..n-1) combined into one."""
        return _Stats(**{field: _grouped(ids, getattr(self, field), reduce) for field, reduce in _REDUCE.items()})


# ---------------------------------------------------------------- union-find
def _compressed(parent: np.ndarray) -> np.ndarray:
    """Every pointer replaced by its root (pointer jumping: log(depth) vectorised steps)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The root of each of `n` ids once every pair (a[i], b[i]) is joined; a root is its set's lowest id.

    Each round hangs the higher root of every still-split pair under the lower one; parents only
    ever point down, so there are no cycles and the number of roots falls every round.
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        parent = _compressed(parent)
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[split], np.minimum(ra, rb)[split])


def _touching(previous: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(2, k) unique id pairs of components 26-adjacent across the plane between two slices.

    `previous`, `first`: (y, x) component ids, -1 where none. Voxel (y, x) of one touches
    (y + dy, x + dx) of the other for dy, dx in -1..1 (face, edge and corner neighbours).
    """
    ny, nx = previous.shape
    pairs = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = previous[max(-dy, 0):ny - max(dy, 0), max(-dx, 0):nx - max(dx, 0)]
            b = first[max(dy, 0):ny - max(-dy, 0), max(dx, 0):nx - max(-dx, 0)]
            both = (a >= 0) & (b >= 0)
            pairs.append(np.stack([a[both], b[both]]))
    return np.unique(np.concatenate(pairs, axis=1), axis=1)


class _ClassTracker:
    """The components of one defect class, slab after slab, in provisional ids 0, 1, ..."""

    def __init__(self) -> None:
        self.stats: list[_Stats] = [_Stats.empty()]
        self.pairs: list[np.ndarray] = []
        self.last: np.ndarray | None = None  # ids in the previous slab's last slice
        self.n = 0

    def add(self, mask: np.ndarray, eroded: np.ndarray, z0: int) -> None:
        local, count = ndimage.label(mask, structure=_STRUCTURE)
        # provisional ids of the boundary slices only: a whole-slab int64 copy would double memory
        if self.last is not None:
            self.pairs.append(_touching(self.last, self._ids(local[0])))
        self.last = self._ids(local[-1])
        if count:
            flat = np.flatnonzero(local)
            coords = np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int64)
            coords[:, 0] += z0
            self.stats.append(_Stats.of_voxels(local.ravel()[flat] - 1, coords, ~eroded.ravel()[flat]))
        self.n += count

    def _ids(self, plane: np.ndarray) -> np.ndarray:
        """Slab-local labels (1..count, 0 none) as provisional ids (-1 none), a fresh array."""
        return np.where(plane > 0, plane.astype(np.int64) - 1 + self.n, -1)

    def components(self) -> _Stats:
        """The whole-volume components: pieces that touch across a slab boundary merged."""
        pairs = np.concatenate([np.zeros((2, 0), np.int64), *self.pairs], axis=1)
        _, ids = np.unique(_union_find(self.n, pairs[0], pairs[1]), return_inverse=True)
        return _Stats.concatenated(self.stats).grouped(ids)


# ---------------------------------------------------------------- streaming
def _slabs(n_z: int, slab: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
    """(z0, z1, lo, hi): each slab's own slices [z0, z1) and the slices read [lo, hi)."""
    for z0 in range(0, n_z, slab):
        z1 = min(z0 + slab, n_z)
        yield z0, z1, max(z0 - halo, 0), min(z1 + halo, n_z)


def _read(read: Reader, lo: int, hi: int, shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.asarray(read(lo, hi))
    if labels.shape != (hi - lo, *shape[1:]):
        raise ValueError(f"read({lo}, {hi}) returned shape {labels.shape}, expected {(hi - lo, *shape[1:])}")
    return _check(labels, f"slices {lo}..{hi}:")  # integer labels in 0..3, as defect_scores takes them


def _scale(config: DefectsConfig, voxel_size: float) -> float:
    if config.diameter_unit != "mm":
        return 1.0
    if not voxel_size > 0:
        raise ValueError(f"diameter_unit mm needs a positive voxel_size, got {voxel_size}")
    return float(voxel_size)


def _defects(cls: str, stats: _Stats, min_voxels: int, scale: float) -> list[Defect]:
    keep = stats.voxels >= min_voxels
    voxels, sums, low, high, surface = (a[keep] for a in (stats.voxels, stats.sums, stats.low, stats.high, stats.surface))
    centroids = sums / voxels[:, None]
    diameters = equivalent_diameter(voxels, scale)
    return [Defect(cls, "surface" if s else "internal", int(v), float(d), tuple(c.tolist()), tuple(lo.tolist() + (hi + 1).tolist()))
            for v, d, c, lo, hi, s in zip(voxels, diameters, centroids, low, high, surface)]


def part_defects(read: Reader, shape: tuple[int, int, int], config: DefectsConfig, *,
                 voxel_size: float = 1.0, slab: int = 64) -> PartReport:
    """The defect report of the (z, y, x) label volume of `shape` that `read(z0, z1)` returns.

    Reads never exceed `slab + 2 * config.surface_depth` slices. Raises ValueError for a bad
    shape, slab or voxel size, and for a read of the wrong shape, dtype or values.
    """
    if len(shape) != 3 or any(int(n) != n or n < 0 for n in shape):
        raise ValueError(f"shape must be three non-negative slice counts (z, y, x), got {shape}")
    if slab < 1:
        raise ValueError(f"slab must be >= 1 slice, got {slab}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    scale, depth = _scale(config, voxel_size), config.surface_depth
    trackers = {cls: _ClassTracker() for cls in DEFECT_CLASSES}
    totals = dict.fromkeys(("part", *DEFECT_CLASSES), 0)
    for z0, z1, lo, hi in _slabs(shape[0], slab, depth):
        labels = _read(read, lo, hi, shape)
        # the halo's outer slices erode wrongly (their far side counts as outside), but only
        # `depth` steps in: the slab's own slices come out as in the whole volume
        eroded = eroded_part(labels, depth)[z0 - lo:z1 - lo]
        own = labels[z0 - lo:z1 - lo]
        totals["part"] += int(np.count_nonzero(own >= 1))
        for cls, value in DEFECT_CLASSES.items():
            mask = own == value
            totals[cls] += int(np.count_nonzero(mask))
            trackers[cls].add(mask, eroded, z0)
        del labels, eroded, own, mask  # let the next read reuse the memory
    defects = [d for cls, tracker in trackers.items() for d in _defects(cls, tracker.components(), config.min_voxels, scale)]
    defects.sort(key=lambda d: (-d.voxels, d.cls, d.bbox))
    return PartReport(shape, config.diameter_unit, scale, depth, config.min_voxels, totals["part"], totals["pore"],
                      totals["inclusion"], [float(e) for e in config.diameter_bins], defects)


# ---------------------------------------------------------------- outputs
def _write_csv(report: PartReport, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        # floats as str(), i.e. the shortest text that reads back to the same number
        writer.writerows((d.cls, d.location, d.voxels, d.diameter, *d.centroid, *d.bbox) for d in report.defects)


def _bin_labels(edges: list[float]) -> list[str]:
    return [f"[{low:g}, {high:g})" for low, high in zip(edges, edges[1:])] + [f">= {edges[-1]:g}"]


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3%}"


def _write_png(report: PartReport, path: Path, name: str) -> None:
    """Equivalent-diameter histogram per class, internal and surface defects stacked."""
    # Figure without pyplot: no global backend state, renders with Agg in any process
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(DEFECT_CLASSES), 4), layout="constrained")
    histograms, x = report.histograms, np.arange(len(report.bins))
    for axes, cls in zip(figure.subplots(1, len(DEFECT_CLASSES), squeeze=False)[0], DEFECT_CLASSES):
        internal, surface = histograms[cls]["internal"], histograms[cls]["surface"]
        axes.bar(x, internal, label="internal")
        axes.bar(x, surface, bottom=internal, label="surface")
        axes.set_xticks(x, _bin_labels(report.bins), rotation=30)
        axes.set_xlabel(f"equivalent diameter ({report.unit})")
        axes.set_ylabel("defects")
        axes.set_title(f"{cls}: {report.counts[cls]['all']} defects")
        axes.legend()
    figure.suptitle(f"{name}: porosity {_percent(report.porosity)}, inclusions {_percent(report.inclusion_fraction)}")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def report_paths(out_dir: Path, name: str) -> list[Path]:
    """The files of part `name`'s report in `out_dir`: `<name>.defects.csv`, `.json`, `.png`."""
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file name stem, got {name!r}")
    return [Path(out_dir) / f"{name}.defects.{ext}" for ext in ("csv", "json", "png")]


def write_part_report(report: PartReport, out_dir: Path, name: str, *, largest: int = 20) -> list[Path]:
    """Write `<name>.defects.csv` (every defect, largest first), `.json` (the summary with the
    `largest` defects, NaN as null) and `.png` (the histograms) atomically; returns their paths."""
    if largest < 0:
        raise ValueError(f"largest must be >= 0, got {largest}")
    paths = report_paths(out_dir, name)
    _write_csv(report, paths[0])
    write_json(paths[1], report.summary(largest))
    _write_png(report, paths[2], name)
    return paths
