"""Checks every reader and writer of volumes shares: dtypes, finite grey values, label values,
and whether a read fits in memory.

Each raises `InputError` naming the file (and the slice, where there is one), so a bad volume
is refused with one line wherever it enters: import, prediction, training, `data info`.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil

from xctsam import NUM_CLASSES
from xctsam.util.errors import InputError

# numpy kinds that are real numbers: bool, signed and unsigned integers, floats. Complex values
# would lose their imaginary part silently when cast to float32; strings and objects cannot
# be grey values at all.
_REAL_KINDS = frozenset("biuf")
_GIB = 2**30
LABEL_REMEDY = "labels must be 0 background, 1 material, 2 pore, 3 inclusion"


def check_real_dtype(dtype: np.dtype, source: Path | str, what: str = "image") -> None:
    """Refuse complex, string, object (anything but bool/int/float) `what` data of `source`."""
    dtype = np.dtype(dtype)
    if dtype.kind not in _REAL_KINDS:
        raise InputError(
            source,
            f"{what} has dtype {dtype} ({_kind_name(dtype)}), not real numbers",
            f"save the {what} as integer or float values",
        )


def _kind_name(dtype: np.dtype) -> str:
    names = {"c": "complex", "U": "text", "S": "bytes", "O": "Python objects", "V": "raw records", "M": "dates", "m": "time spans"}
    return names.get(dtype.kind, "not numeric")


def check_finite(image: np.ndarray, source: Path | str, first_slice: int = 0, remedy: str = "replace them (e.g. numpy.nan_to_num) and write the volume again") -> None:
    """Refuse NaN/inf in a (Z, Y, X) slab (or one (Y, X) slice) whose first slice is `first_slice`."""
    finite = np.isfinite(image)
    if finite.all():
        return
    bad_per_slice = (~finite.reshape(-1, *finite.shape[-2:])).sum(axis=(1, 2))
    offset = int(np.flatnonzero(bad_per_slice)[0])
    raise InputError(
        source,
        f"image slice {first_slice + offset} holds NaN/inf values ({int(bad_per_slice[offset])} in that slice)",
        remedy,
    )


def unknown_label_values(labels: np.ndarray) -> list[int]:
    """Values of an integer label array outside 0..3, ascending (empty when all are known)."""
    if labels.size == 0:
        return []
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < NUM_CLASSES:  # the common case, without sorting every voxel
        return []
    return [int(v) for v in np.unique(labels) if not 0 <= v < NUM_CLASSES]


def check_label_values(labels: np.ndarray, source: Path | str, first_slice: int | None = None) -> None:
    """Refuse values outside 0..3 in integer labels, naming up to five of them (and the slice)."""
    bad = unknown_label_values(labels)
    if not bad:
        return
    where = ""
    if first_slice is not None and labels.ndim == 3:
        offset = next(z for z in range(labels.shape[0]) if unknown_label_values(labels[z]))
        where = f" in slice {first_slice + offset}"
    elif first_slice is not None:
        where = f" in slice {first_slice}"
    raise InputError(source, f"unknown label value(s) {bad[:5]}{where}", LABEL_REMEDY)


def format_gib(n_bytes: float) -> str:
    """'37.3 GiB' ('4.0 TiB' from 1024 GiB on)."""
    gib = n_bytes / _GIB
    return f"{gib:.1f} GiB" if gib < 1024 else f"{gib / 1024:.1f} TiB"


def check_fits_in_memory(source: Path | str, needed: int, what: str) -> None:
    """Refuse a read that needs more memory than is available now (sizes come from file headers:
    a tiny file may claim a huge image, and allocating it would end in a MemoryError)."""
    available = psutil.virtual_memory().available
    if needed > available:
        raise InputError(
            source,
            f"{what} needs {format_gib(needed)}, {format_gib(available)} available",
            "check the file's dimensions, or use a machine with more memory",
        )


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of an array of `shape` and `dtype` (Python ints: no overflow for huge claims)."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * np.dtype(dtype).itemsize


def check_label_dtype(dtype: np.dtype, source: Path | str) -> None:
    """Stored labels must be integers (or bool): a float label would be truncated silently."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biu":
        raise InputError(source, f"labels have dtype {dtype}, not integer", LABEL_REMEDY)


class Stored(NamedTuple):
    """How much of a chunked array's declared shape its file holds (HDF5, zarr)."""

    chunks: int  # chunks with data in the file
    declared: int  # chunks the declared shape spans
    skips_fill: bool  # the writer leaves out chunks that equal the fill value (zarr's default)


# Decoders (Pillow, tifffile, zlib, numpy, HDF5) report corrupt or truncated files with any of
# these; they are caught only around the decoding call itself and turned into an InputError.
DECODE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    zlib.error,
    struct.error,
    KeyError,
    IndexError,
    RuntimeError,
)


def require_exists(path: Path, what: str, *, folder: bool = False) -> None:
    if not path.exists():
        raise InputError(path, f"{what} not found", "check the path")
    if folder and not path.is_dir():
        raise InputError(path, f"{what} is not a folder", "give the folder that holds the files")
    if not folder and path.is_dir():
        raise InputError(
            path,
            f"{what} is a folder, not a file",
            "give the file (or the folder's format, e.g. tiff-dir)",
        )
