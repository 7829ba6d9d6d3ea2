"""Nothing of the user's is lost by a training: a finished model outlives a new training until
that one has a better answer, two runs into one folder cannot both write it, and an --out that
cannot be a folder is one line, not a traceback."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
from pathlib import Path

import pytest

from xctsam.cli import main
from xctsam.models.factory import load_segmenter
from xctsam.train.loop import BEST, LAST, SUMMARY, finished_result
from xctsam.util.folder_lock import LOCK_NAME

from . import test_cli_contract
from .conftest import write_params
from .test_cli_contract import Streamed, run_cli
from .test_loop import config, train

unet_project = test_cli_contract.unet_project  # the fixture: a tiny U-Net split and params
OUT = Path("models") / "unet"


@pytest.fixture
def project(unet_project: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    """unet_project with MLflow in a file store: a new SQLite store spends seconds on migrations."""
    root, env = unet_project
    return root, {**env, "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _short_params(root: Path, tiny_params: dict, name: str) -> str:
    """unet_project's params with a training of a few steps that ends (another fingerprint)."""
    tiny_params["train"]["unet"].update({"steps": 4, "epoch_steps": 2})
    write_params(root / name, tiny_params)
    return name


def _in_process(root: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """The console script's code run in this process: a process start less where only the code matters."""
    monkeypatch.chdir(root)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, env[name])
    return main(list(args))


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_a_new_training_stopped_early_keeps_the_finished_model(project: tuple[Path, dict[str, str]], tiny_params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    root, env = project
    assert _in_process(root, env, monkeypatch, "train", "unet", "-p", _short_params(root, tiny_params, "short.yaml")) == 0
    best, summary = root / OUT / BEST, root / OUT / SUMMARY
    kept = {path: _digest(path) for path in (best, summary)}

    # other params, no validation (so no new best) before the Ctrl-C
    tiny_params["train"]["unet"].update({"steps": 100000, "epoch_steps": 100000})
    write_params(root / "params.yaml", tiny_params)
    other = Streamed(["train", "unet"], root, env)
    other.wait_for((root / OUT / LAST).is_file)
    assert other.stop(signal.SIGINT) == 130, other.stderr[-2000:]

    assert {path: _digest(path) for path in kept} == kept
    load_segmenter(best)  # still a model evaluation can load
    assert finished_result(root / OUT, json.loads(summary.read_text())["fingerprint"]) is not None
    assert not (root / OUT / LOCK_NAME).exists()


def test_a_stale_summary_never_vouches_for_a_new_best(tmp_path: Path) -> None:
    """The old training.json stays while the old best.pt does, and goes when a new best replaces it."""
    finished, other = config(steps=4, epoch_steps=2), config(steps=8, epoch_steps=2)
    train(tmp_path, cfg=finished)
    old = _digest(tmp_path / BEST)
    train(tmp_path, cfg=other, stop_after=1)  # stopped before its first validation
    assert _digest(tmp_path / BEST) == old and (tmp_path / SUMMARY).is_file()

    train(tmp_path, cfg=other, stop_after=2)  # its first validation: a new best.pt
    assert _digest(tmp_path / BEST) != old and not (tmp_path / SUMMARY).exists()
    again = train(tmp_path, cfg=finished)
    assert again.steps_per_second is not None  # trained again, not "finished" with other weights


def test_a_second_run_into_the_same_folder_is_refused(
    project: tuple[Path, dict[str, str]], tiny_params: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, env = project
    first = Streamed(["train", "unet"], root, env)
    first.wait_for((root / OUT / LOCK_NAME).is_file)  # taken before the data are read

    capsys.readouterr()
    assert _in_process(root, env, monkeypatch, "train", "unet", "-p", _short_params(root, tiny_params, "short.yaml")) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{OUT}: in use by another run (pid {first.process.pid} on {socket.gethostname()} since " in line
    assert "xctsam train unet" in line and "choose another --out" in line
    assert not (root / OUT / SUMMARY).exists()  # the refused run wrote nothing

    first.wait_for((root / OUT / LAST).is_file)  # undisturbed: it trains, and stops as usual
    assert first.stop(signal.SIGINT) == 130, first.stderr[-2000:]
    assert (root / OUT / LAST).is_file() and not (root / OUT / LOCK_NAME).exists()


def test_an_out_folder_under_a_file_is_one_line(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    (root / "notes.txt").write_text("not a folder\n")
    done = run_cli("train", "unet", "--out", "notes.txt/sub", cwd=root, env=env)
    assert done.returncode == 2
    assert "notes.txt: is a file where a folder is needed" in _one_line_error(done.stderr)
