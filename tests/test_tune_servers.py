"""`xctsam tune dashboard/show/apply` through the console script: the dashboard answers only this
machine's own pages, and a missing, empty or unreachable storage is one line, exit 2, nothing made."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest

from .test_ui import _free_port, get_when_served

XCTSAM = str(Path(sys.executable).with_name("xctsam"))
EVIL = "evil.example.com"


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([XCTSAM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def files_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text("seed: 0\n")  # marks the project root
    return tmp_path


def make_study(project: Path, name: str = "shown") -> str:
    """A study in the project's default storage, made by optuna directly (no trial run)."""
    (project / "tune").mkdir(exist_ok=True)
    storage = f"sqlite:///{project}/tune/optuna.db"
    optuna.create_study(study_name=name, storage=storage)
    return storage


def request(port: int, method: str, path: str, host: str, origin: str | None = None) -> int:
    """The status of one request sent to 127.0.0.1:`port` with the given Host (and Origin) header."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Host": host} | ({"Origin": origin} if origin else {})
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.fixture
def dashboard(project: Path) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    storage = make_study(project)
    port = _free_port()
    server = subprocess.Popen([XCTSAM, "tune", "dashboard", "--port", str(port)], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"http://127.0.0.1:{port}" in server.stdout.readline()
        assert get_when_served(f"http://127.0.0.1:{port}/api/studies", 60) is not None, "the dashboard never answered"
        yield server, port, storage
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ---------------------------------------------------------------- the dashboard answers this machine only
def test_dashboard_refuses_foreign_hosts_and_stops_on_ctrl_c(dashboard: tuple[subprocess.Popen[str], int, str]) -> None:
    server, port, storage = dashboard
    study_id = optuna.load_study(study_name="shown", storage=storage)._study_id
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/api/studies", host) == 200, host
    # a page whose domain re-resolves to 127.0.0.1 (DNS rebinding) sends its own name
    assert request(port, "GET", "/api/studies", EVIL) == 403
    assert request(port, "GET", "/api/studies", f"{EVIL}:{port}") == 403
    assert request(port, "DELETE", f"/api/studies/{study_id}", EVIL) == 403
    # a cross-site request carries the right Host but a foreign Origin
    assert request(port, "DELETE", f"/api/studies/{study_id}", f"127.0.0.1:{port}", origin=f"http://{EVIL}") == 403
    assert optuna.get_all_study_names(storage) == ["shown"]  # still there
    assert request(port, "DELETE", f"/api/studies/{study_id}", f"127.0.0.1:{port}", origin=f"http://127.0.0.1:{port}") == 204
    assert optuna.get_all_study_names(storage) == []  # the dashboard's own page may delete

    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=30) == 130
    assert "Traceback" not in server.stderr.read()
    with socket.socket() as probe:  # the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_dashboard_on_a_taken_port_is_one_line(project: Path) -> None:
    make_study(project)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_cli("tune", "dashboard", "--port", str(taken.getsockname()[1]), cwd=project)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "--port" in done.stderr


# ---------------------------------------------------------------- no study: refused, nothing made
def _empty_storage(project: Path) -> list[str]:
    """A storage with Optuna's tables and no study: the last one deleted."""
    storage = make_study(project, "gone")
    optuna.delete_study(study_name="gone", storage=storage)
    return []


def _empty_file(project: Path) -> list[str]:
    """What the old dashboard left behind on a fresh project: an empty tune/optuna.db."""
    (project / "tune").mkdir()
    (project / "tune" / "optuna.db").write_bytes(b"")
    return []


@pytest.mark.parametrize(
    "setup",
    [
        lambda project: [],
        _empty_storage,
        _empty_file,
        lambda project: ["--storage", f"sqlite:///{project}/missing/x.db"],
        lambda project: ["--storage", "sqlite:///x.db"],
    ],
    ids=["fresh-project", "storage-without-studies", "empty-file", "missing-file", "missing-relative-file"],
)
def test_dashboard_without_a_study_is_refused(project: Path, setup: Callable[[Path], list[str]]) -> None:
    args = setup(project)
    before = files_under(project)
    done = run_cli("tune", "dashboard", "--port", str(_free_port()), *args, cwd=project)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: ") and "no study yet" in done.stderr and "xctsam tune run" in done.stderr
    assert done.stdout == ""  # no banner: nothing was served
    assert files_under(project) == before  # no file, no folder


# ---------------------------------------------------------------- show/apply: bad storages are one line
@pytest.mark.parametrize("command", ["show", "apply"])
@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("nonsense://x", "not a database URL"),
        ("postgresql://nobody:secret@127.0.0.1:1/none", "cannot connect"),  # connection refused
        ("sqlite:////nonexistent/dir/x.db", "no study yet"),
    ],
    ids=["unknown-dialect", "connection-refused", "missing-folder"],
)
def test_show_and_apply_with_a_bad_storage_are_one_line(project: Path, command: str, storage: str, expected: str) -> None:
    before = files_under(project)
    done = run_cli("tune", command, "--study-name", "s", "--storage", storage, cwd=project)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: ") and expected in done.stderr and storage.split("@")[-1] in done.stderr
    assert "secret" not in done.stderr  # the password stays out of messages
    assert files_under(project) == before
    assert not Path("/nonexistent").exists()


@pytest.mark.parametrize("command", ["show", "apply"])
def test_show_and_apply_of_an_unknown_study_are_one_line(project: Path, command: str) -> None:
    make_study(project)
    before = {path: path.stat().st_mtime_ns for path in files_under(project)}
    done = run_cli("tune", command, "--study-name", "nope", cwd=project)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "no study 'nope'" in done.stderr and "shown" in done.stderr
    assert {path: path.stat().st_mtime_ns for path in files_under(project)} == before


# ---------------------------------------------------------------- usage
def test_tune_run_needs_at_least_one_trial(project: Path) -> None:
    done = run_cli("tune", "run", "--n-trials", "0", cwd=project)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr  # passes once cli.main runs Typer in standalone mode
    assert "--n-trials" in done.stdout + done.stderr
    assert files_under(project) == [project / "params.yaml"]

