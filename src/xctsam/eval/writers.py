"""Writing a streamed prediction to the file a user asked for, atomically, by its suffix.

- `.h5` / `.hdf5`: a project volume (`image`: the scan's grey values as float32, `labels`),
  readable by `xctsam.data.volumes.Volume` and every tool of the project, attrs naming the model;
- `.tif` / `.tiff`: the labels only, an ImageJ hyperstack (uint8, one page per slice, axes ZYX)
  that ImageJ/Fiji and napari open as a stack; the provenance JSON is ImageJ's `Info`;
- `.zarr`: OME-Zarr (NGFF 0.5) with the scan's image at the root and the labels image under
  `labels/segmentation`, so napari (napari-ome-zarr) shows both, the labels as a layer.

With `uncertainty`, each slice's normalised entropy (eval.uncertainty, x 255 as uint8) goes to
`<name>.uncertainty.tif` beside the output, a multi-page TIFF, for every format alike
(`write_uncertainty` writes it alone, for an output that exists).

Each writer pulls (z, labels) items in z order, slice by slice, so memory stays flat in depth,
and publishes its output under the final name only once the last slice is in. An output that
is the input itself (the same file, a link to it) is refused before anything is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xctsam.data.scans import GreySource, Scan
from xctsam.data.volumes import LABELS, VolumeWriter
from xctsam.eval.uncertainty import normalised_entropy
from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError

OutputFormat = Literal["hdf5", "tiff", "zarr"]
FORMATS_BY_SUFFIX: dict[str, OutputFormat] = {".h5": "hdf5", ".hdf5": "hdf5", ".tif": "tiff", ".tiff": "tiff", ".zarr": "zarr"}
SUFFIX_OF: dict[OutputFormat, str] = {"hdf5": ".h5", "tiff": ".tif", "zarr": ".zarr"}
ZARR_LABELS = "segmentation"  # the labels image's name in an OME-Zarr output (OmeZarrLabelsWriter's default)


def output_format(out: Path, fmt: OutputFormat | None = None) -> OutputFormat:
    """The given format, or the one the file suffix names (.h5/.hdf5, .tif/.tiff, .zarr)."""
    if fmt is not None:
        return fmt
    found = FORMATS_BY_SUFFIX.get(Path(out).suffix.lower())
    if found is None:
        raise InputError(out, "unknown output format", f"name it {' / '.join(FORMATS_BY_SUFFIX)} or pass the format")
    return found


def refuse_overwriting(out: Path, source: Path) -> None:
    """Refuse an output that is the input scan (the same path, a symlink or a hard link to it):
    renaming the prediction onto it would replace the scan (and a volume's ground-truth labels)."""
    if out.exists() and os.path.samefile(out, source):
        link = "" if out.absolute() == source.absolute() else f" {source} (a link to it)"
        raise InputError(out, f"is the input volume{link}; the prediction would overwrite the scan and its labels", "choose another --out")


def _in_order(predictions: Iterable[tuple[Any, ...]], n_slices: int) -> Iterator[tuple[int, np.ndarray]]:
    """(z, labels) checked to arrive as 0, 1, ..., n_slices - 1 (streamed writers need it)."""
    expected = 0
    for z, labels, *_ in predictions:
        if z != expected:
            raise ValueError(f"prediction for slice {z} arrived where slice {expected} was due")
        yield z, np.asarray(labels, dtype=np.uint8)
        expected += 1
    if expected != n_slices:
        raise ValueError(f"{expected} predicted slices for a volume of {n_slices}")


def open_labels(out: Path) -> Scan:
    """A written prediction's labels, for reading back slab by slab (e.g. the part's defect report)."""
    fmt = output_format(out)
    if fmt == "hdf5":
        return Scan(out, "hdf5", LABELS)
    if fmt == "zarr":
        return Scan(Path(out) / "labels" / ZARR_LABELS, "zarr")
    return Scan(out, "tiff")


def uncertainty_path(out: Path) -> Path:
    """Where the uncertainty map of output `out` goes: `<out name>.uncertainty.tif` beside it."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix(out.suffix)}.uncertainty.tif")


def write_prediction(
    predictions: Iterable[tuple[Any, ...]],
    out: Path,
    source: GreySource,
    fmt: OutputFormat | None = None,
    attrs: Mapping[str, Any] | None = None,
    uncertainty: Path | None = None,
) -> Path:
    """Write streamed (z, labels, probabilities) items for `source`'s slices to `out`, atomically;
    with `uncertainty`, also each slice's normalised entropy there (uint8, 255 = all classes
    equally likely), a multi-page TIFF published after the labels."""
    fmt = output_format(out, fmt)
    refuse_overwriting(Path(out), source.path)
    safe = _json_safe(attrs or {})
    with ExitStack() as stack:
        if uncertainty is not None:
            refuse_overwriting(Path(uncertainty), source.path)
            pages = stack.enter_context(_UncertaintyPages(Path(uncertainty), safe))
            predictions = pages.tap(predictions)
        write = {"hdf5": _write_hdf5, "tiff": _write_tiff, "zarr": _write_zarr}[fmt]
        write(_in_order(predictions, source.n_slices), Path(out), source, safe)
    return Path(out)


def write_uncertainty(predictions: Iterable[tuple[Any, ...]], path: Path, source: GreySource, attrs: Mapping[str, Any] | None = None) -> Path:
    """Only the uncertainty map of streamed (z, labels, probabilities) items, atomically: for
    an output kept from an earlier run that lacks it."""
    refuse_overwriting(Path(path), source.path)
    with _UncertaintyPages(Path(path), _json_safe(attrs or {})) as pages:
        for _ in _in_order(pages.tap(predictions), source.n_slices):
            pass  # the pages are written as the items pass
    return Path(path)


class _UncertaintyPages:
    """Entropy pages appended to one contiguous TIFF series as the slices stream past."""

    def __init__(self, path: Path, attrs: Mapping[str, Any]) -> None:
        self.path = path
        self.attrs = {"axes": "ZYX", "uncertainty": "normalised entropy x 255", **attrs}
        self._stack = ExitStack()

    def __enter__(self) -> _UncertaintyPages:
        import tifffile

        tmp = self._stack.enter_context(atomic_path(self.path))
        self._tif = self._stack.enter_context(tifffile.TiffWriter(tmp))
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def tap(self, predictions: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for item in predictions:
            _, _, probabilities = item
            page = np.round(normalised_entropy(probabilities) * 255).astype(np.uint8)
            # uncompressed: only then does tifffile append pages to one series (ImageJ opens it as a stack)
            self._tif.write(page, contiguous=True, photometric="minisblack", metadata=self.attrs)
            yield item


def _write_hdf5(ordered: Iterable[tuple[int, np.ndarray]], out: Path, source: GreySource, attrs: Mapping[str, Any]) -> None:
    with VolumeWriter(out, source.shape, labelled=True, attrs=attrs) as writer:
        for z, labels in ordered:
            writer.write(z, source.image(z, z + 1), labels)


def _write_tiff(ordered: Iterable[tuple[int, np.ndarray]], out: Path, source: GreySource, attrs: Mapping[str, Any]) -> None:
    import tifffile

    # Uncompressed: ImageJ's own opener reads hyperstacks only so (compressed ones need Bio-Formats).
    pages = (labels for _, labels in ordered)
    metadata = {"axes": "ZYX", "Info": json.dumps(dict(attrs))}
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, imagej=True) as tif:
        tif.write(pages, shape=source.shape, dtype=np.uint8, photometric="minisblack", metadata=metadata)


def _write_zarr(ordered: Iterable[tuple[int, np.ndarray]], out: Path, source: GreySource, attrs: Mapping[str, Any]) -> None:
    from xctsam.data.omezarr import OmeZarrLabelsWriter

    # the image in the scan's own dtype (a uint16 scan stays uint16 for the viewer's contrast)
    with OmeZarrLabelsWriter(out, source.shape, source.dtype, attrs=attrs) as writer:
        for z, labels in ordered:
            writer.write(z, source.raw(z, z + 1), labels)


def _json_safe(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as JSON keeps it: paths and other objects become their text."""
    return json.loads(json.dumps(dict(attrs), default=str))
