"""Thread counts: every process sizes torch's pool to the cores it is given; tune workers split
the cores and pin themselves to their share, so parallel work never oversubscribes."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xctsam.params_file import update_params_file
from xctsam.tune.study import WorkerSpec, enter_worker, worker_specs
from xctsam.util.threads import available_cores, split_cores

from .conftest import REPO


def _params(tmp_path: Path, threads_per_worker: int | None) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    update_params_file(path, {"tune.threads_per_worker": threads_per_worker})
    return path


@pytest.mark.parametrize(
    ("cores", "workers", "shares"),
    [
        ([0, 1], 1, [[0, 1]]),
        ([0, 1], 2, [[0], [1]]),
        ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),
        ([4, 5, 6, 7], 3, [[4, 5], [6], [7]]),
        ([0, 1], 3, [[0], [1], [0]]),  # more workers than cores: one core (one thread) each
    ],
)
def test_cores_split_into_contiguous_near_equal_shares(cores: list[int], workers: int, shares: list[list[int]]) -> None:
    assert split_cores(cores, workers) == shares


def _report_worker(spec: WorkerSpec, queue: multiprocessing.Queue) -> None:
    # what a spawned tune worker sets up before its first trial, read back from inside it
    import torch

    threads = enter_worker(spec)
    queue.put((threads, torch.get_num_threads(), sorted(os.sched_getaffinity(0)), os.environ["OMP_NUM_THREADS"]))


def _spawned_worker_settings(spec: WorkerSpec) -> tuple[int, int, list[int], str]:
    context = multiprocessing.get_context("spawn")  # as run_workers starts them
    queue = context.Queue()
    process = context.Process(target=_report_worker, args=(spec, queue))
    process.start()
    settings = queue.get(timeout=120)
    process.join(timeout=60)
    assert process.exitcode == 0
    return settings


@pytest.mark.parametrize("threads_per_worker", [None, 3])
def test_each_tune_worker_takes_its_share_of_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads_per_worker: int | None) -> None:
    monkeypatch.delenv("XCTSAM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(len(available_cores())))  # what the parent CLI exported
    params = _params(tmp_path, threads_per_worker)
    specs = worker_specs(WorkerSpec(params, tmp_path, "study"), workers=2)
    assert [list(spec.cores) for spec in specs] == split_cores(available_cores(), 2)
    assert [spec.worker_index for spec in specs] == [0, 1]
    expected_threads = threads_per_worker or len(specs[-1].cores)
    threads, torch_threads, affinity, omp = _spawned_worker_settings(specs[-1])
    assert (threads, torch_threads, omp) == (expected_threads, expected_threads, str(expected_threads))
    assert affinity == list(specs[-1].cores)


def test_xctsam_threads_overrides_a_workers_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XCTSAM_THREADS", "1")
    params = _params(tmp_path, 4)
    spec = worker_specs(WorkerSpec(params, tmp_path, "study"), workers=1)[0]
    threads, torch_threads, _, omp = _spawned_worker_settings(spec)
    assert (threads, torch_threads, omp) == (1, 1, "1")


def test_xctsam_threads_sizes_a_process_pool_before_torch_loads() -> None:
    probe = "from xctsam.util.threads import size_pool_before_import; size_pool_before_import(); import torch; print(torch.get_num_threads())"
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**env, "XCTSAM_THREADS": "1"}, check=True)
    assert result.stdout.strip() == "1"


def test_a_bad_xctsam_threads_is_one_line_and_exit_2() -> None:
    env = {**os.environ, "XCTSAM_THREADS": "two"}
    result = subprocess.run([str(Path(sys.executable).with_name("xctsam")), "data", "info", "nowhere"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "XCTSAM_THREADS='two'" in lines[0], result.stderr
