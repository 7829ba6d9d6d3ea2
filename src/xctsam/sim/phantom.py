"""3-D label phantoms of additively manufactured (AM) metal test coupons.

A phantom is a uint8 (Z, Y, X) label volume: 0 background, 1 material, 2 pore, 3 inclusion.

Geometry, after the study's coupons (Tabassum and Ziabari, arXiv 2412.11381): a cylinder
along z whose cross-section may carry a flat (the D shape of the real scans), well inside the
field of view. It is either *solid* (material with a few CAD-like cavities: drilled rods,
milled slots) or a *lattice* of CAD-like features (blocks, bars, round rods, tubes) with air
between them, like the Ti coupon. Features are extruded along z over the full height or part
of it.

Defects replace only *core* material (specimen voxels none of whose 26 neighbours is
background), so no defect ever touches air or pokes out of the specimen, and defects never
overlap one another:

- gas pores: near-spherical, log-normal radii;
- lack-of-fusion pores: flat lenses lying in the build layers (few voxels in z), wide and
  ragged in x-y;
- keyhole pores: ellipsoids elongated along z;
- inclusions: small near-spherical dense particles (label 3).

Each population is added batch by batch until its measured voxel count reaches its target
share of the specimen volume. A batch is vectorised: radii and shapes are drawn at once,
centres are drawn among the spots with room for each defect (a distance map of the core in the
population's own metric), and all candidates are stamped at once on small local boxes. The
last defects are shrunk to the remaining budget, so each population ends between its target
and 5 % above it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from xctsam.config.data import (
    DefectPopulation,
    DefectRecipe,
    KeyholePopulation,
    LackOfFusionPopulation,
    PhantomGeometry,
)

BACKGROUND, MATERIAL, PORE, INCLUSION = 0, 1, 2, 3

# ---------------------------------------------------------------- geometry knobs
LATTICE_PROBABILITY = 0.5  # share of specimens built as a lattice of features (else solid)
FLAT_PROBABILITY = 0.6  # share of specimens with a D-shaped cross-section
FULL_HEIGHT_PROBABILITY = 0.6  # share of features extruded over the whole z range
MIN_BACKGROUND_RING = 2  # voxels of air kept between specimen and the field of view's edge
MIN_FEATURE_HALF_WIDTH = 2.0  # voxels; thinner CAD features would not survive rendering
SOLID_CAVITY_SCALE = 0.6  # cavities of solid specimens are smaller than lattice features
FEATURE_KINDS = ("block", "bar", "rod", "tube")
FEATURE_KIND_WEIGHTS = (0.3, 0.25, 0.3, 0.15)
CENTRE_TRIALS = 8  # best-of-n centres spread features apart, leaving air between them

# ---------------------------------------------------------------- placement knobs
# Defects may only replace *core* material: voxels none of whose 26 neighbours is background.
# Each population measures the room around every core voxel in its own metric (a distance
# map of the core), and a defect is drawn only at a spot with room for it, or shrunk to fit.
# The stamping step re-checks every voxel against the core, so the guarantee does not rest on
# that geometry alone.
_JITTER = 0.5  # voxels: defect centres move this much off their voxel, in-plane only
_JITTER_REACH = _JITTER * math.sqrt(2.0)
_SHELL = 255  # working label of non-core material while defects are placed
RADIUS_CLIP_SIGMAS = 2.5  # log-normal tail cut: one huge pore would blow the voxel budget
FALLBACK_QUANTILE = 0.9  # a defect too large for every spot is shrunk into one of the roomiest 10 %
MAX_STAMP_ELEMENTS = 2_000_000  # candidates x box voxels per vectorised stamp (memory bound)
MAX_ROUNDS = 500  # batches per population before giving up (specimen too thin or too full)
SQUEEZE_STEP = 0.85  # radius factor after a round that placed nothing (the roomy spots are taken)
BATCH_OVERDRAW = 1.25  # draw this much nominal volume per round; overlaps reject some
TARGET_TOLERANCE = 0.05  # overshoot allowed past a population's target, relative


# ================================================================ specimen
@dataclass(frozen=True)
class _Envelope:
    """The specimen's outer cross-section: a disc, optionally cut by a flat."""

    centre: tuple[float, float]  # (y, x) voxels
    radius: float
    flat_angle: float | None  # direction of the flat's outward normal, radians
    flat_distance: float  # distance of the flat from the centre, voxels

    def mask(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        dy, dx = yy - self.centre[0], xx - self.centre[1]
        inside = dy**2 + dx**2 <= self.radius**2
        if self.flat_angle is not None:
            inside &= (
                dy * math.sin(self.flat_angle) + dx * math.cos(self.flat_angle)
                <= self.flat_distance
            )
        return inside


@dataclass(frozen=True)
class _Feature:
    """One CAD-like extruded feature; sizes in voxels, angle in radians, z half-open range."""

    kind: str
    centre: tuple[float, float]  # (y, x)
    half_size: tuple[float, float]  # block/bar: (along, across); rod/tube: (outer, inner radius)
    angle: float
    z_range: tuple[int, int]

    def mask(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        dy, dx = yy - self.centre[0], xx - self.centre[1]
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos
        first, second = self.half_size
        if self.kind in ("block", "bar"):
            return (np.abs(along) <= first) & (np.abs(across) <= second)
        radius_sq = along**2 + across**2
        return (radius_sq <= first**2) & (radius_sq >= second**2)


def specimen_radius_voxels(shape: tuple[int, int, int], geometry: PhantomGeometry) -> float:
    """Radius of the specimen cylinder in voxels (always leaving a background ring)."""
    half_width = min(shape[1], shape[2]) / 2.0
    return min(geometry.specimen_radius * half_width, half_width - MIN_BACKGROUND_RING)


def _in_plane_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable (Y, 1) and (1, X) voxel-centre coordinates."""
    yy = np.arange(shape[1], dtype=np.float64)[:, None]
    xx = np.arange(shape[2], dtype=np.float64)[None, :]
    return yy, xx


def _draw_envelope(geometry: PhantomGeometry, rng: np.random.Generator) -> _Envelope:
    _, height, width = geometry.shape
    radius = specimen_radius_voxels(geometry.shape, geometry)
    has_flat = rng.random() < FLAT_PROBABILITY
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    distance = float(rng.uniform(0.55, 0.9)) * radius
    return _Envelope(
        ((height - 1) / 2.0, (width - 1) / 2.0), radius, angle if has_flat else None, distance
    )


def _draw_z_range(depth: int, full_height: bool, rng: np.random.Generator) -> tuple[int, int]:
    if full_height:
        return 0, depth
    length = max(1, round(rng.uniform(0.3, 0.8) * depth))
    start = int(rng.integers(0, depth - length + 1))
    return start, start + length


def _draw_half_size(kind: str, size: float, rng: np.random.Generator) -> tuple[float, float]:
    """Kind-specific proportions around one characteristic size (voxels)."""
    if kind == "block":
        return size, max(MIN_FEATURE_HALF_WIDTH, size * rng.uniform(0.5, 1.0))
    if kind == "bar":
        return size * rng.uniform(1.5, 3.0), max(
            MIN_FEATURE_HALF_WIDTH, size * rng.uniform(0.2, 0.4)
        )
    if kind == "rod":
        return size, 0.0
    return size, size * rng.uniform(0.35, 0.65)  # tube


def _spread_centre(
    inside: np.ndarray,
    plane_shape: tuple[int, int],
    taken: list[tuple[float, float]],
    rng: np.random.Generator,
) -> tuple[float, float]:
    """A point of the envelope (flat indices `inside`), the farthest from `taken` of a few."""
    picks = inside[rng.integers(0, inside.size, CENTRE_TRIALS)]
    trials = np.stack(np.unravel_index(picks, plane_shape), axis=1)
    trials = trials + rng.uniform(-0.5, 0.5, size=trials.shape)
    if taken:
        gaps = np.linalg.norm(trials[:, None, :] - np.asarray(taken)[None], axis=-1).min(axis=1)
        trials = trials[[int(np.argmax(gaps))]]
    return float(trials[0, 0]), float(trials[0, 1])


def _draw_features(
    count: int,
    size_scale: float,
    envelope: _Envelope,
    envelope_mask: np.ndarray,
    geometry: PhantomGeometry,
    rng: np.random.Generator,
) -> list[_Feature]:
    """CAD-like features centred inside the envelope, sharing one grid orientation."""
    grid_angle = float(rng.uniform(0.0, math.pi / 2.0))
    inside = np.flatnonzero(envelope_mask)
    features: list[_Feature] = []
    for index in range(count):
        kind = str(rng.choice(FEATURE_KINDS, p=FEATURE_KIND_WEIGHTS))
        size = max(
            MIN_FEATURE_HALF_WIDTH,
            rng.uniform(*geometry.feature_size) * envelope.radius * size_scale,
        )
        # the first feature spans all of z so no slice of a lattice is left without material
        full_height = index == 0 or rng.random() < FULL_HEIGHT_PROBABILITY
        features.append(
            _Feature(
                kind=kind,
                centre=_spread_centre(
                    inside, envelope_mask.shape, [feature.centre for feature in features], rng
                ),
                half_size=_draw_half_size(kind, size, rng),
                angle=grid_angle + int(rng.integers(0, 2)) * math.pi / 2.0,
                z_range=_draw_z_range(geometry.shape[0], full_height, rng),
            )
        )
    return features


def _union_of_features(features: list[_Feature], shape: tuple[int, int, int]) -> np.ndarray:
    yy, xx = _in_plane_grid(shape)
    union = np.zeros(shape, dtype=bool)
    for feature in features:
        start, stop = feature.z_range
        union[start:stop] |= feature.mask(yy, xx)
    return union


def make_specimen(geometry: PhantomGeometry, rng: np.random.Generator) -> np.ndarray:
    """Boolean (Z, Y, X) mask of the specimen's material, before any defect."""
    envelope = _draw_envelope(geometry, rng)
    yy, xx = _in_plane_grid(geometry.shape)
    envelope_mask = envelope.mask(yy, xx)
    lattice = rng.random() < LATTICE_PROBABILITY
    count = int(rng.integers(geometry.features[0], geometry.features[1] + 1))
    if lattice:
        features = _draw_features(count, 1.0, envelope, envelope_mask, geometry, rng)
        return _union_of_features(features, geometry.shape) & envelope_mask
    # solid coupons are mostly material: only a few smaller cavities, sometimes none
    cavities = _draw_features(
        int(rng.integers(0, count // 3 + 1)),
        SOLID_CAVITY_SCALE,
        envelope,
        envelope_mask,
        geometry,
        rng,
    )
    return ~_union_of_features(cavities, geometry.shape) & envelope_mask


# ================================================================ defect shapes
Shape = dict[str, np.ndarray]  # per-candidate shape parameters, each with N rows


class _DefectShape(Protocol):
    """Shape family of one defect population; `radius` is the log-normal size, in voxels."""

    def draw(self, rng: np.random.Generator, count: int) -> Shape:
        """Per-candidate shape parameters that do not depend on the radius."""

    def extent(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        """(N, 3) half-extents along z, y, x of a box around the centre holding the defect."""

    def room_key(self) -> tuple[object, ...]:
        """Families with equal keys measure room the same way (the map is computed once)."""

    def room_map(self, core: np.ndarray) -> np.ndarray:
        """Room around each voxel in this family's metric: 0 outside the core."""

    def reach(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        """How far the defect reaches from its centre, in the metric of `room_map`.

        A defect with reach + _JITTER_REACH < room at its centre voxel lies inside the core.
        """

    def volume(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        """Nominal volume in voxels."""

    def radius_for_volume(self, volume: float, shape: Shape) -> np.ndarray:
        """Radius whose nominal volume is `volume` (the inverse of `volume`)."""

    def inside(self, offset: np.ndarray, radius: np.ndarray, shape: Shape) -> np.ndarray:
        """(N, K) mask; offset (N, K, 3) z, y, x from each candidate's true centre."""


@dataclass(frozen=True)
class _Ellipsoid:
    """Axis-aligned ellipsoid; semi-axes are radius x per-candidate ratios (z, y, x).

    Room is the core's distance map with z shrunk by `z_ratio`: in that metric the ellipsoid
    is (nearly) a ball, so a tall keyhole fits a thin upright bar.
    """

    z_ratio: float = 1.0  # mean elongation along z (keyholes > 1)
    wobble: float = 0.08  # log-space spread of each ratio: near-spherical, not identical

    def draw(self, rng: np.random.Generator, count: int) -> Shape:
        ratios = np.exp(rng.normal(0.0, self.wobble, size=(count, 3)))
        ratios[:, 0] *= self.z_ratio
        return {"ratios": ratios}

    def extent(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        return radius[:, None] * shape["ratios"]

    def room_key(self) -> tuple[object, ...]:
        return ("ellipsoid", self.z_ratio)

    def room_map(self, core: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(core, sampling=(1.0 / self.z_ratio, 1.0, 1.0))

    def reach(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        return radius * (shape["ratios"] / np.array([self.z_ratio, 1.0, 1.0])).max(axis=1)

    def volume(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        return 4.0 / 3.0 * math.pi * radius**3 * shape["ratios"].prod(axis=1)

    def radius_for_volume(self, volume: float, shape: Shape) -> np.ndarray:
        return np.cbrt(volume / (4.0 / 3.0 * math.pi * shape["ratios"].prod(axis=1)))

    def inside(self, offset: np.ndarray, radius: np.ndarray, shape: Shape) -> np.ndarray:
        semi_axes = radius[:, None, None] * shape["ratios"][:, None, :]
        return ((offset / semi_axes) ** 2).sum(axis=-1) <= 1.0


@dataclass(frozen=True)
class _LackOfFusion:
    """Flat lens in the build layers with a ragged in-plane outline.

    The outline is an ellipse (random aspect and orientation) whose polar radius is modulated
    by random harmonics; `irregularity` scales that modulation (0: smooth, 1: +-60 %). The
    lens is floor or ceil of `thickness` layers thick at its centre (mean `thickness`) and
    thins to one layer at its rim. Room is the in-slice distance map of the core, minimised
    over the slices the thickest lens can cover.
    """

    thickness: float
    irregularity: float
    harmonics: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    max_modulation: float = 0.6  # keeps the polar radius positive

    @property
    def _layer_reach(self) -> int:
        """Largest slice offset from the centre a lens covers."""
        return math.ceil(self.thickness) // 2

    def draw(self, rng: np.random.Generator, count: int) -> Shape:
        orders = np.asarray(self.harmonics, dtype=np.float64)
        amplitudes = rng.uniform(0.3, 1.0, size=(count, orders.size)) / orders
        amplitudes *= self.max_modulation / amplitudes.sum(axis=1, keepdims=True)
        whole, part = divmod(self.thickness, 1.0)
        return {
            "aspect": rng.uniform(0.35, 1.0, size=count),
            "angle": rng.uniform(0.0, math.pi, size=count),
            "amplitudes": amplitudes,
            "phases": rng.uniform(0.0, 2.0 * math.pi, size=(count, orders.size)),
            "layers": whole + (rng.random(count) < part),  # stochastic rounding keeps the mean
        }

    def extent(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        in_plane = self.reach(radius, shape)
        return np.stack([shape["layers"] // 2, in_plane, in_plane], axis=1)

    def room_key(self) -> tuple[object, ...]:
        return ("layers", self._layer_reach)

    def room_map(self, core: np.ndarray) -> np.ndarray:
        in_slice = np.stack([ndimage.distance_transform_edt(plane) for plane in core])
        span = 2 * self._layer_reach + 1
        return ndimage.minimum_filter1d(in_slice, span, axis=0, mode="constant", cval=0.0)

    def reach(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        return radius * (1.0 + self.irregularity * self.max_modulation)

    def _mean_layers(self, shape: Shape) -> np.ndarray:
        # a lens of centre thickness t averages 2/3 t over its area, and never less than one
        return np.maximum(1.0, 2.0 / 3.0 * shape["layers"])

    def volume(self, radius: np.ndarray, shape: Shape) -> np.ndarray:
        return math.pi * radius**2 * shape["aspect"] * self._mean_layers(shape)

    def radius_for_volume(self, volume: float, shape: Shape) -> np.ndarray:
        return np.sqrt(volume / (math.pi * shape["aspect"] * self._mean_layers(shape)))

    def inside(self, offset: np.ndarray, radius: np.ndarray, shape: Shape) -> np.ndarray:
        dz, dy, dx = offset[..., 0], offset[..., 1], offset[..., 2]
        cos, sin = np.cos(shape["angle"])[:, None], np.sin(shape["angle"])[:, None]
        along = dx * cos + dy * sin
        across = (-dx * sin + dy * cos) / shape["aspect"][:, None]
        polar = np.arctan2(across, along)[..., None]
        orders = np.asarray(self.harmonics, dtype=np.float64)
        wave = (
            shape["amplitudes"][:, None, :] * np.cos(orders * polar + shape["phases"][:, None, :])
        ).sum(axis=-1)
        outline = radius[:, None] * (1.0 + self.irregularity * wave)
        rim = np.hypot(along, across) / outline  # 0 at the centre, 1 on the outline
        layers = np.maximum(
            1.0, np.rint(shape["layers"][:, None] * np.sqrt(np.clip(1.0 - rim**2, 0.0, None)))
        )
        return (rim <= 1.0) & (dz >= -((layers - 1) // 2)) & (dz <= layers // 2)


def _shape_of(name: str, population: DefectPopulation) -> _DefectShape:
    if isinstance(population, LackOfFusionPopulation):
        return _LackOfFusion(population.thickness, population.irregularity)
    if isinstance(population, KeyholePopulation):
        return _Ellipsoid(z_ratio=population.elongation)
    return _Ellipsoid(wobble=0.06 if name == "inclusion" else 0.08)


# ================================================================ placement
@dataclass(frozen=True)
class _Room:
    """Where defect centres may go, roomiest last."""

    flat_index: np.ndarray  # int64 flat indices into the volume, by increasing `free`
    free: np.ndarray  # room left for the defect's reach once the centre jitter is paid


@dataclass(frozen=True)
class _Candidates:
    centre: np.ndarray  # (N, 3) int voxel
    jitter: np.ndarray  # (N, 3) sub-voxel offset of the true centre
    radius: np.ndarray  # (N,)
    shape: Shape

    def take(self, keep: np.ndarray | slice) -> _Candidates:
        return _Candidates(
            self.centre[keep],
            self.jitter[keep],
            self.radius[keep],
            {k: v[keep] for k, v in self.shape.items()},
        )

    def __len__(self) -> int:
        return len(self.radius)


def _core(specimen: np.ndarray) -> np.ndarray:
    """Specimen voxels none of whose 26 neighbours is background (the volume's faces count)."""
    return ndimage.minimum_filter(specimen, size=3, mode="constant", cval=False)


def _room_map_in_core_box(shape_family: _DefectShape, core: np.ndarray) -> np.ndarray:
    """The family's room map, computed on the core's bounding box only (much less work).

    Exact: everything outside the box is non-core, and the one-voxel ring of non-core padded
    around the box is at least as near to any core voxel as anything outside it.
    """
    room_map = np.zeros(core.shape)
    boxes = ndimage.find_objects(core.astype(np.uint8))
    if not boxes:
        return room_map
    box = boxes[0]
    room_map[box] = shape_family.room_map(np.pad(core[box], 1))[1:-1, 1:-1, 1:-1]
    return room_map


def _room(room_map: np.ndarray) -> _Room:
    free = room_map.ravel() - _JITTER_REACH
    flat_index = np.flatnonzero(free > 0)
    order = np.argsort(free[flat_index], kind="stable")
    return _Room(flat_index[order], free[flat_index][order])


def _pick_spots(
    room: _Room, reach: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """For each reach, a spot drawn uniformly among those with room for it.

    Returns (indices into room, radius scale <= 1). A defect without such a spot goes to one
    of the roomiest spots and is shrunk to fit (thin lattice bars cannot hold large pores).
    """
    count = room.free.size
    first_fitting = np.searchsorted(room.free, reach, side="right")
    first_allowed = np.minimum(first_fitting, min(int(FALLBACK_QUANTILE * count), count - 1))
    spots = first_allowed + (rng.random(reach.size) * (count - first_allowed)).astype(np.int64)
    # the tiny factor keeps reach strictly below the room after shrinking
    scale = np.minimum(1.0, room.free[spots] / np.maximum(reach, 1e-12) * (1.0 - 1e-9))
    return spots, scale


def _draw_radii(population: DefectPopulation, rng: np.random.Generator, count: int) -> np.ndarray:
    median, sigma = population.radius.median, population.radius.sigma
    radii = median * np.exp(rng.normal(0.0, sigma, size=count))
    return np.minimum(radii, median * math.exp(RADIUS_CLIP_SIGMAS * sigma))


def _mean_volume(
    population: DefectPopulation, shape_family: _DefectShape, rng: np.random.Generator
) -> float:
    """Mean nominal volume of this population's defects, from a sample, in voxels."""
    probe = 256
    return float(
        shape_family.volume(
            _draw_radii(population, rng, probe), shape_family.draw(rng, probe)
        ).mean()
    )


def _draw_candidates(
    population: DefectPopulation,
    shape_family: _DefectShape,
    room: _Room,
    budget: float,
    mean_volume: float,
    squeeze: float,
    volume_shape: tuple[int, int, int],
    rng: np.random.Generator,
) -> _Candidates:
    """Enough candidates to fill about `budget` voxels, each fitted to its spot and the budget.

    `squeeze` (<= 1) scales all radii down when earlier rounds found no free spot.
    """
    count = int(min(max(1, math.ceil(BATCH_OVERDRAW * budget / max(mean_volume, 1.0))), 100_000))
    shape = shape_family.draw(rng, count)
    # the last defects are shrunk to the remaining budget so the total lands on target
    radius = np.minimum(
        squeeze * _draw_radii(population, rng, count), shape_family.radius_for_volume(budget, shape)
    )
    spots, scale = _pick_spots(room, shape_family.reach(radius, shape), rng)
    radius = radius * scale
    jitter = np.zeros((count, 3))
    jitter[:, 1:] = rng.uniform(-_JITTER, _JITTER, size=(count, 2))
    candidates = _Candidates(
        centre=np.stack(np.unravel_index(room.flat_index[spots], volume_shape), axis=1),
        jitter=jitter,
        radius=radius,
        shape=shape,
    )
    # the nominal volume tells how many candidates are worth stamping this round
    filled = np.cumsum(shape_family.volume(radius, shape))
    return candidates.take(slice(0, int(np.searchsorted(filled, BATCH_OVERDRAW * budget)) + 1))


def _box_half(shape_family: _DefectShape, candidates: _Candidates) -> np.ndarray:
    """Half-size (z, y, x) of one box holding every candidate of the batch, in whole voxels."""
    return np.ceil(
        shape_family.extent(candidates.radius, candidates.shape).max(axis=0)
        + np.abs(candidates.jitter).max(axis=0)
    ).astype(int)


def _box_offsets(half: np.ndarray) -> np.ndarray:
    """(K, 3) integer offsets of the box [-half, half] along z, y, x."""
    axes = [np.arange(-h, h + 1) for h in half]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def _first_claims(voxels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Candidates (rows) whose voxels no earlier row of this batch also claims."""
    rows, cols = np.nonzero(mask)
    claimed = voxels[rows, cols]
    order = np.argsort(claimed, kind="stable")  # stable: earlier rows first among equal voxels
    repeated = claimed[order][1:] == claimed[order][:-1]
    keep = np.ones(mask.shape[0], dtype=bool)
    keep[rows[order[1:][repeated]]] = False
    return keep


def _stamp(
    labels: np.ndarray,
    shape_family: _DefectShape,
    candidates: _Candidates,
    label: int,
    budget: float,
    tolerance: float,
) -> int:
    """Write the candidates that fit in core material and in the budget; returns voxels written.

    A candidate is dropped if it leaves the core, overlaps an earlier defect (merged blobs
    would mix classes and shapes) or an earlier candidate of the batch; the kept ones are
    taken in draw order while their running voxel count stays within budget + tolerance.
    """
    offsets = _box_offsets(_box_half(shape_family, candidates))
    mask = shape_family.inside(
        offsets[None] - candidates.jitter[:, None, :], candidates.radius, candidates.shape
    )
    mask |= (offsets == 0).all(axis=1)[None]  # every defect keeps at least its centre voxel
    # box voxels past the volume's faces are clipped onto the faces, which are never core
    voxels = np.ravel_multi_index(
        tuple((candidates.centre[:, None, :] + offsets[None]).transpose(2, 0, 1)),
        labels.shape,
        mode="clip",
    )
    flat_labels = labels.reshape(-1)
    keep = ~(mask & (flat_labels[voxels] != MATERIAL)).any(axis=1)
    keep &= _first_claims(voxels, mask & keep[:, None])
    sizes = np.where(keep, mask.sum(axis=1), 0)
    keep &= np.cumsum(sizes) <= budget + tolerance
    written = voxels[mask & keep[:, None]]
    flat_labels[written] = label
    return int(written.size)


def _stamp_in_chunks(
    labels: np.ndarray,
    shape_family: _DefectShape,
    candidates: _Candidates,
    label: int,
    budget: float,
    tolerance: float,
) -> int:
    """`_stamp` over slices of the batch small enough to bound memory."""
    box_voxels = int(np.prod(2 * _box_half(shape_family, candidates) + 1))
    chunk = max(1, MAX_STAMP_ELEMENTS // box_voxels)
    written = 0
    for start in range(0, len(candidates), chunk):
        if budget - written <= 0:
            break
        written += _stamp(
            labels,
            shape_family,
            candidates.take(slice(start, start + chunk)),
            label,
            budget - written,
            tolerance,
        )
    return written


def _place_population(
    labels: np.ndarray,
    name: str,
    population: DefectPopulation,
    shape_family: _DefectShape,
    label: int,
    target: int,
    room: _Room,
    rng: np.random.Generator,
) -> int:
    """Add defects of one population until `target` voxels are reached; returns the count."""
    if room.free.size == 0:
        warnings.warn(f"phantom: no room for {name} defects (specimen too thin)", stacklevel=3)
        return 0
    mean_volume = _mean_volume(population, shape_family, rng)
    tolerance = TARGET_TOLERANCE * target
    placed, squeeze = 0, 1.0
    for _ in range(MAX_ROUNDS):
        budget = target - placed
        if budget <= 0:
            return placed
        candidates = _draw_candidates(
            population, shape_family, room, budget, mean_volume, squeeze, labels.shape, rng
        )
        written = _stamp_in_chunks(labels, shape_family, candidates, label, budget, tolerance)
        squeeze = squeeze if written else squeeze * SQUEEZE_STEP
        # defects shrunk by their spots or rejected by overlaps fill less than drawn: size the
        # next batch from what this one achieved per candidate
        mean_volume = max(written / len(candidates), 1.0) if written else mean_volume
        placed += written
    warnings.warn(
        f"phantom: {name} reached {placed} of {target} voxels (specimen too full or too thin)",
        stacklevel=3,
    )
    return placed


# ================================================================ public API
def make_phantom(
    geometry: PhantomGeometry, recipe: DefectRecipe, rng: np.random.Generator
) -> np.ndarray:
    """uint8 (Z, Y, X) labels: 0 background, 1 material, 2 pore, 3 inclusion.

    Deterministic for a given generator state. Each population's measured share of the
    specimen (labels > 0) meets its `fraction` to within a few percent when the specimen has
    room for it; a fraction of 0 yields no voxel of that population.
    """
    specimen = make_specimen(geometry, rng)
    core = _core(specimen)
    specimen_voxels = int(np.count_nonzero(specimen))
    labels = specimen.astype(np.uint8)  # material = 1
    shell = specimen & ~core
    labels[shell] = _SHELL  # so stamping rejects any defect reaching it
    rooms: dict[tuple[object, ...], _Room] = {}
    # largest defects first: they need the most room, the small ones fill in around them
    populations = (
        ("lack_of_fusion", recipe.lack_of_fusion, PORE),
        ("keyhole", recipe.keyhole, PORE),
        ("gas_pore", recipe.gas_pore, PORE),
        ("inclusion", recipe.inclusion, INCLUSION),
    )
    for name, population, label in populations:
        target = round(population.fraction * specimen_voxels)
        if target == 0:
            continue
        shape_family = _shape_of(name, population)
        key = shape_family.room_key()
        if key not in rooms:
            rooms[key] = _room(_room_map_in_core_box(shape_family, core))
        _place_population(labels, name, population, shape_family, label, target, rooms[key], rng)
    labels[shell] = MATERIAL
    return labels


def defect_fractions(labels: np.ndarray) -> dict[str, float]:
    """{'pore': ..., 'inclusion': ...}: voxels of each class / voxels of the specimen (labels > 0).

    Both are 0.0 for a volume without specimen.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=INCLUSION + 1)
    specimen = int(counts[MATERIAL:].sum())
    if specimen == 0:
        return {"pore": 0.0, "inclusion": 0.0}
    return {
        "pore": float(counts[PORE] / specimen),
        "inclusion": float(counts[INCLUSION] / specimen),
    }
