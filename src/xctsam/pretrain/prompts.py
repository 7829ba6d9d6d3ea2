"""SAM-style prompts from instance masks: jittered boxes and single positive points.

Coordinates are SAM's: (x, y) in pixels of the model's input image, boxes as
(x0, y0, x1, y1) with inclusive pixel indices (the prompt encoder adds the half-pixel shift).
As in SAM's training, a box's corners move by Gaussian noise of std `jitter` x the box side,
at most 20 pixels, and a point is drawn uniformly from the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label as connected_components
from skimage.measure import regionprops

MAX_JITTER_PX = 20.0


@dataclass(frozen=True)
class Prompts:
    """Boxes for instances `box_of`, points for instances `point_of` (indices into the masks)."""

    boxes: np.ndarray  # (Nb, 4) float32 x0, y0, x1, y1
    box_of: np.ndarray  # (Nb,) int
    points: np.ndarray  # (Np, 2) float32 x, y
    point_of: np.ndarray  # (Np,) int

    @property
    def targets(self) -> np.ndarray:
        """Instance index of each prompt, boxes first: the order the decoder outputs follow."""
        return np.concatenate([self.box_of, self.point_of])


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) of a non-empty bool mask, inclusive pixel indices."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def jitter_box(box: np.ndarray, jitter: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Each coordinate moved by N(0, jitter x side), clipped to 20 px and to the image; kept ordered."""
    sides = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, dtype=np.float32)
    noise = np.clip(rng.normal(0.0, 1.0, 4) * jitter * sides, -MAX_JITTER_PX, MAX_JITTER_PX)
    moved = np.clip(box + noise, 0, size - 1)
    x0, x1 = sorted((moved[0], moved[2]))
    y0, y1 = sorted((moved[1], moved[3]))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def mask_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn pixel of the mask, as (x, y)."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(ys.size)
    return np.array([xs[pick], ys[pick]], dtype=np.float32)


def sample_prompts(instances: np.ndarray, count: int, box_share: float, jitter: float, rng: np.random.Generator) -> Prompts:
    """Up to `count` distinct instances, each prompted by a jittered box (share `box_share`) or a point."""
    chosen = rng.permutation(len(instances))[:count]
    is_box = rng.random(chosen.size) < box_share
    size = instances.shape[-1]
    box_of, point_of = chosen[is_box], chosen[~is_box]
    boxes = [jitter_box(mask_box(instances[i]), jitter, size, rng) for i in box_of]
    points = [mask_point(instances[i], rng) for i in point_of]
    return Prompts(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        box_of.astype(np.int64),
        np.asarray(points, dtype=np.float32).reshape(-1, 2),
        point_of.astype(np.int64),
    )


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """(N, 4) exact boxes, one per 8-connected component of a bool mask (the study's zero-shot prompts)."""
    regions = regionprops(connected_components(mask, connectivity=2))
    # regionprops' bbox is (min_row, min_col, max_row, max_col) with exclusive maxima
    boxes = [(c0, r0, c1 - 1, r1 - 1) for r0, c0, r1, c1 in (region.bbox for region in regions)]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
