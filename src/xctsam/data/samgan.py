"""The SAM-Material-GAN release layout: `<split>/input/<scan>_<NNNNNN>.png` grey slices and
`<split>/class_1..3/<same name>.png` binary masks, into one labelled volume per scan
(`train` -> `synthetic/Tr-GAN`, `testN` -> `real/Te-N`) and a manifest per split.

Every split lands together or not at all (`import_samgan`); layout errors (missing files, stray
names) surface before any pixel is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xctsam.data.checks import DECODE_ERRORS, check_fits_in_memory, require_exists
from xctsam.data.readers import provenance, visible_entries
from xctsam.data.split_folders import write_manifest
from xctsam.data.volumes import VolumeWriter
from xctsam.util.atomic import (
    atomic_dir,
    remove_created_dirs_on_failure,
)
from xctsam.util.errors import InputError
from xctsam.util.progress import track

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
GREY_PNG_MODES = {
    "L": "8-bit grey",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit grey",
}


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
    require_exists(source, "SAM-Material-GAN folder", folder=True)
    if splits is None:
        found = [
            entry
            for entry in visible_entries(source)
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
        require_exists(source / split, "split folder", folder=True)
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
        for mask in visible_entries(split_dir / folder):
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
    for image in visible_entries(input_dir):
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
    except DECODE_ERRORS as exc:
        raise InputError(
            path,
            f"unreadable PNG (corrupt or truncated?): {exc}",
            "replace the file with a good copy",
        ) from None
    return image


def read_grey_png(path: Path) -> tuple[np.ndarray, str]:
    """A grey PNG slice as an array with its original values, and its intensity description."""
    image = _open_png(path)
    if image.mode not in GREY_PNG_MODES:
        raise InputError(
            path, f"PNG mode {image.mode} is not greyscale", "slices must be 8- or 16-bit grey PNGs"
        )
    return np.asarray(image), GREY_PNG_MODES[image.mode]


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
        "provenance": provenance(f"{__name__}.import_samgan"),
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
                    "provenance": provenance(f"{__name__}.import_samgan"),
                },
            )
    return written
