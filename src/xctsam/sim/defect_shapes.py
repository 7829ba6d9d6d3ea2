"""Shape families of the defect populations: how each is drawn, sized and tested voxel by voxel.

- gas pores: near-spherical, log-normal radii;
- lack-of-fusion pores: flat lenses lying in the build layers (few voxels in z), wide and
  ragged in x-y;
- keyhole pores: ellipsoids elongated along z;
- inclusions: small near-spherical dense particles.

Each family also measures the room a defect has around a voxel of the core in its own metric,
which defect_placement uses to draw centres with room for each defect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from xctsam.config.data import DefectPopulation, KeyholePopulation, LackOfFusionPopulation

Shape = dict[str, np.ndarray]  # per-candidate shape parameters, each with N rows


class DefectShape(Protocol):
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

        A defect whose reach plus the reach of its centre's jitter (defect_placement) stays
        below the room at its centre voxel lies inside the core.
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


def shape_for(name: str, population: DefectPopulation) -> DefectShape:
    """The shape family of the recipe's population `name` (inclusions are rounder than pores)."""
    if isinstance(population, LackOfFusionPopulation):
        return _LackOfFusion(population.thickness, population.irregularity)
    if isinstance(population, KeyholePopulation):
        return _Ellipsoid(z_ratio=population.elongation)
    return _Ellipsoid(wobble=0.06 if name == "inclusion" else 0.08)
