"""`xctsam predict` on the files users have: every input and output format, folders of scans,
shards of a campaign, reruns that keep finished outputs, memory flat in volume size."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from tests.test_bad_input_data import TinyModel, predict_args, tiny_model, xctsam  # noqa: F401 (fixture)
from tests.test_predict import UNIT, QuantiseModel, quantise
from xctsam.config.eval import PredictConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.data.omezarr import OmeZarrLabelsWriter, OmeZarrStack
from xctsam.data.scans import Scan, scan_format, scan_inputs
from xctsam.data.volumes import Volume, write_volume
from xctsam.eval.campaign import (
    Job,
    Shard,
    describe,
    estimate,
    parse_shard,
    plan_jobs,
    predict_campaign,
    predict_file,
    scan_stem,
    shard_from_env,
    shard_jobs,
)
from xctsam.util.errors import InputError

CONFIG = PredictConfig(tile=32, overlap=0.25, batch=8)


def grey(shape: tuple[int, int, int] = (6, 40, 56), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def save_scan(folder: Path, kind: str, image: np.ndarray, name: str = "part") -> Path:
    """`image` written as a user's scan of format `kind`; returns the path xctsam is given."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tiff":
        path = folder / f"{name}.tif"
        tifffile.imwrite(path, image, photometric="minisblack")
    elif kind == "tiff-dir":
        path = folder / name
        path.mkdir()
        for z, plane in enumerate(image):
            tifffile.imwrite(path / f"slice_{z}.tif", plane)
    elif kind == "hdf5":
        path = folder / f"{name}.h5"
        with h5py.File(path, "w") as file:
            file.create_dataset("scan/data", data=image)
    elif kind == "npy":
        path = folder / f"{name}.npy"
        np.save(path, image)
    elif kind == "zarr":
        path = folder / f"{name}.zarr"
        with OmeZarrLabelsWriter(path, image.shape, image.dtype) as writer:  # an OME-Zarr image (its labels unused)
            writer.write(0, image, np.zeros_like(image))
    else:
        raise ValueError(kind)
    return path


def read_labels(out: Path) -> np.ndarray:
    if out.suffix == ".h5":
        with Volume(out) as volume:
            return volume.labels()
    if out.suffix == ".tif":
        return tifffile.imread(out)
    return np.asarray(zarr.open_array(out / "labels" / "segmentation" / "0", mode="r")[:])


# ---------------------------------------------------------------- formats in and out
@pytest.mark.parametrize("kind", ["tiff", "tiff-dir", "hdf5", "npy", "zarr"])
def test_every_input_format_reads_the_same_scan(tmp_path: Path, kind: str) -> None:
    image = grey()
    path = save_scan(tmp_path, kind, image)
    assert scan_format(path) == kind
    with Scan(path, dataset="scan/data") as scan:
        assert scan.shape == image.shape and scan.dtype == np.uint8
        np.testing.assert_array_equal(scan.raw(2, 4), image[2:4])
        np.testing.assert_array_equal(scan.image(1, 2), image[1:2].astype(np.float32))


@pytest.mark.parametrize("out_name", ["labels.tif", "labels.h5", "labels.zarr"])
@pytest.mark.parametrize("kind", ["tiff", "npy", "zarr"])
def test_predicted_labels_are_the_same_in_every_output_format(tmp_path: Path, kind: str, out_name: str) -> None:
    image = grey()
    source = save_scan(tmp_path / "in", kind, image)
    window = IntensityWindow(0.0, 255.0)
    out = predict_file(QuantiseModel(), source, window, CONFIG, tmp_path / out_name, device="cpu", attrs={"model": "fake"}, progress=False)
    np.testing.assert_array_equal(read_labels(out), quantise(image / 255.0))


def test_an_ome_zarr_output_holds_the_scan_in_its_dtype_and_the_labels_as_napari_reads_them(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    image = (grey().astype(np.uint16) * 200)
    source = save_scan(tmp_path / "in", "npy", image)
    out = predict_file(QuantiseModel(), source, IntensityWindow(0.0, 51000.0), CONFIG, tmp_path / "part.zarr", device="cpu", attrs={"model": "fake"}, progress=False)
    stack = OmeZarrStack(out)
    assert stack.dtype == np.uint16
    np.testing.assert_array_equal(stack.read(0, 6), image)
    labels = zarr.open_group(out / "labels" / "segmentation", mode="r")
    assert "image-label" in labels.attrs["ome"] and labels.attrs["xctsam"]["model"] == "fake"
    nodes = list(Reader(parse_url(out))())  # ome-zarr-py, as napari-ome-zarr opens it: image, then labels
    label_nodes = [node for node in nodes if any(type(spec).__name__ == "Label" for spec in node.specs)]
    assert len(label_nodes) == 1 and label_nodes[0].data[0].shape == image.shape
    assert len(label_nodes[0].metadata["properties"]) == 4  # one per class, with its colour


def test_a_tiff_that_can_only_be_read_whole_is_refused_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xctsam.data import readers

    path = save_scan(tmp_path, "tiff", grey())
    monkeypatch.setattr(readers._MultiPageTiff, "reads_whole", True, raising=False)
    original = readers._MultiPageTiff.__init__

    def whole_only(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self.reads_whole = True

    monkeypatch.setattr(readers._MultiPageTiff, "__init__", whole_only)
    with pytest.raises(InputError, match="can only be read whole"):
        Scan(path)


# ---------------------------------------------------------------- memory
def test_memory_stays_flat_for_a_volume_larger_than_the_cap(tmp_path: Path) -> None:
    """A 40 MiB scan predicted into TIFF and OME-Zarr while numpy's allocations stay under half
    of it (OME-Zarr holds one 16-slice chunk slab of image and labels, 5 MiB here, and its codec's copies)."""
    image = np.random.default_rng(3).random((160, 256, 256)).astype(np.float32)
    source = tmp_path / "big.npy"
    np.save(source, image)
    del image
    cap = 20 * 2**20
    assert source.stat().st_size >= 2 * cap
    for out in (tmp_path / "big.tif", tmp_path / "big.zarr"):
        tracemalloc.start()
        try:
            predict_file(QuantiseModel(), source, UNIT, PredictConfig(tile=128, overlap=0.25, batch=8), out, device="cpu", progress=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        print(f"{out.name}: peak {peak / 2**20:.1f} MiB for a {source.stat().st_size / 2**20:.0f} MiB scan")
        assert peak < cap, (out.name, peak)
        assert read_labels(out).shape == (160, 256, 256)


def test_the_estimate_counts_tiles_and_names_memory_and_time() -> None:
    found = estimate(QuantiseModel(), (10, 100, 70), PredictConfig(tile=32, overlap=0.25, batch=4), per_tile=0.01)
    assert found.tiles_per_slice == 4 * 3  # rows start at 0, 24, 48, 68; columns at 0, 24, 38
    assert found.seconds == pytest.approx(0.01 * found.tiles_per_slice * 10)
    line = describe(Path("scan.tif"), (10, 100, 70), np.dtype(np.uint16), found)
    assert "10 x 100 x 70 uint16" in line and "MiB" in line and f"{found.tiles_per_slice} tiles" in line


# ---------------------------------------------------------------- planning and shards
def test_scan_inputs_take_folders_of_scans_and_folders_of_slices(tmp_path: Path) -> None:
    campaign = tmp_path / "campaign"
    for name, kind in (("a", "tiff"), ("b", "npy"), ("c", "zarr"), ("d", "tiff-dir")):
        save_scan(campaign, kind, grey(), name)
    (campaign / "notes.txt").write_text("not a scan")
    found = scan_inputs([campaign])
    assert [p.name for p in found] == ["a.tif", "b.npy", "c.zarr", "d"]
    assert scan_inputs([campaign / "d", campaign / "d"]) == [campaign / "d"]  # a slice folder is one scan, named twice once
    with pytest.raises(InputError, match="holds no volume"):
        scan_inputs([_empty(tmp_path)])


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_outputs_are_one_file_or_one_per_scan_and_never_shared(tmp_path: Path) -> None:
    sources = [Path("x/part.tif"), Path("x/slices"), Path("y/scan.ome.zarr"), Path("z/v.npy")]
    assert scan_stem(Path("y/scan.ome.zarr")) == "scan"
    assert plan_jobs(sources[:1], tmp_path / "one.zarr", None, "tiff") == [Job(sources[0], tmp_path / "one.zarr")]
    formats = {"x/part.tif": "tiff", "x/slices": "tiff-dir", "y/scan.ome.zarr": "zarr", "z/v.npy": "npy"}
    jobs = [plan_jobs([source], tmp_path / "out", None, formats[str(source)])[0] for source in sources]
    assert [job.out.name for job in jobs] == ["part.tif", "slices.tif", "scan.zarr", "v.h5"]  # the input's family
    assert [job.out.name for job in plan_jobs(sources[:1], tmp_path / "out", "zarr", "tiff")] == ["part.zarr"]
    with pytest.raises(InputError, match="one output file for 2 scans"):
        plan_jobs(sources[:2], tmp_path / "one.tif", None, "tiff")
    with pytest.raises(InputError, match="would both be written"):
        plan_jobs([Path("a/part.tif"), Path("b/part.tif")], tmp_path / "out", None, "tiff")


def test_shards_split_the_scans_disjointly_and_cover_them() -> None:
    jobs = [Job(Path(f"s{k}.tif"), Path(f"o{k}.tif")) for k in range(7)]
    shares = [shard_jobs(jobs, Shard(i, 3)) for i in range(3)]
    assert sorted(job for share in shares for job in share) == sorted(jobs)
    assert [len(share) for share in shares] == [3, 2, 2]
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}) == Shard(1, 3)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(2, 4)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert shard_from_env({}) == Shard(0, 1)
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_a_rerun_keeps_finished_outputs_and_predicts_the_rest(tmp_path: Path) -> None:
    sources = [save_scan(tmp_path / "in", "npy", grey(seed=k), f"v{k}") for k in range(3)]
    jobs = plan_jobs(sources, tmp_path / "out", "tiff", "npy")
    model, window = QuantiseModel(), IntensityWindow(0.0, 255.0)
    first = predict_campaign(model, window, jobs[:2], CONFIG, device="cpu")
    assert first.written == [jobs[0].out, jobs[1].out] and first.kept == []
    stamp = jobs[0].out.stat().st_mtime_ns
    second = predict_campaign(model, window, jobs, CONFIG, device="cpu")
    assert second.written == [jobs[2].out] and second.kept == [jobs[0].out, jobs[1].out]
    assert jobs[0].out.stat().st_mtime_ns == stamp  # untouched
    for source, job in zip(sources, jobs, strict=True):
        np.testing.assert_array_equal(tifffile.imread(job.out), quantise(np.load(source) / 255.0))


# ---------------------------------------------------------------- the command
def test_the_command_predicts_a_folder_campaign_shard_by_shard(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    campaign = tmp_path / "campaign"
    save_scan(campaign, "tiff", grey(), "a")
    save_scan(campaign, "zarr", grey(seed=1), "b")
    save_scan(campaign, "tiff-dir", grey(seed=2), "c")
    out = tmp_path / "predictions"
    args = ["predict", campaign, "--model", tiny_model.checkpoint, "--params", tiny_model.params, "--out", out]
    first = xctsam(*args, cwd=tmp_path, env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["b.zarr", "b.zarr.xctsam.json"]  # task 1 of 2: the second scan only (and its record)
    second = xctsam(*args, "--shard", "0/2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".xctsam.json")) == ["a.tif", "b.zarr", "c.tif"]
    assert second.stdout.split() == [str(out / "a.tif"), str(out / "c.tif")]
    with tifffile.TiffFile(out / "a.tif") as tif:
        assert tif.is_imagej and json.loads(tif.imagej_metadata["Info"])["model_kind"] == "unet"
    assert read_labels(out / "c.tif").shape == (6, 40, 56)
    rerun = xctsam(*args, "--report", "--voxel-size", "0.02", cwd=tmp_path)
    assert rerun.returncode == 0 and rerun.stdout == "" and rerun.stderr.count("kept") == 3, rerun.stderr
    summary = json.loads((out / "b.defects.json").read_text())  # reports made from the kept outputs
    assert summary["unit"] == "mm" and {"porosity", "inclusion_fraction", "counts"} <= set(summary)


@pytest.mark.parametrize(("option", "value"), [("--shard", "2/2"), ("--out-format", "png"), ("--format", "dicom"), ("--voxel-size", "0")])
def test_bad_predict_options_are_usage_errors(tmp_path: Path, tiny_model: TinyModel, option: str, value: str) -> None:  # noqa: F811
    source = save_scan(tmp_path, "npy", grey())
    result = xctsam(*predict_args(tiny_model, source, tmp_path / "out.tif"), option, value, cwd=tmp_path)
    assert result.returncode == 2 and option in result.stderr, result.stderr
    assert not (tmp_path / "out.tif").exists()


def test_an_hdf5_scan_is_read_from_the_dataset_named(tmp_path: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    source = save_scan(tmp_path, "hdf5", grey())
    out = tmp_path / "labels.h5"
    missing = xctsam(*predict_args(tiny_model, source, out), cwd=tmp_path)
    assert missing.returncode == 2 and "no dataset 'image'" in missing.stderr and not out.exists()
    found = xctsam(*predict_args(tiny_model, source, out), "--dataset", "scan/data", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    with Volume(out) as volume:
        np.testing.assert_array_equal(volume.image(), grey().astype(np.float32))
        assert volume.labels().shape == (6, 40, 56)


def test_a_project_volume_predicts_as_before(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((5, 50, 70)).astype(np.float32)
    write_volume(tmp_path / "grey.h5", image)
    out = predict_file(QuantiseModel(), tmp_path / "grey.h5", UNIT, PredictConfig(tile=32), tmp_path / "p.tif", device="cpu", progress=False)
    np.testing.assert_array_equal(tifffile.imread(out), quantise(image))


# ---------------------------------------------------------------- the part's defect report
def test_each_part_gets_its_defect_report_also_for_kept_outputs(tmp_path: Path) -> None:
    from xctsam.config.defects import DefectsConfig
    from xctsam.eval.part_report import part_defects

    sources = [save_scan(tmp_path / "in", "npy", grey(seed=k), f"v{k}") for k in range(2)]
    jobs = plan_jobs(sources, tmp_path / "out", "zarr", "npy")
    model, window = QuantiseModel(), IntensityWindow(0.0, 255.0)
    predict_campaign(model, window, jobs[:1], CONFIG, device="cpu")  # an earlier run, without reports
    predict_campaign(model, window, jobs, CONFIG, device="cpu", defects=DefectsConfig(), voxel_size=0.05)
    for source in sources:
        summary = json.loads((tmp_path / "out" / f"{source.stem}.defects.json").read_text())
        labels = quantise(np.load(source) / 255.0)
        expected = part_defects(lambda z0, z1, labels=labels: labels[z0:z1], labels.shape, DefectsConfig(diameter_unit="mm"), voxel_size=0.05)
        assert summary["porosity"] == pytest.approx(np.mean(labels == 2) / np.mean(labels >= 1))
        assert summary["counts"] == expected.counts and summary["counts"]["pore"]["all"] > 0
        assert (tmp_path / "out" / f"{source.stem}.defects.csv").is_file() and (tmp_path / "out" / f"{source.stem}.defects.png").is_file()
