"""MLflow store location and stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from xctsam.util import tracking


def test_store_is_absolute_sqlite_in_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    nested = tmp_path / "src" / "deep"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"


def test_dvc_temp_experiment_copies_log_to_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "abc"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(copy)
    assert tracking.store_dir() == tmp_path.resolve() / "mlruns"


def test_env_uri_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_nests_with_dots() -> None:
    assert tracking.flatten({"sam": {"lora": {"rank": 4}}, "seed": 0}) == {"sam.lora.rank": 4, "seed": 0}


def test_stage_run_logs_params_and_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with tracking.stage_run("fid", {"fid": {"samples": 10}}) as run:
        mlflow.log_metric("fid.Te-1", 12.5)
    stored = mlflow.get_run(run.info.run_id)
    assert stored.data.params == {"fid.samples": "10"}
    assert stored.data.tags["stage"] == "fid" and stored.data.metrics["fid.Te-1"] == 12.5


def _runs(tmp_path: Path) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_stages_of_one_execution_share_a_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for execution, stages in (("run-1", ("a", "b")), ("run-2", ("a",))):
        monkeypatch.setenv("XCTSAM_EXECUTION", execution)
        for stage in stages:
            with tracking.stage_run(stage, {"x": 1}):
                pass
    runs = _runs(tmp_path)
    parents = {run.info.run_id: run for run in runs if run.data.tags.get("stage") == "pipeline"}
    children = [run for run in runs if run.data.tags.get("stage") != "pipeline"]
    assert len(parents) == 2 and len(children) == 3
    by_execution = {}
    for child in children:
        parent = parents[child.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags[tracking.EXECUTION_TAG] == child.data.tags[tracking.EXECUTION_TAG]
        by_execution.setdefault(child.data.tags[tracking.EXECUTION_TAG], []).append(child.data.tags["stage"])
    assert sorted(by_execution["run-1"]) == ["a", "b"] and by_execution["run-2"] == ["a"]


def test_no_parent_outside_a_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XCTSAM_EXECUTION", "DVC_EXP_NAME", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with tracking.stage_run("alone"):
        pass
    (run,) = _runs(tmp_path)
    assert "mlflow.parentRunId" not in run.data.tags


def test_dvc_repro_gives_one_parent_per_execution(tmp_path: Path) -> None:
    """Two stages of a real `dvc repro` (separate processes) share one parent; a second repro has its own."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    log = "from xctsam.util.tracking import stage_run\\nwith stage_run('{name}'): pass"
    stages = {
        name: {"cmd": f'{sys.executable} -c "exec(\\"{log.format(name=name)}\\")" && echo {name} > {name}.txt', "outs": [f"{name}.txt"], **({"deps": ["a.txt"]} if name == "b" else {})}
        for name in ("a", "b")
    }
    import yaml

    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    env = {k: v for k, v in os.environ.items() if k not in ("XCTSAM_EXECUTION", "DVC_EXP_NAME")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], [sys.executable, "-m", "dvc", "repro"], [sys.executable, "-m", "dvc", "repro", "--force"]):
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    runs = _runs(tmp_path)
    children = [run for run in runs if run.data.tags.get("stage") in ("a", "b")]
    parents = {run.data.tags.get("mlflow.parentRunId") for run in children}
    assert len(children) == 4 and len(parents) == 2 and None not in parents


def test_parent_is_tagged_with_the_data_hashes_of_dvc_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    lock = {
        "schema": "2.0",
        "stages": {
            "simulate@Te-1": {"cmd": "x", "outs": [{"path": "data/real/Te-1", "hash": "md5", "md5": "abc.dir"}]},
            "train_sam": {"cmd": "y", "outs": [{"path": "models/sam", "hash": "md5", "md5": "def.dir"}]},
        },
    }
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("XCTSAM_EXECUTION", "run-1")
    with tracking.stage_run("evaluate"):
        pass
    (parent,) = [run for run in _runs(tmp_path) if run.data.tags.get("stage") == "pipeline"]
    assert parent.data.tags["data.data/real/Te-1"] == "abc.dir"
    assert not any(key.startswith("data.models") for key in parent.data.tags)


def test_parent_holds_each_stage_final_metrics_prefixed_by_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("XCTSAM_EXECUTION", "run-1")
    for model, value in (("sam", 0.5), ("unet", 0.7)):
        with tracking.stage_run(f"evaluate.{model}", tags={"model": model}):
            mlflow.log_metric("iou.Te-1.pore", value - 0.1, step=0)
            mlflow.log_metric("iou.Te-1.pore", value, step=1)  # the final value is rolled up
    with tracking.stage_run("fid"):
        mlflow.log_metric("fid.Te-1", 12.5)
    (parent,) = [run for run in _runs(tmp_path) if run.data.tags.get("stage") == "pipeline"]
    assert parent.data.metrics == {"sam.iou.Te-1.pore": 0.5, "unet.iou.Te-1.pore": 0.7, "fid.Te-1": 12.5}
