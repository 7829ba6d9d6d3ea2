"""OME-Zarr in and out (`xctsam.data.omezarr`): slab reads of NGFF 0.4/0.5 images and bare zarr
arrays, refusals naming the file, and the labels writer (layout napari reads, atomic publish,
chunk-slab buffering). Every file is written here, small, in tmp_path.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr.writer import write_image

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.data.omezarr import OmeZarrLabelsWriter, OmeZarrStack
from xctsam.data.readers import VOLUME_FORMATS, open_stack
from xctsam.util.errors import InputError

SHAPE = (20, 12, 14)  # 20 slices: one full 16-deep chunk-slab and a 4-deep remainder


def _volume(shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    image = (np.arange(np.prod(shape)) * 7 % 4093).astype(np.uint16).reshape(shape)
    return image, (image % NUM_CLASSES).astype(np.uint8)


def _write(dst: Path, image: np.ndarray, labels: np.ndarray, step: int = 1, **kwargs: Any) -> Path:
    with OmeZarrLabelsWriter(dst, image.shape, image.dtype, **kwargs) as writer:
        for z in range(0, len(image), step):
            writer.write(z, image[z : z + step], labels[z : z + step])
    return dst


def _attrs(folder: Path) -> dict:
    return json.loads((folder / "zarr.json").read_text())["attributes"]


def _ome_image(path: Path, data: np.ndarray, axes: str, fmt: Any = None) -> Path:
    """An image written by ome-zarr-py itself (zarr v2 for NGFF 0.4, else v3)."""
    group = zarr.open_group(path, mode="w", zarr_format=2 if fmt else 3)
    write_image(data, group, scale_factors=[2] if data.shape[-1] > 4 else [], axes=axes, fmt=fmt)
    return path


def test_round_trip_reads_back_slabs(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = _write(tmp_path / "scan_pred.zarr", image, labels)
    grey, seg = OmeZarrStack(dst), OmeZarrStack(dst / "labels" / "segmentation")
    assert (grey.shape, grey.dtype, grey.reads_whole) == (SHAPE, np.uint16, False)
    assert (seg.shape, seg.dtype) == (SHAPE, np.uint8)
    np.testing.assert_array_equal(grey.read(3, 7), image[3:7])
    np.testing.assert_array_equal(seg.read(0, 20), labels)
    assert grey.file_of(5) == dst


def test_reads_only_the_chunks_of_the_requested_slices(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = _write(tmp_path / "scan.zarr", image, labels)
    (dst / "0" / "c" / "1" / "0" / "0").write_bytes(b"not a chunk" * 9)  # slices 16..19
    stack = OmeZarrStack(dst)
    np.testing.assert_array_equal(stack.read(0, 16), image[:16])
    with pytest.raises(InputError, match=r"scan\.zarr: cannot read slices 10\.\.20"):
        stack.read(10, 20)


def test_writer_layout_and_metadata(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = _write(tmp_path / "scan.zarr", image, labels, voxel_size=(2.0, 0.5, 0.5), attrs={"model": "m1"})
    root = _attrs(dst)["ome"]
    assert root["version"] == "0.5"
    (dataset,) = root["multiscales"][0]["datasets"]
    assert dataset["path"] == "0"
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]
    assert [a["name"] for a in root["multiscales"][0]["axes"]] == ["z", "y", "x"]
    assert _attrs(dst / "labels")["ome"] == {"labels": ["segmentation"], "version": "0.5"}
    seg = _attrs(dst / "labels" / "segmentation")
    label_meta = seg["ome"]["image-label"]
    assert label_meta["colors"][0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}
    assert all(c["rgba"][3] == 255 for c in label_meta["colors"][1:])
    assert [p["class"] for p in label_meta["properties"]] == list(CLASS_NAMES)
    assert seg["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    assert seg["xctsam"] == {"model": "m1"}
    arrays = zarr.open_array(dst / "0", mode="r"), zarr.open_array(dst / "labels/segmentation/0", mode="r")
    assert [(a.dtype, a.chunks) for a in arrays] == [(np.uint16, (16, 12, 14)), (np.uint8, (16, 12, 14))]
    assert all(a.compressors for a in arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.zarr"]  # no temporary left


def test_ome_zarr_reader_finds_the_labels_as_napari_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image, labels = _volume()
    dst = _write(tmp_path / "scan.zarr", image, labels)
    with caplog.at_level(logging.WARNING):
        nodes = list(Reader(parse_url(dst))())
    assert not caplog.records  # e.g. no "no parent found" for the labels' source image
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), image)
    (label_node,) = [node for node in nodes if node.load(Label)]
    assert label_node.metadata["name"] == "segmentation"
    assert label_node.metadata["color"][0] == [0, 0, 0, 0]
    assert label_node.metadata["properties"] == {v: {"class": n} for v, n in enumerate(CLASS_NAMES)}
    np.testing.assert_array_equal(np.asarray(label_node.data[0]), labels)


def test_reads_ngff_04_written_by_ome_zarr_py(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image, _ = _volume()
    path = _ome_image(tmp_path / "v04.zarr", image, "zyx", FormatV04())
    assert _attrs_v2(path)["multiscales"][0]["version"] == "0.4"
    with caplog.at_level(logging.WARNING):
        stack = OmeZarrStack(path)  # its level 0 is "s0", found from the metadata
    assert not caplog.records  # no "version mismatch" from ome-zarr-py on the user's terminal
    assert stack.shape == SHAPE
    np.testing.assert_array_equal(stack.read(5, 9), image[5:9])


def _attrs_v2(folder: Path) -> dict:
    return json.loads((folder / ".zattrs").read_text())


def test_reads_ngff_05_with_size_one_time_and_channel(tmp_path: Path) -> None:
    image, _ = _volume()
    path = _ome_image(tmp_path / "tczyx.zarr", image[None, None], "tczyx")
    stack = OmeZarrStack(path)
    assert (stack.shape, stack.dtype) == (SHAPE, np.uint16)
    np.testing.assert_array_equal(stack.read(18, 20), image[18:20])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_reads_a_bare_3d_zarr_array(tmp_path: Path, zarr_format: int) -> None:
    image, _ = _volume()
    path = tmp_path / "bare.zarr"
    zarr.create_array(path, data=image, chunks=(4, 12, 14), zarr_format=zarr_format)
    stack = OmeZarrStack(path)
    assert stack.shape == SHAPE
    np.testing.assert_array_equal(stack.read(2, 11), image[2:11])


def _two_channels(path: Path) -> Path:
    return _ome_image(path, np.zeros((2, *SHAPE), np.uint8), "czyx")


def _two_d(path: Path) -> Path:
    return _ome_image(path, np.zeros(SHAPE[1:], np.uint8), "yx")


def _bare_2d(path: Path) -> Path:
    zarr.create_array(path, shape=(4, 5), dtype="u1")
    return path


def _not_zarr(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("hello")
    return path


def _corrupt_metadata(path: Path) -> Path:
    path.mkdir()
    (path / "zarr.json").write_text("{not json")
    return path


def _no_multiscales(path: Path) -> Path:
    zarr.open_group(path, mode="w").attrs["ome"] = {"version": "0.5"}
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_two_channels, "non-spatial axes of size > 1"),
        (_two_d, "not z, y, x"),
        (_bare_2d, "not z, y, x"),
        (lambda path: path, "not found"),
        (_not_zarr, "not a zarr array or OME-Zarr image"),
        (_corrupt_metadata, "corrupt"),
        (_no_multiscales, "without OME-NGFF multiscales"),
    ],
    ids=["2-channel", "2-D", "bare-2-D", "missing", "not-zarr", "corrupt-metadata", "no-multiscales"],
)
def test_refuses_what_is_not_one_grey_volume(tmp_path: Path, make: Any, problem: str) -> None:
    path = make(tmp_path / "bad.zarr")
    with pytest.raises(InputError, match=problem) as caught:
        OmeZarrStack(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_refuses_a_corrupt_chunk_naming_the_file(tmp_path: Path) -> None:
    path = _ome_image(tmp_path / "v04.zarr", _volume()[0], "zyx", FormatV04())
    chunks = [p for p in (path / "s0").rglob("*") if p.is_file() and not p.name.startswith(".")]
    chunks[0].write_bytes(b"\x00junk")
    with pytest.raises(InputError, match=r"corrupt chunk") as caught:
        OmeZarrStack(path).read(0, SHAPE[0])
    assert str(path) in str(caught.value)


def test_writer_publishes_nothing_when_the_block_raises(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = tmp_path / "out" / "scan.zarr"
    with pytest.raises(KeyError), OmeZarrLabelsWriter(dst, SHAPE, image.dtype) as writer:
        writer.write(0, image, labels)
        raise KeyError("prediction failed")
    assert list(dst.parent.iterdir()) == []


def test_writer_publishes_nothing_when_slices_are_missing(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = tmp_path / "scan.zarr"
    with pytest.raises(RuntimeError, match="1 of 20 slices never written"):  # noqa: SIM117
        with OmeZarrLabelsWriter(dst, SHAPE, image.dtype) as writer:
            writer.write(0, image[:19], labels[:19])
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_an_existing_destination_and_keeps_it(tmp_path: Path) -> None:
    dst = tmp_path / "scan.zarr"
    dst.mkdir()
    (dst / "keep.txt").write_text("theirs")
    with pytest.raises(InputError, match="already exists") as caught:
        OmeZarrLabelsWriter(dst, SHAPE, np.uint16).__enter__()
    assert str(dst) in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["scan.zarr"]
    assert (dst / "keep.txt").read_text() == "theirs"


def test_writer_refuses_a_name_without_zarr_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"must be named \*\.zarr"):
        OmeZarrLabelsWriter(tmp_path / "scan.h5", SHAPE, np.uint16)


@pytest.mark.parametrize(
    ("image_slice", "labels_slice", "problem"),
    [
        (np.zeros(SHAPE[1:], np.uint16), np.full(SHAPE[1:], NUM_CLASSES), "labels must be integers"),
        (np.zeros(SHAPE[1:], np.uint16), np.zeros(SHAPE[1:], np.float32), "labels must be integers"),
        (np.zeros(SHAPE[1:], np.float32), np.zeros(SHAPE[1:], np.uint8), "cannot be stored as uint16"),
        (np.zeros((1, 12, 15), np.uint16), np.zeros((1, 12, 15), np.uint8), "do not fit"),
    ],
    ids=["class-out-of-range", "float-labels", "lossy-image-cast", "wrong-size"],
)
def test_writer_refuses_slabs_that_would_be_stored_wrong(
    tmp_path: Path, image_slice: np.ndarray, labels_slice: np.ndarray, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem), OmeZarrLabelsWriter(
        tmp_path / "a.zarr", SHAPE, np.uint16
    ) as writer:
        writer.write(0, image_slice, labels_slice)
    assert list(tmp_path.iterdir()) == []


def test_writer_takes_a_one_slice_slab_with_a_2d_labels_slice(tmp_path: Path) -> None:
    image, labels = _volume()
    with OmeZarrLabelsWriter(tmp_path / "mixed.zarr", SHAPE, np.uint16) as writer:
        for z in range(SHAPE[0]):
            writer.write(z, image[z : z + 1], labels[z].astype(np.int64))  # as argmax gives
    np.testing.assert_array_equal(OmeZarrStack(tmp_path / "mixed.zarr/labels/segmentation").read(0, 20), labels)


class _Recorder:
    """Stands in for a zarr array: records the z ranges written to it."""

    def __init__(self, array: zarr.Array) -> None:
        self.array, self.writes = array, []

    def __setitem__(self, key: slice, value: np.ndarray) -> None:
        self.writes.append((key.start, key.stop))
        self.array[key] = value


def test_slices_one_at_a_time_are_written_as_whole_chunk_slabs(tmp_path: Path) -> None:
    image, labels = _volume()
    with OmeZarrLabelsWriter(tmp_path / "one.zarr", SHAPE, image.dtype) as writer:
        writer._image, writer._labels = _Recorder(writer._image), _Recorder(writer._labels)
        for z in range(SHAPE[0]):
            writer.write(z, image[z], labels[z])  # (Y, X) slices
    assert writer._image.writes == writer._labels.writes == [(0, 16), (16, 20)]
    slab = _write(tmp_path / "slab.zarr", image, labels, step=SHAPE[0])
    for inner in ("0", "labels/segmentation/0"):
        one, whole = (zarr.open_array(p / inner, mode="r")[:] for p in (tmp_path / "one.zarr", slab))
        np.testing.assert_array_equal(one, whole)
    np.testing.assert_array_equal(zarr.open_array(slab / "0", mode="r")[:], image)


def test_slices_in_any_order_give_the_same_arrays(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = tmp_path / "reversed.zarr"
    with OmeZarrLabelsWriter(dst, SHAPE, image.dtype) as writer:
        for z in reversed(range(0, SHAPE[0], 3)):
            writer.write(z, image[z : z + 3], labels[z : z + 3])
    np.testing.assert_array_equal(OmeZarrStack(dst).read(0, 20), image)
    np.testing.assert_array_equal(OmeZarrStack(dst / "labels/segmentation").read(0, 20), labels)


def test_open_stack_reads_zarr(tmp_path: Path) -> None:
    image, labels = _volume()
    dst = _write(tmp_path / "scan.zarr", image, labels)
    assert "zarr" in VOLUME_FORMATS
    with ExitStack() as files:
        stack = open_stack(dst, "zarr", "", files)
        assert isinstance(stack, OmeZarrStack)
        np.testing.assert_array_equal(stack.read(15, 17), image[15:17])


def test_importing_readers_does_not_import_zarr() -> None:
    code = "import sys, xctsam.data.readers; sys.exit('zarr' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
