"""The specimen of a phantom: an AM coupon's material, before any defect.

Geometry, after the study's coupons (Tabassum and Ziabari, arXiv 2412.11381): a cylinder
along z whose cross-section may carry a flat (the D shape of the real scans), well inside the
field of view. It is either *solid* (material with a few CAD-like cavities: drilled rods,
milled slots) or a *lattice* of CAD-like features (blocks, bars, round rods, tubes) with air
between them, like the Ti coupon. Features are extruded along z over the full height or part
of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xctsam.config.data import PhantomGeometry

LATTICE_PROBABILITY = 0.5  # share of specimens built as a lattice of features (else solid)
FLAT_PROBABILITY = 0.6  # share of specimens with a D-shaped cross-section
FULL_HEIGHT_PROBABILITY = 0.6  # share of features extruded over the whole z range
MIN_BACKGROUND_RING = 2  # voxels of air kept between specimen and the field of view's edge
MIN_FEATURE_HALF_WIDTH = 2.0  # voxels; thinner CAD features would not survive rendering
SOLID_CAVITY_SCALE = 0.6  # cavities of solid specimens are smaller than lattice features
FEATURE_KINDS = ("block", "bar", "rod", "tube")
FEATURE_KIND_WEIGHTS = (0.3, 0.25, 0.3, 0.15)
CENTRE_TRIALS = 8  # best-of-n centres spread features apart, leaving air between them


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
