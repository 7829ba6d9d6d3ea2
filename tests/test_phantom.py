"""Label phantoms: determinism, geometry, defect fractions and defect shapes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from xctsam.config.data import DefectRecipe, PhantomGeometry
from xctsam.sim.phantom import defect_fractions, make_phantom
from xctsam.sim.specimen import make_specimen, specimen_radius_voxels

CUBE = PhantomGeometry(shape=(64, 64, 64))
SMALL = PhantomGeometry(shape=(24, 48, 48))
MIXED = DefectRecipe.model_validate(
    {
        "gas_pore": {"fraction": 0.01},
        "lack_of_fusion": {"fraction": 0.01, "radius": {"median": 3.0}, "thickness": 1.5},
        "keyhole": {"fraction": 0.005, "radius": {"median": 1.5}},
        "inclusion": {"fraction": 0.003},
    }
)
RECIPES = {
    "pore-rich": MIXED.model_copy(
        update={"gas_pore": MIXED.gas_pore.model_copy(update={"fraction": 0.03})}
    ),
    "inclusion-rich": DefectRecipe.model_validate(
        {"gas_pore": {"fraction": 0.002}, "inclusion": {"fraction": 0.01}}
    ),
    "no-inclusion": MIXED.model_copy(
        update={"inclusion": MIXED.inclusion.model_copy(update={"fraction": 0.0})}
    ),
    "no-pore": DefectRecipe.model_validate({"inclusion": {"fraction": 0.0005}}),
}


@pytest.fixture(params=["solid", "lattice"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force one kind of specimen, so both are exercised whatever the seed draws."""
    lattice = 1.0 if request.param == "lattice" else 0.0
    monkeypatch.setattr("xctsam.sim.specimen.LATTICE_PROBABILITY", lattice)
    return request.param


def _radius_map(shape: tuple[int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    return np.hypot(yy - (shape[1] - 1) / 2, xx - (shape[2] - 1) / 2)


def _component_extents(mask: np.ndarray) -> np.ndarray:
    """(N, 3) bounding-box sizes along z, y, x of the mask's connected components."""
    components, _ = ndimage.label(mask)
    boxes = ndimage.find_objects(components)
    return np.array([[s.stop - s.start for s in box] for box in boxes])


def test_same_seed_same_volume_other_seed_other_volume() -> None:
    first = make_phantom(SMALL, MIXED, np.random.default_rng(7))
    again = make_phantom(SMALL, MIXED, np.random.default_rng(7))
    other = make_phantom(SMALL, MIXED, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_labels_are_uint8_volume_of_four_classes(mode: str) -> None:
    labels = make_phantom(CUBE, MIXED, np.random.default_rng(1))
    assert labels.dtype == np.uint8
    assert labels.shape == CUBE.shape
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", [0, 1])
def test_background_outside_the_specimen_cylinder(mode: str, seed: int) -> None:
    labels = make_phantom(CUBE, MIXED, np.random.default_rng(seed))
    outside = _radius_map(CUBE.shape) > specimen_radius_voxels(CUBE.shape, CUBE) + 0.5
    assert outside.any()
    assert not labels[:, outside].any()
    # the specimen is well inside the field of view: the whole rim of every slice is air
    assert not labels[:, [0, -1], :].any() and not labels[:, :, [0, -1]].any()
    assert (labels == 1).mean() > 0.02


def test_defects_replace_material_only(mode: str) -> None:
    labels = make_phantom(CUBE, MIXED, np.random.default_rng(3))
    specimen = make_specimen(CUBE, np.random.default_rng(3))  # the phantom's first draw
    np.testing.assert_array_equal(labels > 0, specimen)


@pytest.mark.parametrize("name", list(RECIPES))
def test_fractions_meet_targets_within_20_percent(mode: str, name: str) -> None:
    recipe = RECIPES[name]
    labels = make_phantom(CUBE, recipe, np.random.default_rng(11))
    measured = defect_fractions(labels)
    for key, target in (("pore", recipe.pore_fraction), ("inclusion", recipe.inclusion.fraction)):
        if target == 0:
            assert measured[key] == 0.0
        else:
            assert measured[key] == pytest.approx(target, rel=0.2), key


def test_defects_never_touch_background(mode: str) -> None:
    labels = make_phantom(CUBE, RECIPES["pore-rich"], np.random.default_rng(5))
    defects = labels >= 2
    assert defects.any()
    reach = ndimage.binary_dilation(defects, structure=np.ones((3, 3, 3), dtype=bool))
    assert not (reach & (labels == 0)).any()


def test_lack_of_fusion_pores_are_flat_in_z() -> None:
    recipe = DefectRecipe.model_validate(
        {"lack_of_fusion": {"fraction": 0.01, "radius": {"median": 4.0}, "thickness": 1.5}}
    )
    labels = make_phantom(CUBE, recipe, np.random.default_rng(2))
    extents = _component_extents(labels == 2)
    height, width = extents[:, 0], extents[:, 1:].max(axis=1)
    assert len(extents) >= 5
    assert np.median(height) <= 3
    assert np.median(width) >= 2 * np.median(height)
    assert (height < width).mean() > 0.8


def test_keyhole_pores_are_taller_than_wide() -> None:
    recipe = DefectRecipe.model_validate(
        {"keyhole": {"fraction": 0.01, "radius": {"median": 2.0}, "elongation": 2.5}}
    )
    labels = make_phantom(CUBE, recipe, np.random.default_rng(2))
    extents = _component_extents(labels == 2)
    height, width = extents[:, 0], extents[:, 1:].max(axis=1)
    assert len(extents) >= 5
    assert np.median(height) > 1.5 * np.median(width)


def test_defect_fractions_counts_against_the_specimen() -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=(6, 7, 8)).astype(np.uint8)
    specimen = np.count_nonzero(labels)
    fractions = defect_fractions(labels)
    assert fractions["pore"] == pytest.approx(np.count_nonzero(labels == 2) / specimen)
    assert fractions["inclusion"] == pytest.approx(np.count_nonzero(labels == 3) / specimen)
    assert defect_fractions(np.zeros((2, 3, 3), np.uint8)) == {"pore": 0.0, "inclusion": 0.0}


def test_specimen_without_room_warns_and_places_nothing() -> None:
    # a rod 3 voxels across: no voxel of it is clear of the background on all sides
    thin = PhantomGeometry(shape=(8, 16, 16), specimen_radius=0.2)
    with pytest.warns(UserWarning, match="no room"):
        labels = make_phantom(thin, RECIPES["pore-rich"], np.random.default_rng(0))
    assert (labels == 1).any()
    assert not (labels >= 2).any()
