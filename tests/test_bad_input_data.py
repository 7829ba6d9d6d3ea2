"""Bad data and bad output places, through the installed console script.

Each case must end in exit code 2 with one line on stderr naming the file (no traceback, no
crash) and leave every file as it was, with no half-written or temporary file behind:
prediction onto its own input, a re-import failing on a corrupt sibling volume, a full disk,
headers claiming more memory than there is, outputs under a path that is a file, and image or
label values that are not grey values or classes.

The main case of each runs `xctsam` in a subprocess (a crash such as a segfault shows there);
variants call the CLI's `main` in-process, which is faster (torch is imported once).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest
import tifffile
import yaml

from xctsam.cli import main
from xctsam.data import importers
from xctsam.data.volumes import write_volume

from .conftest import REPO, write_params

XCTSAM = Path(sys.executable).with_name("xctsam")
if not XCTSAM.exists():  # an installation without the venv layout
    XCTSAM = Path(shutil.which("xctsam") or "xctsam")
HUGE = 1 << 20  # a 2**20 x 2**20 float32 slice is 4 TiB: more than any test machine has


# ================================================================ helpers
def xctsam(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script; progress bars off so stderr holds only what the user must read."""
    environment = {**os.environ, "XCTSAM_NO_PROGRESS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(XCTSAM), *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300, check=False)


def assert_one_line_error(code: int, stderr: str, named: Path | str, phrase: str) -> str:
    """Exit 2 and exactly one line `error: <named>: ...<phrase>...`; returns the line."""
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {named}: "), (lines[0], str(named))
    assert phrase in lines[0], (lines[0], phrase)
    return lines[0]


def assert_cli_error(result: subprocess.CompletedProcess[str], named: Path | str, phrase: str) -> str:
    return assert_one_line_error(result.returncode, result.stderr, named, phrase)


def run_main(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """The CLI in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders): equal snapshots = untouched."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def labelled_volume(path: Path, shape: tuple[int, int, int] = (3, 20, 20), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    write_volume(path, rng.random(shape).astype(np.float32), rng.integers(0, 4, shape).astype(np.uint8))
    return path


def raw_volume(path: Path, image: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """A volume file written with h5py directly, so it can hold what write_volume refuses."""
    with h5py.File(path, "w") as file:
        file["image"] = image
        if labels is not None:
            file["labels"] = labels
    return path


def huge_tiff(path: Path) -> Path:
    """A ~230-byte TIFF whose header claims one HUGE x HUGE float32 slice (4 TiB)."""
    tifffile.imwrite(path, np.zeros((1, 1), np.float32), photometric="minisblack", metadata=None)
    with tifffile.TiffFile(path, mode="r+") as tif:
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tif.pages[0].tags[tag].overwrite(HUGE)
    assert path.stat().st_size < 1000
    return path


def huge_hdf5(path: Path) -> Path:
    """A ~1 KB HDF5 volume whose `image` dataset claims HUGE x HUGE float32 slices (no chunk stored)."""
    with h5py.File(path, "w") as file:
        file.create_dataset("image", shape=(1, HUGE, HUGE), dtype=np.float32, chunks=(1, 1024, 1024))
    assert path.stat().st_size < 10_000
    return path


def samgan_release(release: Path, size: tuple[int, int], slices: int) -> None:
    """A one-split SAM-Material-GAN release (test1, scan `part`): random grey slices, empty masks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("input", "class_1", "class_2", "class_3"):
        (release / "test1" / folder).mkdir(parents=True)
    for z in range(slices):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(release / "test1" / "input" / f"part_{z}.png")
        for folder in ("class_1", "class_2", "class_3"):
            Image.fromarray(np.zeros(size, np.uint8)).save(release / "test1" / folder / f"part_{z}.png")


class TinyModel(NamedTuple):
    checkpoint: Path
    params: Path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """An untrained 2.5D U-Net checkpoint (context 1, a few filters) and params predicting with it fast."""
    from xctsam.config.params import load_params
    from xctsam.data.datasets import IntensityWindow
    from xctsam.models.checkpoint import save_segmenter_checkpoint
    from xctsam.models.factory import build_segmenter, model_meta

    folder = tmp_path_factory.mktemp("model")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sam"]["checkpoint"] = None  # nothing here needs a SAM foundation checkpoint
    raw["pretrain"]["stand_ins"] = []
    raw["zero_shot"] = {}
    raw["unet"] = {"context": 1, "filters": 4, "depth": 2}
    raw["predict"] = {"tile": 32, "overlap": 0.25, "batch": 16}
    params_path = write_params(folder / "params.yaml", raw)
    params = load_params(params_path)
    checkpoint = folder / "best.pt"
    model = build_segmenter("unet", params.unet, params.train.unet)
    save_segmenter_checkpoint(checkpoint, model, model_meta("unet", params.unet, params.train.unet, IntensityWindow(0.0, 1.0)), {"step": 0})
    return TinyModel(checkpoint, params_path)


def predict_args(model: TinyModel, volume: Path, out: Path) -> list[object]:
    return ["predict", volume, "--model", model.checkpoint, "--params", model.params, "--out", out]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB tmpfs mounted for the test: a real ENOSPC, as a full disk gives it."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not found: cannot make a small file system")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run([umount, str(folder)], check=False).returncode != 0:
            subprocess.run([umount, "-l", str(folder)], check=False)


# ================================================================ 1. prediction onto its input
def test_predict_refuses_to_overwrite_its_input_volume(tmp_path: Path, tiny_model: TinyModel) -> None:
    volume = labelled_volume(tmp_path / "scan.h5")
    before, listing = sha256(volume), sorted(os.listdir(tmp_path))

    result = xctsam(*predict_args(tiny_model, volume, volume), cwd=tmp_path)

    assert_cli_error(result, volume, "is the input volume")
    assert sha256(volume) == before  # the scan and its ground-truth labels are untouched
    assert sorted(os.listdir(tmp_path)) == listing  # and no temporary file is left


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_predict_refuses_a_link_to_its_input(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str], link: str) -> None:
    volume = labelled_volume(tmp_path / "scan.h5")
    out = tmp_path / "prediction.h5"
    out.symlink_to(volume) if link == "symlink" else os.link(volume, out)
    before, listing = sha256(volume), sorted(os.listdir(tmp_path))

    code, err = run_main(capsys, *predict_args(tiny_model, volume, out))

    assert_one_line_error(code, err, out, "is the input volume")
    assert sha256(volume) == before and sorted(os.listdir(tmp_path)) == listing


# ================================================================ 2. a failed re-import keeps the split
def test_reimport_failing_on_a_corrupt_sibling_leaves_the_split_as_it_was(tmp_path: Path) -> None:
    split = tmp_path / "data" / "real" / "Te-1"
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(1).random((2, 6, 7)).astype(np.float32))
        importers.import_volume(tmp_path / f"{name}.npy", "npy", split)
    sibling = split / "b.h5"
    sibling.write_bytes(sibling.read_bytes()[:300])  # truncated after the import
    before = snapshot(split)

    result = xctsam("data", "import", tmp_path / "a.npy", "--format", "npy", "--root", tmp_path / "data", "--split", "real/Te-1", cwd=tmp_path)

    assert_cli_error(result, sibling, "another volume of split Te-1")
    assert snapshot(split) == before  # a.h5 still there, the manifest byte-identical


# ================================================================ 3. a full disk
def test_import_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    source = tmp_path / "scan.npy"
    np.save(source, np.random.default_rng(0).random((4, 128, 128)).astype(np.float32))  # 256 KiB, incompressible
    root = small_disk / "data"

    result = xctsam("data", "import", source, "--format", "npy", "--root", root, "--split", "real/Te-1", cwd=tmp_path)

    assert_cli_error(result, root / "real" / "Te-1" / "scan.h5", "no space left on device; free space or choose another --out/--root")
    assert list(small_disk.iterdir()) == []  # no partial volume, no temporary file, no empty folders


def test_predict_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, tiny_model: TinyModel, small_disk: Path) -> None:
    volume = tmp_path / "scan.h5"
    write_volume(volume, np.random.default_rng(0).random((4, 128, 128)).astype(np.float32))
    out = small_disk / "prediction.h5"  # holds a copy of the 256 KiB image

    result = xctsam(*predict_args(tiny_model, volume, out), cwd=tmp_path)

    assert_cli_error(result, out, "no space left on device")
    assert list(small_disk.iterdir()) == []


def test_samgan_import_onto_a_full_disk_names_the_final_volume(tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samgan_release(tmp_path / "release", (256, 256), slices=8)  # 2 MiB of float32 image

    code, err = run_main(capsys, "data", "import", tmp_path / "release", "--root", small_disk / "data")

    assert_one_line_error(code, err, small_disk / "data" / "real" / "Te-1" / "part.h5", "no space left on device")
    assert list(small_disk.iterdir()) == []


# ================================================================ 4. sizes from headers
@pytest.mark.parametrize("fmt", ["tiff", "tiff-dir", "hdf5"])
def test_import_refuses_a_header_claiming_more_memory_than_available(tmp_path: Path, fmt: str) -> None:
    if fmt == "tiff-dir":
        (tmp_path / "slices").mkdir()
        source, named = tmp_path / "slices", huge_tiff(tmp_path / "slices" / "z0.tif")
    else:
        source = named = huge_tiff(tmp_path / "scan.tif") if fmt == "tiff" else huge_hdf5(tmp_path / "scan.h5")
    root = tmp_path / "data"

    result = xctsam("data", "import", source, "--format", fmt, "--root", root, "--split", "real/Te-1", cwd=tmp_path)

    line = assert_cli_error(result, named, "TiB, ")
    assert "needs" in line and "GiB available" in line
    assert not root.exists()


def test_import_checks_npy_slabs_against_available_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from xctsam.data import checks

    source = tmp_path / "scan.npy"
    np.save(source, np.zeros((2, 64, 64), np.float32))
    monkeypatch.setattr(checks.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 1024})())

    code, err = run_main(capsys, "data", "import", source, "--format", "npy", "--root", tmp_path / "data", "--split", "real/Te-1")

    assert_one_line_error(code, err, source, "GiB available")
    assert not (tmp_path / "data").exists()


def test_predict_refuses_slices_larger_than_memory(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:
    volume, out = huge_hdf5(tmp_path / "scan.h5"), tmp_path / "prediction.h5"

    code, err = run_main(capsys, *predict_args(tiny_model, volume, out))

    assert_one_line_error(code, err, volume, "GiB available")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


# ================================================================ 5. outputs under a file
@pytest.mark.parametrize("fmt", ["npy", "samgan"])
def test_root_under_a_file_is_one_line(tmp_path: Path, fmt: str) -> None:
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    if fmt == "npy":
        np.save(tmp_path / "scan.npy", np.ones((2, 6, 7), np.float32))
        args = [tmp_path / "scan.npy", "--format", "npy", "--split", "real/Te-1"]
    else:
        samgan_release(tmp_path / "release", (6, 7), slices=1)
        args = [tmp_path / "release"]

    result = xctsam("data", "import", *args, "--root", blocker / "data", cwd=tmp_path)

    assert_cli_error(result, blocker, "is a file where a folder is needed")
    assert blocker.read_text() == "not a folder"


def test_predict_out_under_a_file_is_one_line(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:
    volume = labelled_volume(tmp_path / "scan.h5")
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")

    code, err = run_main(capsys, *predict_args(tiny_model, volume, blocker / "x.h5"))

    assert_one_line_error(code, err, blocker, "is a file where a folder is needed")
    assert blocker.read_text() == "not a folder"


# ================================================================ 6. values that are not grey values or classes
def test_predict_refuses_nan_naming_the_input_and_its_slice(tmp_path: Path, tiny_model: TinyModel) -> None:
    image = np.random.default_rng(0).random((4, 20, 20)).astype(np.float32)
    image[2, 5, 5] = np.nan
    volume, out = raw_volume(tmp_path / "scan.h5", image), tmp_path / "prediction.h5"

    result = xctsam(*predict_args(tiny_model, volume, out), cwd=tmp_path)

    assert_cli_error(result, volume, "image slice 2 holds NaN/inf")
    assert sorted(os.listdir(tmp_path)) == ["scan.h5"]


@pytest.mark.parametrize(
    ("case", "phrase"),
    [("inf-to-tif", "image slice 0 holds NaN/inf"), ("complex", "dtype complex64"), ("text", "dtype |S3")],
)
def test_predict_refuses_images_that_are_not_real_finite_numbers(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str], case: str, phrase: str) -> None:
    image = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    if case == "inf-to-tif":
        image[0, 1, 1] = np.inf
    stored = {"inf-to-tif": image, "complex": image.astype(np.complex64), "text": np.full(image.shape, b"abc")}[case]
    volume = raw_volume(tmp_path / "scan.h5", stored)
    out = tmp_path / ("prediction.tif" if case == "inf-to-tif" else "prediction.h5")

    code, err = run_main(capsys, *predict_args(tiny_model, volume, out))

    assert_one_line_error(code, err, volume, phrase)
    assert sorted(os.listdir(tmp_path)) == ["scan.h5"]


@pytest.mark.parametrize(("dtype", "phrase"), [(np.complex128, "dtype complex128 (complex)"), (np.str_, "(text), not real numbers")])
def test_import_refuses_complex_and_text_images(tmp_path: Path, dtype: type, phrase: str) -> None:
    source = tmp_path / "scan.npy"
    np.save(source, np.ones((2, 6, 7)).astype(dtype))

    result = xctsam("data", "import", source, "--format", "npy", "--root", tmp_path / "data", "--split", "real/Te-1", cwd=tmp_path)

    assert_cli_error(result, source, phrase)
    assert not (tmp_path / "data").exists()


def _training_split(root: Path) -> Path:
    """Tr-GAN with two labelled volumes; the first (trained on) holds label 7 in slice 1."""
    split = root / "synthetic" / "Tr-GAN"
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        labels = rng.integers(0, 4, (2, 16, 16)).astype(np.uint8)
        if name == "a":
            labels[1, 3, 4] = 7
        raw_volume(split / f"{name}.h5", rng.random((2, 16, 16)).astype(np.float32), labels)
    return split / "a.h5"


def test_train_refuses_unknown_label_values_before_any_step(tmp_path: Path, tiny_params: dict) -> None:
    bad = _training_split(tmp_path / "data")
    tiny_params["unet"] = {"context": 1, "filters": 4, "depth": 2}
    tiny_params["train"]["unet"].update({"steps": 2, "epoch_steps": 1, "tile": 16, "batch": 1, "val_slices": 1, "warmup_steps": 1, "checkpoint_every": 1})
    params = write_params(tmp_path / "params.yaml", tiny_params)
    out = tmp_path / "models" / "unet"

    result = xctsam("train", "unet", "--params", params, "--root", tmp_path / "data", "--out", out, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})

    assert_cli_error(result, bad, "unknown label value(s) [7] in slice 1")
    assert not out.exists()  # refused when the data was loaded: no step, no checkpoint


def test_data_info_shows_unknown_label_values(tmp_path: Path) -> None:
    bad = _training_split(tmp_path / "data")

    result = xctsam("data", "info", bad.parent, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stderr.splitlines() if "a.h5" in line or "b.h5" in line]
    assert len(rows) == 2, result.stderr
    assert "7: 1 voxels" in rows[0] and "7:" not in rows[1]
