"""Registered models are data, never code; a server that does not answer and secrets in URLs.

A model version on a shared MLflow server is written by whoever may register one: loading it
through xctsam must run nothing of it. Each refusal here is one line with exit code 2, through
the console script.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xctsam.data.volumes import write_volume
from xctsam.models.pyfunc import DATA_FOLDER, LOADER_MODULE, META, WEIGHTS
from xctsam.util.urls import mask_secrets, redact_url

from .conftest import write_params
from .test_cli_contract import run_cli
from .test_train_stage import _coupon

# Unpickling this runs `touch <marker>`: what a hostile model version would hold.
RUNS_COMMAND = """
class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, ("touch " + self.marker,)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A tiny project with one trained U-Net (out folder w/u) registered in its own store."""
    import copy

    import yaml

    root = tmp_path_factory.mktemp("registry")
    params = copy.deepcopy(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()))
    rng = np.random.default_rng(0)
    for split, count in (("synthetic/Tr-GAN", 3), ("synthetic/Tr-sim", 3), ("real/Te-1", 1)):
        for i in range(count):
            write_volume(root / "data" / split / f"v{i}.h5", *_coupon(rng, (4, 40, 40)))
    params["train"]["unet"].update({"steps": 2, "epoch_steps": 2, "tile": 32, "batch": 2, "val_slices": 1, "warmup_steps": 1, "checkpoint_every": 2})
    params["unet"] = {"context": 3, "filters": 4, "depth": 2}
    params["predict"] = {"tile": 32, "overlap": 0.25, "batch": 4}
    write_params(root / "params.yaml", params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "XCTSAM_NO_PROGRESS": "1"}
    for args in (["train", "unet", "--out", "w/u"], ["train", "unet", "--train-split", "synthetic/Tr-sim", "--out", "w/s"]):
        done = run_cli(*args, cwd=root, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    return root, env


def _in_store(root: Path, env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    """Python run against the project's MLflow store (as a colleague with register rights would)."""
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_registered_names_follow_the_model_not_the_out_folder(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    listed = _in_store(root, env, "import mlflow; print(sorted(m.name for m in mlflow.MlflowClient().search_registered_models()))")
    assert listed.stdout.strip() == "['xctsam-unet', 'xctsam-unet-sim']", listed.stderr
    done = run_cli("predict", "data/real/Te-1/v0.h5", "--model", "models:/xctsam-unet/latest", "--out", "named.tif", cwd=root, env=env)
    assert done.returncode == 0, done.stderr


def test_a_registered_version_is_weights_and_json_that_mlflow_clients_load(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    code = (
        "import mlflow, mlflow.pyfunc, numpy as np, json\n"
        "info = mlflow.models.get_model_info('models:/xctsam-unet/1')\n"
        "model = mlflow.pyfunc.load_model('models:/xctsam-unet/1')\n"
        "out = model.predict(np.random.default_rng(0).random((2, 3, 48, 40)).astype(np.float32))\n"
        "print(json.dumps({'flavors': sorted(info.flavors), 'loader': info.flavors['python_function'].get('loader_module'),"
        " 'shape': list(out.shape), 'sums': float(np.abs(out.sum(axis=1) - 1).max())}))\n"
    )
    done = _in_store(root, env, code)
    assert done.returncode == 0, done.stderr
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["flavors"] == ["python_function"] and found["loader"] == LOADER_MODULE  # no pytorch pickle flavor
    assert found["shape"] == [2, 4, 48, 40] and found["sums"] < 1e-4  # any tile size; class probabilities


def _register(root: Path, env: dict[str, str], code: str) -> str:
    """Run `code` (which logs `info`) as a colleague would through MLflow's API; the version it registered."""
    done = _in_store(root, env, f"import mlflow, mlflow.pyfunc, os, torch\n{RUNS_COMMAND}\n{code}\nprint(info.registered_model_version)\n")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _assert_refused(done: subprocess.CompletedProcess[str], marker: Path, expected: str) -> None:
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and expected in err, err
    assert not marker.exists(), "code from the registry ran"


def test_a_pickled_registered_model_runs_no_code(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    marker = root / "pwned-pickle"
    version = _register(root, env, (
        "class Hostile(mlflow.pyfunc.PythonModel):\n"
        f"    def __init__(self): self.payload = RunsCommand({str(marker)!r})\n"
        "    def predict(self, context, model_input): return model_input\n"
        "info = mlflow.pyfunc.log_model(name='model', python_model=Hostile(), registered_model_name='xctsam-unet')\n"
    ))
    marker.unlink(missing_ok=True)  # MLflow may load a python_model once while logging it
    uri = f"models:/xctsam-unet/{version}"
    # predict, export and calibrate all load through models.registry.load_model
    done = run_cli("predict", "data/real/Te-1/v0.h5", "--out", "evil.tif", "--model", uri, cwd=root, env=env)
    _assert_refused(done, marker, f"{uri}: is a pickled model")
    assert not (root / "evil.tif").exists()
    # the control: MLflow's own loader does unpickle it (what predict used to do)
    _in_store(root, env, f"import mlflow.pyfunc; mlflow.pyfunc.load_model({uri!r})")
    assert marker.exists()


def test_a_version_posing_as_ours_with_pickled_weights_runs_no_code(project: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, env = project
    marker = root / "pwned-weights"
    folder = tmp_path / DATA_FOLDER
    _register(root, env, (
        "import json\n"
        f"folder = {str(folder)!r}; os.makedirs(folder)\n"
        f"torch.save({{'weight': RunsCommand({str(marker)!r})}}, os.path.join(folder, {WEIGHTS!r}))\n"
        f"open(os.path.join(folder, {META!r}), 'w').write(json.dumps({{'kind': 'unet'}}))\n"
        f"info = mlflow.pyfunc.log_model(name='model', loader_module={LOADER_MODULE!r}, data_path=folder, registered_model_name='xctsam-unet-posing')\n"
    ))
    done = run_cli("predict", "data/real/Te-1/v0.h5", "--model", "models:/xctsam-unet-posing/1", "--out", "posing.tif", cwd=root, env=env)
    _assert_refused(done, marker, "models:/xctsam-unet-posing/1: its weights.pt is not a PyTorch checkpoint of tensors: it holds a pickled posix.system object, which is not loaded")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_tracking_server_that_is_down_is_one_line_at_once(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    uri = f"http://alice:hunter2@127.0.0.1:{_free_port()}"
    start = time.monotonic()
    done = run_cli("predict", "data/real/Te-1/v0.h5", "--model", "models:/xctsam-unet/1", "--out", "down.tif", cwd=root, env={**env, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and f"http://alice:***@127.0.0.1:{uri.rsplit(':', 1)[1]} does not answer" in err, err
    assert "hunter2" not in err
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://tuner@127.0.0.1:1/optuna?password=s3cr3t&connect_timeout=2", "s3cr3t"),
        ("postgresql://tuner:p@ss@127.0.0.1:1/optuna?connect_timeout=2", "p@ss"),
    ],
    ids=["query-password", "unescaped-at"],
)
def test_a_storage_password_is_never_printed(url: str, secret: str, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    done = run_cli("tune", "show", "--storage", url, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    printed = done.stdout + done.stderr
    assert "127.0.0.1:1/optuna" in printed and "***" in printed, printed
    assert secret not in printed and "ss@127" not in printed, printed


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:a@b/c@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db?sslmode=require&password=x&application_name=y", "postgresql://u@h/db?sslmode=require&password=***&application_name=y"),
        ("https://u:t@mlflow.example:443", "https://u:***@mlflow.example:443"),
        ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_mask_secrets_hides_every_secret_of_the_url() -> None:
    text = 'FATAL: password authentication failed for "u" (tried "a@b/c" and "x")'
    masked = mask_secrets(text, "postgresql://u:a@b/c@h/db?password=x")
    assert "a@b/c" not in masked and '"x"' not in masked and masked.count("***") == 2
