"""Malformed scans and params are refused before any work: one line (or a usage error), exit 2,
nothing written.

Scans whose headers declare what cannot be real (no voxel at all; 1e8 slices in a 1400-byte
file), OME-Zarr metadata of the wrong JSON types, TIFF folders mixing dtypes or sizes, voxel
sizes and params without a sane bound, and import splits that would leave the data root. The
main case of each runs the console script in a subprocess; variants call the readers, the
params parser or the CLI's `main` in-process. Runs that would grow without bound on a faulty
build are watched and killed past a memory ceiling, so a regression fails fast instead of
filling the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import psutil
import pytest
import tifffile
import yaml
import zarr

from tests.test_bad_input_data import (  # noqa: F401 (fixtures)
    XCTSAM,
    TinyModel,
    assert_cli_error,
    assert_one_line_error,
    predict_args,
    run_main,
    tiny_model,
    xctsam,
)
from xctsam.config.params import parse_params
from xctsam.data import importers
from xctsam.data.datasets import IntensityWindow
from xctsam.data.omezarr import OmeZarrLabelsWriter, OmeZarrStack
from xctsam.data.scans import Scan
from xctsam.eval import predict
from xctsam.util.errors import ConfigError, InputError

from .conftest import REPO, write_params

HUGE_DEPTH = 10**8  # slices a tiny file declares
MAX_RSS = 2 * 2**30  # a refused command needs a few hundred MiB; a faulty build grows past this


# ================================================================ helpers
def declared_scan(path: Path, shape: tuple[int, int, int], *, stored: int = 0) -> Path:
    """An HDF5 (`image`), zarr or NPY scan of `shape` whose first `stored` slices are written;
    HDF5 and zarr keep the rest unwritten (their chunks absent from the file)."""
    if path.suffix == ".npy":
        np.save(path, np.zeros(shape, np.float32))
    elif path.suffix == ".h5":
        with h5py.File(path, "w") as file:
            chunks = (1, *shape[1:]) if min(shape) else None  # HDF5 has no chunk of an empty size
            dataset = file.create_dataset("image", shape=shape, dtype=np.float32, chunks=chunks)
            dataset[:stored] = 1.0
    else:
        array = zarr.open_array(str(path), mode="w", shape=shape, chunks=(1, max(1, shape[1]), max(1, shape[2])), dtype="f4")
        array[:stored] = 1.0
    return path


def ome_zarr(path: Path, edit: Callable[[dict[str, Any]], None] | None = None, level_edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A small OME-Zarr image (NGFF 0.5), then `edit` applied to its `ome` attributes and
    `level_edit` to its level-0 array's zarr.json (as a hand edit or a broken writer would)."""
    image = np.arange(4 * 20 * 20, dtype=np.uint16).reshape(4, 20, 20)
    with OmeZarrLabelsWriter(path, image.shape, image.dtype) as writer:
        writer.write(0, image, np.zeros(image.shape, np.uint8))
    for meta_path, change in ((path / "zarr.json", edit), (path / "0" / "zarr.json", level_edit)):
        if change is not None:
            meta = json.loads(meta_path.read_text())
            change(meta["attributes"]["ome"] if meta_path.parent == path else meta)
            meta_path.write_text(json.dumps(meta))
    return path


def tiff_folder(folder: Path, dtypes: list[type], shapes: list[tuple[int, int]] | None = None) -> Path:
    """One grey TIFF slice per dtype (slice_0.tif, ...), each of its shape (default 20 x 20)."""
    folder.mkdir()
    for z, dtype in enumerate(dtypes):
        shape = shapes[z] if shapes else (20, 20)
        tifffile.imwrite(folder / f"slice_{z}.tif", np.full(shape, 10 + z, dtype), photometric="minisblack")
    return folder


def watched(*args: object, cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    """The console script in a subprocess, killed if its memory passes MAX_RSS; (result, seconds)."""
    environment = {**os.environ, "XCTSAM_NO_PROGRESS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    start = time.monotonic()
    with subprocess.Popen([str(XCTSAM), *map(str, args)], cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        watch = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                rss = watch.memory_info().rss
            except psutil.NoSuchProcess:
                break
            if rss > MAX_RSS or time.monotonic() - start > timeout:
                child.kill()
                child.wait()
                pytest.fail(f"xctsam {' '.join(map(str, args))}: grew to {rss / 2**20:.0f} MiB in {time.monotonic() - start:.0f} s instead of refusing the scan")
            time.sleep(0.1)
        stdout, stderr = child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr), time.monotonic() - start


def usage_error(stderr: str) -> str:
    """A usage error's message on one line, out of the box typer draws around it."""
    return " ".join(stderr.replace("│", " ").split())


def import_args(source: Path, fmt: str, root: Path, split: str = "real/Te-1") -> list[object]:
    return ["data", "import", source, "--format", fmt, "--root", root, "--split", split]


def tiny_params_variant(tiny_model: TinyModel, folder: Path, section: str, key: str, value: Any) -> Path:  # noqa: F811
    raw = yaml.safe_load(tiny_model.params.read_text())
    raw[section][key] = value
    return write_params(folder / "params.yaml", raw)


# ================================================================ 1. volumes without a voxel
def test_predict_refuses_a_volume_without_slices(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    scan, out = declared_scan(tmp_path / "scan.npy", (0, 20, 20)), tmp_path / "pred.tif"

    result = xctsam(*predict_args(tiny_model, scan, out), cwd=tmp_path)

    assert_cli_error(result, scan, "empty volume of 0 slices of 20 x 20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npy"]


@pytest.mark.parametrize(
    ("name", "shape", "out"),
    [("rows.h5", (3, 0, 20), "pred.h5"), ("columns.zarr", (3, 20, 0), "pred.zarr"), ("slices.zarr", (0, 20, 20), "pred.tif")],
)
def test_predict_refuses_empty_volumes_into_every_format(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str], name: str, shape: tuple[int, int, int], out: str) -> None:  # noqa: F811
    scan = declared_scan(tmp_path / name, shape)

    code, err = run_main(capsys, *predict_args(tiny_model, scan, tmp_path / out))

    assert_one_line_error(code, err, scan, f"empty volume of {shape[0]} slices of {shape[1]} x {shape[2]}")
    assert not (tmp_path / out).exists()


def test_import_refuses_a_volume_without_voxels(tmp_path: Path) -> None:
    scan, root = declared_scan(tmp_path / "scan.h5", (3, 20, 0)), tmp_path / "data"

    result = xctsam(*import_args(scan, "hdf5", root), cwd=tmp_path)

    assert_cli_error(result, scan, "empty volume of 3 slices of 20 x 0")
    assert not root.exists()


# ================================================================ 2. sizes a file declares but does not hold
@pytest.mark.parametrize("name", ["huge.h5", "huge.zarr"])
def test_predict_refuses_1e8_declared_slices_at_once_and_in_little_memory(tmp_path: Path, tiny_model: TinyModel, name: str) -> None:  # noqa: F811
    scan, out = declared_scan(tmp_path / name, (HUGE_DEPTH, 64, 64)), tmp_path / "pred.tif"
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) < 10_000

    result, seconds = watched(*predict_args(tiny_model, scan, out), cwd=tmp_path)

    assert_cli_error(result, scan, f"declares {HUGE_DEPTH} slices of 64 x 64 voxels but stores none of their")
    assert seconds < 60 and not out.exists()


def test_import_refuses_1e8_declared_slices(tmp_path: Path) -> None:
    scan, root = declared_scan(tmp_path / "huge.h5", (HUGE_DEPTH, 64, 64)), tmp_path / "data"

    result, _ = watched(*import_args(scan, "hdf5", root), cwd=tmp_path)

    assert_cli_error(result, scan, f"declares {HUGE_DEPTH} slices of 64 x 64 voxels but stores none of their {HUGE_DEPTH} chunks")
    assert not root.exists()


def test_predict_refuses_an_hdf5_scan_written_only_in_part(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # HDF5 allocates every chunk written to, so absent ones were never written: their slices
    # would be predicted from the fill value
    scan = declared_scan(tmp_path / "part.h5", (40, 16, 16), stored=5)

    code, err = run_main(capsys, *predict_args(tiny_model, scan, tmp_path / "pred.h5"))

    assert_one_line_error(code, err, scan, "declares 40 slices of 16 x 16 voxels but stores only 5 of their 40 chunks")


def test_a_zarr_scan_may_leave_out_fill_value_chunks(tmp_path: Path) -> None:
    # zarr's writers skip chunks equal to the fill value, so a sparse zarr scan can be a real one
    scan = declared_scan(tmp_path / "sparse.zarr", (40, 16, 16), stored=5)

    with Scan(scan) as opened:
        opened.check_stored()


def test_memory_before_the_first_slice_is_flat_in_depth() -> None:
    # The context indices of every slice were built up front, each a view keeping a padded copy
    # of range(depth) alive: memory grew with depth squared (4000 slices: 128 MB; 1e8 slices
    # filled any machine). Small enough here that a regression fails without harm.
    depth = 4000
    volume = predict._ArraySlices(np.broadcast_to(np.zeros((1, 8, 8), np.float32), (depth, 8, 8)), Path("deep.npy"))
    tracemalloc.start()
    try:
        z, stack = next(predict._context_stacks(volume, IntensityWindow(0.0, 1.0), 5, None, progress=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (z, stack.shape) == (0, (5, 8, 8))
    assert peak < 2**20, f"{peak / 2**20:.0f} MiB allocated before the first slice of {depth}"


# ================================================================ 3. OME-Zarr metadata of the wrong shape
def test_predict_refuses_garbage_multiscales_in_one_line(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    scan = ome_zarr(tmp_path / "scan.zarr", lambda ome: ome.update(multiscales="garbage"))

    code, err = run_main(capsys, *predict_args(tiny_model, scan, tmp_path / "pred.zarr"))

    assert_one_line_error(code, err, scan, 'malformed OME-NGFF multiscales metadata: multiscales is "garbage", not a list')
    assert not (tmp_path / "pred.zarr").exists()


def test_import_refuses_a_zarr_chunk_dimension_of_0(tmp_path: Path) -> None:
    scan, root = ome_zarr(tmp_path / "scan.zarr", level_edit=lambda meta: meta["chunk_grid"]["configuration"].update(chunk_shape=[0, 20, 20])), tmp_path / "data"

    result = xctsam(*import_args(scan, "zarr", root), cwd=tmp_path)

    assert_cli_error(result, scan, "chunk shape (0, 20, 20): a dimension of 0")
    assert not root.exists()


def _first_image(ome: dict[str, Any]) -> dict[str, Any]:
    return ome["multiscales"][0]


GARBAGE_OME: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "multiscales-a-dict": (lambda ome: ome.update(multiscales={"datasets": []}), "multiscales is {"),
    "multiscales-a-number": (lambda ome: ome.update(multiscales=5), "multiscales is 5, not a list"),
    "image-a-number": (lambda ome: ome.update(multiscales=[5]), "multiscales[0] is 5"),
    "no-datasets": (lambda ome: _first_image(ome).pop("datasets"), "multiscales[0].datasets is null"),
    "no-levels": (lambda ome: _first_image(ome).update(datasets=[]), "multiscales[0].datasets is []"),
    "no-path": (lambda ome: _first_image(ome)["datasets"][0].pop("path"), "datasets[0] has path null"),
    "path-a-number": (lambda ome: _first_image(ome)["datasets"][0].update(path=0), "datasets[0] has path 0"),
    "axes-a-string": (lambda ome: _first_image(ome).update(axes="zyx"), 'multiscales[0].axes is "zyx"'),
    "axes-of-numbers": (lambda ome: _first_image(ome).update(axes=[1, 2, 3]), "malformed OME-NGFF multiscales metadata"),
    "axes-unknown": (lambda ome: _first_image(ome).update(axes=[{"name": "q"}, {"name": "y"}, {"name": "x"}]), "malformed OME-NGFF multiscales metadata"),
    "axes-two": (lambda ome: _first_image(ome).update(axes=[{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]), "do not match the array's shape"),
}


@pytest.mark.parametrize("case", GARBAGE_OME)
def test_garbage_ome_metadata_is_an_input_error(tmp_path: Path, case: str) -> None:
    edit, phrase = GARBAGE_OME[case]
    scan = ome_zarr(tmp_path / "scan.zarr", edit)

    with pytest.raises(InputError) as refused:
        OmeZarrStack(scan)

    assert refused.value.path == scan and phrase in refused.value.problem, str(refused.value)


@pytest.mark.parametrize("chunks", [[0, 20, 20], [4, 0, 20], [4, 20, 0]])
def test_a_zarr_chunk_dimension_of_0_is_refused_on_opening(tmp_path: Path, chunks: list[int]) -> None:
    scan = ome_zarr(tmp_path / "scan.zarr", level_edit=lambda meta: meta["chunk_grid"]["configuration"].update(chunk_shape=chunks))

    with pytest.raises(InputError, match="a dimension of 0"):
        OmeZarrStack(scan)


# ================================================================ 4. TIFF folders mixing slices
def test_predict_refuses_a_tiff_folder_mixing_dtypes(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    folder = tiff_folder(tmp_path / "scan", [np.uint8] * 3 + [np.uint16] * 3 + [np.uint8] * 2)

    result = xctsam(*predict_args(tiny_model, folder, tmp_path / "pred.tif"), cwd=tmp_path)

    assert_cli_error(result, folder / "slice_3.tif", "slice dtype uint16 differs from the first slice's uint8 (slice_0.tif)")
    assert not (tmp_path / "pred.tif").exists()


def test_import_refuses_a_tiff_folder_mixing_dtypes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, root = tiff_folder(tmp_path / "scan", [np.uint16] * 5 + [np.float32]), tmp_path / "data"

    code, err = run_main(capsys, *import_args(folder, "tiff-dir", root))

    assert_one_line_error(code, err, folder / "slice_5.tif", "slice dtype float32 differs from the first slice's uint16")
    assert not root.exists()


def test_a_tiff_folder_mixing_sizes_is_refused_on_opening(tmp_path: Path) -> None:
    # before any slice is read, so no prediction starts on the slices ahead of the odd one
    folder = tiff_folder(tmp_path / "scan", [np.uint8] * 4, [(20, 20), (20, 20), (20, 21), (20, 20)])

    with pytest.raises(InputError, match=r"slice size \(20, 21\) differs") as refused:
        Scan(folder)

    assert refused.value.path == folder / "slice_2.tif"


# ================================================================ 5. voxel sizes
def test_predict_refuses_an_infinite_voxel_size(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    scan = declared_scan(tmp_path / "scan.h5", (2, 8, 8), stored=2)

    result = xctsam(*predict_args(tiny_model, scan, tmp_path / "pred.h5"), "--report", "--voxel-size", "inf", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "Invalid value for --voxel-size: inf is not a voxel size in mm" in usage_error(result.stderr), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]


@pytest.mark.parametrize("size", ["nan", "1e300", "1e-300", "2000"])
def test_predict_refuses_voxel_sizes_whose_volumes_are_not_numbers(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str], size: str) -> None:  # noqa: F811
    scan = declared_scan(tmp_path / "scan.h5", (2, 8, 8), stored=2)

    code, err = run_main(capsys, *predict_args(tiny_model, scan, tmp_path / "pred.h5"), "--report", "--voxel-size", size)

    assert code == 2 and "is not a voxel size in mm: give a finite size from 1e-06 to 1000" in usage_error(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]


def test_import_refuses_an_infinite_voxel_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan, root = declared_scan(tmp_path / "scan.h5", (2, 8, 8), stored=2), tmp_path / "data"

    code, err = run_main(capsys, *import_args(scan, "hdf5", root), "--voxel-size-mm", "inf")

    assert code == 2 and "Invalid value for --voxel-size-mm: inf is not a voxel size in mm" in usage_error(err), err
    assert not root.exists()


# ================================================================ 6. params without an upper bound
def test_predict_refuses_a_batch_beyond_memory_naming_the_key(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    scan = declared_scan(tmp_path / "scan.h5", (2, 8, 8), stored=2)
    params = tiny_params_variant(tiny_model, tmp_path, "predict", "batch", 10**8)

    result, _ = watched("predict", scan, "--model", tiny_model.checkpoint, "--params", params, "--out", tmp_path / "pred.h5", cwd=tmp_path)

    assert_cli_error(result, params, "predict.batch: 100000000 tiles of 32 x 32 are 102400000000 pixels a batch")
    assert not (tmp_path / "pred.h5").exists()


UNBOUNDED = {
    "predict.tile": (("predict", "tile"), 10**6, "predict.tile: Input should be less than or equal to 4096"),
    "predict.batch": (("predict", "batch"), 10**8, "more than 134217728 (2^27); lower predict.batch or predict.tile"),
    "eval.bootstrap.resamples": (("eval", "bootstrap", "resamples"), 10**9, "eval.bootstrap.resamples: Input should be less than or equal to 100000"),
    "fid.crops_per_slice": (("fid", "crops_per_slice"), 10**8, "fid.crops_per_slice: 40 samples x 100000000 crops are 4000000000 crops a split"),
}


@pytest.mark.parametrize("key", UNBOUNDED)
def test_params_that_would_outgrow_memory_are_refused(default_params: dict, key: str) -> None:
    path, value, phrase = UNBOUNDED[key]
    section = default_params
    for part in path[:-1]:
        section = section[part]
    section[path[-1]] = value

    with pytest.raises(ConfigError) as refused:
        parse_params(default_params, "params.yaml")

    assert refused.value.key == key and phrase in str(refused.value), str(refused.value)


def test_the_bounds_keep_the_largest_documented_settings_valid(default_params: dict) -> None:
    default_params["predict"].update(tile=4096, batch=8)  # 2^27 pixels: exactly the bound
    default_params["fid"].update(samples=1000, crops_per_slice=100)
    default_params["eval"]["bootstrap"]["resamples"] = 100_000
    parse_params(default_params, "params.yaml")
    parse_params(yaml.safe_load((REPO / "params.yaml").read_text()), REPO / "params.yaml")


def test_export_refuses_a_tile_wider_than_any_slice(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    out = tmp_path / "model.onnx"

    result, _ = watched("export", "--model", tiny_model.checkpoint, "--params", tiny_model.params, "--tile", "100000", "--out", out, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "Invalid value for --tile: 100000 is more than 4096 pixels" in usage_error(result.stderr), result.stderr
    assert not out.exists()


# ================================================================ 7. import splits outside the data root
def test_import_refuses_a_split_outside_the_root(tmp_path: Path) -> None:
    scan, root = declared_scan(tmp_path / "scan.h5", (2, 8, 8), stored=2), tmp_path / "a" / "data"
    before = sorted(tmp_path.rglob("*"))

    result = xctsam(*import_args(scan, "hdf5", root, "../../escape"), cwd=tmp_path)

    assert_cli_error(result, "../../escape", "is not a split folder under --root")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("split", ["/tmp/abs", "real/../x", "real/..", ".hidden/Te-1", "real/.Te-1", "real//Te-1", "real\\Te-1", "real/Te 1", "", "/"])
def test_split_names_that_could_leave_the_root_are_refused(tmp_path: Path, split: str) -> None:
    with pytest.raises(InputError, match="is not a split folder under --root"):
        importers.split_folder(tmp_path, split)


@pytest.mark.parametrize(("split", "parts"), [("real/Te-1", ("real", "Te-1")), ("real/Te-1/", ("real", "Te-1")), ("synthetic/Tr_GAN.v2", ("synthetic", "Tr_GAN.v2"))])
def test_split_names_like_real_te_n_are_taken(tmp_path: Path, split: str, parts: tuple[str, ...]) -> None:
    assert importers.split_folder(tmp_path, split) == tmp_path.joinpath(*parts)
