"""DVC experiments as users run them: `dvc exp run -S ...`, one of them queued, each its own MLflow parent.

The project is a git repository in a temporary folder holding tiny volumes, the project's
params.yaml shrunk to seconds and a one-stage dvc.yaml running the real `xctsam train sam`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from xctsam.data.volumes import write_volume

from .conftest import write_params
from .test_train_stage import _coupon

TRAIN_SAM = {
    "cmd": "xctsam train sam --root data --out models/sam",
    "deps": ["data/synthetic/Tr-GAN"],
    "params": ["seed", "sam", "train.sam"],
    "outs": [{"models/sam": {"persist": True}}],
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def experiment_repo(tmp_path: Path, tiny_params: dict) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "repo"
    rng = np.random.default_rng(0)
    for i in range(2):  # one training volume, one validation volume
        write_volume(repo / "data" / "synthetic" / "Tr-GAN" / f"v{i}.h5", *_coupon(rng, (4, 40, 40)))
    tiny_params["train"]["sam"].update(
        {"steps": 2, "epoch_steps": 2, "tile": 32, "batch": 2, "val_slices": 2, "warmup_steps": 1, "checkpoint_every": 2}
    )
    tiny_params["sam"]["small"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}
    tiny_params["sam"]["lora"].update({"rank": 2, "experts": 2})
    write_params(repo / "params.yaml", tiny_params)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_sam": TRAIN_SAM}}, sort_keys=False))
    (repo / ".gitignore").write_text("/models\n/mlruns\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XCTSAM_EXECUTION", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        _run(args, repo, env)
    return repo, env


def _pipeline_parents(repo: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlruns/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return runs, [run for run in runs if run.data.tags.get("stage") == "pipeline"]


def test_two_experiments_one_queued_give_two_parent_runs(experiment_repo: tuple[Path, dict[str, str]]) -> None:
    repo, env = experiment_repo
    _run(["dvc", "exp", "run", "-n", "rank-3", "-S", "sam.lora.rank=3"], repo, env)
    _run(["dvc", "exp", "run", "--queue", "-n", "rank-5", "-S", "sam.lora.rank=5"], repo, env)
    _run(["dvc", "exp", "run", "--run-all"], repo, env)
    shown = _run(["dvc", "exp", "show", "--csv"], repo, env)
    assert "rank-3" in shown and "rank-5" in shown

    runs, parents = _pipeline_parents(repo)
    assert len(parents) == 2, [run.data.tags for run in runs]
    assert sorted(run.data.params["sam.lora.rank"] for run in parents) == ["3", "5"]
    assert sorted(run.data.tags.get("dvc.experiment") for run in parents) == ["rank-3", "rank-5"]
    children = {parent.info.run_id: [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id] for parent in parents}
    metric_keys = []
    for parent in parents:
        (child,) = children[parent.info.run_id]
        assert child.data.tags["stage"] == "train_sam"
        assert child.data.params["sam.lora.rank"] == parent.data.params["sam.lora.rank"]
        metric_keys.append(set(child.data.metrics))
    assert metric_keys[0] == metric_keys[1] and "val.miou" in metric_keys[0]
    parent_keys = [set(parent.data.metrics) for parent in parents]
    assert parent_keys[0] == parent_keys[1] and "sam.val.miou" in parent_keys[0]
