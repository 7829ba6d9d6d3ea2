"""Slice references, the intensity window and tile sampling over split folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xctsam.data.datasets import IntensityWindow, TileSampler, sample_slices, split_slices
from xctsam.data.volumes import write_volume
from xctsam.util.errors import InputError


@pytest.fixture
def split(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, z in enumerate((3, 5)):
        labels = rng.integers(0, 4, size=(z, 20, 20)).astype(np.uint8)
        write_volume(tmp_path / "Te-1" / f"v{i}.h5", labels.astype(np.float32) * 10 + i, labels)
    return tmp_path / "Te-1"


def test_every_slice_once_in_fixed_order(split: Path) -> None:
    refs = split_slices([split])
    assert [(ref.volume.name, ref.z) for ref in refs] == [("v0.h5", z) for z in range(3)] + [("v1.h5", z) for z in range(5)]


def test_sampling_is_seeded_and_distinct(split: Path) -> None:
    refs = split_slices([split])
    first, again, other = sample_slices(refs, 4, seed=1), sample_slices(refs, 4, seed=1), sample_slices(refs, 4, seed=2)
    assert first == again and len(set(first)) == 4 and first != other
    assert sample_slices(refs, 100, seed=0) == refs


def test_empty_split_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no volumes"):
        split_slices([tmp_path / "empty"])


def test_window_maps_percentiles_to_unit_range(split: Path) -> None:
    window = IntensityWindow.measure(split_slices([split]), percentiles=(0, 100))
    assert (window.low, window.high) == (0.0, 31.0)
    image = np.array([[-5.0, 0.0, 15.5, 31.0, 40.0]])
    np.testing.assert_allclose(window.normalise(image), [[0, 0, 0.5, 1, 1]])
    np.testing.assert_allclose(window.denormalise(window.normalise(image[:, 1:4])), image[:, 1:4])


def test_tiles_pair_images_with_their_labels(split: Path) -> None:
    window = IntensityWindow(0.0, 31.0)
    sampler = TileSampler(split_slices([split]), window, tile=8, seed=3, with_labels=True)
    images, labels = sampler.batch(6)
    assert images.shape == (6, 1, 8, 8) and labels.shape == (6, 8, 8)
    # the fixture's image is labels * 10 + volume index: a tile and its labels must agree
    residual = window.denormalise(images[:, 0]) - labels * 10
    assert np.isin(np.round(residual, 4), [0.0, 1.0]).all()


def test_tiles_resume_from_saved_rng_state(split: Path) -> None:
    window = IntensityWindow(0.0, 31.0)
    sampler = TileSampler(split_slices([split]), window, tile=8, seed=3)
    state = sampler.rng_state()
    first, _ = sampler.batch(2)
    sampler.set_rng_state(state)
    again, _ = sampler.batch(2)
    np.testing.assert_array_equal(first, again)


def test_small_slices_are_padded_to_the_tile(split: Path) -> None:
    images, _ = TileSampler(split_slices([split]), IntensityWindow(0.0, 31.0), tile=32, seed=0).batch(2)
    assert images.shape == (2, 1, 32, 32)


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from xctsam.util.atomic import atomic_dir, write_text_atomic

    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "split") as staged:
            (staged / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "split").stat().st_mode) == 0o755
