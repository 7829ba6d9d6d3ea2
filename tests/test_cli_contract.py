"""The CLI's exit-code contract, through the installed console script in a subprocess.

Usage errors print the framework's short usage message and exit 2; a stop signal exits
128 + its number with one line and the outputs kept; a command's own code comes through.
These break when a dependency upgrade changes how the CLI framework raises (typer 0.29 shipped
its own Click), so they run against whatever the lock installed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from xctsam.data.volumes import write_volume
from xctsam.tune.study import worst_exit_code
from xctsam.util.interrupt import Interrupted

from .conftest import write_params

XCTSAM = str(Path(sys.executable).with_name("xctsam"))


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([XCTSAM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["data", "import"],
        ["tune", "run", "--n-trials", "0"],
        ["predict", "x.h5", "--no-such-option"],
        ["train", "finetune-real", "--fresh", "extra-argument"],
    ],
    ids=["no-arguments", "unknown-command", "missing-argument", "invalid-value", "unknown-option", "extra-argument"],
)
def test_usage_errors_print_usage_and_exit_2(args: list[str], tmp_path: Path) -> None:
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Usage: xctsam" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())  # refused before any work


def test_help_exits_0() -> None:
    done = run_cli("--help")
    assert done.returncode == 0 and "Usage: xctsam" in done.stdout


def test_a_user_error_is_one_line_and_2(tmp_path: Path) -> None:
    done = run_cli("data", "info", str(tmp_path / "missing.h5"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "missing.h5" in done.stderr


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """MLflow's server only logs a failed bind and exits 0: the command checks the port first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
        done = run_cli("ui", "--port", str(port), cwd=tmp_path, env=env)
    assert done.returncode == 2 and f"port {port}" in done.stderr and done.stderr.strip().count("\n") == 0
    assert not list(tmp_path.iterdir())  # no store created


@pytest.mark.parametrize(("server_code", "expected"), [(3, 3), (0, 1)])
def test_a_server_that_ends_by_itself_has_failed(server_code: int, expected: int) -> None:
    from xctsam.ui import run_server

    assert run_server([sys.executable, "-c", f"raise SystemExit({server_code})"], dict(os.environ), "banner") == expected


def test_workers_exit_codes_fold_into_the_worst() -> None:
    assert worst_exit_code([0, 0]) == 0
    assert worst_exit_code([0, 2]) == 2
    assert worst_exit_code([0, -signal.SIGKILL]) == 137  # a worker killed by SIGKILL
    assert worst_exit_code([2, -signal.SIGTERM]) == 143


def test_interrupted_names_its_signal_and_code() -> None:
    assert Interrupted(signal.SIGINT).exit_code == 130 and Interrupted(signal.SIGTERM).exit_code == 143
    assert "SIGTERM" in Interrupted(signal.SIGTERM, "at step 3, last.pt saved").message


# ---------------------------------------------------------------- stop signals
class Streamed:
    """A running console-script process whose stderr lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([XCTSAM, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True) for stream, sink in ((self.process.stderr, self.lines), (self.process.stdout, self.out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)

    def wait_for(self, condition: object, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode} before the condition held: {''.join(self.lines)[-2000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"timed out: {''.join(self.lines)[-2000:]}")
            time.sleep(0.05)

    def stop(self, signum: int, timeout: float = 120) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def unet_project(tmp_path: Path, tiny_params: dict) -> Iterator[tuple[Path, dict[str, str]]]:
    """A tiny labelled training split and params for a U-Net training far too long to finish."""
    rng = np.random.default_rng(0)
    for i in range(2):
        labels = (rng.random((4, 32, 32)) < 0.5).astype(np.uint8)
        write_volume(tmp_path / "data" / "synthetic" / "Tr-GAN" / f"v{i}.h5", (labels * 0.8 + rng.normal(0, 0.05, labels.shape)).astype(np.float32), labels)
    tiny_params["train"]["unet"].update({"steps": 100000, "epoch_steps": 4, "tile": 32, "batch": 2, "val_slices": 2, "warmup_steps": 1, "checkpoint_every": 2, "patience": 1000})
    tiny_params["unet"] = {"context": 3, "filters": 4, "depth": 2}
    write_params(tmp_path / "params.yaml", tiny_params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "COLUMNS": "200"}
    yield tmp_path, env


def _stage_run_statuses(tracking_uri: str, stage: str) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("xctsam")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'", order_by=["attributes.start_time ASC"])
    return [run.info.status for run in runs]


def _checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, weights_only=True)["step"])


def test_ctrl_c_then_sigterm_during_training(unet_project: tuple[Path, dict[str, str]]) -> None:
    root, env = unet_project
    last = root / "models" / "unet" / "last.pt"

    first = Streamed(["train", "unet"], root, env)
    first.wait_for(last.is_file)
    assert first.stop(signal.SIGINT) == 130
    message = first.stderr.strip().splitlines()[-1]
    assert message.startswith("interrupted (SIGINT): at step ") and "models/unet/last.pt saved" in message and "Traceback" not in first.stderr
    stopped_at = _checkpoint_step(last)
    assert f"at step {stopped_at}," in message  # the step in flight was finished and saved

    second = Streamed(["train", "unet"], root, env)
    second.wait_for(lambda: "resuming from step" in second.stderr)
    assert f"resuming from step {stopped_at} of 100000" in second.stderr
    # the signal must find the loop running: on a loaded machine the first steps after the
    # "resuming" line can take seconds, and a stop before them is the outside-a-loop case
    second.wait_for(lambda: _checkpoint_step(last) > stopped_at)
    assert second.stop(signal.SIGTERM) == 143
    assert second.stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM): at step ")
    assert not list(last.parent.glob("*.tmp"))

    assert _stage_run_statuses(env["MLFLOW_TRACKING_URI"], "train_unet") == ["KILLED", "KILLED"]


def test_sigterm_outside_a_training_loop_keeps_finished_outputs_only(tmp_path: Path, tiny_params: dict) -> None:
    """Phantoms are written one volume at a time: a kill mid-way keeps the finished ones whole
    and leaves no temporary file, and the command says so in one line with code 143."""
    tiny_params["data"]["phantom"]["shape"] = [48, 192, 192]
    for split in tiny_params["data"]["splits"].values():
        split["volumes"] = 3
    write_params(tmp_path / "params.yaml", tiny_params)
    out = tmp_path / "phantoms"
    job = Streamed(["data", "phantoms", "--out", str(out)], tmp_path, {**os.environ, "COLUMNS": "200"})
    job.wait_for(lambda: len(job.out) >= 1)
    assert job.stop(signal.SIGTERM) == 143
    assert job.stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM)")
    assert "Traceback" not in job.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    import h5py

    for path in out.rglob("*.h5"):
        with h5py.File(path) as f:  # every file left is whole
            assert f["labels"].shape[0] == 48


def test_stage_runs_and_their_parent_end_killed_or_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xctsam.util import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XCTSAM_EXECUTION", "one-pipeline")  # the stages share a parent run
    monkeypatch.chdir(tmp_path)
    parent_statuses = []
    with pytest.raises(Interrupted), tracking.stage_run("killed"):
        raise Interrupted(signal.SIGTERM)
    parent_statuses += _stage_run_statuses(uri, "pipeline")
    with pytest.raises(ValueError), tracking.stage_run("failed"):
        raise ValueError("boom")
    parent_statuses += _stage_run_statuses(uri, "pipeline")
    with tracking.stage_run("finished"):
        parent_statuses += _stage_run_statuses(uri, "pipeline")
    parent_statuses += _stage_run_statuses(uri, "pipeline")
    assert [_stage_run_statuses(uri, stage) for stage in ("killed", "failed", "finished")] == [["KILLED"], ["FAILED"], ["FINISHED"]]
    assert parent_statuses == ["KILLED", "FAILED", "RUNNING", "FINISHED"]



def test_a_failed_tuning_worker_fails_the_command(tmp_path: Path, tiny_params: dict) -> None:
    """Two workers whose trials find no training data: each exits 2, and so does `tune run`."""
    from .test_tune import make_tune_project

    make_tune_project(tmp_path, tiny_params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = run_cli("tune", "run", "--n-trials", "2", "--workers", "2", "--root", str(tmp_path / "nowhere"), cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("error: worker") == 2 and "Traceback" not in done.stderr
