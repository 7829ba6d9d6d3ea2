"""The volume store: one HDF5 file per volume (DESIGN.md contract), read and written by slices.

Layout: dataset `image` (float32, Z x Y x X), optional dataset `labels` (uint8, same shape,
values 0..3), one slice per chunk, metadata as file attributes. Nested metadata (dicts,
lists) is stored as JSON text with a `json:` prefix so any HDF5 tool can still show it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.atomic import atomic_path, write_text_atomic
from xctsam.errors import InputError

if TYPE_CHECKING:
    from rich.table import Table

IMAGE = "image"
LABELS = "labels"
MANIFEST = "manifest.json"
_JSON_PREFIX = "json:"
# Images: lzf decodes ~2x faster than gzip-1 (training reads 5-slice context slabs per tile;
# measured 9.5 vs 22 ms per 5 slices of 512x512) at ~10% more disk. h5py reads it anywhere;
# other HDF5 tools need the lzf filter plugin. Labels compress ~50x with gzip and are cheap.
_IMAGE_COMPRESSION = {"compression": "lzf"}
_LABEL_COMPRESSION = {"compression": "gzip", "compression_opts": 1}


# ---------------------------------------------------------------- validation
def check_image(image: np.ndarray, source: Path | str) -> np.ndarray:
    """Return `image` as float32, refusing NaN/inf with the file named."""
    image = np.asarray(image)
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise InputError(source, f"image has non-numeric dtype {image.dtype}", "give grey-value images")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise InputError(source, f"image holds {bad} NaN/inf values", "fix or mask them before import")
    return image


def check_labels(labels: np.ndarray, source: Path | str) -> np.ndarray:
    """Return `labels` as uint8, refusing any value outside 0..3."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all():
            labels = labels.astype(np.int64)
        else:
            raise InputError(source, f"labels have dtype {labels.dtype}, not integer", "labels must be 0..3")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high >= NUM_CLASSES:
        bad = sorted(set(np.unique(labels).tolist()) - set(range(NUM_CLASSES)))[:5]
        raise InputError(source, f"unknown label value(s) {bad}", "labels must be 0 background, 1 material, 2 pore, 3 inclusion")
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
    """

    def __init__(self, path: Path, shape: tuple[int, int, int], *, labelled: bool, attrs: Mapping[str, Any] | None = None) -> None:
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"volume shape must be 3 positive sizes, got {shape}")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.labelled = labelled
        self.attrs = dict(attrs or {})
        self._written = np.zeros(self.shape[0], dtype=bool)
        self._stack = ExitStack()

    def __enter__(self) -> VolumeWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(h5py.File(tmp, "w"))
        chunk = (1, *self.shape[1:])
        self._image = self._file.create_dataset(IMAGE, shape=self.shape, dtype=np.float32, chunks=chunk, **_IMAGE_COMPRESSION)
        self._labels = (
            self._file.create_dataset(LABELS, shape=self.shape, dtype=np.uint8, chunks=chunk, **_LABEL_COMPRESSION) if self.labelled else None
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
        where = source or self.path
        label_where = label_source or where
        image = check_image(image, where)
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
            labels = check_labels(labels, label_where)
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
        if self._labels is not None and self._labels.shape != self._image.shape:
            self.close()
            raise InputError(self.path, f"labels shape {self._labels.shape} differs from image shape {self._image.shape}")

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
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def attrs(self) -> dict[str, Any]:
        return {key: _decode_attr(value) for key, value in self._file.attrs.items()}

    def image(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """Slices z0..z1 of the image as float32 (Z, Y, X)."""
        return np.asarray(self._image[z0:z1], dtype=np.float32)

    def labels(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        if self._labels is None:
            raise InputError(self.path, "volume has no labels", "use a labelled split")
        return np.asarray(self._labels[z0:z1], dtype=np.uint8)

    def iter_slabs(self, slab: int = 16) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(z0, image slab, label slab or None) in order, `slab` slices at a time."""
        for z0 in range(0, self.n_slices, slab):
            z1 = min(z0 + slab, self.n_slices)
            yield z0, self.image(z0, z1), (self.labels(z0, z1) if self.has_labels else None)


def label_counts(path: Path | str, slab: int = 32) -> np.ndarray:
    """Voxel count per class over a whole volume, streamed slab by slab."""
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    with Volume(path) as volume:
        for z0 in range(0, volume.n_slices, slab):
            labels = volume.labels(z0, z0 + slab)
            counts += np.bincount(labels.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    return counts


# ---------------------------------------------------------------- manifests
def split_name(folder: str | Path) -> str:
    """'real/Te-1' -> 'Te-1': the key of a split in metrics files and MLflow metric names."""
    return Path(folder).name


def split_volumes(split_dir: Path) -> list[Path]:
    return sorted(Path(split_dir).glob("*.h5"))


def write_manifest(split_dir: Path, split: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe every volume of a split (shape, labelled, class fractions) in manifest.json."""
    split_dir = Path(split_dir)
    entries = []
    for path in split_volumes(split_dir):
        with Volume(path) as volume:
            entry: dict[str, Any] = {"file": path.name, "shape": list(volume.shape), "labelled": volume.has_labels}
        if entry["labelled"]:
            counts = label_counts(path)
            entry["class_fractions"] = {name: float(c) / float(counts.sum()) for name, c in zip(CLASS_NAMES, counts, strict=False)}
        entries.append(entry)
    manifest = {"split": split, "volumes": entries, **dict(extra or {})}
    write_text_atomic(split_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(split_dir: Path) -> dict[str, Any]:
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise InputError(path, "split manifest not found", "run the stage that makes the split (dvc repro)")
    return json.loads(path.read_text())


def describe_volumes(paths: Iterable[Path]) -> Table:
    """A table of shape, labels and class fractions for volume files or split folders."""
    from rich.table import Table

    table = Table("volume", "shape", "labelled", *CLASS_NAMES)
    for given in paths:
        files = split_volumes(given) if Path(given).is_dir() else [Path(given)]
        if not files:
            raise InputError(given, "no .h5 volumes here", "give volume files or a split folder")
        for path in files:
            with Volume(path) as volume:
                shape, labelled = volume.shape, volume.has_labels
            fractions = ["-"] * len(CLASS_NAMES)
            if labelled:
                counts = label_counts(path)
                fractions = [f"{c / counts.sum():.5f}" for c in counts]
            table.add_row(str(path), "x".join(map(str, shape)), "yes" if labelled else "no", *fractions)
    return table
