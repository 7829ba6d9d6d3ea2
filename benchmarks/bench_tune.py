"""Benchmark: what a search costs beyond training, and a 20-trial search with 2 workers.

1. Overhead per trial: one worker process runs --overhead-trials trials on tiny settings, with
   the storage calls (claim: lock + stale check + ask; tell), the MLflow calls (child run,
   metric logging, finish) and the training timed apart; the worker's process start (spawn,
   imports, study and parent run) is spread over its trials. Printed: medians over trials and
   overhead as a share of the trial's training time.
2. A --trials search with --workers workers on the same tiny settings: wall time, best rank
   and expert count, and the spread (min / median / max) of the objective.

Everything runs in a temporary project (tiny volumes written there, no DVC needed).

    .venv/bin/python benchmarks/bench_tune.py [--trials 20] [--workers 2] [--steps 6] [--storage URL]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _timed(owner: object, name: str, bucket: str, spent: dict[str, list[float]]) -> None:
    """Wrap owner.name so each call's duration is added to spent[bucket]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[bucket].append(time.perf_counter() - began)

    setattr(owner, name, wrapper)


def _overhead_worker(spec, started: float, queue: mp.Queue) -> None:
    entered = time.time()
    import optuna

    from xctsam.tune import mlflow_log, objective, study

    spent: dict[str, list[float]] = defaultdict(list)
    _timed(study, "prepare", "setup", spent)
    _timed(study, "_claim", "storage", spent)
    _timed(optuna.Study, "tell", "storage", spent)
    _timed(mlflow_log.TrialRun, "__init__", "mlflow", spent)
    _timed(mlflow_log.TrialRun, "log_metrics", "mlflow_in_training", spent)
    _timed(mlflow_log.TrialRun, "finish", "mlflow", spent)
    _timed(objective.Objective, "__call__", "objective", spent)
    report = study.run_worker(spec)
    queue.put({"spawn_s": entered - started, "spent": dict(spent), "trials": len(report.trials)})


def measure_overhead(spec, trials: int) -> dict:
    from dataclasses import replace

    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_overhead_worker, args=(replace(spec, study_name="overhead", n_trials=trials), time.time(), queue))
    process.start()
    result = queue.get()
    process.join()
    spent, n = result["spent"], result["trials"]
    # storage: every claim (one per trial, plus the last that finds the study full) and tell
    in_training_mlflow = sum(spent["mlflow_in_training"]) / n  # metric logging during training
    training_net = [seconds - in_training_mlflow for seconds in spent["objective"]]
    per_trial = {
        "storage": sum(spent["storage"]) / n,
        "mlflow": (sum(spent["mlflow"]) + sum(spent["mlflow_in_training"])) / n,
        "process start": (result["spawn_s"] + sum(spent["setup"])) / n,
    }
    return {"training_median_s": statistics.median(training_net), "per_trial": per_trial, "spawn_s": result["spawn_s"], "setup_s": sum(spent["setup"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overhead-trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="training steps per trial (tiny settings)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in the temp project)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from tests.test_tune import make_tune_project

    from xctsam.tune.study import WorkerSpec, run_workers

    os.environ.setdefault("XCTSAM_NO_PROGRESS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as folder:
        root = Path(folder)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        make_tune_project(root, params, steps=args.steps, epoch_steps=max(1, args.steps // 2))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        os.chdir(root)
        spec = WorkerSpec(root / "params.yaml", root / "data", "bench", args.storage, args.trials, None, None, 0, root)

        overhead = measure_overhead(spec, args.overhead_trials)
        training = overhead["training_median_s"]
        print(f"tiny trial ({args.steps} steps, {args.overhead_trials} trials, 1 worker): training {training:.2f} s (median)")
        for name, seconds in overhead["per_trial"].items():
            print(f"  {name:14s} {seconds:.3f} s/trial  = {seconds / training:6.1%} of training")
        total = sum(overhead["per_trial"].values())
        print(f"  overhead total {total:.3f} s/trial  = {total / training:6.1%} of training "
              f"(process start {overhead['spawn_s']:.1f} s spawn+imports, {overhead['setup_s']:.1f} s study+parent run, spread over the worker's trials)")

        began = time.perf_counter()
        code = run_workers(spec, args.workers)
        wall = time.perf_counter() - began
        import optuna

        from xctsam.tune.study import resolve_storage_url

        study = optuna.load_study(study_name="bench", storage=resolve_storage_url(args.storage, root))
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        values = sorted(t.value for t in complete)
        states = {s: sum(t.state.name == s for t in study.trials) for s in {t.state.name for t in study.trials}}
        print(f"search: {args.trials} trials, {args.workers} workers: wall {wall:.0f} s ({wall / 60:.1f} min), exit code {code}, states {states}")
        best = study.best_trial
        print(f"  best trial {best.number}: value {best.value:.4f} rank {best.params['sam.lora.rank']} experts {best.params['sam.lora.experts']} lr {best.params['train.sam.lr']:.2e}")
        print(f"  objective spread: min {values[0]:.4f} median {statistics.median(values):.4f} max {values[-1]:.4f}")


if __name__ == "__main__":
    main()
