"""`xctsam ui`: the MLflow UI on the project's store, lean and local.

Defaults to 2 processes and ~0.5 GB instead of MLflow's 11 processes and 2.7 GB: one worker
and no job execution (DESIGN.md). Bound to 127.0.0.1; Ctrl-C stops the server and its workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from xctsam import tracking


def ui_command(port: int, uri: str) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def serve(port: int = 5000) -> int:
    """Run the UI until Ctrl-C (or SIGTERM); returns the exit code."""
    tracking.configure()  # creates the store and experiment, so a fresh project shows them
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return run_server(ui_command(port, tracking.tracking_uri()), env, f"MLflow UI: http://127.0.0.1:{port}  (store {tracking.tracking_uri()}); Ctrl-C stops it")


def run_server(command: list[str], env: dict[str, str], banner: str) -> int:
    """Run a local web server until Ctrl-C (or SIGTERM) stops it and its workers; returns the exit code."""
    # its own process group, so stopping reaches the server's worker processes too
    server = subprocess.Popen(command, env=env, start_new_session=True)
    print(banner, flush=True)
    stop = {"requested": False}

    def _stop(signum: int, frame: object) -> None:
        stop["requested"] = True
        os.killpg(server.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stop["requested"] else code
