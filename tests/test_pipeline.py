"""The data stages end to end through the CLI: phantoms -> simulate, resume, determinism, DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xctsam.cli import main
from xctsam.data.split_folders import read_manifest
from xctsam.data.volumes import Volume

from .conftest import REPO, write_params

TINY_SPLITS = ["Tr-sim", "Tr-real", "Te-3"]


def _run(args: list[str]) -> None:
    assert main(args) == 0


@pytest.fixture
def made(tmp_path: Path, tiny_params: dict) -> Path:
    """Phantoms and scans of three representative splits under tmp_path."""
    params = write_params(tmp_path / "params.yaml", tiny_params)
    split_args = [arg for split in TINY_SPLITS for arg in ("--split", split)]
    _run(["data", "phantoms", "-p", str(params), "--out", str(tmp_path / "phantoms"), *split_args])
    _run(["data", "simulate", "-p", str(params), "--phantoms", str(tmp_path / "phantoms"), "--root", str(tmp_path / "data"), *split_args])
    return tmp_path


def test_splits_land_where_the_contract_says(made: Path) -> None:
    sim = made / "data" / "synthetic" / "Tr-sim" / "Tr-sim_000.h5"
    real = made / "data" / "real" / "Tr-real" / "Tr-real_000.h5"
    test = made / "data" / "real" / "Te-3" / "Te-3_000.h5"
    with Volume(sim) as a, Volume(real) as b, Volume(test) as c:
        assert a.shape == b.shape == c.shape == (6, 48, 48)
        assert a.has_labels and c.has_labels and not b.has_labels  # Tr-real is unlabelled
        assert a.attrs["kind"] == "synthetic" and c.attrs["scanner"]["kvp"] == 160
        assert np.isfinite(c.image()).all() and c.image().dtype == np.float32
    manifest = read_manifest(made / "data" / "real" / "Te-3")
    assert manifest["volumes"][0]["file"] == "Te-3_000.h5"
    assert abs(sum(manifest["volumes"][0]["class_fractions"].values()) - 1) < 1e-9


def test_same_seed_same_data_and_resume_skips_finished_volumes(made: Path) -> None:
    target = made / "data" / "real" / "Te-3" / "Te-3_000.h5"
    before = target.stat().st_mtime_ns
    with Volume(target) as volume:
        first = volume.image()
    params = str(made / "params.yaml")
    _run(["data", "simulate", "-p", params, "--phantoms", str(made / "phantoms"), "--root", str(made / "data"), "--split", "Te-3"])
    assert target.stat().st_mtime_ns == before  # resumed: nothing redone
    target.unlink()
    _run(["data", "simulate", "-p", params, "--phantoms", str(made / "phantoms"), "--root", str(made / "data"), "--split", "Te-3"])
    with Volume(target) as volume:
        np.testing.assert_array_equal(volume.image(), first)  # remade identically


def test_the_data_stages_write_the_same_bytes_twice(tmp_path: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same params and seed, made again later in another project folder: every file
    byte-identical, so DVC hashes and data.* MLflow tags change only when the data does (HDF5
    stamps creation times unless told not to). Paths are relative, as dvc.yaml's are: a scan
    records the phantom file it was made from."""
    split_args = [arg for split in TINY_SPLITS for arg in ("--split", split)]
    for project in ("first", "again"):
        monkeypatch.chdir(tmp_path)
        (tmp_path / project).mkdir()
        write_params(tmp_path / project / "params.yaml", tiny_params)
        monkeypatch.chdir(tmp_path / project)
        _run(["data", "phantoms", "--out", "phantoms", *split_args])
        _run(["data", "simulate", "--phantoms", "phantoms", "--root", "data", *split_args])
    first, again = tmp_path / "first", tmp_path / "again"
    made = sorted(path.relative_to(first) for folder in ("phantoms", "data") for path in (first / folder).rglob("*") if path.is_file())
    assert len(made) >= 2 * len(TINY_SPLITS) and any(path.suffix == ".h5" for path in made)
    for relative in made:
        assert (again / relative).read_bytes() == (first / relative).read_bytes(), relative


def test_other_seed_other_phantoms(made: Path) -> None:
    params = str(made / "params.yaml")
    _run(["data", "phantoms", "-p", params, "--out", str(made / "other"), "--split", "Te-3", "--seed", "7"])
    with Volume(made / "phantoms" / "Te-3" / "Te-3_000.h5") as a, Volume(made / "other" / "Te-3" / "Te-3_000.h5") as b:
        assert (a.labels() != b.labels()).any()


def test_bad_params_key_exits_2_with_one_line(tmp_path: Path, tiny_params: dict, capsys) -> None:
    tiny_params["data"]["scanners"]["lab"]["kv"] = 100
    params = write_params(tmp_path / "params.yaml", tiny_params)
    assert main(["data", "phantoms", "-p", str(params), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.scanners.lab.kv" in err
    assert not (tmp_path / "out").exists()


def test_unknown_split_is_refused(tmp_path: Path, tiny_params: dict, capsys) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params)
    assert main(["data", "phantoms", "-p", str(params), "--split", "Te-9", "--out", str(tmp_path / "out")]) == 2
    assert "data.splits.Te-9" in capsys.readouterr().err


def test_help_everywhere() -> None:
    commands = (
        [], ["data"], ["data", "phantoms"], ["data", "simulate"], ["data", "import"], ["data", "info"],
        ["gan"], ["gan", "train"], ["gan", "synthesize"], ["train"], ["train", "sam"], ["train", "unet"],
        ["train", "finetune-real"], ["predict"], ["eval"], ["eval", "fid"], ["eval", "models"],
        ["eval", "forgetting"], ["eval", "robustness"], ["report"], ["ui"],
    )
    for args in ([*command, "--help"] for command in commands):
        result = subprocess.run([sys.executable, "-m", "xctsam.cli", *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "Usage" in result.stdout, (args, result.stderr)


def test_debug_shows_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    quiet = subprocess.run([sys.executable, "-m", "xctsam.cli", "data", "phantoms", "-p", str(missing)], capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-m", "xctsam.cli", "--debug", "data", "phantoms", "-p", str(missing)], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "params file not found" in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_dvc_repro_twice_second_does_nothing(tmp_path: Path, tiny_params: dict) -> None:
    """A clone of the project's pipeline on tiny params: the data stages, then again as a no-op."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    tiny_params["data"]["splits"] = {k: v for k, v in tiny_params["data"]["splits"].items() if k in TINY_SPLITS}
    write_params(work / "params.yaml", tiny_params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")  # the project's default remote
    data_stages = ("--glob", "simulate@*")  # and the phantoms they depend on; later stages have tests of their own
    run(*dvc, "repro", *data_stages)
    scan = work / "data" / "real" / "Te-3" / "Te-3_000.h5"
    assert scan.is_file()
    assert "up to date" in run(*dvc, "repro", *data_stages)
    lock = (work / "dvc.lock").read_text()
    assert "simulate@Te-3" in lock and "data.splits.Te-3" in lock
    assert json.loads(run(*dvc, "status", "--json", *(f"simulate@{s}" for s in TINY_SPLITS)) or "{}") == {}

    # the default remote works out of the box: push, lose data and cache, pull it back
    original = scan.read_bytes()
    data_targets = [f"{stage}@{split}" for stage in ("phantoms", "simulate") for split in TINY_SPLITS]
    run(*dvc, "push", *data_targets)
    shutil.rmtree(work / "data")
    shutil.rmtree(work / ".dvc" / "cache")
    run(*dvc, "pull", *data_targets)
    assert scan.read_bytes() == original

    # naming a real dataset in params adds its import stage; no dataset, no stage
    assert "import@" not in run(*dvc, "stage", "list")
    tiny_params["data"]["imports"] = {"scans": {"source": str(tmp_path / "scans"), "format": "samgan"}}
    write_params(work / "params.yaml", tiny_params)
    assert "import@scans" in run(*dvc, "stage", "list")
