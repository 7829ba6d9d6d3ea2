"""Reading a finished (or running) study: best trials, parameter importances, the values to apply."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from xctsam.tune.study import TuneError, resolve_storage_url, storage_label


def load_study(study_name: str, storage: str | None) -> Any:
    """An existing study, read-only use; one line when it does not exist."""
    import optuna

    url = resolve_storage_url(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        names = ", ".join(optuna.get_all_study_names(url)) or "none"
        raise TuneError(f"storage {storage_label(url)}: no study '{study_name}' (studies: {names}); check --study-name/--storage") from None


def ranked_trials(study: Any) -> list[Any]:
    """Complete trials, best first for the study's direction."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not math.isnan(trial.value)]
    return sorted(complete, key=lambda trial: trial.value, reverse=study.direction == StudyDirection.MAXIMIZE)


def best_trials_table(study: Any, top: int) -> Table:
    trials = ranked_trials(study)
    keys = sorted({key for trial in trials for key in trial.params})
    table = Table(title=f"study {study.study_name}: best {min(top, len(trials))} of {len(trials)} complete trials ({study.direction.name.lower()})")
    for column in ("trial", "value", *keys, "seconds"):
        table.add_column(column, justify="right")
    for trial in trials[:top]:
        seconds = trial.duration.total_seconds() if trial.duration else math.nan
        table.add_row(str(trial.number), f"{trial.value:.4f}", *(_short(trial.params.get(key)) for key in keys), f"{seconds:.1f}")
    return table


def importances(study: Any) -> dict[str, float]:
    """fANOVA importances of the searched keys; {} while too few complete trials vary them."""
    import optuna

    if len(ranked_trials(study)) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every complete trial drew the same values
        return {}


def state_counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def chosen_values(study: Any, number: int | None) -> tuple[int, dict[str, Any]]:
    """(trial number, its params) of the best complete trial, or of trial `number`."""
    from optuna.trial import TrialState

    if number is None:
        trials = ranked_trials(study)
        if not trials:
            raise TuneError(f"study {study.study_name}: no complete trial yet; run `xctsam tune run` first")
        return trials[0].number, dict(trials[0].params)
    found = [trial for trial in study.get_trials(deepcopy=False) if trial.number == number]
    if not found or found[0].state != TrialState.COMPLETE:
        raise TuneError(f"study {study.study_name}: trial {number} is not a complete trial; see `xctsam tune show`")
    return number, dict(found[0].params)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
