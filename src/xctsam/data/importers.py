"""Importers: real scans from other tools into the volume store (one HDF5 per volume).

Two entry points, both called by `xctsam data import`:

- `import_samgan` reads the SAM-Material-GAN release layout
  (`<split>/input/<scan>_<NNNNNN>.png` grey slices, `<split>/class_1..3/<same name>.png` binary
  masks) and writes one labelled volume per scan: `train` -> `synthetic/Tr-GAN`,
  `testN` -> `real/Te-N`, a manifest per split.
- `import_volume` reads one volume (folder of TIFF slices, multi-page TIFF, HDF5 dataset or
  NPY array), optionally with labels in the same format, into a split folder.

Both stream slice by slice (a volume is never held whole, except a multi-page TIFF whose pages
are not stored one slice per page), validate every slice through `volumes.VolumeWriter`, and
are all-or-nothing: bad input raises `InputError` naming the exact file, and nothing from the
failed import is left in the output folder.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import tifffile
from PIL import Image

from xctsam import __version__
from xctsam.data.checks import check_fits_in_memory, check_real_dtype, nbytes
from xctsam.data.volumes import (
    MANIFEST,
    VolumeWriter,
    check_same_shape,
    manifest_entry,
    manifest_text,
    split_volumes,
    write_manifest,
)
from xctsam.util.atomic import (
    atomic_dir,
    atomic_path,
    remove_created_dirs_on_failure,
    write_text_atomic,
)
from xctsam.util.errors import InputError
from xctsam.util.progress import track

VOLUME_FORMATS = ("tiff-dir", "tiff", "hdf5", "npy")

# Decoders (Pillow, tifffile, zlib, numpy, HDF5) report corrupt or truncated files with any of
# these; they are caught only around the decoding call itself and turned into an InputError.
_DECODE_ERRORS = (
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

# SAM-Material-GAN: mask folders in painting order (a later class overwrites an earlier one,
# as the study merged them) and the label value each one paints.
SAMGAN_MASK_FOLDERS: tuple[tuple[str, int], ...] = (("class_1", 1), ("class_2", 2), ("class_3", 3))
SAMGAN_LABEL_MERGE = (
    "material -> pore -> inclusion (a later class overwrites an earlier one), background 0"
)
_SAMGAN_SLICE_NAME = re.compile(r"^(?P<scan>.+)_(?P<index>\d+)\.png$", re.IGNORECASE)
_SAMGAN_SPLIT_NAME = re.compile(r"^(train|test(?P<number>\d+))$")
_MASK_ON = 255
# Volume attr: voxels of each mask (material, pore, inclusion) before merging.
MASK_COUNTS_ATTR = "mask_voxel_counts"

# Pillow modes accepted as grey slices, with the description recorded as `intensity`.
_GREY_PNG_MODES = {
    "L": "8-bit grey",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit grey",
}
_TIFF_SUFFIXES = {".tif", ".tiff"}
_GREY_PHOTOMETRIC = {tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE}
_SLAB_BYTES = 64 * 2**20  # how much of a source array to read at once (HDF5, NPY)


# ================================================================ shared helpers
def _provenance(importer: str) -> dict[str, str]:
    return {"importer": f"{__name__}.{importer}", "xctsam_version": __version__}


def _require_exists(path: Path, what: str, *, folder: bool = False) -> None:
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


def _visible_entries(folder: Path) -> list[Path]:
    """Entries of `folder` without hidden ones (.DS_Store, editor swap files): those are never slices."""
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting slice_2 before slice_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _slab_length(slice_shape: Sequence[int], itemsize: int) -> int:
    return max(1, _SLAB_BYTES // max(1, int(np.prod(slice_shape)) * itemsize))


# ================================================================ SAM-Material-GAN PNG release
@dataclass(frozen=True)
class SamganSlice:
    """One slice of a SAM-Material-GAN scan: its index, grey PNG and mask PNGs (painting order)."""

    index: int
    image: Path
    masks: tuple[Path, ...]


@dataclass(frozen=True)
class SamganScan:
    name: str
    slices: tuple[SamganSlice, ...]

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.slices]


def samgan_split_folder(split: str) -> Path:
    """Where a release split lands under the data root: train -> synthetic/Tr-GAN, testN -> real/Te-N."""
    match = _SAMGAN_SPLIT_NAME.match(split)
    if match is None:
        raise ValueError(f"not a SAM-Material-GAN split name: {split!r} (train or testN)")
    number = match.group("number")
    return Path("synthetic/Tr-GAN") if number is None else Path(f"real/Te-{int(number)}")


def _samgan_split_sources(source: Path, splits: Iterable[str] | None) -> list[Path]:
    """The release's split folders to import: all `train`/`testN` present, or those asked for."""
    _require_exists(source, "SAM-Material-GAN folder", folder=True)
    if splits is None:
        found = [
            entry
            for entry in _visible_entries(source)
            if entry.is_dir() and _SAMGAN_SPLIT_NAME.match(entry.name)
        ]
        if not found:
            hint = (
                " (this looks like one split: give its parent)"
                if (source / "input").is_dir()
                else ""
            )
            raise InputError(
                source,
                f"no train/ or testN/ split folders{hint}",
                "give the release folder holding train/, test1/ ...",
            )
        return found
    chosen = []
    for split in splits:
        if not _SAMGAN_SPLIT_NAME.match(split):
            raise InputError(
                source / split,
                f"{split!r} is not a SAM-Material-GAN split name",
                "use train or testN",
            )
        _require_exists(source / split, "split folder", folder=True)
        chosen.append(source / split)
    return chosen


def _samgan_slice_index(path: Path) -> tuple[str, int]:
    """(scan name, slice index) from `<scan>_<NNNNNN>.png`; anything else in input/ is an error."""
    match = _SAMGAN_SLICE_NAME.match(path.name)
    if not path.is_file() or match is None:
        raise InputError(
            path,
            "not a slice image: input/ must hold only <scan>_<NNNNNN>.png files",
            "move other files out of input/",
        )
    return match.group("scan"), int(match.group("index"))


def _samgan_mask_paths(split_dir: Path, image: Path) -> tuple[Path, ...]:
    masks = tuple(split_dir / folder / image.name for folder, _ in SAMGAN_MASK_FOLDERS)
    for mask in masks:
        if not mask.is_file():
            raise InputError(
                mask,
                f"mask missing for input slice {image.name}",
                f"every slice in input/ needs {', '.join(f for f, _ in SAMGAN_MASK_FOLDERS)} masks of the same name",
            )
    return masks


def _check_no_orphan_masks(split_dir: Path, image_names: set[str]) -> None:
    """A mask without its input slice means the release copy is incomplete: refuse it."""
    for folder, _ in SAMGAN_MASK_FOLDERS:
        for mask in _visible_entries(split_dir / folder):
            if mask.name not in image_names:
                raise InputError(
                    mask,
                    "mask has no input slice of the same name",
                    "restore input/" + mask.name + " or remove the mask",
                )


def find_samgan_scans(split_dir: Path) -> list[SamganScan]:
    """Check a split's layout (names and files only, no pixels read) and group its slices by scan."""
    input_dir = split_dir / "input"
    if not input_dir.is_dir():
        raise InputError(
            input_dir,
            "missing 'input' folder",
            "SAM-Material-GAN splits hold input/ (grey PNG slices) and class_1..3/ (masks)",
        )
    for folder, _ in SAMGAN_MASK_FOLDERS:
        if not (split_dir / folder).is_dir():
            raise InputError(
                split_dir / folder,
                "missing mask folder",
                "SAM-Material-GAN splits hold input/ and class_1..3/",
            )
    by_scan: dict[str, dict[int, SamganSlice]] = {}
    for image in _visible_entries(input_dir):
        scan, index = _samgan_slice_index(image)
        slices = by_scan.setdefault(scan, {})
        if index in slices:
            raise InputError(
                image,
                f"slice index {index} of scan {scan} appears twice (also {slices[index].image.name})",
                "keep one file per slice index",
            )
        slices[index] = SamganSlice(index, image, _samgan_mask_paths(split_dir, image))
    if not by_scan:
        raise InputError(input_dir, "no PNG slices", "input/ must hold <scan>_<NNNNNN>.png files")
    _check_no_orphan_masks(
        split_dir, {s.image.name for slices in by_scan.values() for s in slices.values()}
    )
    return [
        SamganScan(scan, tuple(slices[i] for i in sorted(slices)))
        for scan, slices in sorted(by_scan.items())
    ]


def _open_png(path: Path) -> Image.Image:
    try:
        image = Image.open(path)  # reads the header only
        # the header's size, before decoding allocates it (4 bytes a pixel covers 32-bit grey)
        check_fits_in_memory(path, image.width * image.height * 4, f"decoding its {image.width} x {image.height} pixels")
        image.load()  # decoding happens here: truncation and bad data show up now, not later
    except Image.DecompressionBombError as exc:
        raise InputError(path, f"PNG claims too many pixels: {exc}", "check the file; slices are at most a few thousand pixels wide") from None
    except _DECODE_ERRORS as exc:
        raise InputError(
            path,
            f"unreadable PNG (corrupt or truncated?): {exc}",
            "replace the file with a good copy",
        ) from None
    return image


def read_grey_png(path: Path) -> tuple[np.ndarray, str]:
    """A grey PNG slice as an array with its original values, and its intensity description."""
    image = _open_png(path)
    if image.mode not in _GREY_PNG_MODES:
        raise InputError(
            path, f"PNG mode {image.mode} is not greyscale", "slices must be 8- or 16-bit grey PNGs"
        )
    return np.asarray(image), _GREY_PNG_MODES[image.mode]


def read_binary_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A 0/255 mask PNG as a boolean array; any other value is an unknown label."""
    image = _open_png(path)
    if image.mode == "1":
        mask = np.asarray(image, dtype=bool)
    elif image.mode == "L":
        values = np.asarray(image)
        counts = np.bincount(values.ravel(), minlength=256)
        unknown = [v for v in np.flatnonzero(counts) if v not in (0, _MASK_ON)]
        if unknown:
            raise InputError(
                path,
                f"unknown mask value(s) {unknown[:5]} (masks are binary 0/255)",
                "re-export the mask as 0 = absent, 255 = present",
            )
        mask = values == _MASK_ON
    else:
        raise InputError(
            path,
            f"mask PNG mode {image.mode} is not 8-bit grey or 1-bit",
            "masks must be binary 0/255 grey PNGs",
        )
    if mask.shape != tuple(shape):
        raise InputError(
            path,
            f"mask size {mask.shape} differs from its input slice's {tuple(shape)}",
            "give masks of the slice's size",
        )
    return mask


def merge_samgan_masks(
    slice_: SamganSlice, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Label map painted in SAMGAN_MASK_FOLDERS order, and each mask's own voxel count (before overwriting)."""
    labels = np.zeros(shape, dtype=np.uint8)
    mask_counts = np.zeros(len(SAMGAN_MASK_FOLDERS), dtype=np.int64)
    for position, (mask_path, (_, value)) in enumerate(zip(slice_.masks, SAMGAN_MASK_FOLDERS, strict=False)):
        mask = read_binary_mask(mask_path, shape)
        labels[mask] = value
        mask_counts[position] = np.count_nonzero(mask)
    return labels, mask_counts


def _read_samgan_slice(
    slice_: SamganSlice, first: tuple[tuple[int, ...], np.dtype]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, mask counts) of one slice, checked against the scan's first slice."""
    image, _ = read_grey_png(slice_.image)
    shape, dtype = first
    if image.shape != shape:
        raise InputError(
            slice_.image,
            f"slice size {image.shape} differs from the scan's first slice {shape}",
            "all slices of a scan must have one size",
        )
    if image.dtype != dtype:
        raise InputError(
            slice_.image,
            f"bit depth ({image.dtype}) differs from the scan's first slice ({dtype})",
            "export every slice of a scan alike",
        )
    labels, mask_counts = merge_samgan_masks(slice_, shape)
    return image, labels, mask_counts


def _samgan_attrs(scan: SamganScan, split_dir: Path, intensity: str) -> dict[str, Any]:
    return {
        "source": str(split_dir.resolve()),
        "format": "samgan",
        "scan": scan.name,
        "slice_indices": scan.indices,
        "intensity": intensity,
        "label_merge": SAMGAN_LABEL_MERGE,
        "provenance": _provenance("import_samgan"),
    }


def _write_samgan_scan(scan: SamganScan, split_dir: Path, out_dir: Path) -> Path:
    """Stream one scan into `out_dir/<scan>.h5`, slice by slice."""
    first_image, intensity = read_grey_png(scan.slices[0].image)
    first = (first_image.shape, first_image.dtype)
    path = out_dir / f"{scan.name}.h5"
    mask_counts = np.zeros(len(SAMGAN_MASK_FOLDERS), dtype=np.int64)
    with VolumeWriter(
        path,
        (len(scan.slices), *first[0]),
        labelled=True,
        attrs=_samgan_attrs(scan, split_dir, intensity),
    ) as out:
        for z, slice_ in enumerate(
            track(scan.slices, f"{split_dir.name}/{scan.name}", total=len(scan.slices))
        ):
            image, labels, counts = _read_samgan_slice(slice_, first)
            out.write(z, image, labels, source=slice_.image)
            mask_counts += counts
        # The masks overlap: these counts (before painting) are what the release's own
        # statistics describe.
        out.set_attrs(**{MASK_COUNTS_ATTR: mask_counts})
    return path


def import_samgan(source: Path, root: Path, splits: Iterable[str] | None = None) -> list[Path]:
    """Import a SAM-Material-GAN release folder into `root`; returns the written volume paths.

    `splits` limits the import to some release splits (e.g. ["test1"]); default: every
    `train`/`testN` folder present. All splits land together or not at all.
    """
    source, root = Path(source), Path(root)
    split_sources = _samgan_split_sources(source, splits)
    # Layout errors (missing files, stray names) surface before any pixel is written.
    scans = {split_dir: find_samgan_scans(split_dir) for split_dir in split_sources}
    targets = {split_dir: root / samgan_split_folder(split_dir.name) for split_dir in split_sources}
    written: list[Path] = []
    with remove_created_dirs_on_failure(targets.values()), ExitStack() as staging:
        for split_dir, target in targets.items():
            staged = staging.enter_context(atomic_dir(target))
            for scan in scans[split_dir]:
                _write_samgan_scan(scan, split_dir, staged)
                written.append(target / f"{scan.name}.h5")
            write_manifest(
                staged,
                target.name,
                {
                    "source": str(split_dir.resolve()),
                    "format": "samgan",
                    "provenance": _provenance("import_samgan"),
                },
            )
    return written


# ================================================================ single volumes
class SliceStack(Protocol):
    """A 3-D source read by slabs of slices, able to say which file holds slice z."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    reads_whole: bool  # True when the first read decodes the whole volume at once

    def read(self, z0: int, z1: int) -> np.ndarray: ...

    def file_of(self, z: int) -> Path: ...


def _unreadable_tiff(path: Path, exc: BaseException) -> InputError:
    return InputError(path, f"unreadable TIFF (corrupt or truncated?): {exc}", "replace the file with a good copy")


class _TiffFolder:
    """A folder of single-slice TIFFs in natural name order (slice_2 before slice_10).

    Each file's header is checked (one grey slice of the first file's size) before its pixels
    are decoded, so a file claiming a huge size is refused instead of allocated.
    """

    reads_whole = False

    def __init__(self, folder: Path) -> None:
        _require_exists(folder, "TIFF folder", folder=True)
        self.files = _visible_entries(folder)
        for entry in self.files:
            if not entry.is_file() or entry.suffix.lower() not in _TIFF_SUFFIXES:
                raise InputError(
                    entry,
                    "not a TIFF slice (.tif/.tiff) in a TIFF folder",
                    "move other files out of the folder",
                )
        if not self.files:
            raise InputError(folder, "no TIFF slices", "give a folder of .tif slices")
        self.files.sort(key=_natural_key)
        with self._open(self.files[0]) as tif:
            first = self._slice_series(self.files[0], tif)
            self.shape = (len(self.files), *first.shape)
            self.dtype = first.dtype

    @staticmethod
    def _open(path: Path) -> tifffile.TiffFile:
        try:
            return tifffile.TiffFile(path)
        except _DECODE_ERRORS as exc:
            raise _unreadable_tiff(path, exc) from None

    @staticmethod
    def _slice_series(path: Path, tif: tifffile.TiffFile) -> tifffile.TiffPageSeries:
        """The file's one grey slice, from its header (no pixel decoded yet)."""
        try:
            series = tif.series[0]
        except _DECODE_ERRORS as exc:
            raise _unreadable_tiff(path, exc) from None
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
            except _DECODE_ERRORS as exc:
                raise _unreadable_tiff(path, exc) from None

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
        _require_exists(path, "TIFF file")
        self.path = path
        try:
            tif = stack.enter_context(tifffile.TiffFile(path))
            series = tif.series[0]
        except _DECODE_ERRORS as exc:
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
        except _DECODE_ERRORS as exc:
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
        _require_exists(path, "HDF5 file")
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
        except _DECODE_ERRORS as exc:
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
        _require_exists(path, "NPY file")
        self.path = path
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except _DECODE_ERRORS as exc:
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
    raise InputError(
        path, f"unknown format {fmt!r}", f"use samgan or one of {', '.join(VOLUME_FORMATS)}"
    )


def _volume_name(source: Path, name: str | None) -> str:
    chosen = name if name is not None else source.stem
    if not chosen or chosen in {".", ".."} or Path(chosen).name != chosen:
        raise InputError(
            source,
            f"volume name {chosen!r} is not a plain file name",
            "give --name without folders",
        )
    return chosen


def _slab_for(image: SliceStack) -> int:
    """Slices copied at a time: about _SLAB_BYTES of the source (at least one slice)."""
    return _slab_length(image.shape[1:], max(image.dtype.itemsize, 4))


def _check_copy_memory(image: SliceStack, labels: SliceStack | None) -> None:
    """Refuse a copy whose reads would not fit in memory (the sizes come from file headers)."""

    def held(stack: SliceStack) -> int:  # bytes of one read, decoded
        slices = stack.shape[0] if stack.reads_whole else min(_slab_for(image), stack.shape[0])
        return nbytes((slices, *stack.shape[1:]), stack.dtype)

    # plus, per slice written, its float32 copy (the stored type) and the NaN/inf check's mask
    as_float = 0 if image.dtype == np.float32 else nbytes(image.shape[1:], np.float32)
    needed = held(image) + (held(labels) if labels is not None else 0) + as_float + nbytes(image.shape[1:], np.bool_)
    check_fits_in_memory(image.file_of(0), needed, f"importing {'x'.join(map(str, image.shape))} {image.dtype} voxels")


def _copy_stacks(image: SliceStack, labels: SliceStack | None, out: VolumeWriter) -> None:
    """Stream `image` (and `labels`) into `out`, checking each label slice against its own file."""
    n_slices = image.shape[0]
    slab = _slab_for(image)
    for z0 in track(
        range(0, n_slices, slab), f"import {out.path.name}", total=-(-n_slices // slab)
    ):
        z1 = min(z0 + slab, n_slices)
        image_slab = image.read(z0, z1)
        label_slab = labels.read(z0, z1) if labels is not None else None
        for offset, z in enumerate(range(z0, z1)):
            out.write(
                z,
                image_slab[offset],
                None if label_slab is None else label_slab[offset],
                source=image.file_of(z),
                label_source=None if labels is None else labels.file_of(z),
            )


def _manifest_extras(split_dir: Path) -> dict[str, Any]:
    """Keys other stages put in the split's manifest, kept when it is rewritten.

    Read before the volume is written, so a broken manifest stops the import with nothing done.
    """
    manifest = split_dir / MANIFEST
    if not manifest.is_file():
        return {}
    try:
        content = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise InputError(
            manifest,
            "existing manifest is not valid JSON",
            "delete it; it is rebuilt from the volumes",
        ) from None
    return {key: value for key, value in content.items() if key not in {"split", "volumes"}}


def _volume_attrs(
    source: Path,
    fmt: str,
    path: Path,
    dtype: np.dtype,
    labels: Path | None,
    voxel_size_mm: float | None,
) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "source": str(source.resolve()),
        "format": fmt,
        "scan": path.stem,
        "intensity": str(dtype),
        "provenance": _provenance("import_volume"),
    }
    if labels is not None:
        attrs["labels_source"] = str(Path(labels).resolve())
    if voxel_size_mm is not None:
        attrs["voxel_size_mm"] = float(voxel_size_mm)
    return attrs


def _sibling_entries(split_dir: Path, replacing: str) -> list[dict[str, Any]]:
    """Manifest entries of the split's other volumes. The manifest lists every volume, so a
    corrupt one stops the import (named) before anything is renamed into place."""
    entries = []
    for other in split_volumes(split_dir):
        if other.name == replacing:
            continue
        try:
            entries.append(manifest_entry(other))
        except InputError as exc:
            raise InputError(
                exc.path,
                f"{exc.problem} (another volume of split {split_dir.name}, listed in its manifest)",
                f"{exc.remedy or 're-create it'}, or move it out of the split",
            ) from None
    return entries


def import_volume(
    source: Path,
    fmt: str,
    split_dir: Path,
    *,
    name: str | None = None,
    labels: Path | None = None,
    dataset: str = "image",
    label_dataset: str = "labels",
    voxel_size_mm: float | None = None,
) -> Path:
    """Import one volume (and optional labels, same format, values 0..3) into `split_dir`.

    Writes `split_dir/<name or source stem>.h5` (replacing a volume of that name) and refreshes
    the split's manifest; other volumes of the split are untouched. All or nothing: the volume
    and the manifest are staged under temporary names and renamed into place together, so a
    failure (bad input, a corrupt sibling volume, a full disk) leaves the split as it was.
    """
    source, split_dir = Path(source), Path(split_dir)
    path = split_dir / f"{_volume_name(source, name)}.h5"
    extras = _manifest_extras(split_dir)
    with remove_created_dirs_on_failure([split_dir]), ExitStack() as files:
        image = open_stack(source, fmt, dataset, files)
        # from the headers: complex or text data is refused before a voxel is read
        check_real_dtype(image.dtype, source, "image")
        label_stack = open_stack(Path(labels), fmt, label_dataset, files) if labels else None
        if label_stack is not None:
            check_real_dtype(label_stack.dtype, Path(labels), "labels")
            check_same_shape(image.shape, label_stack.shape, Path(labels))
        _check_copy_memory(image, label_stack)
        attrs = _volume_attrs(source, fmt, path, image.dtype, labels, voxel_size_mm)
        with atomic_path(path) as staged_volume:
            with VolumeWriter(staged_volume, image.shape, labelled=label_stack is not None, attrs=attrs, atomic=False) as out:
                _copy_stacks(image, label_stack, out)
            # after the input is known good, so its problems are the ones reported first
            entries = [*_sibling_entries(split_dir, path.name), manifest_entry(staged_volume, path.name)]
            # renamed into place last thing before the volume is
            write_text_atomic(split_dir / MANIFEST, manifest_text(split_dir.name, entries, extras))
    return path
