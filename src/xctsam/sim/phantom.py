"""3-D label phantoms of additively manufactured (AM) metal test coupons.

A phantom is a uint8 (Z, Y, X) label volume: 0 background, 1 material, 2 pore, 3 inclusion
(labels.py). It takes two draws from one generator: the specimen, a coupon's material
(specimen.py), then its defects, which replace core material only (defect_placement.py, in
the shapes of defect_shapes.py).
"""

from __future__ import annotations

import numpy as np

from xctsam.config.data import DefectRecipe, PhantomGeometry
from xctsam.sim.defect_placement import add_defects
from xctsam.sim.labels import INCLUSION, MATERIAL, PORE
from xctsam.sim.specimen import make_specimen


def make_phantom(
    geometry: PhantomGeometry, recipe: DefectRecipe, rng: np.random.Generator
) -> np.ndarray:
    """uint8 (Z, Y, X) labels: 0 background, 1 material, 2 pore, 3 inclusion.

    Deterministic for a given generator state. Each population's measured share of the
    specimen (labels > 0) meets its `fraction` to within a few percent when the specimen has
    room for it; a fraction of 0 yields no voxel of that population.
    """
    return add_defects(make_specimen(geometry, rng), recipe, rng)


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
