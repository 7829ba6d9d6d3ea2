"""`import_volume`: one scan (any format `data.readers` opens), optionally with labels in the
same format, into a split folder of the volume store, with the split's manifest.

Streams slab by slab (a volume is never held whole, except a multi-page TIFF whose pages are
not one slice each), validates every slice through `volumes.VolumeWriter`, and is
all-or-nothing: the new volume and the manifest are staged under temporary names and published
last, so bad input (an InputError naming the exact file) leaves the split as it was.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from xctsam.data.checks import check_fits_in_memory, check_real_dtype, nbytes
from xctsam.data.readers import SliceStack, check_stored, open_stack, provenance, slab_length
from xctsam.data.split_folders import (
    MANIFEST,
    manifest_entry,
    manifest_text,
    split_volumes,
)
from xctsam.data.volumes import (
    VolumeWriter,
    check_same_shape,
)
from xctsam.util.atomic import (
    atomic_path,
    remove_created_dirs_on_failure,
    write_text_atomic,
)
from xctsam.util.errors import InputError
from xctsam.util.progress import track

# A split folder under the data root: relative names like real/Te-1, each folder a plain name
# that does not start with a dot (no "..", no hidden folder, no absolute path), so an import
# writes under --root and nowhere else.
_SPLIT_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def split_folder(root: Path, split: str) -> Path:
    """`root / split` for a split named like real/Te-1; anything that could leave `root` is an
    InputError before anything is written."""
    parts = split.removesuffix("/").split("/")
    if not all(_SPLIT_PART.fullmatch(part) for part in parts):
        raise InputError(
            split,
            "is not a split folder under --root: give folder names of letters, digits, _ . - (not starting with a dot), joined by /",
            "e.g. --split real/Te-1",
        )
    return Path(root, *parts)


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
    """Slices copied at a time: about SLAB_BYTES of the source (at least one slice)."""
    return slab_length(image.shape[1:], max(image.dtype.itemsize, 4))


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
        "provenance": provenance(f"{__name__}.import_volume"),
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
        check_stored(image, source)  # slices that fit, but that the file does not hold
        attrs = _volume_attrs(source, fmt, path, image.dtype, labels, voxel_size_mm)
        with atomic_path(path) as staged_volume:
            with VolumeWriter(staged_volume, image.shape, labelled=label_stack is not None, attrs=attrs, atomic=False) as out:
                _copy_stacks(image, label_stack, out)
            # after the input is known good, so its problems are the ones reported first
            entries = [*_sibling_entries(split_dir, path.name), manifest_entry(staged_volume, path.name)]
            # renamed into place last thing before the volume is
            write_text_atomic(split_dir / MANIFEST, manifest_text(split_dir.name, entries, extras))
    return path
