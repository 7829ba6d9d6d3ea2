"""`xctsam ui` serves the project's MLflow store on 127.0.0.1 and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
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


def get_when_served(url: str, seconds: float) -> tuple[int, bytes] | None:
    """(status, body) of the first answered GET of `url` within `seconds`, None if none answered."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except OSError:
            time.sleep(0.5)
    return None


def test_ui_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen([sys.executable, "-m", "xctsam.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        # the link opens the experiment's runs in MLflow 3's model-training view, not its GenAI overview
        assert re.search(rf"http://127\.0\.0\.1:{port}/#/experiments/\d+/runs\?workflowType=machine_learning ", ui.stdout.readline())
        answer = get_when_served(f"http://127.0.0.1:{port}/", 120)
        assert answer is not None and answer[0] == 200
        assert (tmp_path / "mlruns" / "mlflow.db").is_file()  # the project's own store
        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=60) == 130  # stopped by Ctrl-C: 128 + SIGINT, as every command
        with socket.socket() as probe:  # the port is free again: no server process left behind
            # The server closed the answered connection, so the port may hold a TIME_WAIT entry;
            # SO_REUSEADDR lets a new listener bind over that (as uvicorn does) but never over a live one.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen()
    finally:
        if ui.poll() is None:
            ui.kill()
