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
from xctsam.data.checks import DECODE_ERRORS, require_exists
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


def unreadable_tiff(path: Path, exc: BaseException) -> InputError:
    return InputError(path, f"unreadable TIFF (corrupt or truncated?): {exc}", "replace the file with a good copy")


class _TiffFolder:
    """A folder of single-slice TIFFs in natural name order (slice_2 before slice_10).

    Each file's header is checked (one grey slice of the first file's size) before its pixels
    are decoded, so a file claiming a huge size is refused instead of allocated.
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

    def _read_file(self, path: Path) -> np.ndarray:
        with self._open(path) as tif:
            series = self._slice_series(path, tif)
            if tuple(series.shape) != self.shape[1:]:
                raise InputError(
                    path,
                    f"slice size {tuple(series.shape)} differs from the first slice's {self.shape[1:]} ({self.files[0].name})",
                    "all slices of a volume must have one size",
                )
            try:
                return series.asarray()
            except DECODE_ERRORS as exc:
                raise unreadable_tiff(path, exc) from None

    def read(self, z0: int, z1: int) -> np.ndarray:
        return np.stack([self._read_file(path) for path in self.files[z0:z1]])

    def file_of(self, z: int) -> Path:
        return self.files[z]


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


def open_stack(path: Path, fmt: str, dataset: str, stack: ExitStack) -> SliceStack:
    """Open `path` as a slice stack of format `fmt`; files it opens are closed by `stack`."""
    path = Path(path)
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
