"""The volume store: one HDF5 file per volume (README, data contract), read and written by slices.

Layout: dataset `image` (float32, Z x Y x X), optional dataset `labels` (uint8, same shape,
values 0..3), one slice per chunk, metadata as file attributes. Nested metadata (dicts,
lists) is stored as JSON text with a `json:` prefix so any HDF5 tool can still show it.
A split is a folder of such files with a manifest (split_folders.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xctsam import NUM_CLASSES
from xctsam.data.checks import (
    LABEL_REMEDY,
    check_finite,
    check_label_dtype,
    check_label_values,
    check_real_dtype,
)
from xctsam.data.latched_writes import LatchedWrites
from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError

IMAGE = "image"
LABELS = "labels"
_JSON_PREFIX = "json:"
# Images: lzf decodes ~2x faster than gzip-1 (training reads 5-slice context slabs per tile;
# measured 9.5 vs 22 ms per 5 slices of 512x512) at ~10% more disk. h5py reads it anywhere;
# other HDF5 tools need the lzf filter plugin. Labels compress ~50x with gzip and are cheap.
# track_times=False: HDF5 stamps every dataset with its creation time by default, so the same
# volume written twice would differ byte for byte (and with it every DVC hash of a split).
_IMAGE_DATASET = {"compression": "lzf", "track_times": False}
_LABEL_DATASET = {"compression": "gzip", "compression_opts": 1, "track_times": False}


# ---------------------------------------------------------------- validation
def check_image(image: np.ndarray, source: Path | str, first_slice: int = 0) -> np.ndarray:
    """Return `image` as float32, refusing non-real dtypes and NaN/inf with the file (and slice) named."""
    image = np.asarray(image)
    check_real_dtype(image.dtype, source, "image")
    image = image.astype(np.float32, copy=False)
    check_finite(image, source, first_slice, "fix or mask them before import")
    return image


def check_labels(labels: np.ndarray, source: Path | str, first_slice: int | None = None) -> np.ndarray:
    """Return `labels` as uint8, refusing any value outside 0..3."""
    labels = np.asarray(labels)
    check_real_dtype(labels.dtype, source, "labels")
    if labels.dtype.kind == "f":  # whole-number floats (some tools save masks so) are accepted
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise InputError(source, f"labels have dtype {labels.dtype} with fractional or NaN values, not integer", LABEL_REMEDY)
        labels = labels.astype(np.int64)
    check_label_values(labels, source, first_slice)
    return labels.astype(np.uint8, copy=False)


def check_same_shape(image_shape: tuple[int, ...], label_shape: tuple[int, ...], source: Path | str) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise InputError(source, f"labels shape {tuple(label_shape)} differs from image shape {tuple(image_shape)}", "give labels of the image's shape")


def _encode_attr(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (Mapping, list, tuple)) or value is None:
        return _JSON_PREFIX + json.dumps(value, default=str)
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX):])
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ---------------------------------------------------------------- writing
class VolumeWriter:
    """Streams slabs of slices into a new volume file, renamed into place only when complete.

    with VolumeWriter(path, shape, labelled=True, attrs={...}) as out:
        out.write(z0, image_slab, label_slab)

    `atomic=False` writes `path` itself: for callers that stage the file under a temporary
    name of their own and publish it together with other files (an import and its manifest).
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], *, labelled: bool, attrs: Mapping[str, Any] | None = None, atomic: bool = True) -> None:
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"volume shape must be 3 positive sizes, got {shape}")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.labelled = labelled
        self.attrs = dict(attrs or {})
        self.atomic = atomic
        self._written = np.zeros(self.shape[0], dtype=bool)
        self._stack = ExitStack()

    def __enter__(self) -> VolumeWriter:
        target = self._stack.enter_context(atomic_path(self.path)) if self.atomic else self.path
        self._sink = LatchedWrites(target)
        self._stack.push(self._sink.close)  # after HDF5 has closed (the stack unwinds in reverse)
        self._file = self._stack.enter_context(h5py.File(self._sink, "w"))
        chunk = (1, *self.shape[1:])
        self._image = self._file.create_dataset(IMAGE, shape=self.shape, dtype=np.float32, chunks=chunk, **_IMAGE_DATASET)
        self._labels = (
            self._file.create_dataset(LABELS, shape=self.shape, dtype=np.uint8, chunks=chunk, **_LABEL_DATASET) if self.labelled else None
        )
        for key, value in self.attrs.items():
            self._file.attrs[key] = _encode_attr(value)
        return self

    def write(
        self,
        z0: int,
        image: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        source: Path | str | None = None,
        label_source: Path | str | None = None,
    ) -> None:
        """Write slices z0.. from a (k, Y, X) slab (a single (Y, X) slice is accepted).

        `source` / `label_source` name the input files in error messages.
        """
        self._sink.raise_error()  # an earlier write failed (a full disk): stop feeding HDF5
        where = source or self.path
        label_where = label_source or where
        image = check_image(image, where, z0)
        image = image[None] if image.ndim == 2 else image
        if image.shape[1:] != self.shape[1:]:
            raise InputError(where, f"slice size {image.shape[1:]} differs from the volume's {self.shape[1:]}", "all slices of a volume must have one size")
        z1 = z0 + image.shape[0]
        if z0 < 0 or z1 > self.shape[0]:
            raise ValueError(f"slices {z0}..{z1} outside volume of {self.shape[0]}")
        self._image[z0:z1] = image
        if self.labelled:
            if labels is None:
                raise ValueError("labelled volume written without labels")
            labels = check_labels(labels, label_where, z0)
            labels = labels[None] if labels.ndim == 2 else labels
            check_same_shape(image.shape, labels.shape, label_where)
            self._labels[z0:z1] = labels
        self._written[z0:z1] = True

    def set_attrs(self, **attrs: Any) -> None:
        """Add metadata known only after writing (e.g. counts over all slices)."""
        for key, value in attrs.items():
            self._file.attrs[key] = _encode_attr(value)

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is None and not self._written.all():
            missing = int((~self._written).sum())
            exc = RuntimeError(f"{self.path}: {missing} slices never written")
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        return self._stack.__exit__(exc_type, exc, tb)


def write_volume(path: Path, image: np.ndarray, labels: np.ndarray | None = None, attrs: Mapping[str, Any] | None = None) -> None:
    """Write a whole in-memory volume (validated) atomically."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(path, f"image must be 3-D (Z, Y, X), got shape {image.shape}")
    if labels is not None:
        check_same_shape(image.shape, np.shape(labels), path)
    with VolumeWriter(path, image.shape, labelled=labels is not None, attrs=attrs) as out:
        out.write(0, image, labels)


# ---------------------------------------------------------------- reading
class Volume:
    """Read-only view of a volume file; slices are read on demand, never the whole volume."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "volume file not found", "run the stage that makes it (dvc repro)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise InputError(self.path, "not a readable HDF5 file (corrupt or truncated?)", "re-create it") from None
        if IMAGE not in self._file or self._file[IMAGE].ndim != 3:
            self.close()
            raise InputError(self.path, f"no 3-D '{IMAGE}' dataset", "volumes need image (Z, Y, X)")
        self._image = self._file[IMAGE]
        self._labels = self._file.get(LABELS, None)
        try:
            # from the header: a complex or text volume is refused before any slice is read
            check_real_dtype(self._image.dtype, self.path, "image")
            if self._labels is not None:
                check_label_dtype(self._labels.dtype, self.path)
                if self._labels.shape != self._image.shape:
                    raise InputError(self.path, f"labels shape {self._labels.shape} differs from image shape {self._image.shape}")
        except InputError:
            self.close()
            raise

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._image.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._image.dtype)

    def raw(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1 of the image as stored (float32 for the project's volumes)."""
        return np.asarray(self._image[z0:z1])

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def attrs(self) -> dict[str, Any]:
        return {key: _decode_attr(value) for key, value in self._file.attrs.items()}

    def image(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """Slices z0..z1 of the image as float32 (Z, Y, X); NaN/inf are refused, naming the slice."""
        image = np.asarray(self._image[z0:z1], dtype=np.float32)
        check_finite(image, self.path, z0, "replace them (e.g. numpy.nan_to_num) and write the volume again")
        return image

    def labels(self, z0: int = 0, z1: int | None = None, *, check: bool = True) -> np.ndarray:
        """Slices z0..z1 of the labels as uint8; values outside 0..3 are refused unless `check` is False
        (then they are returned as stored, for tools that report them)."""
        if self._labels is None:
            raise InputError(self.path, "volume has no labels", "use a labelled split")
        labels = np.asarray(self._labels[z0:z1])
        if not check:
            return labels
        check_label_values(labels, self.path, z0)
        return labels.astype(np.uint8, copy=False)

    def validate_labels(self, slab: int = 32) -> None:
        """Read every label slab once, refusing values outside 0..3 (before training, not mid-way)."""
        for z0 in range(0, self.n_slices, slab):
            self.labels(z0, z0 + slab)

    def iter_slabs(self, slab: int = 16) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(z0, image slab, label slab or None) in order, `slab` slices at a time."""
        for z0 in range(0, self.n_slices, slab):
            z1 = min(z0 + slab, self.n_slices)
            yield z0, self.image(z0, z1), (self.labels(z0, z1) if self.has_labels else None)


def label_counts(path: Path | str, slab: int = 32) -> np.ndarray:
    """Voxel count per class over a whole volume, streamed slab by slab; unknown values are refused."""
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    with Volume(path) as volume:
        for z0 in range(0, volume.n_slices, slab):
            labels = volume.labels(z0, z0 + slab)
            counts += np.bincount(labels.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    return counts


def label_histogram(path: Path | str, slab: int = 32) -> Counter[int]:
    """Voxel count of every stored label value, unknown ones included (for reports)."""
    counts: Counter[int] = Counter()
    with Volume(path) as volume:
        for z0 in range(0, volume.n_slices, slab):
            counts.update(_value_counts(volume.labels(z0, z0 + slab, check=False)))
    return counts


def _value_counts(labels: np.ndarray) -> dict[int, int]:
    if labels.dtype == np.uint8:  # the stored type: one bincount, no sort
        numbers = np.bincount(labels.ravel(), minlength=256)
        values = np.flatnonzero(numbers)
        return dict(zip(values.tolist(), numbers[values].tolist(), strict=True))
    values, numbers = np.unique(labels, return_counts=True)
    return dict(zip(values.tolist(), numbers.tolist(), strict=True))
