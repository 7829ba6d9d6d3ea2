"""A grey scan as users have it, opened for streaming reads: the input of `xctsam predict`.

`Scan(path)` reads a volume in any format the readers know, slice range by slice range, never
whole: the project's own `.h5` volumes (dataset `image`) and any HDF5 dataset, a multi-page
TIFF, a folder of TIFF slices, a `.npy` array (memory mapped) and OME-Zarr. The format comes
from the path unless given (`scan_format`). A `Scan` offers what prediction reads of a project
`Volume` (`path`, `shape`, `n_slices`, `image(z0, z1)` as checked float32), so both are a
`GreySource` to the predictor.

`scan_inputs` turns what a user names (files, folders of volumes, a folder of TIFF slices)
into the list of scans to predict, so `xctsam predict` takes a whole campaign at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import numpy as np
import tifffile

from xctsam.data.checks import DECODE_ERRORS, check_finite, check_real_dtype
from xctsam.data.readers import (
    VOLUME_FORMATS,
    check_stored,
    natural_key,
    open_stack,
    visible_entries,
)
from xctsam.data.volumes import IMAGE
from xctsam.util.errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
FORMAT_BY_SUFFIX = {".h5": "hdf5", ".hdf5": "hdf5", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy", ".zarr": "zarr"}
_ZARR_MARKERS = ("zarr.json", ".zattrs", ".zgroup", ".zarray")  # zarr v3, then v2


class GreySource(Protocol):
    """What prediction reads of a volume: its path, shape, checked float32 slices (`image`) and
    the stored values in the file's dtype (`raw`, for copying the scan into an output)."""

    path: Path

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def n_slices(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    def raw(self, z0: int, z1: int) -> np.ndarray: ...

    def image(self, z0: int = 0, z1: int | None = None) -> np.ndarray: ...


def is_zarr(path: Path) -> bool:
    return path.is_dir() and (path.suffix.lower() == ".zarr" or any((path / marker).exists() for marker in _ZARR_MARKERS))


def _tiff_slices(folder: Path) -> list[Path]:
    return [entry for entry in visible_entries(folder) if entry.is_file() and entry.suffix.lower() in TIFF_SUFFIXES]


def _single_page(path: Path) -> bool:
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].shape) == 2
    except DECODE_ERRORS as exc:
        raise InputError(path, f"unreadable TIFF (corrupt or truncated?): {exc}", "replace the file with a good copy") from None


def is_slice_folder(path: Path) -> bool:
    """A folder whose TIFFs are single 2-D slices (one volume), not a folder of TIFF stacks."""
    if not path.is_dir() or is_zarr(path):
        return False
    slices = _tiff_slices(path)
    return bool(slices) and _single_page(min(slices, key=natural_key))


def scan_format(path: Path) -> str:
    """The reader format of `path`: zarr for a zarr folder, tiff-dir for a folder of TIFF
    slices, else by suffix; an unknown kind is an InputError naming it."""
    path = Path(path)
    if is_zarr(path):
        return "zarr"
    if path.is_dir():
        return "tiff-dir"
    found = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise InputError(path, "is not a volume format xctsam reads", f"give {', '.join(FORMAT_BY_SUFFIX)} or a folder of TIFF slices")
    return found


class Scan:
    """A read-only grey volume of any reader format, read slice range by slice range."""

    def __init__(self, path: Path | str, fmt: str | None = None, dataset: str = IMAGE) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "scan not found", "check the path")
        self.fmt = fmt or scan_format(self.path)
        if self.fmt not in VOLUME_FORMATS:
            raise InputError(self.path, f"unknown format {self.fmt!r}", f"use one of {', '.join(VOLUME_FORMATS)}")
        self._files = ExitStack()
        try:
            self._stack = open_stack(self.path, self.fmt, dataset, self._files)
            check_real_dtype(self._stack.dtype, self.path, "image")
        except BaseException:
            self._files.close()
            raise
        if self._stack.reads_whole:
            self.close()
            raise InputError(self.path, "is a TIFF stored so that it can only be read whole (compressed, one strip for all slices)", "save it one page per slice (tifffile.imwrite(..., metadata=None)) or as OME-Zarr")

    def __enter__(self) -> Scan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._files.close()

    def check_stored(self) -> None:
        """Refuse a grey scan whose file does not store the slices it declares (readers.check_stored);
        not done on opening, because a labels image may legitimately store no chunk."""
        check_stored(self._stack, self.path)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(size) for size in self._stack.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._stack.dtype)

    def raw(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1 in the file's own dtype (for copying the image into an output)."""
        return np.asarray(self._stack.read(z0, z1))

    def image(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """Slices z0..z1 as float32 (Z, Y, X); NaN/inf are refused, naming the slice."""
        z1 = self.n_slices if z1 is None else z1
        image = self.raw(z0, z1).astype(np.float32, copy=False)
        check_finite(image, self.path, z0, "replace them (e.g. numpy.nan_to_num) and save the scan again")
        return image


def _volumes_in(folder: Path) -> list[Path]:
    """The volumes a folder holds: zarr folders, folders of TIFF slices, volume files."""
    found = []
    for entry in visible_entries(folder):
        if is_zarr(entry) or is_slice_folder(entry) or (entry.is_file() and entry.suffix.lower() in FORMAT_BY_SUFFIX):
            found.append(entry)
    return sorted(found, key=natural_key)


def scan_inputs(paths: Iterable[Path]) -> list[Path]:
    """Every scan the given paths name, in order, each once: a volume file, a zarr folder or a
    folder of TIFF slices is one scan; any other folder contributes the volumes inside it."""
    scans: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(path, "not found", "check the path")
        if path.is_dir() and not is_zarr(path) and not is_slice_folder(path):
            inside = _volumes_in(path)
            if not inside:
                raise InputError(path, "holds no volume xctsam reads", f"put {', '.join(FORMAT_BY_SUFFIX)} files, zarr folders or TIFF slices in it")
            scans.extend(inside)
        else:
            scans.append(path)
    unique: dict[Path, Path] = {}
    for path in scans:
        unique.setdefault(path.resolve(), path)  # the same scan named twice is predicted once
    return list(unique.values())
