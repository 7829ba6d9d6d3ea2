"""`xctsam tune`: hyperparameter search (Optuna): run, show, apply the best values, dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xctsam.cli.common import DataRootOption, ParamsOption, SeedOption

tune_app = typer.Typer(help="Hyperparameter search (Optuna): run, show, apply the best values, dashboard.", no_args_is_help=True)

StudyOption = Annotated[str | None, typer.Option("--study-name", help="Study name (default xctsam-<tune.model>); the same name continues a study.")]
StorageOption = Annotated[str | None, typer.Option("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db (default: SQLite tune/optuna.db).")]


def _study_name(name: str | None, params: Path) -> str:
    from xctsam.config.params import load_params

    return name or f"xctsam-{load_params(params).tune.model}"


@tune_app.command("run")
def tune_run(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    study_name: StudyOption = None,
    storage: StorageOption = None,
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="The study's total of finished trials, across workers and reruns (default tune.n_trials).")] = None,
    timeout: Annotated[float | None, typer.Option(min=0, help="Seconds after which no new trial starts.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes sharing the study.")] = 1,
    seed: SeedOption = None,
    worker_index: Annotated[int | None, typer.Option(help="Offsets the sampler seed per host (default $SLURM_ARRAY_TASK_ID or 0).")] = None,
) -> None:
    """Search params tune.space: each trial trains on tune.trial settings, scored on held-out validation slices."""
    import os

    from xctsam.tune.study import WorkerSpec, run_workers, study_summary

    index = worker_index if worker_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    spec = WorkerSpec(params, root, _study_name(study_name, params), storage, n_trials, timeout, seed, index)
    code = run_workers(spec, workers)
    summary = study_summary(spec)
    best = summary["best"]
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(summary["states"].items()))
    print(f"study {spec.study_name} ({summary['storage']}): {states}")
    if best is not None:
        print(f"best: trial {best['number']} value {best['value']:.4f} {best['params']}")
    if code:
        raise typer.Exit(code)


@tune_app.command("show")
def tune_show(
    params: ParamsOption = Path("params.yaml"),
    study_name: StudyOption = None,
    storage: StorageOption = None,
    top: Annotated[int, typer.Option(min=1, help="Trials in the table.")] = 10,
) -> None:
    """Best trials as a table, trial states and parameter importances."""
    from rich.console import Console

    from xctsam.tune.results import best_trials_table, importances, load_study, state_counts

    study = load_study(_study_name(study_name, params), storage)
    console = Console()
    console.print(best_trials_table(study, top))
    console.print("trials: " + ", ".join(f"{count} {state.lower()}" for state, count in sorted(state_counts(study).items())))
    weights = importances(study)
    if weights:
        console.print("importance: " + ", ".join(f"{key} {weight:.2f}" for key, weight in weights.items()))
    else:
        console.print("importance: needs at least 2 complete trials with different values")


@tune_app.command("apply")
def tune_apply(
    params: ParamsOption = Path("params.yaml"),
    study_name: StudyOption = None,
    storage: StorageOption = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Apply this trial's values instead of the best's.")] = None,
) -> None:
    """Write the best trial's values into params.yaml (comments and layout kept) for the next `dvc repro`."""
    from xctsam.params_file import update_params_file
    from xctsam.tune.results import chosen_values, load_study

    study = load_study(_study_name(study_name, params), storage)
    number, values = chosen_values(study, trial)
    previous = update_params_file(params, values)
    for key, value in values.items():
        print(f"{key}: {previous[key]} -> {value}")
    print(f"{params}: trial {number}'s values written; `dvc repro` retrains what depends on them")


@tune_app.command("dashboard")
def tune_dashboard(
    storage: StorageOption = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Start optuna-dashboard on the study storage (127.0.0.1); Ctrl-C stops it."""
    from xctsam.tune.dashboard import serve

    raise typer.Exit(serve(storage, port))
