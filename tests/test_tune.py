"""`xctsam tune`: search space, trials on a tiny project, continuing a study, MLflow runs, apply."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml

from xctsam.cli import main
from xctsam.config.params import load_params
from xctsam.data.volumes import write_volume
from xctsam.params_file import update_params_file
from xctsam.tune.space import apply_values, suggest
from xctsam.util import tracking
from xctsam.util.errors import ConfigError

from .conftest import REPO, write_params
from .test_train_stage import _coupon

SPACE = {
    "sam.lora.rank": {"type": "categorical", "choices": [2, 4]},
    "sam.lora.experts": {"type": "categorical", "choices": [1, 2]},
    "train.sam.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
}


def make_tune_project(root: Path, params: dict, steps: int = 4, epoch_steps: int = 2) -> Path:
    """Three tiny labelled volumes (two train, one held out for validation) and tiny SAM settings."""
    rng = np.random.default_rng(0)
    for i in range(3):
        write_volume(root / "data" / "synthetic" / "Tr-GAN" / f"v{i}.h5", *_coupon(rng, (4, 40, 40)))
    params["train"]["sam"].update({"steps": steps, "epoch_steps": epoch_steps, "tile": 32, "batch": 2, "val_slices": 2, "warmup_steps": 1, "checkpoint_every": 2})
    params["sam"]["small"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}
    params["sam"]["checkpoint"] = None
    params["tune"].update({"space": SPACE, "trial": {}, "heartbeat_seconds": 1, "max_retry": 2})
    return write_params(root / "params.yaml", params)


@pytest.fixture
def project(tmp_path: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_tune_project(tmp_path, tiny_params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _study(root: Path, name: str = "xctsam-sam") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root}/tune/optuna.db")


# ---------------------------------------------------------------- space
def test_space_suggests_and_applies_values(tmp_path: Path, default_params: dict) -> None:
    params = load_params(write_params(tmp_path / "params.yaml", {**default_params, "tune": {**default_params["tune"], "space": SPACE}}))
    values = suggest(optuna.trial.FixedTrial({"sam.lora.rank": 2, "sam.lora.experts": 2, "train.sam.lr": 1e-3}), params.tune.space)
    assert values == {"sam.lora.rank": 2, "sam.lora.experts": 2, "train.sam.lr": 1e-3}
    changed = apply_values(params, values)
    assert (changed.sam.lora.rank, changed.sam.lora.experts, changed.train.sam.lr) == (2, 2, 1e-3)
    assert params.sam.lora.rank == default_params["sam"]["lora"]["rank"]  # a copy, the original untouched
    with pytest.raises(ConfigError, match="top_k"):  # the schema's own rules hold for drawn values
        apply_values(params, {"sam.lora.experts": 1, "sam.lora.top_k": 2})


def test_unknown_space_key_is_one_line_exit_2(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tune"]["space"]["sam.lora.rnak"] = {"type": "categorical", "choices": [2]}
    write_params(project / "params.yaml", raw)
    assert main(["tune", "run", "--n-trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tune.space.sam.lora.rnak" in err
    assert not (project / "tune" / "trials").exists()


def test_incomplete_dimension_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tune"]["space"]["train.sam.lr"] = {"type": "float", "low": 0.01}
    write_params(project / "params.yaml", raw)
    assert main(["tune", "run"]) == 2
    assert "tune.space.train.sam.lr" in capsys.readouterr().err


# ---------------------------------------------------------------- a study on local storage
def test_study_continues_with_mlflow_parent_and_children(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "run", "--n-trials", "2"]) == 0
    assert [t.state.name for t in _study(project).trials] == ["COMPLETE", "COMPLETE"]
    assert main(["tune", "run", "--n-trials", "3"]) == 0  # the same name continues the study
    trials = _study(project).trials
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["train.sam.lr"] for t in trials}) == 3  # a rerun does not replay the first draws
    for trial in trials:  # one report per epoch (4 steps, a validation every 2): what a pruner sees
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.value == max(trial.intermediate_values.values())
        assert (project / "tune" / "trials" / "xctsam-sam" / f"trial-{trial.number}" / "best.pt").is_file()

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    children = [r for r in runs if r.data.tags.get("stage") == "tune_trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    keys = {frozenset(r.data.metrics) for r in children}
    assert len(keys) == 1 and {"val.miou", "objective", "train.loss"} <= next(iter(keys))
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        assert run.data.metrics["objective"] == pytest.approx(trials[number].value)
        assert run.data.params["sam.lora.rank"] == str(trials[number].params["sam.lora.rank"])
        assert run.data.tags["optuna.state"] == "COMPLETE" and run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(parents[0].info.run_id, "objective")
    assert sorted(m.step for m in history) == [0, 1, 2]

    capsys.readouterr()
    assert main(["tune", "show"]) == 0
    shown = capsys.readouterr().out
    best = max(trials, key=lambda t: t.value)
    assert "3 complete" in shown and f"{best.value:.4f}" in shown and "importance" in shown

    before = (project / "params.yaml").read_text()
    assert main(["tune", "apply"]) == 0
    applied = load_params(project / "params.yaml")
    assert applied.sam.lora.rank == best.params["sam.lora.rank"] and applied.train.sam.lr == pytest.approx(best.params["train.sam.lr"])
    after = (project / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before.splitlines(), after) if a != b]
    assert len(after) == len(before.splitlines()) and 1 <= len(changed) <= 3
    for old_line, new_line in changed:  # only the searched values changed, each on its own line
        key = old_line.split(":")[0]
        assert new_line.split(":")[0] == key and key.strip() in {"rank", "experts", "lr"}


def test_pruning_stops_a_trial_after_its_first_epoch(project: Path) -> None:
    from xctsam.tune.mlflow_log import TrialRun
    from xctsam.tune.objective import Objective

    params = load_params(project / "params.yaml")
    storage = f"sqlite:///{project}/prune.db"
    study = optuna.create_study(storage=storage, direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # mIoU < 2: always prune
    trial = study.ask()
    values = suggest(trial, params.tune.space)
    experiment_id = tracking.configure()  # points mlflow at this test's store
    parent = mlflow.MlflowClient().create_run(experiment_id).info.run_id
    run = TrialRun(parent, trial, values, "prune")
    with pytest.raises(optuna.TrialPruned):
        Objective(params, project / "data", project / "trials")(trial, values, run)
    reported = study.trials[-1].intermediate_values
    assert list(reported) == [1] and 0 <= reported[1] <= 1
    assert not (project / "trials" / f"trial-{trial.number}" / "training.json").exists()  # stopped before the end


# ---------------------------------------------------------------- params file edits
def test_update_params_file_changes_only_values(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    previous = update_params_file(path, {"sam.lora.rank": 16, "train.sam.lr": 0.00125, "fid.window": [0, 255]})
    assert previous["fid.window"] is None
    after = path.read_text()
    diff = [(a, b) for a, b in zip(original.splitlines(), after.splitlines()) if a != b]
    assert len(original.splitlines()) == len(after.splitlines()) and len(diff) == 3
    assert all("#" not in a or a.split("#", 1)[1] == b.split("#", 1)[1] for a, b in diff)  # comments kept
    loaded = load_params(path)
    assert (loaded.sam.lora.rank, loaded.train.sam.lr, loaded.fid.window) == (16, 0.00125, (0.0, 255.0))


@pytest.mark.parametrize("updates", [{"sam.lora.rnak": 8}, {"sam.lora.experts": 0}])
def test_update_params_file_refuses_bad_keys_and_values(tmp_path: Path, updates: dict) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(ConfigError, match=next(iter(updates)).rsplit(".", 1)[-1]):
        update_params_file(path, updates)
    assert path.read_text() == before  # nothing written


# ---------------------------------------------------------------- dashboard
def test_dashboard_serves_the_study_storage_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys

    from .test_ui import _free_port, get_when_served

    (tmp_path / "params.yaml").write_text("seed: 0\n")  # marks the project root
    storage = f"sqlite:///{tmp_path}/tune/optuna.db"
    (tmp_path / "tune").mkdir()
    optuna.create_study(study_name="shown", storage=storage)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "xctsam.cli", "tune", "dashboard", "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert f"http://127.0.0.1:{port}" in server.stdout.readline()
        answer = get_when_served(f"http://127.0.0.1:{port}/api/studies", 60)
        assert answer is not None, "the dashboard never answered"
        studies = json.loads(answer[1])["study_summaries"]
        assert [study["study_name"] for study in studies] == ["shown"]  # the project's default storage
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 130
    finally:
        if server.poll() is None:
            server.kill()
