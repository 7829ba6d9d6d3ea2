"""`xctsam predict` campaigns and `xctsam calibrate` never lose a user's file, nor keep a wrong one.

- A file the campaign would write (an output, an uncertainty map, a defect report) that exists
  without xctsam's record of finishing it is the user's: refused before any work, one line.
- Two scans whose side files would share a name are refused before any work, like outputs.
- "Finished" means complete: a rerun keeps only outputs its record names at their size, and
  writes again what a finished output lacks (a report PNG lost to a full disk, a map asked for
  on the rerun) without touching the output.
- A full disk while writing a TIFF is one line and leaves nothing.
- SLURM arrays with a step are shared out by task position; arrays SLURM does not describe
  fully (gaps) are one line naming its variables and `--shard`.
- `xctsam calibrate --out` never replaces a file (the model it calibrates least of all).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.test_bad_input_data import (  # noqa: F401 (fixtures)
    TinyModel,
    assert_cli_error,
    assert_one_line_error,
    labelled_volume,
    predict_args,
    run_main,
    small_disk,
    tiny_model,
    xctsam,
)
from tests.test_predict import QuantiseModel
from tests.test_predict_campaign import CONFIG, grey, save_scan
from xctsam.config.defects import DefectsConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.eval.campaign import Shard, plan_jobs, predict_campaign, shard_from_env
from xctsam.eval.finished import record_path
from xctsam.util.atomic import DiskFullError
from xctsam.util.errors import InputError, XctsamError

WINDOW = IntensityWindow(0.0, 255.0)


def campaign(tmp_path: Path, names: tuple[str, ...] = ("part",)) -> tuple[list[Path], Path]:
    """NPY scans in `in/` and the output folder `out/` (TIFF outputs)."""
    return [save_scan(tmp_path / "in", "npy", grey(seed=k), name) for k, name in enumerate(names)], tmp_path / "out"


def run(sources: list[Path], out: Path, **options: object) -> object:
    jobs = plan_jobs(sources, out, "tiff", "npy", uncertainty=bool(options.get("uncertainty")), report=options.get("defects") is not None)
    return predict_campaign(QuantiseModel(), WINDOW, jobs, CONFIG, device="cpu", **options)


# ---------------------------------------------------------------- 1. calibrate --out
def test_calibrate_writes_a_new_file_and_never_onto_an_existing_one(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    for k in range(2):  # one volume to train on, one held out: what calibrate fits on
        (tmp_path / "data" / "synthetic" / "Tr-GAN").mkdir(parents=True, exist_ok=True)
        labelled_volume(tmp_path / "data" / "synthetic" / "Tr-GAN" / f"v{k}.h5", seed=k)
    model = tmp_path / "best.pt"  # a copy: the module's model stays whole whatever happens here
    shutil.copyfile(tiny_model.checkpoint, model)
    args = ["calibrate", "--model", model, "--params", tiny_model.params, "--root", tmp_path / "data", "--out"]
    code, err = run_main(capsys, *args, tmp_path / "fit.json")
    assert code == 0 and "temperature" in json.loads((tmp_path / "fit.json").read_text()), err
    (tmp_path / "mine.json").write_text("my notes")
    for out in (model, tmp_path / "mine.json", tmp_path / "fit.json"):  # the model calibrated, any file
        before = out.read_bytes()
        assert_one_line_error(*run_main(capsys, *args, out), out, "exists")
        assert out.read_bytes() == before


# ---------------------------------------------------------------- 2. side files shared by two scans
def test_two_scans_whose_side_files_share_a_name_are_refused_before_any_work(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    folder = tmp_path / "scans"
    save_scan(folder, "npy", grey(), "part")
    save_scan(folder, "tiff", grey(seed=1), "part")  # outputs part.h5 and part.tif: distinct
    out = tmp_path / "predictions"
    assert len(plan_jobs([folder / "part.npy", folder / "part.tif"], out, None)) == 2  # without side files: fine
    with pytest.raises(InputError, match="uncertainty"):
        plan_jobs([folder / "part.npy", folder / "part.tif"], out, None, uncertainty=True)
    code, err = run_main(capsys, "predict", folder, "--model", tiny_model.checkpoint, "--params", tiny_model.params, "--out", out, "--report", "--shard", "1/2")
    assert_one_line_error(code, err, folder / "part.tif", "part.defects.csv")  # found over all scans, not this shard's
    assert not out.exists()


# ---------------------------------------------------------------- 3. a user's files at side-file names
@pytest.mark.parametrize("name", ["part.defects.csv", "part.defects.png", "part.uncertainty.tif", "part.tif.xctsam.json"])
def test_a_users_file_where_a_side_file_goes_is_refused_and_kept(tmp_path: Path, name: str) -> None:
    sources, out = campaign(tmp_path)
    out.mkdir()
    (out / name).write_bytes(b"the user's own")
    with pytest.raises(InputError) as refused:
        run(sources, out, uncertainty=True, defects=DefectsConfig())
    assert refused.value.path == out / name and "move" in str(refused.value)
    assert sorted(p.name for p in out.iterdir()) == [name]  # refused before any work
    assert (out / name).read_bytes() == b"the user's own"


def test_a_users_side_file_is_refused_also_beside_a_finished_output(tmp_path: Path) -> None:
    sources, out = campaign(tmp_path)
    run(sources, out)
    (out / "part.defects.json").write_text("{}")  # the user's, not the campaign's
    with pytest.raises(InputError, match="part.defects.json"):
        run(sources, out, defects=DefectsConfig())
    assert (out / "part.defects.json").read_text() == "{}" and not (out / "part.defects.csv").exists()


# ---------------------------------------------------------------- 4. finished means complete
def test_an_output_xctsam_has_no_record_of_finishing_is_refused_not_kept(tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    source = save_scan(tmp_path, "npy", grey((8, 40, 56)))
    out = tmp_path / "labels.tif"
    tifffile.imwrite(out, np.zeros((1, 40, 56), np.uint8))  # 1 of 8 slices: a truncated copy, or another program's
    before = out.read_bytes()
    code, err = run_main(capsys, *predict_args(tiny_model, source, out), "--report")
    assert_one_line_error(code, err, out, "move or delete it")
    assert out.read_bytes() == before and not (tmp_path / "labels.defects.json").exists()


def test_an_output_changed_since_it_was_finished_is_refused(tmp_path: Path) -> None:
    sources, out = campaign(tmp_path)
    run(sources, out)
    tifffile.imwrite(out / "part.tif", np.zeros((1, 40, 56), np.uint8))
    with pytest.raises(InputError, match="differs from the output xctsam finished"):
        run(sources, out)


def test_a_report_lost_to_a_full_disk_is_written_again_and_the_output_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    sources, out = campaign(tmp_path)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", full)  # the PNG is the report's last file
        with pytest.raises(DiskFullError, match="part.defects.png"):
            run(sources, out, defects=DefectsConfig())
    assert not (out / "part.defects.png").exists() and (out / "part.defects.json").exists()
    stamp = (out / "part.tif").stat().st_mtime_ns  # a whole output: the rerun keeps it
    rerun = run(sources, out, defects=DefectsConfig())
    assert rerun.kept == [out / "part.tif"] and (out / "part.tif").stat().st_mtime_ns == stamp
    assert (out / "part.defects.png").stat().st_size > 0
    record = json.loads(record_path(out / "part.tif").read_text())
    assert sorted(record["complete"]) == ["part.defects.csv", "part.defects.json", "part.defects.png", "part.tif"]


def test_a_failed_scan_leaves_only_whole_recorded_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xctsam.eval import campaign as module

    sources, out = campaign(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(module, "write_prediction", broken)
    with pytest.raises(RuntimeError, match="killed"):
        run(sources, out, defects=DefectsConfig())
    assert not out.exists() or list(out.iterdir()) == []  # neither an output nor a record of one


# ---------------------------------------------------------------- 5. a full disk while writing a TIFF
def test_a_full_disk_while_writing_labels_as_tiff_is_one_line_and_leaves_nothing(tmp_path: Path, tiny_model: TinyModel, small_disk: Path) -> None:  # noqa: F811
    source = save_scan(tmp_path, "npy", grey((16, 128, 128)))  # 256 KiB of labels onto 192 KiB
    out = small_disk / "labels.tif"
    assert_cli_error(xctsam(*predict_args(tiny_model, source, out), cwd=tmp_path), out, "no space left on device")
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_while_writing_the_uncertainty_map_is_one_line_and_leaves_nothing(
    tmp_path: Path, tiny_model: TinyModel, small_disk: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    monkeypatch.setenv("XCTSAM_NO_PROGRESS", "1")
    source = save_scan(tmp_path, "npy", grey((10, 100, 100)))  # labels and map 100 KB each: either fits alone
    out = small_disk / "labels.tif"
    code, err = run_main(capsys, *predict_args(tiny_model, source, out), "--uncertainty")
    named = err.split(":")[1].strip() if err.startswith("error: ") else ""
    assert named in {str(out), str(small_disk / "labels.uncertainty.tif")}, err
    assert_one_line_error(code, err, named, "no space left on device")
    assert list(small_disk.iterdir()) == []


# ---------------------------------------------------------------- 6. --uncertainty on a rerun
def test_uncertainty_asked_on_a_rerun_writes_the_maps_of_kept_outputs(tmp_path: Path) -> None:
    sources, out = campaign(tmp_path, ("a", "b"))
    run(sources[:1], out)
    stamp = (out / "a.tif").stat().st_mtime_ns
    rerun = run(sources, out, uncertainty=True)
    assert rerun.kept == [out / "a.tif"] and rerun.written == [out / "b.tif"]
    assert (out / "a.tif").stat().st_mtime_ns == stamp
    for name in ("a", "b"):
        assert tifffile.imread(out / f"{name}.uncertainty.tif").shape == (6, 40, 56)
    assert "a.uncertainty.tif" in json.loads(record_path(out / "a.tif").read_text())["complete"]


# ---------------------------------------------------------------- 7. SLURM arrays
def slurm(task: int, first: int, last: int, count: int, step: int | None = None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": first, "SLURM_ARRAY_TASK_MAX": last, "SLURM_ARRAY_TASK_COUNT": count}
    return {key: str(value) for key, value in {**env, **({"SLURM_ARRAY_TASK_STEP": step} if step else {})}.items()}


def test_a_slurm_array_with_a_step_is_shared_by_task_position() -> None:
    assert shard_from_env(slurm(20, 0, 30, 4, step=10)) == Shard(2, 4)  # --array=0-30:10
    assert shard_from_env(slurm(5, 1, 5, 3, step=2)) == Shard(2, 3)  # --array=1,3,5 as a step of 2
    assert shard_from_env(slurm(7, 4, 8, 5)) == Shard(3, 5)  # --array=4-8
    with pytest.raises(XctsamError, match=r"SLURM_ARRAY_TASK_ID=5.*--shard i/n"):
        shard_from_env(slurm(5, 1, 5, 3))  # --array=1,2,5: no step describes it


def test_a_slurm_array_with_gaps_is_one_line_naming_slurm_and_shard(
    tmp_path: Path, tiny_model: TinyModel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    for name, value in slurm(5, 1, 5, 3).items():
        monkeypatch.setenv(name, value)
    source = save_scan(tmp_path, "npy", grey())
    code, err = run_main(capsys, *predict_args(tiny_model, source, tmp_path / "out"))
    line = assert_one_line_error(code, err, "SLURM array task 5", "--shard i/n")
    assert "SLURM_ARRAY_TASK_COUNT=3" in line
    assert not (tmp_path / "out").exists()
