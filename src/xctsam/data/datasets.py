"""2-D slices and tiles drawn from split folders, and the intensity window that normalises them.

Volumes keep their physical (or scanner) grey values; models see values normalised by an
`IntensityWindow` measured on their training data and stored with the model, so the same
mapping is applied at inference. With `peaks` set, each volume is first matched to the training
data by its own background and material grey levels (`IntensityWindow.for_volume`): a scan from
another scanner, alloy or export (the release's Te-5 sits at grey 104 / 158 where training sits
at 23 / 39) then reaches the model at the grey levels it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from skimage.filters import threshold_otsu

from xctsam.data.split_folders import split_volumes
from xctsam.data.volumes import Volume
from xctsam.util.errors import InputError

if TYPE_CHECKING:
    from xctsam.data.scans import GreySource


class InvalidWindow(ValueError):
    """A stored intensity window that cannot normalise anything; its loader names the file."""


def _finite_number(value: Any, name: str) -> float:
    # bool is an int to Python, but a window of True/False is a broken file, not a grey value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidWindow(f"has {name} {value!r}, not a finite number")
    return float(value)


def _peaks(stored: Any) -> tuple[float, float] | None:
    if stored is None:
        return None
    if not isinstance(stored, list | tuple) or len(stored) != 2:
        raise InvalidWindow(f"has peaks {stored!r}, not two numbers (background, material)")
    background, material = _finite_number(stored[0], "peaks[0]"), _finite_number(stored[1], "peaks[1]")
    if not background < material:
        raise InvalidWindow(f"has peaks {stored!r}: the background level must be below the material level")
    return background, material


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


# Peaks are measured on this many slices spread evenly through a volume, every PEAK_STRIDE-th
# pixel in-plane: the two grey modes of a part are broad, so a sample finds them as well as
# every voxel would (the study's hist_match.py measures them on a 10x downsampled slice).
PEAK_SLICES = 16
PEAK_STRIDE = 4


def grey_peaks(values: np.ndarray) -> tuple[float, float] | None:
    """(background, material) grey levels of a scan's values: the medians either side of Otsu's
    threshold, as the study's two-peak histogram match measures them. None where the values do
    not split into two (a constant or empty sample): such a volume is left as it is."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size < 2 or not values.max() > values.min():
        return None
    threshold = threshold_otsu(values)
    dark, bright = values[values < threshold], values[values >= threshold]
    if dark.size == 0 or bright.size == 0:
        return None
    low, high = float(np.median(dark)), float(np.median(bright))
    return (low, high) if high > low else None


def source_peaks(source: GreySource) -> tuple[float, float] | None:
    """(background, material) grey levels of an open volume or scan (grey_peaks on a sample of its slices)."""
    depth = source.n_slices
    chosen = np.unique(np.linspace(0, depth - 1, min(PEAK_SLICES, depth)).round().astype(int))
    values = np.concatenate([source.image(int(z), int(z) + 1)[0, ::PEAK_STRIDE, ::PEAK_STRIDE].ravel() for z in chosen])
    return grey_peaks(values)


@lru_cache(maxsize=512)
def _volume_peaks(path: str, modified_ns: int, size: int) -> tuple[float, float] | None:
    # keyed by modification time and size too: a volume rewritten under the same name is measured again
    with Volume(Path(path)) as volume:
        return source_peaks(volume)


def volume_peaks(path: Path) -> tuple[float, float] | None:
    """(background, material) grey levels of one volume file (grey_peaks on a sample of its slices)."""
    stat = Path(path).stat()
    return _volume_peaks(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class IntensityWindow:
    """Maps grey values [low, high] linearly onto [0, 1] (clipped).

    `peaks`: the training data's (background, material) grey levels, or None. When set,
    `for_volume` gives each volume the window that first maps its own two levels linearly onto
    these (the study's histogram match, per volume rather than per slice, so slices showing no
    part are mapped as their neighbours are).
    """

    low: float
    high: float
    peaks: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.peaks is not None:  # from JSON a list: stored as a tuple so windows compare and hash
            object.__setattr__(self, "peaks", (float(self.peaks[0]), float(self.peaks[1])))

    def normalise(self, image: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(image, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-12)
        return np.clip(scaled, 0.0, 1.0)

    def denormalise(self, unit: np.ndarray) -> np.ndarray:
        return (np.asarray(unit, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)

    def for_volume(self, path: Path) -> IntensityWindow:
        """The window to normalise volume `path` with: this one, or with `peaks` set, this one
        moved into the volume's own grey units so that its peaks land where the training data's are.
        A volume whose peaks cannot be found is normalised as it is."""
        return self if self.peaks is None else self.matched(volume_peaks(path))

    def for_source(self, source: GreySource) -> IntensityWindow:
        """As `for_volume`, for an open volume or scan of any format (its peaks measured now)."""
        return self if self.peaks is None else self.matched(source_peaks(source))

    def matched(self, found: tuple[float, float] | None) -> IntensityWindow:
        """This window moved so that a volume whose peaks are `found` has them where the
        training data's are (`peaks`); unchanged (without peaks) where none were found."""
        if self.peaks is None:
            return self
        if found is None:
            return IntensityWindow(self.low, self.high)
        (train_low, train_high), (own_low, own_high) = self.peaks, found
        scale = (train_high - train_low) / (own_high - own_low)  # own grey units -> training's
        return IntensityWindow(own_low + (self.low - train_low) / scale, own_low + (self.high - train_low) / scale)

    def to_dict(self) -> dict[str, Any]:
        # without peaks, the two keys windows have always had (models' meta, cache keys)
        return asdict(self) if self.peaks is not None else {"low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, stored: Any) -> IntensityWindow:
        """The window `to_dict` wrote, read back from a file (a model's meta, an ONNX export).

        Refused with InvalidWindow (saying what is wrong) unless it is a mapping of finite
        numbers `low` < `high`, plus optional `peaks` (background < material): a NaN or
        zero-width window normalises every voxel to one value, and the model then quietly
        labels the whole scan background.
        """
        if not isinstance(stored, Mapping):
            raise InvalidWindow(f"is a {type(stored).__name__}, not a mapping with low and high")
        unknown = sorted(set(map(str, stored)) - {"low", "high", "peaks"})
        if unknown or not {"low", "high"} <= set(stored):
            raise InvalidWindow(f"has keys {sorted(map(str, stored))}, not low, high and optionally peaks")
        low, high = _finite_number(stored["low"], "low"), _finite_number(stored["high"], "high")
        if not low < high:
            raise InvalidWindow(f"is [{low:g}, {high:g}]: low must be below high (a zero-width window maps every voxel to one value)")
        return cls(low, high, _peaks(stored.get("peaks")))

    @classmethod
    def measure(
        cls, refs: Sequence[SliceRef], percentiles: tuple[float, float] = (0.5, 99.5), max_slices: int = 64, seed: int = 0, match_peaks: bool = False,
    ) -> IntensityWindow:
        """Robust window from percentiles of a seeded sample of slices; with `match_peaks`, the
        sample's background and material levels too (every volume is then matched to them)."""
        with SliceReader() as reader:
            values = np.concatenate([reader.image(ref).ravel() for ref in sample_slices(refs, max_slices, seed)])
        low, high = np.percentile(values, percentiles)
        if not high > low:
            high = low + 1.0  # a constant image: any window maps it to one value
        return cls(float(low), float(high), grey_peaks(values[::PEAK_STRIDE]) if match_peaks else None)


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
