"""`xctsam tune run` on the PostgreSQL storage many machines share (127.0.0.1:5432; README, tuning).

Each test gets a database of its own, dropped afterwards. Where no server answers (a laptop
without PostgreSQL) the tests skip and say so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest

from xctsam.cli import main

from .test_tune import make_tune_project

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e .)")

SERVER = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def _admin() -> object:
    try:
        connection = psycopg.connect(dbname="postgres", connect_timeout=3, autocommit=True, **SERVER)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answering on 127.0.0.1:5432 as user postgres ({str(exc).strip().splitlines()[0]}); "
                    "start it with `pg_ctlcluster --skip-systemctl-redirect <version> main start`")
    return connection


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"xctsam_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def project(tmp_path: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_tune_project(tmp_path, tiny_params, steps=6, epoch_steps=3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _children() -> dict[int, mlflow.entities.Run]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.stage = 'tune_trial'")
    return {int(run.data.tags["optuna.trial_number"]): run for run in runs}


def test_two_workers_share_a_global_cap(project: Path, pg_url: str) -> None:
    assert main(["tune", "run", "--storage", pg_url, "--n-trials", "3", "--workers", "2"]) == 0
    trials = optuna.load_study(study_name="xctsam-sam", storage=pg_url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]  # exactly the cap: no trial beyond it was started
    assert all(t.state.name == "COMPLETE" for t in trials)
    children = _children()
    assert sorted(children) == [0, 1, 2]
    parents = {run.data.tags["mlflow.parentRunId"] for run in children.values()}
    assert len(parents) == 1  # one parent run although two workers looked for it at once
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {run.info.run_id for run in children.values()}


def test_killed_worker_trial_fails_and_is_retried(project: Path, pg_url: str) -> None:
    env = {**os.environ, "XCTSAM_NO_PROGRESS": "1"}
    doomed = subprocess.Popen([sys.executable, "-m", "xctsam.cli", "tune", "run", "--storage", pg_url, "--n-trials", "2"], cwd=project, env=env)
    checkpoint = project / "tune" / "trials" / "xctsam-sam" / "trial-0" / "last.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file():  # mid-trial: past its first checkpoint, before its end
        assert doomed.poll() is None, "the worker ended before it could be killed"
        assert time.monotonic() < deadline, "trial 0 never reached its first checkpoint"
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert optuna.load_study(study_name="xctsam-sam", storage=pg_url).trials[0].state.name == "RUNNING"

    assert main(["tune", "run", "--storage", pg_url, "--n-trials", "2"]) == 0  # the surviving worker finishes the work
    trials = optuna.load_study(study_name="xctsam-sam", storage=pg_url).trials
    states = {t.number: t.state.name for t in trials}
    assert states[0] == "FAIL" and list(states.values()).count("COMPLETE") == 2 and len(states) == 3
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == trials[0].params
    assert not (checkpoint.parent.parent / f"trial-{retried[0].number}").exists()  # resumed in trial 0's folder
    assert (checkpoint.parent / "training.json").is_file() and not checkpoint.exists()
    children = _children()
    assert children[0].info.status == "FAILED" and children[0].data.tags["optuna.state"] == "FAIL"
    assert children[retried[0].number].data.tags["optuna.retry_of"] == "0"
    assert all(children[n].info.status == "FINISHED" for n, state in states.items() if state == "COMPLETE")
