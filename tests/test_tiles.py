"""2.5D training tiles: alignment of context and labels, edge reflection, oversampling, resume,
and the validation hold-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xctsam.data.datasets import IntensityWindow, SliceRef, split_slices
from xctsam.data.tiles import (
    ContextReader,
    SegmentationTiles,
    context_indices,
    read_context,
    validation_slices,
)
from xctsam.data.volumes import write_volume
from xctsam.util.errors import InputError

SHAPES = ((6, 30, 30), (4, 24, 28))  # two volumes of one split
TOTAL = sum(int(np.prod(shape)) for shape in SHAPES)
IDENTITY = IntensityWindow(0.0, 1.0)


def encoded_image(shape: tuple[int, int, int], offset: int) -> np.ndarray:
    """Every voxel's grey value is its global index / TOTAL: a tile tells where it came from."""
    return ((offset + np.arange(int(np.prod(shape)))).reshape(shape) / TOTAL).astype(np.float32)


def sparse_labels(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    labels = (rng.random(shape) < 0.4).astype(np.uint8)  # material
    for z in range(shape[0]):
        y, x = rng.integers(0, np.array(shape[1:]) - 2)
        labels[z, y : y + 2, x : x + 2] = 2  # one 2x2 pore per slice
    labels[shape[0] // 2, 3, 5] = 3  # a single inclusion voxel per volume
    return labels


@pytest.fixture
def volumes(tmp_path: Path) -> dict[Path, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    made, offset = {}, 0
    for index, shape in enumerate(SHAPES):
        image, labels = encoded_image(shape, offset), sparse_labels(shape, rng)
        path = tmp_path / "Tr-x" / f"v{index}.h5"
        write_volume(path, image, labels)
        made[path] = (image, labels)
        offset += image.size
    return made


def locate(value: float, volumes: dict[Path, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, int, int, int]:
    """(volume, z, y, x) of the voxel whose encoded grey value is `value`."""
    index = int(round(float(value) * TOTAL))
    for path, (image, _) in volumes.items():
        if index < image.size:
            return (path, *(int(i) for i in np.unravel_index(index, image.shape)))
        index -= image.size
    raise AssertionError(f"grey value {value} is no voxel")


def test_context_indices_reflect_like_numpy() -> None:
    assert context_indices(0, 6, 5).tolist() == [2, 1, 0, 1, 2]
    assert context_indices(5, 6, 5).tolist() == [3, 4, 5, 4, 3]
    assert context_indices(3, 6, 3).tolist() == [2, 3, 4]
    assert context_indices(0, 2, 5).tolist() == [0, 1, 0, 1, 0]
    assert context_indices(0, 1, 3).tolist() == [0, 0, 0]


def test_tiles_carry_their_context_and_centre_labels(volumes) -> None:
    refs = split_slices([next(iter(volumes)).parent])
    tiles = SegmentationTiles(refs, IDENTITY, tile=8, context=5, oversample=0.5, seed=1)
    images, labels = tiles.batch(12)
    assert images.shape == (12, 5, 8, 8) and images.dtype == np.float32
    assert labels.shape == (12, 8, 8)
    for image, label in zip(images, labels):
        path, z, y, x = locate(image[2, 0, 0], volumes)
        volume_image, volume_labels = volumes[path]
        expected = volume_image[context_indices(z, len(volume_image), 5), y : y + 8, x : x + 8]
        np.testing.assert_array_equal(image, expected)
        np.testing.assert_array_equal(label, volume_labels[z, y : y + 8, x : x + 8])


def test_values_are_windowed_into_unit_range(volumes) -> None:
    refs = split_slices([next(iter(volumes)).parent])
    images, _ = SegmentationTiles(refs, IntensityWindow(0.2, 0.6), tile=8, context=3, oversample=0.0, seed=2).batch(20)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert (images == 0).any() and (images == 1).any()  # the window clips both ends here


@pytest.mark.parametrize("z", [0, 5])
def test_edges_are_reflected(volumes, z: int) -> None:
    path = next(iter(volumes))
    tiles = SegmentationTiles([SliceRef(path, z)], IDENTITY, tile=8, context=5, oversample=0.0, seed=3)
    images, _ = tiles.batch(3)
    slices = [[locate(channel[0, 0], volumes)[1] for channel in image] for image in images]
    expected = [2, 1, 0, 1, 2] if z == 0 else [3, 4, 5, 4, 3]
    assert slices == [expected] * 3


def test_slices_smaller_than_the_tile_are_reflect_padded(volumes) -> None:
    path = next(iter(volumes))
    image, labels = volumes[path]
    tiles, tile_labels = SegmentationTiles([SliceRef(path, 1)], IDENTITY, tile=40, context=1, oversample=0.0, seed=4).batch(1)
    expected = np.pad(image[1], ((0, 10), (0, 10)), mode="reflect")
    np.testing.assert_array_equal(tiles[0, 0], expected)
    np.testing.assert_array_equal(tile_labels[0], np.pad(labels[1], ((0, 10), (0, 10)), mode="reflect"))


def test_full_oversampling_puts_a_defect_in_every_tile_and_balances_classes(volumes) -> None:
    refs = split_slices([next(iter(volumes)).parent])
    _, labels = SegmentationTiles(refs, IDENTITY, tile=6, context=3, oversample=1.0, seed=5).batch(300)
    assert all(np.isin(label, (2, 3)).any() for label in labels)
    # inclusions are 2 voxels against 40 pore voxels, yet chosen for about half the tiles
    with_inclusion = np.mean([(label == 3).any() for label in labels])
    assert 0.4 < with_inclusion < 0.65


def test_no_oversampling_matches_uniform_tiles(volumes) -> None:
    """Frequency of tiles holding a defect vs the exact share over every slice and position."""
    tile = 6
    refs = split_slices([next(iter(volumes)).parent])
    exact = []
    for ref in refs:
        defect = np.isin(volumes[ref.volume][1][ref.z], (2, 3))
        windows = np.lib.stride_tricks.sliding_window_view(defect, (tile, tile))
        exact.append(windows.any(axis=(2, 3)).mean())
    expected = float(np.mean(exact))
    _, labels = SegmentationTiles(refs, IDENTITY, tile=tile, context=3, oversample=0.0, seed=6).batch(1500)
    observed = np.mean([np.isin(label, (2, 3)).any() for label in labels])
    assert observed == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / 1500))


def test_sampling_is_seeded_and_resumable(volumes) -> None:
    refs = split_slices([next(iter(volumes)).parent])

    def make(seed: int) -> SegmentationTiles:
        return SegmentationTiles(refs, IDENTITY, tile=8, context=3, oversample=0.5, seed=seed)

    first, again, other = make(7).batch(6), make(7).batch(6), make(8).batch(6)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    tiles = make(9)
    tiles.batch(3)
    state = tiles.rng_state()
    expected = tiles.batch(4)
    resumed = make(10)
    resumed.set_rng_state(state)
    np.testing.assert_array_equal(resumed.batch(4)[0], expected[0])


def test_whole_context_slice_for_validation(volumes) -> None:
    path = list(volumes)[1]
    image = volumes[path][0]
    with ContextReader() as reader:
        stack = read_context(reader, SliceRef(path, 3), 3)
    np.testing.assert_array_equal(stack, image[[2, 3, 2]])


def test_validation_holds_out_the_last_volumes_of_each_split(tmp_path: Path) -> None:
    for split, count in (("Tr-a", 3), ("Tr-b", 2)):
        for index in range(count):
            write_volume(tmp_path / split / f"v{index}.h5", np.zeros((index + 2, 4, 4), np.float32), np.zeros((index + 2, 4, 4), np.uint8))
    train, val = validation_slices([tmp_path / "Tr-a", tmp_path / "Tr-b"], val_volumes=1)
    assert {(ref.volume.parent.name, ref.volume.name) for ref in val} == {("Tr-a", "v2.h5"), ("Tr-b", "v1.h5")}
    assert sorted({(ref.volume.parent.name, ref.volume.name) for ref in train}) == [("Tr-a", "v0.h5"), ("Tr-a", "v1.h5"), ("Tr-b", "v0.h5")]
    assert len(val) == 4 + 3 and len(train) == 2 + 3 + 2  # every slice of each volume
    assert not set(train) & set(val)
    with pytest.raises(InputError, match="leaves none to train on"):
        validation_slices([tmp_path / "Tr-b"], val_volumes=2)
    (tmp_path / "Te-1").mkdir()
    with pytest.raises(InputError, match="test split"):
        validation_slices([tmp_path / "Te-1"], val_volumes=1)


def test_oversampled_centres_stay_within_the_given_slices(volumes) -> None:
    path = next(iter(volumes))
    refs = [SliceRef(path, 1), SliceRef(path, 3)]
    with SegmentationTiles(refs, IDENTITY, tile=6, context=3, oversample=1.0, seed=11) as tiles:
        images, labels = tiles.batch(40)
    assert {locate(image[1, 0, 0], volumes)[1] for image in images} == {1, 3}
    assert all(np.isin(label, (2, 3)).any() for label in labels)


def test_noise_augmentation_is_seeded_bounded_and_off_by_default(volumes) -> None:
    refs = split_slices([next(iter(volumes)).parent])
    window = IntensityWindow(0.0, 2.0)  # the fixture's grey values land inside [0, 1]

    def batch(noise: float, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
        return SegmentationTiles(refs, window, tile=8, context=3, oversample=0.5, seed=seed, noise=noise).batch(16)

    clean, labels = batch(0.0)
    noisy, noisy_labels = batch(0.2)
    again, _ = batch(0.2)
    np.testing.assert_array_equal(noisy, again)  # seeded: a resumed training sees the same tiles
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0
    # the same places drawn (noise comes after the tile's place), values moved by up to ~0.2 std
    np.testing.assert_array_equal(noisy_labels[0], labels[0])
    residual = (noisy[0] - clean[0]).std()
    assert 0.0 < residual < 0.25
    # noise 0 draws nothing extra: tiles as they were before the option existed
    np.testing.assert_array_equal(clean, SegmentationTiles(refs, window, tile=8, context=3, oversample=0.5, seed=4).batch(16)[0])
