"""2-D slices and tiles drawn from split folders, and the intensity window that normalises them.

Volumes keep their physical (or scanner) grey values; models see values normalised by an
`IntensityWindow` measured on their training data and stored with the model, so the same
mapping is applied at inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from xctsam.data.split_folders import split_volumes
from xctsam.data.volumes import Volume
from xctsam.util.errors import InputError


@dataclass(frozen=True)
class SliceRef:
    volume: Path
    z: int


def split_slices(split_dirs: Iterable[Path]) -> list[SliceRef]:
    """Every slice of every volume of the given split folders, in a fixed order."""
    refs: list[SliceRef] = []
    for split_dir in split_dirs:
        volumes = split_volumes(Path(split_dir))
        if not volumes:
            raise InputError(split_dir, "no volumes (*.h5) in this split folder", "run the stage that makes it (dvc repro)")
        refs.extend(volume_slices(volumes))
    return refs


def volume_slices(volumes: Iterable[Path]) -> list[SliceRef]:
    """Every slice of these volume files, in order."""
    refs: list[SliceRef] = []
    for path in volumes:
        with Volume(path) as volume:
            refs.extend(SliceRef(path, z) for z in range(volume.n_slices))
    return refs


def sample_slices(refs: Sequence[SliceRef], n: int, seed: int) -> list[SliceRef]:
    """`n` distinct slices (all if fewer), the same ones for the same seed on every run."""
    if n >= len(refs):
        return list(refs)
    chosen = np.random.default_rng(seed).choice(len(refs), size=n, replace=False)
    return [refs[i] for i in sorted(chosen)]


class SliceReader:
    """Reads slices by reference, keeping volume files open between reads."""

    def __init__(self) -> None:
        self._open: dict[Path, Volume] = {}

    def _volume(self, path: Path) -> Volume:
        if path not in self._open:
            self._open[path] = Volume(path)
        return self._open[path]

    def shape(self, path: Path) -> tuple[int, int, int]:
        return self._volume(path).shape

    def image(self, ref: SliceRef) -> np.ndarray:
        return self._volume(ref.volume).image(ref.z, ref.z + 1)[0]

    def labels(self, ref: SliceRef) -> np.ndarray:
        return self._volume(ref.volume).labels(ref.z, ref.z + 1)[0]

    def close(self) -> None:
        for volume in self._open.values():
            volume.close()
        self._open.clear()

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class IntensityWindow:
    """Maps grey values [low, high] linearly onto [0, 1] (clipped)."""

    low: float
    high: float

    def normalise(self, image: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(image, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-12)
        return np.clip(scaled, 0.0, 1.0)

    def denormalise(self, unit: np.ndarray) -> np.ndarray:
        return (np.asarray(unit, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def measure(cls, refs: Sequence[SliceRef], percentiles: tuple[float, float] = (0.5, 99.5), max_slices: int = 64, seed: int = 0) -> IntensityWindow:
        """Robust window from percentiles of a seeded sample of slices."""
        with SliceReader() as reader:
            values = np.concatenate([reader.image(ref).ravel() for ref in sample_slices(refs, max_slices, seed)])
        low, high = np.percentile(values, percentiles)
        if not high > low:
            high = low + 1.0  # a constant image: any window maps it to one value
        return cls(float(low), float(high))


class TileSampler:
    """Random square tiles (native resolution crops) of normalised slices, seeded.

    A slice smaller than the tile is reflect-padded, so small test volumes still work.
    """

    def __init__(self, refs: Sequence[SliceRef], window: IntensityWindow, tile: int, seed: int, with_labels: bool = False) -> None:
        if not refs:
            raise ValueError("no slices to sample tiles from")
        self.refs = list(refs)
        self.window = window
        self.tile = tile
        self.with_labels = with_labels
        self.rng = np.random.default_rng(seed)

    @cached_property
    def _reader(self) -> SliceReader:
        return SliceReader()

    def _crop(self, array: np.ndarray, y: int, x: int, mode: str) -> np.ndarray:
        pad = [(0, max(0, self.tile - size)) for size in array.shape]
        array = np.pad(array, pad, mode=mode) if any(p[1] for p in pad) else array
        return array[y : y + self.tile, x : x + self.tile]

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(size, 1, tile, tile) float32 in [0, 1], and labels (size, tile, tile) if asked."""
        images, labels = [], []
        for index in self.rng.integers(len(self.refs), size=size):
            ref = self.refs[index]
            image = self._reader.image(ref)
            y = int(self.rng.integers(max(1, image.shape[0] - self.tile + 1)))
            x = int(self.rng.integers(max(1, image.shape[1] - self.tile + 1)))
            images.append(self._crop(self.window.normalise(image), y, x, "reflect"))
            if self.with_labels:
                labels.append(self._crop(self._reader.labels(ref), y, x, "reflect"))
        stacked = np.stack(images)[:, None].astype(np.float32)
        return stacked, (np.stack(labels) if self.with_labels else None)

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
