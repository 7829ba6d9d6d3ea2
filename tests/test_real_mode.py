"""The study's real-data mode end to end: `xctsam params apply configs/real-samgan.yaml`, `dvc repro`.

Runs the project's own dvc.yaml on a few slices of each split of the SAM-Material-GAN release
(copied into a temporary folder) with tiny model settings: the release's `train` is the
GAN-translated training split, test1..test6 are Te-1..Te-6, and no simulation or CycleGAN
stage exists. Slow (minutes): `pytest -m slow tests/test_real_mode.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, SAMGAN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

SLICES = {"train": {"AFAwNiInclusionsAndFilledDefects_pair_1": 10, "AFAwNiInclusionsAndFilledDefects_pair_2": 6}}
TEST_SLICES = 5
TINY_TRAINING = {"steps": 4, "epoch_steps": 2, "tile": 64, "batch": 2, "val_slices": 2, "warmup_steps": 1, "checkpoint_every": 2}
TINY = {
    **{f"train.{model}.{key}": value for model in ("sam", "unet") for key, value in TINY_TRAINING.items()},
    "sam.small": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4},
    "pretrain.steps": 2,
    "pretrain.batch": 1,
    "pretrain.heldout_images": 1,
    "sam.lora.rank": 2,
    "sam.lora.experts": 2,
    "unet.filters": 4,
    "unet.depth": 3,
    "predict.tile": 256,
    "finetune.steps": 2,
    "fid.samples": 4,
    "fid.batch": 4,
    "robustness.gaussian": [0.0, 0.1],
    "robustness.poisson": [100],
}


def _few_slices(release: Path, copy: Path) -> None:
    """The first slices of each scan of each split, with their masks, in the release's layout."""
    for split_dir in sorted(path for path in release.iterdir() if path.is_dir()):
        keep = SLICES.get(split_dir.name)
        names = sorted(path.name for path in (split_dir / "input").glob("*.png"))
        chosen = []
        for name in names:
            scan = name.rsplit("_", 1)[0]
            limit = keep.get(scan, 0) if keep else TEST_SLICES
            if sum(1 for kept in chosen if kept.rsplit("_", 1)[0] == scan) < limit:
                chosen.append(name)
        for folder in ("input", "class_1", "class_2", "class_3"):
            (copy / split_dir.name / folder).mkdir(parents=True)
            for name in chosen:
                shutil.copy2(split_dir / folder / name, copy / split_dir.name / folder / name)


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 1800) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.skipif(not SAMGAN.is_dir(), reason=f"no SAM-Material-GAN release at {SAMGAN}")
def test_real_mode_runs_the_study_on_imported_scans(tmp_path: Path) -> None:
    release = tmp_path / "release"
    _few_slices(SAMGAN, release)
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, project / name)
    for folder in ("src", "configs"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "models" / "foundation").mkdir(parents=True)  # as a clone has it: train_sam depends on the folder
    shutil.copy2(REPO / "models" / "foundation" / "README.md", project / "models" / "foundation" / "README.md")
    env = {k: v for k, v in os.environ.items() if k not in ("XCTSAM_EXECUTION", "DVC_EXP_NAME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    _run(["git", "init", "-q"], project, env)
    _run(["dvc", "init", "-q"], project, env)

    _run(["xctsam", "params", "apply", "configs/real-samgan.yaml"], project, env)
    tiny = {**TINY, "data.imports": {"sam-material-gan": {"source": str(release), "format": "samgan"}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    _run(["xctsam", "params", "apply", str(tmp_path / "tiny.yaml")], project, env)

    stages = _run(["dvc", "stage", "list", "--name-only"], project, env).split()
    assert "import@sam-material-gan" in stages
    assert not [stage for stage in stages if stage.startswith(("phantoms", "simulate", "gan_train", "synthesize"))]

    _run(["dvc", "repro"], project, env)

    splits = [f"Te-{i}" for i in range(1, 7)]
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    for model in ("sam", "unet"):
        assert sorted(evaluation["iou"][model]) == splits
        assert set(evaluation["iou"][model]["Te-1"]) == {"background", "material", "pore", "inclusion"}
    fid = json.loads((project / "metrics" / "fid.json").read_text())
    assert sorted(fid["fid"]) == splits and fid["pairs"] == {}
    forgetting = json.loads((project / "metrics" / "forgetting.json").read_text())
    forgotten_on = set(forgetting["deltas"]["SAM-FineReal"]) - {"mean"}
    assert forgotten_on == set(splits) - {"Te-6"}  # fine-tuned on the whole of Te-6
    assert (project / "reports" / "study.html").stat().st_size > 0
    status = _run(["dvc", "status"], project, env)
    assert "up to date" in status.lower(), status
