"""`xctsam ui`: the MLflow UI on the project's store, lean and local.

Defaults to 2 processes and ~0.5 GB instead of MLflow's 11 processes and 2.7 GB: one worker
and no job execution (measured: README, MLflow). Bound to 127.0.0.1; Ctrl-C stops the server and its workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from xctsam.util import tracking
from xctsam.util.errors import XctsamError

HOST = "127.0.0.1"


def ui_command(port: int, uri: str) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port), "--workers", "1"]


def serve(port: int = 5000) -> int:
    """Run the UI until Ctrl-C (or SIGTERM); returns the exit code."""
    check_port_free(port)
    experiment = tracking.configure()  # creates the store and experiment, so a fresh project shows them
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return run_server(ui_command(port, tracking.tracking_uri()), env, f"MLflow UI: {runs_url(port, experiment)}  (store {tracking.tracking_uri()}); Ctrl-C stops it")


def runs_url(port: int, experiment_id: str) -> str:
    """The experiment's runs table. MLflow 3's UI keeps a GenAI / model-training switch of its
    own (browser storage, GenAI at first) that decides over the experiment's kind tag; the
    `workflowType` query parameter sets it, so the link opens on runs, not a traces overview."""
    return f"http://{HOST}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_port_free(port: int) -> None:
    """Refuse a port something already listens on, before anything is started or created.

    MLflow's server only logs a failed bind and exits 0, which would read as a clean stop.
    """
    with socket.socket() as probe:
        # SO_REUSEADDR: a port held only by closed connections (TIME_WAIT) is free to serve on
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise XctsamError(f"port {port} on {HOST} is not free ({exc.strerror}); choose another with --port") from None


def run_server(command: list[str], env: dict[str, str], banner: str) -> int:
    """Run a local web server until Ctrl-C (or SIGTERM) stops it and its workers.

    Returns the exit code: 128 + the signal's number when stopped by one (130 for Ctrl-C, as
    for every other command). A server that ends by itself has failed, whatever its code says:
    its own code, or 1 where it claimed success.
    """
    # its own process group, so stopping reaches the server's worker processes too
    server = subprocess.Popen(command, env=env, start_new_session=True)
    print(banner, flush=True)
    stop: dict[str, int] = {}

    def _stop(signum: int, frame: object) -> None:
        stop["signal"] = signum
        os.killpg(server.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if "signal" in stop:
        return 128 + stop["signal"]
    print(f"error: the server stopped by itself (exit code {code})", file=sys.stderr)
    if code < 0:  # killed by signal N: -N
        return 128 - code
    return code or 1
