"""`xctsam ui` serves the project's MLflow store on 127.0.0.1 and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ui_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen([sys.executable, "-m", "xctsam.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert f"http://127.0.0.1:{port}" in ui.stdout.readline()
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    status = response.status
            except OSError:
                time.sleep(1)
        assert status == 200
        assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the project's own store
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=60) == 0
        with socket.socket() as probe:  # the port is free again: no server process left behind
            probe.bind(("127.0.0.1", port))
    finally:
        if ui.poll() is None:
            ui.kill()
