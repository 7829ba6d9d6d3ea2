"""OME-Zarr (NGFF) in and out for whole-volume prediction of X-ray CT scans (Z, Y, X).

Beamlines and viewers (napari-ome-zarr, Fiji/MoBIE) exchange volumes too large for memory as
chunked OME-Zarr, so xctsam reads and writes them by slabs of slices, never whole:

- `OmeZarrStack` is a `SliceStack` over the full-resolution level of an OME-Zarr image (NGFF 0.4
  on zarr v2, NGFF 0.5 on zarr v3) or over a bare 3-D zarr array; a read decodes only the chunks
  that hold the requested slices.
- `OmeZarrLabelsWriter` writes a new NGFF 0.5 image with the predicted classes as its
  `labels/<name>` image, slice by slice, published under its final name only once complete.

ome-zarr-py supplies the metadata (format detection, axes validation, the multiscales and
image-label writers); zarr does the pixel I/O, by chunk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from ome_zarr.axes import Axes
from ome_zarr.format import Format, FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.data.checks import DECODE_ERRORS, Stored, require_exists
from xctsam.util.atomic import atomic_dir
from xctsam.util.errors import InputError

SPATIAL = ("z", "y", "x")
# zarr raises TypeError (as well as the decoders' errors) for metadata of the wrong JSON type.
_ZARR_ERRORS = (*DECODE_ERRORS, TypeError)
# Malformed NGFF metadata (a missing key, a list where a dict belongs) surfaces as one of these.
_METADATA_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)
# Files of an array's folder that are metadata, not chunks (zarr v3, then v2).
_METADATA_FILES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
_REPLACE = "replace it with a good copy"

# 16 x 256 x 256 = 1 Mi voxels per chunk (1 MiB of labels, 2 MiB of uint16 grey before
# compression): large enough for efficient file I/O and compression, small enough that a viewer
# showing one XY plane reads at most 16 planes' worth, and that the writer's buffer (one
# chunk-deep slab, as predictions arrive slice by slice) stays at 16 slices.
CHUNK = (16, 256, 256)
# Okabe-Ito colours (readable by colour-blind users), one per class after background.
_PALETTE = ((86, 180, 233), (230, 159, 0), (213, 94, 0), (0, 158, 115), (204, 121, 167))


class OmeZarrStack:
    """Level 0 of an OME-Zarr image (or a bare 3-D zarr array), read by slabs of slices.

    Holds only the zarr array handle (metadata); pixels are decoded per `read`, chunk by chunk.
    Non-spatial axes (t, c) of size 1 are squeezed away, so slabs are (k, Y, X).
    """

    reads_whole = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        require_exists(self.path, "OME-Zarr image", folder=True)
        node = _open_zarr(self.path)
        array, axes = _bare(self.path, node) if isinstance(node, zarr.Array) else _level0(self.path, node)
        _check_axes(self.path, axes, array.shape)
        _check_chunks(self.path, array)
        self._array = array
        self._axes = axes
        self.shape: tuple[int, int, int] = tuple(array.shape[axes.index(a)] for a in SPATIAL)
        self.dtype = np.dtype(array.dtype)

    def read(self, z0: int, z1: int) -> np.ndarray:
        # an integer index on the size-1 axes drops them; slices keep z, y, x in file order
        index = tuple(
            slice(z0, z1) if a == "z" else slice(None) if a in SPATIAL else 0 for a in self._axes
        )
        try:
            return np.asarray(self._array[index])
        except _ZARR_ERRORS as exc:
            raise InputError(
                self.path, f"cannot read slices {z0}..{z1} (corrupt chunk?): {exc}", _REPLACE
            ) from None

    def file_of(self, z: int) -> Path:
        return self.path

    def stored(self) -> Stored:
        """Whether the array's folder holds any chunk. zarr leaves out chunks equal to the fill
        value, so fewer than declared is normal; the count stops at the first chunk found
        (0 or 1), sparing a walk over every chunk file of a large scan."""
        grid = self._array.shards or self._array.chunks  # a shard is one stored object
        declared = 1
        for size, chunk in zip(self._array.shape, grid):
            declared *= -(-size // chunk)
        folder = self.path / self._array.path
        found = any(name not in _METADATA_FILES for _, _, names in os.walk(folder) for name in names)
        return Stored(int(found), declared, skips_fill=True)


def _check_chunks(path: Path, array: zarr.Array) -> None:
    """A chunk dimension of 0 (a hand-edited or corrupt zarr.json/.zarray) would divide by zero
    on the first read; refuse it when the array is opened."""
    chunks = tuple(array.shards or array.chunks)
    if min(chunks, default=1) < 1:
        raise InputError(path, f"zarr array of shape {array.shape} has chunk shape {chunks}: a dimension of 0", _REPLACE)


def _open_zarr(path: Path) -> zarr.Array | zarr.Group:
    """The zarr node at `path`; read-only, so a mistaken path can never be modified."""
    try:
        return zarr.open(store=LocalStore(path, read_only=True), mode="r")
    except _ZARR_ERRORS as exc:
        raise InputError(
            path,
            f"not a zarr array or OME-Zarr image (no zarr metadata, or it is corrupt): {exc}",
            "give the .zarr folder of an OME-Zarr image or of a 3-D zarr array",
        ) from None


def _bare(path: Path, array: zarr.Array) -> tuple[zarr.Array, list[str]]:
    """A zarr array without OME metadata carries no axes: only a 3-D one is taken, as (Z, Y, X)."""
    if array.ndim != 3:
        raise InputError(
            path,
            f"zarr array of shape {array.shape} without OME axes: not z, y, x",
            "give a 3-D (Z, Y, X) array, or an OME-Zarr image whose axes say which are z, y, x",
        )
    return array, list(SPATIAL)


def _level0(path: Path, group: zarr.Group) -> tuple[zarr.Array, list[str]]:
    """The full-resolution array of the first multiscales entry, and its axis names."""
    # Telling ome-zarr-py the format the zarr version implies spares its "version mismatch"
    # warning for NGFF 0.4 files; it still detects the exact version from the metadata.
    guess: Format = FormatV04() if group.metadata.zarr_format == 2 else FormatV05()
    multiscales = _raw_multiscales(group)
    if not multiscales:
        raise InputError(
            path,
            "zarr group without OME-NGFF multiscales metadata (a plate, a labels folder?)",
            "give an OME-Zarr image (or its labels/<name> image) or a 3-D zarr array",
        )
    problem = _multiscales_problem(multiscales)
    if problem:  # before ome-zarr-py, which fails on these with an AttributeError
        raise InputError(path, f"malformed OME-NGFF multiscales metadata: {problem}", _REPLACE)
    try:
        location = parse_url(path, fmt=guess)
        attrs = location.root_attrs if location is not None else {}
    except _METADATA_ERRORS as exc:
        raise InputError(path, f"unreadable OME-Zarr metadata: {exc}", _REPLACE) from None
    try:
        multiscale = attrs["multiscales"][0]
        level_path = multiscale["datasets"][0]["path"]
        axes = _axis_names(multiscale.get("axes"), location.fmt)
        array = group[level_path]
    except _METADATA_ERRORS as exc:
        raise InputError(path, f"malformed OME-NGFF multiscales metadata: {exc!r}", _REPLACE) from None
    if not isinstance(array, zarr.Array):
        raise InputError(path, f"multiscales dataset {level_path!r} is not an array", _REPLACE)
    return array, axes


def _raw_multiscales(group: zarr.Group) -> Any:
    """`multiscales` as the group stores it: under `ome` (NGFF 0.5), else at the top (0.4)."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome")
    return (ome if isinstance(ome, dict) else attrs).get("multiscales")


def _multiscales_problem(multiscales: Any) -> str | None:
    """What is wrong with the JSON types of the parts xctsam reads (None if nothing): the
    first image's first dataset path and its axes."""
    if not isinstance(multiscales, list):
        return f"multiscales is {json.dumps(multiscales)[:80]}, not a list of images"
    image = multiscales[0]
    if not isinstance(image, dict):
        return f"multiscales[0] is {json.dumps(image)[:80]}, not an image's metadata"
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        return f"multiscales[0].datasets is {json.dumps(datasets)[:80]}, not a list of levels"
    if not isinstance(datasets[0].get("path"), str):
        return f"multiscales[0].datasets[0] has path {json.dumps(datasets[0].get('path'))[:80]}, not a string"
    axes = image.get("axes")
    if axes is not None and not isinstance(axes, list):
        return f"multiscales[0].axes is {json.dumps(axes)[:80]}, not a list of axes"
    return None


def _axis_names(axes: Any, fmt: Format) -> list[str]:
    """Axis names, validated by ome-zarr-py (NGFF 0.1/0.2 have none: implicitly t, c, z, y, x)."""
    if axes is None and fmt.version not in ("0.1", "0.2"):
        raise ValueError(f"NGFF {fmt.version} multiscales without 'axes'")
    return [axis["name"] for axis in Axes(axes, fmt).to_list()]


def _check_axes(path: Path, axes: list[str], shape: tuple[int, ...]) -> None:
    """Refuse anything but one grey (Z, Y, X) volume: 2-D images, colour or multi-channel data."""
    if len(axes) != len(shape):
        raise InputError(path, f"axes {axes} do not match the array's shape {shape}", _REPLACE)
    spatial = [a for a in axes if a in SPATIAL]
    if len(spatial) != 3:
        raise InputError(
            path,
            f"image has spatial axes {spatial} (axes {axes}, shape {shape}), not z, y, x",
            "give a 3-D (Z, Y, X) volume; a 2-D image cannot be segmented as a volume",
        )
    if spatial != list(SPATIAL):
        raise InputError(
            path, f"spatial axes in order {spatial}, not z, y, x", "save the volume as (Z, Y, X)"
        )
    extra = {a: n for a, n in zip(axes, shape) if a not in SPATIAL and n != 1}
    if extra:
        raise InputError(
            path,
            f"non-spatial axes of size > 1 {extra} (axes {axes}, shape {shape}): not one grey volume",
            "save one channel and one time point per image (e.g. with ome-zarr-py's write_image)",
        )


class OmeZarrLabelsWriter:
    """Write a new OME-Zarr (NGFF 0.5, zarr v3): the grey image and its predicted labels.

    Layout (as napari-ome-zarr and Fiji/MoBIE read it): the grey image at the root (array "0",
    axes z, y, x) and the labels at `labels/<name>` (array "0", uint8, `image-label` metadata
    with a colour and a `properties` entry per class, `attrs` under the key "xctsam").

    Used as a context manager; `write` takes slabs or single slices in any order. Slices are
    buffered until a chunk-deep slab is complete, then written whole, so memory stays at one
    chunk-slab and no chunk is rewritten slice after slice. The folder is built under a
    temporary name and renamed to `dst` only when every slice was written.
    """

    def __init__(
        self,
        dst: Path,
        shape: tuple[int, int, int],
        image_dtype: np.dtype | type | str,
        *,
        name: str = "segmentation",
        voxel_size: tuple[float, float, float] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.dst = Path(dst)
        if self.dst.suffix.lower() != ".zarr":
            raise InputError(self.dst, "an OME-Zarr output must be named *.zarr", "e.g. --out scan_pred.zarr")
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (Z, Y, X) of positive sizes, not {shape}")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"labels name must be a plain folder name, not {name!r}")
        self.shape = tuple(int(n) for n in shape)
        self.image_dtype = np.dtype(image_dtype)
        self.name = name
        self.voxel_size = [float(v) for v in (voxel_size or (1.0, 1.0, 1.0))]
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be 3 positive sizes (z, y, x), not {voxel_size}")
        self.attrs = json.loads(json.dumps(dict(attrs or {})))  # fails early (TypeError) if not JSON-able
        self.chunks = tuple(min(n, c) for n, c in zip(self.shape, CHUNK))
        self._stack = ExitStack()

    def __enter__(self) -> OmeZarrLabelsWriter:
        self._refuse_existing()
        tmp = self._stack.enter_context(atomic_dir(self.dst))
        try:
            self._image, self._labels = self._create(tmp)
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise
        depth = self.chunks[0]
        self._block = 0  # which chunk-deep slab the buffers hold
        self._image_buf = np.zeros((depth, *self.shape[1:]), self.image_dtype)
        self._labels_buf = np.zeros((depth, *self.shape[1:]), np.uint8)
        self._filled = np.zeros(depth, bool)  # slices of the buffered slab received so far
        self._written = np.zeros(self.shape[0], bool)  # slices received, over the whole volume
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as error:  # atomic_dir then removes the temporary folder
                self._stack.__exit__(type(error), error, error.__traceback__)
                raise
        return bool(self._stack.__exit__(exc_type, exc, tb))

    def write(self, z0: int, image_slab: np.ndarray, labels_slab: np.ndarray) -> None:
        """Write slices z0..z0+k of the image and its labels ((k, Y, X) or one (Y, X) slice)."""
        image, labels = self._checked(z0, np.asarray(image_slab), np.asarray(labels_slab))
        depth = self.chunks[0]
        for k in range(len(image)):
            z = z0 + k
            if z // depth != self._block:
                self._flush()
                self._block = z // depth
            self._image_buf[z % depth], self._labels_buf[z % depth] = image[k], labels[k]
            self._filled[z % depth] = self._written[z] = True
            if self._filled[: self._block_depth()].all():
                self._flush()

    def _refuse_existing(self) -> None:
        # atomic_dir would replace an existing folder; a prediction must never delete one
        if self.dst.exists():
            raise InputError(self.dst, "already exists", "choose a new output name, or move the old one away")

    def _create(self, root_dir: Path) -> tuple[zarr.Array, zarr.Array]:
        """The empty arrays and all OME metadata (pixels follow by chunk-slabs)."""
        fmt = FormatV05()
        root = zarr.open_group(root_dir, mode="w", zarr_format=3)
        image = self._array(root, self.image_dtype)
        self._multiscales(root, fmt, self.dst.stem)
        labels_root = root.create_group("labels")
        group = labels_root.create_group(self.name)
        labels = self._array(group, np.dtype(np.uint8))
        self._multiscales(group, fmt, self.name)
        # before write_label_metadata: it opens its own handle on the group, and a write through
        # this (then stale) one would put back the attributes without its image-label
        group.attrs["xctsam"] = self.attrs
        write_label_metadata(
            labels_root,
            self.name,
            colors=[{"label-value": v, "rgba": _rgba(v)} for v in range(NUM_CLASSES)],
            properties=[{"label-value": v, "class": CLASS_NAMES[v]} for v in range(NUM_CLASSES)],
            fmt=fmt,
            source={"image": "../../"},  # the grey image these labels segment
        )
        add_metadata(labels_root, {"version": fmt.version}, fmt=fmt)  # writer omits it; NGFF 0.5 asks for it
        return image, labels

    def _array(self, group: zarr.Group, dtype: np.dtype) -> zarr.Array:
        return group.create_array(
            "0",
            shape=self.shape,
            chunks=self.chunks,
            dtype=dtype,
            fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
            dimension_names=SPATIAL,
        )

    def _multiscales(self, group: zarr.Group, fmt: Format, name: str) -> None:
        scale = [{"type": "scale", "scale": self.voxel_size}]
        write_multiscales_metadata(
            group,
            [{"path": "0", "coordinateTransformations": scale}],
            fmt=fmt,
            axes=[{"name": a, "type": "space"} for a in SPATIAL],
            name=name,
        )

    def _checked(self, z0: int, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slabs as (k, Y, X), refusing what would be silently wrong: other sizes, lossy casts,
        values that are no class."""
        image, labels = (a[None] if a.ndim == 2 else a for a in (image, labels))
        if image.shape != labels.shape or image.shape[1:] != self.shape[1:]:
            raise ValueError(f"slabs {image.shape} / {labels.shape} do not fit slices of {self.shape[1:]}")
        if not 0 <= z0 <= z0 + len(image) <= self.shape[0]:
            raise ValueError(f"slices {z0}..{z0 + len(image)} are outside 0..{self.shape[0]}")
        if not np.can_cast(image.dtype, self.image_dtype, "safe"):
            raise ValueError(f"image slab of {image.dtype} cannot be stored as {self.image_dtype}")
        if not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES)
        ):
            raise ValueError(f"labels must be integers 0..{NUM_CLASSES - 1}")
        return image, labels

    def _block_depth(self) -> int:
        """Slices in the buffered chunk-slab (the last one may be shallower)."""
        depth = self.chunks[0]
        return min(depth, self.shape[0] - self._block * depth)

    def _flush(self) -> None:
        """Write the buffered slices: the whole chunk-slab when complete, else each run of them."""
        start = self._block * self.chunks[0]
        for a, b in _runs(self._filled):
            self._image[start + a : start + b] = self._image_buf[a:b]
            self._labels[start + a : start + b] = self._labels_buf[a:b]
        self._filled[:] = False

    def _finish(self) -> None:
        self._flush()
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise RuntimeError(
                f"{self.dst}: {missing.size} of {self.shape[0]} slices never written"
                f" (first z={missing[0]}); nothing was published"
            )
        self._refuse_existing()  # created meanwhile by someone else: keep theirs


def _rgba(value: int) -> list[int]:
    """Background transparent, so the grey image shows through; classes in distinct colours."""
    if value == 0:
        return [0, 0, 0, 0]
    return [*_PALETTE[(value - 1) % len(_PALETTE)], 255]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
