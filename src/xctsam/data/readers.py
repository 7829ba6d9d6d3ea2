"""Readers of 3-D sources, one per format, behind one protocol: a `SliceStack` read by slabs.

`open_stack(path, fmt, dataset, stack)` is the registry: `tiff-dir` (a folder of TIFF slices),
`tiff` (a multi-page TIFF), `hdf5` (a dataset of an HDF5 file), `npy` (a NumPy array, memory
mapped), `zarr` (an OME-Zarr image or a 3-D zarr array, see `omezarr`). Sizes come from the
files' headers before any pixel is decoded, so a volume too large for memory is refused with
the numbers; a corrupt file is an InputError naming it. The small file helpers here
(existence, natural sort, slab sizes, decoder errors) serve every importer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import tifffile

from xctsam import __version__
from xctsam.data.checks import DECODE_ERRORS, Stored, require_exists
from xctsam.util.errors import InputError

VOLUME_FORMATS = ("tiff-dir", "tiff", "hdf5", "npy", "zarr")



_TIFF_SUFFIXES = {".tif", ".tiff"}
_GREY_PHOTOMETRIC = {tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE}
SLAB_BYTES = 64 * 2**20  # how much of a source array to read at once (HDF5, NPY)


def provenance(importer: str) -> dict[str, str]:
    """What an importer records in the volumes and manifests it writes: its qualified name, the version."""
    return {"importer": importer, "xctsam_version": __version__}


def visible_entries(folder: Path) -> list[Path]:
    """Entries of `folder` without hidden ones (.DS_Store, editor swap files): those are never slices."""
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def natural_key(path: Path) -> list[Any]:
    """Sort key putting slice_2 before slice_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def slab_length(slice_shape: Sequence[int], itemsize: int) -> int:
    return max(1, SLAB_BYTES // max(1, int(np.prod(slice_shape)) * itemsize))


class SliceStack(Protocol):
    """A 3-D source read by slabs of slices, able to say which file holds slice z."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    reads_whole: bool  # True when the first read decodes the whole volume at once

    def read(self, z0: int, z1: int) -> np.ndarray: ...

    def file_of(self, z: int) -> Path: ...

    def stored(self) -> Stored | None:
        """Chunks stored against chunks declared; None where every voxel is in the file
        (TIFF, NPY: a short file fails to decode) or its storage cannot be counted."""
        ...


def unreadable_tiff(path: Path, exc: BaseException) -> InputError:
    return InputError(path, f"unreadable TIFF (corrupt or truncated?): {exc}", "replace the file with a good copy")


class _TiffFolder:
    """A folder of single-slice TIFFs in natural name order (slice_2 before slice_10).

    Every file's header is checked when the folder is opened (one grey slice of the first
    file's size and dtype), before any pixel is decoded: a file claiming a huge size is refused
    instead of allocated, and a slice of another dtype (uint16 among uint8 slices) before it
    would be stored silently wrong, and before any work on the slices ahead of it.
    """

    reads_whole = False

    def __init__(self, folder: Path) -> None:
        require_exists(folder, "TIFF folder", folder=True)
        self.files = visible_entries(folder)
        for entry in self.files:
            if not entry.is_file() or entry.suffix.lower() not in _TIFF_SUFFIXES:
                raise InputError(
                    entry,
                    "not a TIFF slice (.tif/.tiff) in a TIFF folder",
                    "move other files out of the folder",
                )
        if not self.files:
            raise InputError(folder, "no TIFF slices", "give a folder of .tif slices")
        self.files.sort(key=natural_key)
        with self._open(self.files[0]) as tif:
            first = self._slice_series(self.files[0], tif)
            self.shape = (len(self.files), *first.shape)
            self.dtype = first.dtype
        for path in self.files[1:]:  # headers only: about 0.4 ms a file
            with self._open(path) as tif:
                self._check_like_first(path, self._slice_series(path, tif))

    @staticmethod
    def _open(path: Path) -> tifffile.TiffFile:
        try:
            return tifffile.TiffFile(path)
        except DECODE_ERRORS as exc:
            raise unreadable_tiff(path, exc) from None

    @staticmethod
    def _slice_series(path: Path, tif: tifffile.TiffFile) -> tifffile.TiffPageSeries:
        """The file's one grey slice, from its header (no pixel decoded yet)."""
        try:
            series = tif.series[0]
        except DECODE_ERRORS as exc:
            raise unreadable_tiff(path, exc) from None
        if len(series.shape) != 2:
            raise InputError(
                path,
                f"holds an array of shape {tuple(series.shape)}, not one grey slice",
                "use format `tiff` for multi-page stacks; convert colour to grey",
            )
        return series

    def _check_like_first(self, path: Path, series: tifffile.TiffPageSeries) -> None:
        """One size and one dtype for every slice: a uint16 slice among uint8 ones would be cast
        to the first slice's range and come out silently wrong."""
        first = self.files[0].name
        if tuple(series.shape) != self.shape[1:]:
            raise InputError(
                path,
                f"slice size {tuple(series.shape)} differs from the first slice's {self.shape[1:]} ({first})",
                "all slices of a volume must have one size",
            )
        if series.dtype != self.dtype:
            raise InputError(
                path,
                f"slice dtype {series.dtype} differs from the first slice's {self.dtype} ({first})",
                "save every slice of a volume with one dtype",
            )

    def _read_file(self, path: Path) -> np.ndarray:
        with self._open(path) as tif:
            series = self._slice_series(path, tif)
            self._check_like_first(path, series)  # again: the file may have changed since
            try:
                return series.asarray()
            except DECODE_ERRORS as exc:
                raise unreadable_tiff(path, exc) from None

    def read(self, z0: int, z1: int) -> np.ndarray:
        return np.stack([self._read_file(path) for path in self.files[z0:z1]])

    def file_of(self, z: int) -> Path:
        return self.files[z]

    def stored(self) -> Stored | None:
        return None  # every voxel is in the file: a short one fails to decode


def _grey_stack_shape(path: Path, series: tifffile.TiffPageSeries) -> tuple[int, int, int]:
    """(Z, Y, X) of a TIFF series, refusing colour: an XCT volume is grey, and a colour file's
    samples would otherwise be taken for slices."""
    colour = series.keyframe.photometric not in _GREY_PHOTOMETRIC
    if colour or len(series.shape) not in (2, 3) or series.axes[-2:] != "YX":
        raise InputError(
            path,
            f"TIFF holds {series.keyframe.photometric.name} data of shape {tuple(series.shape)}"
            f" (axes {series.axes}), not a grey (Z, Y, X) stack",
            "save one grey slice per page (tifffile: photometric='minisblack')",
        )
    return tuple(series.shape) if len(series.shape) == 3 else (1, *series.shape)


class _MultiPageTiff:
    """A multi-page TIFF stack, read page by page when each page is one slice."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        require_exists(path, "TIFF file")
        self.path = path
        try:
            tif = stack.enter_context(tifffile.TiffFile(path))
            series = tif.series[0]
        except DECODE_ERRORS as exc:
            raise InputError(
                path,
                f"unreadable TIFF (corrupt or truncated?): {exc}",
                "replace the file with a good copy",
            ) from None
        shape = _grey_stack_shape(path, series)
        self.shape, self.dtype = shape, series.dtype
        self._series = series
        pages = list(series.pages)
        # Stacks written contiguously (one IFD for all slices) have fewer page objects than
        # slices; those can only be read whole (which also detects truncation).
        self._pages = (
            pages if len(pages) == shape[0] and all(p is not None for p in pages) else None
        )
        self.reads_whole = self._pages is None
        self._whole: np.ndarray | None = None

    def _decode(self, read: Any) -> np.ndarray:
        try:
            return np.asarray(read())
        except DECODE_ERRORS as exc:
            raise InputError(
                self.path,
                f"unreadable TIFF data (corrupt or truncated?): {exc}",
                "replace the file with a good copy",
            ) from None

    def read(self, z0: int, z1: int) -> np.ndarray:
        if self._pages is not None:
            return np.stack(
                [self._decode(page.asarray).reshape(self.shape[1:]) for page in self._pages[z0:z1]]
            )
        if self._whole is None:
            self._whole = self._decode(self._series.asarray).reshape(self.shape)
        return self._whole[z0:z1]

    def file_of(self, z: int) -> Path:
        return self.path

    def stored(self) -> Stored | None:
        return None  # every voxel is in the file: a short one fails to decode


class _Hdf5Dataset:
    """A 3-D dataset inside an HDF5 file, read by slabs."""

    reads_whole = False

    def __init__(self, path: Path, dataset: str, stack: ExitStack) -> None:
        require_exists(path, "HDF5 file")
        self.path = path
        try:
            file = stack.enter_context(h5py.File(path, "r"))
        except OSError as exc:
            raise InputError(
                path,
                f"not a readable HDF5 file (corrupt or truncated?): {exc}",
                "replace the file with a good copy",
            ) from None
        node = file.get(dataset)
        if not isinstance(node, h5py.Dataset):
            raise InputError(
                path,
                f"no dataset '{dataset}' (datasets here: {_hdf5_datasets(file)[:10]})",
                "give its path with --dataset / --label-dataset",
            )
        if node.ndim != 3:
            raise InputError(
                path,
                f"dataset '{dataset}' has shape {node.shape}, not (Z, Y, X)",
                "give a 3-D dataset",
            )
        self._dataset = node
        self.shape, self.dtype = tuple(node.shape), node.dtype

    def read(self, z0: int, z1: int) -> np.ndarray:
        try:
            return self._dataset[z0:z1]
        except DECODE_ERRORS as exc:
            raise InputError(
                self.path,
                f"cannot read slices {z0}..{z1} of '{self._dataset.name}' (corrupt or truncated?): {exc}",
                "replace the file with a good copy",
            ) from None

    def file_of(self, z: int) -> Path:
        return self.path

    def stored(self) -> Stored | None:
        """HDF5 allocates a chunk (a contiguous dataset: its one block) on its first write, so
        any chunk missing was never written; its voxels read as the fill value."""
        node = self._dataset
        if node.is_virtual or node.external or node.id.get_create_plist().get_layout() == h5py.h5d.COMPACT:
            return None  # stored elsewhere, or inside the header itself
        if node.chunks is None:
            return Stored(int(node.id.get_storage_size() > 0), 1, skips_fill=False)
        declared = 1
        for size, chunk in zip(node.shape, node.chunks):
            declared *= -(-size // chunk)
        return Stored(node.id.get_num_chunks(), declared, skips_fill=False)


def _hdf5_datasets(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(
        lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None
    )
    return names


class _NpyArray:
    """A 3-D .npy array, memory-mapped so only the slabs being copied are read."""

    reads_whole = False

    def __init__(self, path: Path) -> None:
        require_exists(path, "NPY file")
        self.path = path
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except DECODE_ERRORS as exc:
            raise InputError(
                path,
                f"not a readable .npy array (corrupt or truncated?): {exc}",
                "save it with numpy.save",
            ) from None
        if not isinstance(array, np.ndarray) or array.ndim != 3:
            raise InputError(
                path,
                f"array of shape {getattr(array, 'shape', '?')} is not (Z, Y, X)",
                "save a 3-D array",
            )
        self._array = array
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def read(self, z0: int, z1: int) -> np.ndarray:
        return np.array(self._array[z0:z1])

    def file_of(self, z: int) -> Path:
        return self.path

    def stored(self) -> Stored | None:
        return None  # every voxel is in the file: a short one fails to decode


def check_stored(stack: SliceStack, path: Path) -> None:
    """Refuse a grey scan whose declared shape its file does not hold: a 1400-byte HDF5 file can
    declare 1e8 slices, all fill value, and prediction would run for weeks on nothing.

    Images only: a zarr writer leaves out chunks equal to the fill value, so an all-background
    labels image legitimately stores none; a grey scan storing none is one constant value.
    """
    stored = stack.stored()
    if stored is None or stored.chunks >= stored.declared or (stored.skips_fill and stored.chunks):
        return
    z, y, x = stack.shape
    held, unread = ("none", "every voxel") if stored.chunks == 0 else (f"only {stored.chunks}", "the others")
    raise InputError(
        path,
        f"declares {z} slices of {y} x {x} voxels but stores {held} of their {stored.declared} chunks"
        f" ({unread} would read as the fill value, not as data)",
        "the scan was not written completely (or is one constant value): export it again",
    )


def _check_not_empty(stack: SliceStack, path: Path) -> None:
    """Refuse a volume with no voxel (0 slices, or slices 0 pixels high or wide): nothing to
    predict or import, and every writer needs at least one."""
    if min(stack.shape) < 1:
        z, y, x = stack.shape
        raise InputError(
            path,
            f"holds an empty volume of {z} slices of {y} x {x} voxels",
            "give a volume with at least one slice of at least 1 x 1 voxels",
        )


def open_stack(path: Path, fmt: str, dataset: str, stack: ExitStack) -> SliceStack:
    """Open `path` as a non-empty slice stack of format `fmt`; files it opens are closed by `stack`."""
    source = _open_stack(Path(path), fmt, dataset, stack)
    _check_not_empty(source, Path(path))
    return source


def _open_stack(path: Path, fmt: str, dataset: str, stack: ExitStack) -> SliceStack:
    if fmt == "tiff-dir":
        return _TiffFolder(path)
    if fmt == "tiff":
        return _MultiPageTiff(path, stack)
    if fmt == "hdf5":
        return _Hdf5Dataset(path, dataset, stack)
    if fmt == "npy":
        return _NpyArray(path)
    if fmt == "zarr":
        from xctsam.data.omezarr import OmeZarrStack  # here, so that importing readers skips zarr

        return OmeZarrStack(path)
    raise InputError(
        path, f"unknown format {fmt!r}", f"use samgan or one of {', '.join(VOLUME_FORMATS)}"
    )
