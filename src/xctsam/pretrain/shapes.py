"""A generic segmentation corpus made on the fly: textured random shapes, not XCT.

Each image is drawn from its own seed (e.g. [corpus seed, step, index]), so any image can be
remade without a stored dataset or a sampler state: a resumed pretraining sees exactly the
images an uninterrupted one would. An image holds many objects of very different sizes
(log-uniform radii, from a few pixels to a quarter of the image): ellipses, star polygons,
rectangles and smooth blobs, each with its own grey level, gradient and texture, painted over
one another on a textured, shaded background; then blur and noise over the whole image.
The instance masks are the *visible* parts (later objects occlude earlier ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import find_objects, gaussian_filter
from skimage.draw import ellipse, polygon

SeedLike = int | Sequence[int]
KINDS = ("ellipse", "polygon", "rectangle", "blob")
MIN_CONTRAST = 0.08  # an object this close to the background grey is not visibly an object


@dataclass(frozen=True)
class ShapeImage:
    """One corpus image: (S, S) float32 grey values in [0, 1] and (N, S, S) bool instance masks."""

    image: np.ndarray
    instances: np.ndarray


Region = tuple[slice, slice]


def _texture(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """Smoothed noise at a random scale: grain, mottling or cloudiness."""
    sigma = rng.uniform(0.5, 6.0)
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return amplitude * field / (field.std() + 1e-6)


def _shading(rng: np.random.Generator, size: int, amplitude: float, region: Region | None = None) -> np.ndarray:
    """A linear gradient in a random direction, zero mean over the image, on `region` of it."""
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = region or (slice(0, size), slice(0, size))
    y, x = np.mgrid[rows, cols] / max(size - 1, 1) - 0.5
    return amplitude * (np.cos(angle) * x + np.sin(angle) * y)


def _square_around(cy: float, cx: float, reach: float, size: int) -> Region:
    """Slices of the image covering a square of half-side `reach` around (cy, cx)."""
    def span(centre: float) -> slice:
        return slice(max(int(centre - reach), 0), min(int(np.ceil(centre + reach)) + 1, size))

    return span(cy), span(cx)


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A bool (size, size) mask of one random shape."""
    radius = float(np.exp(rng.uniform(np.log(2.5), np.log(size / 4))))
    cy, cx = rng.uniform(0, size, 2)
    mask = np.zeros((size, size), dtype=bool)
    if kind == "ellipse":
        ry, rx = radius * rng.uniform(0.4, 1.0, 2)
        rr, cc = ellipse(cy, cx, max(ry, 1.5), max(rx, 1.5), shape=mask.shape, rotation=rng.uniform(0, np.pi))
    elif kind in ("polygon", "rectangle"):
        if kind == "rectangle":
            half = radius * rng.uniform(0.3, 1.0, 2)
            corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]]) * half
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 10)))
            radii = radius * rng.uniform(0.35, 1.0, angles.size)
            corners = np.stack([radii * np.sin(angles), radii * np.cos(angles)], axis=1)
        turn = rng.uniform(0, np.pi)
        rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        corners = corners @ rotation.T + [cy, cx]
        rr, cc = polygon(corners[:, 0], corners[:, 1], shape=mask.shape)
    else:  # blob: a radius that wobbles smoothly with the angle (by at most 4 x 0.3 of it)
        terms = [(k, rng.uniform(0, 0.3), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
        region = _square_around(cy, cx, radius * 2.2, size)
        y, x = np.mgrid[region]
        theta = np.arctan2(y - cy, x - cx)
        wobble = sum(weight * np.cos(k * theta + phase) for k, weight, phase in terms)
        mask[region] = np.hypot(y - cy, x - cx) < radius * (1 + wobble)
        return mask
    mask[rr, cc] = True
    return mask


def _contrasting_grey(rng: np.random.Generator, under: float) -> float:
    """A grey level at least MIN_CONTRAST away from the mean grey the object is painted over."""
    for _ in range(16):
        grey = rng.uniform(0.0, 1.0)
        if abs(grey - under) >= MIN_CONTRAST:
            return grey
    return float(np.clip(under + MIN_CONTRAST if under < 0.5 else under - MIN_CONTRAST, 0, 1))


def make_image(seed: SeedLike, size: int = 256, objects: tuple[int, int] = (4, 14), min_area: int = 12) -> ShapeImage:
    """The corpus image of `seed`: same seed, same image and masks, on any machine."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.1, 0.9) + _shading(rng, size, rng.uniform(0, 0.4)) + _texture(rng, (size, size), rng.uniform(0, 0.08))
    owner = np.full((size, size), -1, dtype=np.int32)
    count = int(rng.integers(objects[0], objects[1] + 1))
    for index in range(count):
        mask = _shape_mask(rng, KINDS[rng.integers(len(KINDS))], size)
        if not mask.any():
            continue
        grey = _contrasting_grey(rng, float(image[mask].mean()))
        # the object's own gradient and texture, kept only over its bounding box. The texture is
        # drawn over the whole image all the same: normalised there, a small object gets a smooth
        # patch of it rather than the full-amplitude noise a box-sized field would give it.
        region = find_objects(mask.view(np.uint8))[0]  # the mask's bounding box
        shading = _shading(rng, size, rng.uniform(0, 0.25), region)
        fill = grey + shading + _texture(rng, (size, size), rng.uniform(0, 0.06))[region]
        inside = mask[region]
        image[region][inside] = fill[inside]
        owner[mask] = index
    image = gaussian_filter(image, rng.uniform(0.0, 1.2))
    image = image + rng.normal(0, rng.uniform(0.0, 0.06), image.shape)
    visible = [owner == index for index in range(count)]
    instances = [mask for mask in visible if mask.sum() >= min_area]
    stacked = np.stack(instances) if instances else np.zeros((0, size, size), dtype=bool)
    return ShapeImage(np.clip(image, 0.0, 1.0).astype(np.float32), stacked)
