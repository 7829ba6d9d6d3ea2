"""Reading a finished (or running) study: best trials, parameter importances, the values to apply.

Reading never writes: no tune/ folder, no SQLite file, no Optuna tables in someone's database.
A storage that cannot be read, or holds no study yet, is one line (TuneError) naming the URL
without its password.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from xctsam.tune.study import DB_NAME, TuneError, check_storage_url, storage_label, tune_dir
from xctsam.util.urls import mask_secrets


def read_storage_url(storage: str | None) -> str:
    """The storage to read: `storage`, or the project's SQLite file (unlike resolve_storage_url,
    which makes its folder for a search about to write there)."""
    return check_storage_url(storage) if storage else f"sqlite:///{tune_dir() / DB_NAME}"


def open_study_storage(storage: str | None) -> Any:
    """The RDBStorage at `storage` holding at least one study, opened without creating anything."""
    import optuna

    url = read_storage_url(storage)
    if _missing_sqlite_file(url):  # connecting would create it
        raise _no_study_yet(url, " (no such file)")
    if not _has_optuna_tables(url):
        raise _no_study_yet(url)
    try:
        # skip_table_creation: the tables are there (checked above), and this is no place to add them
        opened = optuna.storages.RDBStorage(url, skip_table_creation=True)
    except RuntimeError as exc:  # tables of another Optuna version; the message says how to upgrade
        raise TuneError(f"storage {storage_label(url)}: {exc}") from None
    if not opened.get_all_studies():
        raise _no_study_yet(url)
    return opened


def _no_study_yet(url: str, why: str = "") -> TuneError:
    return TuneError(f"storage {storage_label(url)}: no study yet{why}; run `xctsam tune run` first, or point --storage at the study's database")


def _database_url(url: str) -> Any:
    """SQLAlchemy's parsed URL; one line when `url` is none."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError as exc:
        raise _not_a_database_url(url, exc) from None


def _not_a_database_url(url: str, exc: Exception) -> TuneError:
    return TuneError(f"storage {storage_label(url)}: not a database URL ({_first_line(exc, url)}); use e.g. sqlite:///tune/optuna.db or postgresql://user@host/db")


def _missing_sqlite_file(url: str) -> bool:
    parsed = _database_url(url)
    in_memory = parsed.database in (None, "", ":memory:")
    return parsed.get_backend_name() == "sqlite" and not in_memory and not Path(parsed.database).is_file()


def _has_optuna_tables(url: str) -> bool:
    """Whether the database at `url` holds Optuna's tables; one line when it cannot be reached."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, DBAPIError

    label = storage_label(url)
    try:
        engine = sqlalchemy.create_engine(_database_url(url))
    except ArgumentError as exc:  # NoSuchModuleError (an unknown dialect) is one
        raise _not_a_database_url(url, exc) from None
    except ImportError as exc:  # a dialect whose driver package is not installed
        raise TuneError(f"storage {label}: its database driver is missing ({_first_line(exc, url)}); use a postgresql:// or sqlite:/// URL") from None
    try:
        with engine.connect() as connection:
            return sqlalchemy.inspect(connection).has_table("studies")
    except DBAPIError as exc:
        raise TuneError(f"storage {label}: cannot connect ({_first_line(exc.orig, url)}); check the URL and that the database server runs") from None
    finally:
        engine.dispose()


def _first_line(exc: BaseException, url: str) -> str:
    """The first line of an error, with the URL's password (should a driver echo it) masked."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return mask_secrets(text, url)


def load_study(study_name: str, storage: str | None) -> Any:
    """An existing study, read-only use; one line when it or its storage does not exist."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_study_storage(storage)
    try:
        return optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = ", ".join(study.study_name for study in opened.get_all_studies())
        raise TuneError(f"storage {storage_label(read_storage_url(storage))}: no study '{study_name}' (studies: {names}); check --study-name/--storage") from None


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
