"""MLflow store location and stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from xctsam import tracking


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
