"""Labelled 2.5D training tiles: native-resolution crops, oversampling pores and inclusions.

Each sample is `context` adjacent slices (z - k .. z + k, k = context // 2) cropped at one
random position, normalised by the model's `IntensityWindow`, with the centre slice's labels.
Tiles are crops at the scan's own resolution, never downsampled whole slices: pores are a few
pixels wide and vanish when a 512-pixel slice is shrunk.

Volume edges are reflected the numpy 'reflect' way (the edge slice is not repeated):
z = -1 reads slice 1, z = -2 slice 2, z = n reads n - 2; shorter volumes than the context
reflect back and forth. Slices smaller than the tile are reflect-padded at their far edges.

Pores (~1.5% of training voxels) and inclusions (~0.04%) are rare, so with probability
`oversample` a tile is placed to contain a defect voxel: the defect class is first chosen
with equal probability among pore and inclusion (those present), then one of that class's
voxels uniformly, then a tile position containing it uniformly. Choosing the class first
matters: inclusions are ~40x rarer than pores, so a voxel drawn uniformly among all defects
would be an inclusion in only ~2.5% of oversampled tiles. The defect voxels' coordinates are
indexed once, reading labels slab by slab and keeping only (slice id, y, x) of defects.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xctsam.data.datasets import IntensityWindow, SliceReader, SliceRef
from xctsam.data.split_folders import split_volumes
from xctsam.data.volumes import Volume
from xctsam.util.errors import InputError
from xctsam.util.progress import track

DEFECT_CLASSES = (2, 3)  # pore, inclusion
_LABEL_SLAB = 32  # slices per label read while indexing defects


# ---------------------------------------------------------------- reading 2.5D context
def context_indices(z: int, n_slices: int, context: int) -> np.ndarray:
    """Slice indices z - k .. z + k (k = context // 2), reflected at the volume's ends."""
    half = context // 2
    return np.pad(np.arange(n_slices), half, mode="reflect")[z : z + 2 * half + 1]


class ContextReader(SliceReader):
    """A SliceReader that also reads a slice with its reflected neighbours in one HDF5 call."""

    def shape(self, path: Path) -> tuple[int, int, int]:
        return self._volume(path).shape

    def context(self, ref: SliceRef, context: int) -> np.ndarray:
        """Raw grey values (context, H, W) centred on `ref`."""
        indices = context_indices(ref.z, self.shape(ref.volume)[0], context)
        low, high = int(indices.min()), int(indices.max()) + 1
        return self._volume(ref.volume).image(low, high)[indices - low]


def read_context(reader: ContextReader, ref: SliceRef, context: int) -> np.ndarray:
    """A whole 2.5D slice (context, H, W) in raw grey values (normalise with the model's window)."""
    return reader.context(ref, context)


# ---------------------------------------------------------------- validation hold-out
def volume_refs(path: Path) -> list[SliceRef]:
    """Every slice of a labelled volume, its labels checked once here: a value outside 0..3 is
    refused when the data is loaded, not as an IndexError in the loss after some steps."""
    with Volume(path) as volume:
        if not volume.has_labels:
            raise InputError(path, "volume has no labels", "train and validate on labelled splits only")
        volume.validate_labels()
        return [SliceRef(path, z) for z in range(volume.n_slices)]


def validation_slices(split_dirs: Iterable[Path], val_volumes: int) -> tuple[list[SliceRef], list[SliceRef]]:
    """(train refs, validation refs): the last `val_volumes` volumes (file-name order) of each
    training split folder are held out whole, so validation never shares a volume with
    training; test splits (Te-*) are refused, so validation is never drawn from them.
    """
    train: list[SliceRef] = []
    val: list[SliceRef] = []
    for split_dir in map(Path, split_dirs):
        if split_dir.name.startswith("Te"):
            raise InputError(split_dir, "a test split cannot be trained or validated on", "train on Tr-* splits only")
        volumes = split_volumes(split_dir)
        if len(volumes) <= val_volumes:
            raise InputError(
                split_dir,
                f"{len(volumes)} volume(s): holding out {val_volumes} for validation leaves none to train on",
                "add volumes to the split or lower train.<model>.val_volumes",
            )
        for path in volumes[:-val_volumes]:
            train.extend(volume_refs(path))
        for path in volumes[-val_volumes:]:
            val.extend(volume_refs(path))
    return train, val


# ---------------------------------------------------------------- defect index
@dataclass(frozen=True)
class DefectVoxels:
    """Coordinates of one defect class's voxels: which eligible slice, and where in it."""

    slice_ids: np.ndarray  # (N,) int32 index into the refs
    yx: np.ndarray  # (N, 2) int16 (int32 for slices over 32767 pixels)

    def __len__(self) -> int:
        return len(self.slice_ids)


def _refs_by_volume(refs: Sequence[SliceRef]) -> dict[Path, dict[int, int]]:
    """volume -> {z: index in refs}."""
    by_volume: dict[Path, dict[int, int]] = defaultdict(dict)
    for index, ref in enumerate(refs):
        by_volume[ref.volume][ref.z] = index
    return by_volume


def index_defects(refs: Sequence[SliceRef], classes: Sequence[int] = DEFECT_CLASSES) -> dict[int, DefectVoxels]:
    """Defect voxel coordinates per class over the slices `refs`, labels read slab by slab."""
    found: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {label: [] for label in classes}
    by_volume = _refs_by_volume(refs)
    for path, ref_index in track(by_volume.items(), "indexing defects", total=len(by_volume)):
        with Volume(path) as volume:
            # int16 halves the index of a real split (millions of pore voxels) where it fits
            coordinate_type = np.int16 if max(volume.shape[1:]) <= np.iinfo(np.int16).max else np.int32
            wanted = sorted(ref_index)
            for z0 in range(wanted[0], wanted[-1] + 1, _LABEL_SLAB):
                slab = volume.labels(z0, min(z0 + _LABEL_SLAB, wanted[-1] + 1))
                # -1 marks slices of the slab that are not eligible centres
                slab_ids = np.array([ref_index.get(z, -1) for z in range(z0, z0 + slab.shape[0])], dtype=np.int32)
                for label in classes:
                    dz, y, x = np.nonzero(slab == label)
                    ids = slab_ids[dz]
                    keep = ids >= 0
                    found[label].append((ids[keep], np.stack([y[keep], x[keep]], axis=1).astype(coordinate_type)))
    return {label: _concatenate(parts) for label, parts in found.items()}


def _concatenate(parts: list[tuple[np.ndarray, np.ndarray]]) -> DefectVoxels:
    if not parts:
        return DefectVoxels(np.zeros(0, np.int32), np.zeros((0, 2), np.int16))
    return DefectVoxels(np.concatenate([ids for ids, _ in parts]), np.concatenate([yx for _, yx in parts]))


# ---------------------------------------------------------------- tiles
def _pad_to(array: np.ndarray, tile: int) -> np.ndarray:
    """Reflect-pad the last two axes at their far ends up to `tile` (no-op when large enough)."""
    pad = [(0, 0)] * (array.ndim - 2) + [(0, max(0, tile - size)) for size in array.shape[-2:]]
    return np.pad(array, pad, mode="reflect") if any(after for _, after in pad) else array


class SegmentationTiles:
    """Seeded, resumable random 2.5D tiles with labels, oversampling pores and inclusions, with
    `noise` > 0 each tile given Gaussian noise of a random std up to it.

    `refs` are the slices eligible as tile centres (their neighbours are read whatever they
    are). With no defect voxel in those slices every tile is uniform, whatever `oversample`.
    """

    def __init__(self, refs: Sequence[SliceRef], window: IntensityWindow, tile: int, context: int, oversample: float, seed: int, noise: float = 0.0) -> None:
        if not refs:
            raise ValueError("no slices to sample tiles from")
        if not 0 <= oversample <= 1:
            raise ValueError(f"oversample must be a probability, got {oversample}")
        self.refs = list(refs)
        self.window = window
        self.tile = tile
        self.context = context
        self.oversample = oversample
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.reader = ContextReader()
        self.defects = {label: voxels for label, voxels in index_defects(self.refs).items() if len(voxels)}

    def _defect_tile(self) -> tuple[int, int, int]:
        """(ref index, y, x) of a tile containing a defect voxel of a randomly chosen class."""
        labels = sorted(self.defects)
        voxels = self.defects[labels[int(self.rng.integers(len(labels)))]]
        pick = int(self.rng.integers(len(voxels)))
        ref_index = int(voxels.slice_ids[pick])
        y, x = (int(v) for v in voxels.yx[pick])
        height, width = self._slice_shape(ref_index)
        return ref_index, self._start_containing(y, height), self._start_containing(x, width)

    def _uniform_tile(self) -> tuple[int, int, int]:
        ref_index = int(self.rng.integers(len(self.refs)))
        height, width = self._slice_shape(ref_index)
        return ref_index, self._start_containing(None, height), self._start_containing(None, width)

    def _start_containing(self, position: int | None, size: int) -> int:
        """A tile start along one axis of `size` pixels (padded up to the tile), uniform among
        those whose tile covers `position`, or among all when `position` is None."""
        last = max(size, self.tile) - self.tile
        if position is None:
            return int(self.rng.integers(last + 1))
        return int(self.rng.integers(max(0, position - self.tile + 1), min(position, last) + 1))

    def _slice_shape(self, ref_index: int) -> tuple[int, int]:
        _, height, width = self.reader.shape(self.refs[ref_index].volume)
        return height, width

    def _read(self, ref_index: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        ref = self.refs[ref_index]
        window = (slice(y, y + self.tile), slice(x, x + self.tile))
        image = _pad_to(self.reader.context(ref, self.context), self.tile)[(slice(None), *window)]
        labels = _pad_to(self.reader.labels(ref), self.tile)[window]
        return self.window.for_volume(ref.volume).normalise(image), labels

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, context, tile, tile) float32 in [0, 1], labels (n, tile, tile) uint8)."""
        images, labels = [], []
        for _ in range(n):
            wants_defect = self.rng.random() < self.oversample
            place = self._defect_tile() if wants_defect and self.defects else self._uniform_tile()
            image, label = self._read(*place)
            if self.noise:
                image = self._noisy(image)
            images.append(image)
            labels.append(label)
        return np.stack(images).astype(np.float32, copy=False), np.stack(labels)

    def _noisy(self, image: np.ndarray) -> np.ndarray:
        """The tile plus Gaussian noise of a std drawn uniformly from [0, noise] (window units):
        real scans are noisier than the clean or GAN-made slices models train on."""
        std = self.rng.uniform(0.0, self.noise)
        return np.clip(image + std * self.rng.standard_normal(image.shape, dtype=np.float32), 0.0, 1.0)

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> SegmentationTiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
