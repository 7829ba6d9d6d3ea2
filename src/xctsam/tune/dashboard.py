"""`xctsam tune dashboard`: optuna-dashboard on the study storage, bound to 127.0.0.1.

Run as its own process (its console script) through the same start/stop handling as the MLflow
UI, so Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from xctsam.tune.study import resolve_storage_url, storage_label
from xctsam.ui import run_server


def dashboard_command(url: str, port: int) -> list[str]:
    script = Path(sys.executable).with_name("optuna-dashboard")
    program = str(script) if script.is_file() else shutil.which("optuna-dashboard") or "optuna-dashboard"
    return [program, url, "--host", "127.0.0.1", "--port", str(port)]


def serve(storage: str | None, port: int = 8080) -> int:
    url = resolve_storage_url(storage)
    return run_server(dashboard_command(url, port), dict(os.environ), f"Optuna dashboard: http://127.0.0.1:{port}  (storage {storage_label(url)}); Ctrl-C stops it")
