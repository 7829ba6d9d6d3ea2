"""Streamed per-part defect report: equal to whole-volume labelling, bounded reads, written files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from xctsam.config.defects import DefectsConfig
from xctsam.eval.defects import (
    DEFECT_CLASSES,
    LOCATIONS,
    components,
    equivalent_diameter,
    eroded_part,
    porosity,
)
from xctsam.eval.part_report import (
    CSV_COLUMNS,
    PartReport,
    _union_find,
    part_defects,
    write_part_report,
)

FULL = np.ones((3, 3, 3), bool)  # 26-connectivity, written out rather than taken from the module
SHAPE = (13, 11, 12)


def _random_volume(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Material with some air, sprinkled with pore and inclusion voxels dense enough to chain
    (face, edge and corner contacts) across slices, some on the volume's faces."""
    rng = np.random.default_rng(seed)
    labels = np.ones(shape, np.uint8)
    labels[:, : rng.integers(0, 4), :] = 0  # air on one side: a surface inside the volume
    labels[rng.random(shape) < 0.05] = 0
    draw = rng.random(shape)
    labels[draw < 0.12] = 2
    labels[(draw >= 0.12) & (draw < 0.2)] = 3
    labels[0, :3, :3] = 2  # a pore in a corner of the volume
    labels[-1, -2:, -2:] = 3  # an inclusion in the opposite corner
    return labels


def _reader(labels: np.ndarray, reads: list[tuple[int, int]] | None = None):
    """read(z0, z1) over an in-memory volume, recording the requests; returns copies, not views."""

    def read(z0: int, z1: int) -> np.ndarray:
        if reads is not None:
            reads.append((z0, z1))
        assert 0 <= z0 < z1 <= labels.shape[0]
        return labels[z0:z1].copy()

    return read


def _reference(labels: np.ndarray, config: DefectsConfig) -> list[tuple]:
    """(class, voxels, bbox, location, centroid) of every kept component, whole-volume way, sorted."""
    eroded = eroded_part(labels, config.surface_depth)
    rows = []
    for cls, value in DEFECT_CLASSES.items():
        mask = labels == value
        found, n = ndimage.label(mask, structure=FULL)
        voxels = np.bincount(found.ravel(), minlength=n + 1)[1:]
        kept = [i for i in range(1, n + 1) if voxels[i - 1] >= config.min_voxels]
        boxes = ndimage.find_objects(found)
        centroids = ndimage.center_of_mass(mask, found, kept) if kept else []
        located = components(mask.copy(), eroded, config.min_voxels)  # the surface split, same label order
        assert [boxes[i - 1] for i in kept] == located.boxes
        for i, centroid, surface in zip(kept, centroids, located.surface):
            box = tuple(s.start for s in boxes[i - 1]) + tuple(s.stop for s in boxes[i - 1])
            rows.append((cls, int(voxels[i - 1]), box, "surface" if surface else "internal", tuple(centroid)))
    return sorted(rows)


def _streamed(report: PartReport) -> list[tuple]:
    return sorted((d.cls, d.voxels, d.bbox, d.location, d.centroid) for d in report.defects)


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [row[:4] for row in got] == [row[:4] for row in want]
    np.testing.assert_allclose([row[4] for row in got], [row[4] for row in want], rtol=0, atol=1e-9)


# ---------------------------------------------------------------- components equal the whole volume's
@pytest.mark.parametrize("slab", [1, 2, 5, SHAPE[0]])
@pytest.mark.parametrize(("depth", "min_voxels"), [(0, 1), (1, 1), (3, 1), (2, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_components_equal_whole_volume(seed: int, depth: int, min_voxels: int, slab: int) -> None:
    labels = _random_volume(seed)
    config = DefectsConfig(surface_depth=depth, min_voxels=min_voxels)
    report = part_defects(_reader(labels), labels.shape, config, slab=slab)
    want = _reference(labels, config)
    assert len(want) > 10
    _assert_same(_streamed(report), want)


@pytest.mark.parametrize("slab", [1, 2, 5])
def test_random_volumes_have_defects_across_slab_boundaries(slab: int) -> None:
    """The volumes above exercise the merge: components whose slices lie in several slabs."""
    rows = _reference(_random_volume(0), DefectsConfig())
    crossing = [row for row in rows if row[2][0] // slab != (row[2][3] - 1) // slab]
    assert len(crossing) >= 3


@pytest.mark.parametrize("slab", [1, 2])
def test_diagonal_touches_across_the_plane_join(slab: int) -> None:
    """Corner-only, edge-only and face contacts between slices 1 and 2 (a slab boundary) each
    make one component; a gap of one voxel does not."""
    labels = np.ones((4, 9, 9), np.uint8)
    labels[1, 2, 2] = labels[2, 3, 3] = 2  # corner only
    labels[1, 5, 5] = labels[2, 5, 6] = 2  # edge only
    labels[1, 7, 1] = labels[2, 7, 1] = 3  # face
    labels[1, 0, 8] = labels[2, 2, 8] = 3  # two apart: separate
    report = part_defects(_reader(labels), labels.shape, DefectsConfig(surface_depth=1), slab=slab)
    assert sorted((d.cls, d.voxels) for d in report.defects) == [("inclusion", 1), ("inclusion", 1), ("inclusion", 2),
                                                                 ("pore", 2), ("pore", 2)]
    _assert_same(_streamed(report), _reference(labels, DefectsConfig(surface_depth=1)))


@pytest.mark.parametrize("slab", [1, 3, 7])
def test_edges_of_the_volume_count_as_outside(slab: int) -> None:
    """A part filling the whole volume: defects on its faces are surface ones, a central one internal."""
    labels = np.ones((7, 9, 9), np.uint8)
    labels[0, 4, 4] = 2  # first slice
    labels[6, 4, 4] = 2  # last slice
    labels[3, 0, 4] = 3  # y face
    labels[3, 4, 8] = 3  # x face
    labels[3, 4, 4] = 2  # centre, 3 steps from every face
    report = part_defects(_reader(labels), labels.shape, DefectsConfig(surface_depth=3), slab=slab)
    located = {(d.bbox[:3], d.location) for d in report.defects}
    assert located == {((0, 4, 4), "surface"), ((6, 4, 4), "surface"), ((3, 0, 4), "surface"),
                       ((3, 4, 8), "surface"), ((3, 4, 4), "internal")}


# ---------------------------------------------------------------- summary numbers
@pytest.mark.parametrize("seed", [0, 3])
def test_fractions_counts_and_histograms(seed: int) -> None:
    labels = _random_volume(seed)
    config = DefectsConfig(surface_depth=2, diameter_bins=[0.0, 1.5, 2.0, 3.0])
    report = part_defects(_reader(labels), labels.shape, config, slab=4)
    part = np.count_nonzero(labels >= 1)
    assert report.part_voxels == part and report.part_volume == part
    assert report.porosity == np.count_nonzero(labels == 2) / part == porosity(labels)
    assert report.inclusion_fraction == np.count_nonzero(labels == 3) / part
    want = _reference(labels, config)
    for cls in DEFECT_CLASSES:
        for location in LOCATIONS:
            voxels = [row[1] for row in want if row[0] == cls and location in ("all", row[3])]
            assert report.counts[cls][location] == len(voxels)
            bins = np.searchsorted(config.diameter_bins, equivalent_diameter(voxels), side="right") - 1
            assert report.histograms[cls][location] == np.bincount(bins, minlength=4).tolist()
    assert sum(report.histograms["pore"]["all"]) == report.counts["pore"]["all"]  # first edge 0: all binned


def test_defects_largest_first() -> None:
    report = part_defects(_reader(_random_volume(1)), SHAPE, DefectsConfig(), slab=3)
    sizes = [d.voxels for d in report.defects]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_mm_unit_scales_diameters_and_volume() -> None:
    labels = _random_volume(2)
    config = DefectsConfig(diameter_unit="mm", diameter_bins=[0.0, 0.5])
    report = part_defects(_reader(labels), labels.shape, config, voxel_size=0.5, slab=5)
    assert report.part_volume == pytest.approx(report.part_voxels * 0.125)
    assert (report.unit, report.volume_unit) == ("mm", "mm^3")
    for defect in report.defects:
        assert defect.diameter == pytest.approx(0.5 * (6 * defect.voxels / math.pi) ** (1 / 3))
    with pytest.raises(ValueError, match="voxel_size"):
        part_defects(_reader(labels), labels.shape, config, voxel_size=0.0)


def test_empty_part_gives_nan_fractions() -> None:
    labels = np.zeros((3, 4, 4), np.uint8)
    report = part_defects(_reader(labels), labels.shape, DefectsConfig(), slab=2)
    assert report.defects == [] and report.part_voxels == 0
    assert math.isnan(report.porosity) and math.isnan(report.inclusion_fraction)


# ---------------------------------------------------------------- memory: reads stay within slab + halo
@pytest.mark.parametrize(("slab", "depth"), [(1, 0), (1, 3), (2, 1), (5, 3), (64, 2)])
def test_reads_never_exceed_slab_plus_halo(slab: int, depth: int) -> None:
    labels = _random_volume(0, (17, 6, 7))
    reads: list[tuple[int, int]] = []
    part_defects(_reader(labels, reads), labels.shape, DefectsConfig(surface_depth=depth), slab=slab)
    assert max(z1 - z0 for z0, z1 in reads) <= slab + 2 * depth
    assert len(reads) == math.ceil(17 / slab)
    assert reads[0][0] == 0 and reads[-1][1] == 17


# ---------------------------------------------------------------- the union-find
@pytest.mark.parametrize("seed", [0, 1])
def test_union_find_matches_connected_components(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    a, b = rng.integers(0, n, 250), rng.integers(0, n, 250)
    roots = _union_find(n, a, b)
    _, want = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    # same partition: a pair shares a root exactly when it shares a component
    assert np.array_equal(roots[:, None] == roots[None, :], want[:, None] == want[None, :])
    assert np.all(roots[roots] == roots) and np.all(roots <= np.arange(n))


# ---------------------------------------------------------------- bad input
def test_bad_reads_and_arguments_are_refused() -> None:
    labels = _random_volume(0)
    config = DefectsConfig()
    with pytest.raises(ValueError, match="shape"):
        part_defects(lambda z0, z1: labels[z0:z1, 1:], labels.shape, config)
    with pytest.raises(ValueError, match="outside 0..3"):
        part_defects(lambda z0, z1: labels[z0:z1] + 1, labels.shape, config)
    with pytest.raises(ValueError, match="integers"):
        part_defects(lambda z0, z1: labels[z0:z1].astype(float), labels.shape, config)
    with pytest.raises(ValueError, match="slab"):
        part_defects(_reader(labels), labels.shape, config, slab=0)


# ---------------------------------------------------------------- written files
def _written(tmp_path: Path, labels: np.ndarray, largest: int) -> tuple[PartReport, list[Path]]:
    report = part_defects(_reader(labels), labels.shape, DefectsConfig(surface_depth=1), slab=4)
    return report, write_part_report(report, tmp_path / "out", "part7", largest=largest)


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_written_files_agree_with_the_report(tmp_path: Path) -> None:
    report, paths = _written(tmp_path, _random_volume(1), largest=5)
    out = tmp_path / "out"
    assert paths == [out / "part7.defects.csv", out / "part7.defects.json", out / "part7.defects.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temporaries left

    with paths[0].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(report.defects) > 5
    sizes = [int(row["voxels"]) for row in rows]
    assert sizes == sorted(sizes, reverse=True)
    first = report.defects[0]
    assert (rows[0]["class"], rows[0]["location"], float(rows[0]["equivalent_diameter"])) == (first.cls, first.location, first.diameter)
    assert tuple(float(rows[0][f"centroid_{a}"]) for a in "zyx") == first.centroid
    assert tuple(int(rows[0][c]) for c in ("z0", "y0", "x0", "z1", "y1", "x1")) == first.bbox

    summary = _strict_json(paths[1])
    assert summary["porosity"] == report.porosity and summary["inclusion_fraction"] == report.inclusion_fraction
    assert summary["part_volume"] == report.part_volume and summary["counts"] == report.counts
    assert summary["histograms"] == report.histograms and summary["bin_edges"] == report.bins
    assert [d["voxels"] for d in summary["largest"]] == [d.voxels for d in report.defects[:5]]
    assert summary["largest"][0]["centroid"] == list(first.centroid)

    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(paths[2]).shape[:2] == (400, 1000)  # two 5 x 4 inch panels at 100 dpi


def test_empty_part_writes_null_fractions(tmp_path: Path) -> None:
    report, paths = _written(tmp_path, np.zeros((2, 3, 3), np.uint8), largest=20)
    summary = _strict_json(paths[1])
    assert summary["porosity"] is None and summary["inclusion_fraction"] is None
    assert summary["largest"] == [] and summary["counts"]["pore"]["all"] == 0
    assert paths[0].read_text().splitlines() == [",".join(CSV_COLUMNS)]
    assert paths[2].stat().st_size > 0


def test_write_refuses_a_name_with_a_folder(tmp_path: Path) -> None:
    report = part_defects(_reader(_random_volume(0)), SHAPE, DefectsConfig())
    with pytest.raises(ValueError, match="name"):
        write_part_report(report, tmp_path, "a/b")
    assert list(tmp_path.iterdir()) == []
