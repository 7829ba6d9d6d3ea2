"""Defects placed in a specimen's core, population by population, up to a share of its volume.

Defects replace only *core* material (specimen voxels none of whose 26 neighbours is
background), so no defect ever touches air or pokes out of the specimen, and defects never
overlap one another.

Each population is added batch by batch until its measured voxel count reaches its target
share of the specimen volume. A batch is vectorised: radii and shapes are drawn at once,
centres are drawn among the spots with room for each defect (a distance map of the core in the
population's own metric, defect_shapes), and all candidates are stamped at once on small local
boxes. The last defects are shrunk to the remaining budget, so each population ends between
its target and 5 % above it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xctsam.config.data import DefectPopulation, DefectRecipe
from xctsam.sim.defect_shapes import DefectShape, Shape, shape_for
from xctsam.sim.labels import INCLUSION, MATERIAL, PORE

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
# warnings name the caller of make_phantom: _place_population < add_defects < make_phantom
_WARN_CALLER = 4


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


def _room_map_in_core_box(shape_family: DefectShape, core: np.ndarray) -> np.ndarray:
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
    population: DefectPopulation, shape_family: DefectShape, rng: np.random.Generator
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
    shape_family: DefectShape,
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


def _box_half(shape_family: DefectShape, candidates: _Candidates) -> np.ndarray:
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
    shape_family: DefectShape,
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
    shape_family: DefectShape,
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
    shape_family: DefectShape,
    label: int,
    target: int,
    room: _Room,
    rng: np.random.Generator,
) -> int:
    """Add defects of one population until `target` voxels are reached; returns the count."""
    if room.free.size == 0:
        warnings.warn(
            f"phantom: no room for {name} defects (specimen too thin)", stacklevel=_WARN_CALLER
        )
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
        stacklevel=_WARN_CALLER,
    )
    return placed


def add_defects(specimen: np.ndarray, recipe: DefectRecipe, rng: np.random.Generator) -> np.ndarray:
    """uint8 labels of `specimen` (a boolean mask) with the recipe's defects in its core.

    Each population's measured share of the specimen meets its `fraction` to within a few
    percent when the specimen has room for it; a fraction of 0 yields no voxel of it.
    """
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
        shape_family = shape_for(name, population)
        key = shape_family.room_key()
        if key not in rooms:
            rooms[key] = _room(_room_map_in_core_box(shape_family, core))
        _place_population(labels, name, population, shape_family, label, target, rooms[key], rng)
    labels[shell] = MATERIAL
    return labels
